"""RTT decomposition: where each decoding step's time goes, and tokens/s at any round-trip time.

With no arguments it starts a cloud server process and the WAN emulator on
loopback (default model), runs sequential and lookahead at RTTs 0, 20, 40, 80
and 120 ms over a prompt set, fits the decomposition model, reports its
leave-one-RTT-out cross-validation error and projects tokens/s at --project
RTTs.  Writes experiment_data/rtt_analysis.json and rtt_analysis.png.
With --cloud URL it measures a real remote server instead (no emulator: the RTT
is whatever the link has; pass --rtts 0).  With a drafter (the model's default, or
--drafter), lookahead runs once more without it, as the row lookahead-model-free.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import (
    HelpFormatter, add_drafter_arg, add_model_args, add_testbed_args, drafter_problem, fail, model_problem,
)
from ..config import MODES, OUT_HELP, experiment_out


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--rtts", type=floats, default=[0, 20, 40, 80, 120], help="emulated RTTs in ms, comma-separated")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["sequential", "lookahead"],
                   help="decoding modes to measure")
    p.add_argument("--project", type=floats, default=[10, 20, 40, 80], help="RTTs (ms) to project tokens/s at")
    p.add_argument("--per-category", type=int, default=2, help="prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--max-verify", type=int, default=None, help="pin lookahead's tree size (default: chosen by cost)")
    add_testbed_args(p)
    add_drafter_arg(p)
    p.add_argument("--quick", action="store_true", help="smoke run: RTTs 0,40,80, 1 prompt per category, 12 tokens")
    p.add_argument("--out", type=Path, default=experiment_out("rtt_analysis.json"), help=OUT_HELP)
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    args = build_parser(prog).parse_args(argv)
    if args.quick:
        args.rtts, args.per_category, args.max_new_tokens = [0, 40, 80], 1, 12
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if problem := model_problem(args.model) or drafter_problem(args.model, args.drafter):
        return fail(problem)
    from ..experiments import rows_for, rtt
    from ..experiments.plots import rtt_figure
    from ..experiments.record import provenance, write_json
    from ..experiments.testbed import settings, testbed_for
    from ..models import ModelError

    if args.cloud and any(args.rtts):
        print("note: with --cloud the emulator adds these RTTs on top of the real link's")
    options = {"lookahead": {"max_verify": args.max_verify}}
    try:
        with testbed_for(args) as bed:
            rows = rows_for(args.modes, options, drafter=bed.local.drafter is not None)
            records = rtt.measure(bed, args.rtts, rows, args.per_category, args.max_new_tokens)
            local = bed.local
    except ModelError as exc:
        return fail(exc)
    measured = rtt.aggregate(records)
    model = rtt.Decomposition(records)
    cv = rtt.cross_validate(records, measured) if len(args.rtts) > 2 else None
    projection = {m: {rtt.key(x): model.tokens_per_second(m, x) for x in args.project} for m in rows}
    write_json(args.out, {**provenance(settings(args, local), local.model_dir), "measured": measured,
                          "model": model.as_dict(), "cross_validation": cv, "projection": projection, "runs": records})
    rtt_figure(args.out.with_suffix(".png"), measured, model, args.project)
    for mode in rows:
        row = "  ".join(f"{r} ms: {v['tokens_per_second']:.2f}" for r, v in measured[mode].items())
        print(f"{mode:>10} tokens/s  {row}")
    if cv:
        print(f"leave-one-RTT-out error: mean {100 * cv['mean_abs_error']:.1f}%, max {100 * cv['max_abs_error']:.1f}%")
    for mode, proj in projection.items():
        print(f"{mode:>10} projected  " + "  ".join(f"{r} ms: {v:.2f}" for r, v in proj.items()))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0
