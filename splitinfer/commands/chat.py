"""Chat with a split model directly (local layers here, middle layers on the cloud server; no relay).

With --prompt it runs once; with --json it prints one JSON object (text, token_ids,
new_tokens, steps, decode_seconds, tokens_per_second, per-step timings).  Without
--prompt it is a chat REPL that keeps the conversation's history: Ctrl-C stops an
answer half way (the partial answer is dropped from the history); Ctrl-C or Ctrl-D
at the prompt leaves.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..cli import (
    HelpFormatter, add_local_args, add_model_args, drafter_problem, fail, model_problem, read_token, setup,
)

if TYPE_CHECKING:  # the real imports wait until the arguments are parsed
    from ..local import Generation, LocalSide

INTERRUPTED = "(answer stopped; it is not kept in the conversation)"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, random=True)
    add_local_args(p)
    p.add_argument("--prompt", default=None, help="generate once for this prompt and exit")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="with --prompt: print one JSON object instead of text")
    p.add_argument(
        "--trace", type=Path, default=None,
        help="append one JSON line per decoding step (tokens verified, local/cloud/network/serialisation ms) to FILE",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def generate(local: LocalSide, args: argparse.Namespace, prompt_ids: list[int], stream: bool) -> Generation:
    from ..remote import cloud_session, ws_url
    from ..serve.text import TextStream

    url = ws_url(args.cloud, args.cloud_ws)
    text = TextStream(local.decode)  # holds back a character whose bytes span two tokens

    def show(chunk: list[int]) -> None:
        print(text.push(chunk), end="", flush=True)

    token = read_token(args.auth_token_file)
    with cloud_session(url, token, expected=local.identity, reconnect_timeout=args.reconnect_timeout) as span:
        g = local.generate(span, prompt_ids, args.max_new_tokens, args.mode, on_tokens=show if stream else None)
    if stream:
        print(text.finish(), end="", flush=True)
    if args.trace:
        with args.trace.open("a") as f:
            for i, (step, accepted) in enumerate(zip(g.timings, g.per_step)):
                f.write(json.dumps({"step": i + 1, "mode": args.mode, "accepted": accepted, **step}) + "\n")
    return g


def stats(g: Generation) -> str:
    per = sum(g.per_step) / g.steps if g.steps else 0.0
    return f"[{len(g.token_ids)} tokens, {g.steps} steps, {per:.2f} tokens/step, {g.tokens_per_second:.2f} tokens/s]"


def one_shot(local: LocalSide, args: argparse.Namespace) -> int:
    from ..experiments.record import peak_rss_mb

    g = generate(local, args, local.encode(args.prompt, args.raw), stream=not args.json)
    if args.json:
        extra = {"mode": args.mode, "model": str(local.model_dir),
                 "drafter": str(local.drafter_path) if local.drafter_path else None,
                 "peak_rss_mb": round(peak_rss_mb(), 1)}
        print(json.dumps({**extra, **g.as_dict()}))
    else:
        print("\n" + stats(g), file=sys.stderr)
    return 0


def read_line() -> str | None:
    """The user's next line; None to leave (an empty line, Ctrl-D or Ctrl-C at the prompt)."""
    try:
        line = input("\nyou> ").strip()
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return None
    return line or None


def repl(local: LocalSide, args: argparse.Namespace) -> int:
    history: list[dict] = []
    print("splitinfer chat: empty line, Ctrl-D or Ctrl-C to quit, /reset to forget the conversation; "
          "Ctrl-C during an answer stops it", file=sys.stderr)
    while (line := read_line()) is not None:
        if line == "/reset":
            history.clear()
            continue
        print("model> ", end="", flush=True)
        try:
            g = generate(local, args, local.encode(line, args.raw, history), stream=True)
        except KeyboardInterrupt:  # leaving the session's `with` closed it; the cloud drops its cache
            print("\n" + INTERRUPTED, file=sys.stderr, flush=True)
            continue
        print("\n" + stats(g), file=sys.stderr)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": g.text}]
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if problem := model_problem(args.model, weights=args.random_weights is None) or drafter_problem(args.model, args.drafter):
        return fail(problem)
    setup(args)
    from ..local import LocalSide
    from ..models import ModelError
    from ..remote import CloudError

    try:
        local = LocalSide(
            args.model, args.cloud_start, args.cloud_end, args.device, args.dtype, args.kernels, args.drafter,
            memory_dir=None if args.no_memory else args.memory_dir, seed=args.random_weights,
        )
    except ModelError as exc:
        return fail(exc)
    try:
        return one_shot(local, args) if args.prompt is not None else repl(local, args)
    except CloudError as exc:
        print(file=sys.stderr)  # ends a half-written answer
        return fail(exc)
    except KeyboardInterrupt:  # during a one-shot answer
        print(file=sys.stderr)
        return 130
    finally:
        local.close()  # keeps lookahead's memory for the next run
