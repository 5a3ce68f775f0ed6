"""Output identity check: sequential, Jacobi and lookahead through a real cloud server process
vs the full, unsplit model's Hugging Face greedy `generate`.

Reports token-level and exact-sequence agreement, each output's perplexity under
the full model, and for any difference the first differing position and the full
model's top-2 logit margin there.  With a drafter (the model's default, or --drafter),
lookahead runs once more without it, as the row lookahead-model-free.  Writes
experiment_data/perplexity_comparison.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import (
    HelpFormatter, add_drafter_arg, add_model_args, add_testbed_args, drafter_problem, fail, model_problem,
)
from ..config import MODES, OUT_HELP, experiment_out


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--modes", nargs="+", choices=MODES, default=["sequential", "jacobi", "lookahead"],
                   help="decoding modes to compare")
    p.add_argument("--per-category", type=int, default=10, help="prompts per category (at most 10)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--max-verify", type=int, default=None, help="lookahead tree size (default: chosen by cost)")
    p.add_argument("--block", type=int, default=8, help="Jacobi block size")
    add_testbed_args(p)
    add_drafter_arg(p)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 prompt per category, 16 tokens")
    p.add_argument("--out", type=Path, default=experiment_out("perplexity_comparison.json"), help=OUT_HELP)
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    if args.quick:
        args.per_category, args.max_new_tokens = 1, 16
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if problem := model_problem(args.model) or drafter_problem(args.model, args.drafter):
        return fail(problem)
    from ..experiments import identity, rows_for
    from ..experiments.record import provenance, write_json
    from ..experiments.testbed import settings, testbed_for
    from ..models import ModelError

    options = {"jacobi": {"block": args.block}, "lookahead": {"max_verify": args.max_verify}}
    try:
        with testbed_for(args) as bed:
            rows = rows_for(args.modes, options, drafter=bed.local.drafter is not None)
            data = identity.run(bed, rows, args.per_category, args.max_new_tokens)
            write_json(args.out, {**provenance(settings(args, bed.local), bed.local.model_dir), **data})
    except ModelError as exc:
        return fail(exc)
    for key, s in data["summary"].items():
        print(f"{key:>24}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    print(f"wrote {args.out}")
    return 0
