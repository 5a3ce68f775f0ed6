"""Start a cloud server process on loopback and generate once through it (the default model unless --model)."""

from __future__ import annotations

import argparse
import json
import sys

from ..cli import add_model_args, fail, model_problem, setup
from ..config import DEFAULT_MODE, MODES

PROMPT = "Explain in two sentences why the sky is blue."


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", default=PROMPT, help="what to ask")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE, help="decoding strategy (all give the same tokens)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--cloud-threads", type=int, default=1, help="torch threads of the cloud process")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    """Cloud server process + one generation through it, on loopback."""
    if problem := model_problem(args.model):
        return fail(problem)
    setup(args)
    from ..local import LocalSide
    from ..models import ModelError
    from ..procs import cloud_process
    from ..remote import cloud_session, ws_url

    try:  # prepares the default model if needed
        local = LocalSide(args.model, device=args.device, dtype=args.dtype, kernels=args.kernels)
    except ModelError as exc:
        return fail(exc)
    print(f"starting a cloud server process (layers {local.split.cloud_layers.start}.."
          f"{local.split.cloud_layers.stop - 1}) on loopback ...", file=sys.stderr)
    with cloud_process(local.model_dir, threads=args.cloud_threads, extra=local.cloud_args()) as (url, _):
        with cloud_session(ws_url(url), expected=local.identity) as span:
            print(f"\nprompt: {args.prompt}\n", file=sys.stderr)
            g = local.generate(
                span, local.encode(args.prompt), args.max_new_tokens, args.mode,
                on_tokens=lambda c: print(local.tokenizer.decode(c, skip_special_tokens=True), end="", flush=True),
            )
    print()
    per_round_trip = sum(g.per_step) / g.steps if g.steps else 0.0
    print(f"mode {args.mode}: {len(g.token_ids)} tokens in {g.steps} round trips, {per_round_trip:.2f} tokens per "
          f"round trip, {g.tokens_per_second:.2f} tokens/s", file=sys.stderr)
    summary = {k: v for k, v in g.as_dict().items() if k not in ("timings", "token_ids", "accepted_per_step", "text")}
    print(json.dumps({"mode": args.mode, **summary}), file=sys.stderr)
    return 0
