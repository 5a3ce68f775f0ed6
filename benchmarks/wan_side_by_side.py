#!/usr/bin/env python3
"""Sequential vs lookahead through the WAN emulator, same prompts, one run.

Reports each mode's tokens/s, their ratio, and for sequential the share of its
physical limit reached: limit = 1 / (RTT + measured local + cloud compute per
step).  With a drafter (the model's default, or --drafter), lookahead also runs
on the model-free guesses alone, as a third row.  Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from splitinfer.cli import HelpFormatter, add_drafter_arg, add_model_args, add_testbed_args
from splitinfer.config import OUT_HELP, experiment_out
from splitinfer.decoding.lookahead import SOURCES, Memory
from splitinfer.experiments import prompts as prompt_sets
from splitinfer.experiments.record import provenance, write_json
from splitinfer.experiments import MODEL_FREE
from splitinfer.experiments.side_by_side import summarise
from splitinfer.experiments.testbed import settings, testbed_for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--rtt-ms", type=float, default=80.0, help="emulated round-trip time")
    p.add_argument("--per-category", type=int, default=3, help="prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-verify", type=int, default=None, help="pin lookahead's tree size (default: chosen by cost)")
    add_testbed_args(p, existing_cloud=False)
    add_drafter_arg(p)
    p.add_argument("--out", type=Path, default=experiment_out("wan_side_by_side.json"), help=OUT_HELP)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = prompt_sets.load(per_category=args.per_category)
    with testbed_for(args, rtt_ms=args.rtt_ms) as bed:
        # (row, mode, options); with a drafter, lookahead once more on the model-free guesses alone.
        rows = [("sequential", "sequential", {}), ("lookahead", "lookahead", {"max_verify": args.max_verify, "memory": Memory()})]
        if bed.local.drafter is not None:
            free = {"max_verify": args.max_verify, "memory": Memory(), "sources": SOURCES - {"draft"}}
            rows.append((MODEL_FREE, "lookahead", free))
        runs: dict[str, list[dict]] = {row: [] for row, _, _ in rows}
        for p in prompts:  # the rows interleaved per prompt, so that machine drift spreads over all of them
            ids = bed.local.encode(p["prompt"])
            for row, mode, opts in rows:
                g = bed.generate(ids, mode, args.max_new_tokens, **opts)
                runs[row].append({"category": p["category"], "prompt": p["prompt"], **g.as_dict()})
        side = bed.local
    summary, ratio = summarise(runs, args.rtt_ms)
    seq, la = summary["sequential"], summary["lookahead"]
    write_json(args.out, {**provenance(settings(args, side), side.model_dir), "summary": summary, "lookahead_over_sequential": ratio, "runs": runs})
    print(f"at {args.rtt_ms:g} ms RTT: sequential {seq['tokens_per_second']:.2f} tok/s "
          f"({100 * seq['share_of_physical_limit']:.1f}% of its limit {seq['physical_limit_tokens_per_second']:.2f}), "
          f"lookahead {la['tokens_per_second']:.2f} tok/s ({la['tokens_per_step']:.2f} tokens/step), ratio {ratio:.2f}x")
    if free := summary.get(MODEL_FREE):
        print(f"{MODEL_FREE}: {free['tokens_per_second']:.2f} tok/s ({free['tokens_per_step']:.2f} tokens/step), "
              f"ratio {free['tokens_per_second'] / seq['tokens_per_second']:.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
