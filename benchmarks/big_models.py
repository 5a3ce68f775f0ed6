#!/usr/bin/env python3
"""The seed's model sizes (Mistral 7B, Mistral NeMo 12B) on this machine, with weights drawn from a seed.

For each --like shape: the unsplit model's greedy tokens (when it fits in memory), a real cloud process
and a real local side generating through it (when both fit at once; else each alone), every process's
peak resident memory (VmHWM) and the bytes of weights each side holds, beside the spec's local figures
(2.0 GB for 7B, 4.9 GB for 12B, on a GPU in float16).  See splitinfer/experiments/big.py.  Takes about
10 minutes for both shapes on 2 cores; writes experiment_data/big_models.json with provenance; asserts
nothing (`make test-big` does, on its own run).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from splitinfer.cli import HelpFormatter
from splitinfer.config import OUT_HELP, experiment_out
from splitinfer.experiments.big import measure
from splitinfer.experiments.record import provenance, write_json
from splitinfer.random_model import LIKE

SPEC_LOCAL_GB = {"mistral-7b": 2.0, "mistral-nemo-12b": 4.9}  # the seed README's "Local VRAM usage (split mode)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--like", nargs="+", choices=sorted(LIKE), default=["mistral-7b", "mistral-nemo-12b"],
                   help="the published shapes to measure")
    p.add_argument("--seed", type=int, default=0, help="the weights are drawn from it (--random-weights SEED)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="both sides' dtype (bfloat16: a 7B model's 14.5 GB fit this 24 GB machine)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every process (they run one at a time "
                   "except the cloud, which waits while the local side computes)")
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens to generate and compare")
    p.add_argument("--out", type=Path, default=experiment_out("big_models.json"), help=OUT_HELP)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = []
    with tempfile.TemporaryDirectory(prefix="big-models-") as tmp:
        for like in args.like:
            result = measure(like, Path(tmp), args.seed, args.dtype, args.threads, args.tokens)
            result["spec_local_gb"] = SPEC_LOCAL_GB[like]
            shapes.append(result)
            print(summary(result))
    settings = {"like": args.like, "seed": args.seed, "dtype": args.dtype, "threads": args.threads,
                "tokens": args.tokens}
    write_json(args.out, {**provenance(settings, "random weights: " + ", ".join(args.like)), "shapes": shapes})
    print(f"wrote {args.out}")
    return 0


def summary(r: dict) -> str:
    gb = 1e9
    parts = [f"{r['like']}: local weights {r['weights_bytes']['local'] / gb:.2f} GB, peak {r['local']['VmHWM'] / gb:.2f}"
             f" GB (spec {r.get('spec_local_gb')} GB); cloud weights {r['weights_bytes']['cloud'] / gb:.2f} GB, "
             f"peak {r['cloud']['VmHWM'] / gb:.2f} GB"]
    if "tokens" in r["reference"]:
        parts.append(f"unsplit peak {r['reference']['VmHWM'] / gb:.2f} GB; split == unsplit: {r['split_equals_unsplit']}")
    return "; ".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
