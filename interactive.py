#!/usr/bin/env python3
"""Chat with a split model directly (local layers here, middle layers on the cloud server; no relay).

With --prompt it runs once; with --json it prints one JSON object (text, token_ids,
new_tokens, steps, decode_seconds, tokens_per_second, per-step timings).  Without
--prompt it is a chat REPL that keeps the conversation's history.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from splitinfer.cli import add_local_args, add_model_args, read_token, setup
from splitinfer.decoding.strategies import STRATEGIES
from splitinfer.experiments.record import peak_rss_mb
from splitinfer.local import Generation, LocalSide
from splitinfer.remote import CloudError, cloud_session, ws_url
from splitinfer.serve.text import TextStream


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    add_local_args(p, sorted(STRATEGIES))
    p.add_argument("--prompt", default=None, help="generate once for this prompt and exit")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="with --prompt: print one JSON object instead of text")
    p.add_argument(
        "--trace", type=Path, default=None,
        help="append one JSON line per decoding step (tokens verified, local/cloud/network/serialisation ms) to FILE",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def generate(local: LocalSide, args: argparse.Namespace, prompt_ids: list[int], stream: bool) -> Generation:
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    local = LocalSide(args.model, args.split_after, args.resume_at, args.device, args.dtype, args.kernels)
    try:
        if args.prompt is not None:
            g = generate(local, args, local.encode(args.prompt, args.raw), stream=not args.json)
            if args.json:
                extra = {"mode": args.mode, "model": str(local.model_dir), "peak_rss_mb": round(peak_rss_mb(), 1)}
                print(json.dumps({**extra, **g.as_dict()}))
            else:
                print("\n" + stats(g), file=sys.stderr)
            return 0
        history: list[dict] = []
        print("splitinfer chat: empty line or Ctrl-D to quit, /reset to forget the conversation", file=sys.stderr)
        while True:
            try:
                line = input("\nyou> ").strip()
            except EOFError:
                return 0
            if not line:
                return 0
            if line == "/reset":
                history.clear()
                continue
            print("model> ", end="", flush=True)
            g = generate(local, args, local.encode(line, args.raw, history), stream=True)
            print("\n" + stats(g), file=sys.stderr)
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": g.text}]
    except CloudError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
