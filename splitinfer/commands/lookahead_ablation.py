"""Lookahead ablation: n-gram size (n = 3..7), candidate sources and verify budget, by prompt category.

Runs every configuration over the project's prompt sets (splitinfer/prompts/*.json:
code, structured, conversational, creative) through a real cloud server process on
loopback (optionally behind the WAN emulator), and writes tokens per round trip and
tokens per second to experiment_data/lookahead_ablation.json with a PNG.  With a
drafter (--drafter, or the model's default), the source sweep adds the drafter
alone and the model-free sources without it, and the headline runs again without the
drafter, for the figure beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import (
    HelpFormatter, add_drafter_arg, add_model_args, add_testbed_args, drafter_problem, fail, model_problem,
)
from ..config import OUT_HELP, experiment_out


def budget(text: str) -> int | None:
    return None if text == "cost" else int(text)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--ngrams", type=int, nargs="+", default=[3, 4, 5, 6, 7], help="n-gram sizes to sweep")
    p.add_argument("--main-budget", type=int, default=64,
                   help="tree size of the headline run over the whole prompt set (with a drafter, run again without it)")
    p.add_argument("--main-per-category", type=int, default=10, help="prompts per category of the headline run")
    p.add_argument("--budgets", type=budget, nargs="+", default=[16, 32, 96, None],
                   help="tree sizes (nodes verified per step) to sweep; 'cost' = chosen by measured cost "
                   "(default: 16 32 96 cost; the headline is the 64 point)")
    p.add_argument("--base-budget", type=int, default=32, help="tree size for the n-gram and source sweeps")
    p.add_argument("--per-category", type=int, default=3, help="prompts per category of the sweeps (at most 10)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="emulated round-trip time to the cloud")
    add_testbed_args(p)
    add_drafter_arg(p)
    p.add_argument("--quick", action="store_true", help="a smoke run: n=3,4, budget 8, 1 prompt per category, 16 tokens")
    p.add_argument("--out", type=Path, default=experiment_out("lookahead_ablation.json"), help=OUT_HELP)
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    if args.quick:
        args.ngrams, args.budgets, args.base_budget, args.per_category, args.max_new_tokens = [3, 4], [8], 8, 1, 16
        args.main_budget, args.main_per_category = 8, 1
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if problem := model_problem(args.model) or drafter_problem(args.model, args.drafter):
        return fail(problem)
    from ..experiments import ablation, prompts
    from ..experiments.plots import grouped_bars
    from ..experiments.record import provenance, write_json
    from ..experiments.testbed import settings, testbed_for
    from ..models import ModelError

    try:
        with testbed_for(args, rtt_ms=args.rtt_ms) as bed:
            cfgs = ablation.configs(args.ngrams, args.budgets, args.base_budget, args.main_budget,
                                    args.main_per_category, drafter=bed.local.drafter is not None)
            data = ablation.run(bed, cfgs, args.per_category, args.max_new_tokens)
            run = settings(args, bed.local) | {"budgets": [b or "cost" for b in args.budgets]}
            result = {**provenance(run, bed.local.model_dir), **data}
    except ModelError as exc:
        return fail(exc)
    write_json(args.out, result)
    cats = ["all", *prompts.CATEGORIES]
    series = {c["config"]["name"]: [c["summary"].get(k, {}).get("tokens_per_step", 0.0) for k in cats]
              for c in data["configs"]}
    grouped_bars(args.out.with_suffix(".png"), "Lookahead: tokens per round trip", "tokens / step", cats, series)
    for c in data["configs"]:
        s = c["summary"]
        print(f"{c['config']['name']:>16}: " + "  ".join(f"{k} {s[k]['tokens_per_step']:.2f}" for k in cats if k in s)
              + f"  | {s['all']['tokens_per_second']:.2f} tok/s")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0
