#!/usr/bin/env python3
"""Cost of one decoding step by the number of tokens verified (K), through a real cloud process.

For each K the local side sends a K-token block on top of a fixed context and
rolls it back, many times; the median local, cloud, serialisation and total
milliseconds are reported, once with transformers' own attention and linear
layers ("torch", before) and once with splitinfer/kernels.py ("auto", after).
This is the curve the lookahead budget trades against (budget.py).  Measures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from splitinfer.cli import HelpFormatter, add_model_args, add_testbed_args
from splitinfer.config import OUT_HELP, experiment_out
from splitinfer.kernels import KERNELS
from splitinfer.experiments.record import provenance, write_json
from splitinfer.experiments.testbed import settings, testbed_for
from splitinfer.local import LocalSide
from splitinfer.remote import cloud_session


WARM_UP_S = 2.0  # of one-token steps before anything is timed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, kernels=False)  # --compare names the kernels
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--context", type=int, default=256, help="tokens already in the cache")
    p.add_argument("--repeats", type=int, default=15)
    add_testbed_args(p, existing_cloud=False)
    p.add_argument(
        "--compare",
        choices=KERNELS,
        nargs="+",
        default=["torch", "auto"],
        help="kernels to measure, each with its own cloud process: torch (transformers' sdpa and nn.Linear, "
        "'before') and auto (splitinfer/kernels.py, 'after')",
    )
    p.add_argument("--out", type=Path, default=experiment_out("step_cost.json"), help=OUT_HELP)
    return p.parse_args(argv)


def measure(args: argparse.Namespace, kernels: str) -> tuple[list[dict], LocalSide]:
    """Median step cost per block size K, with both sides using `kernels`."""
    rows = []
    with testbed_for(argparse.Namespace(**vars(args), kernels=kernels)) as bed:
        with cloud_session(bed.url, expected=bed.local.identity) as span:
            lm = bed.local.model(span)
            lm.prefill([(7 * i) % 1000 + 100 for i in range(args.context)])
            # A GPU idles at a low clock and takes a while to raise it: without this the first size
            # measured (K=1) came out slower than K=2 on an H200.
            deadline = time.perf_counter() + WARM_UP_S
            while time.perf_counter() < deadline:
                lm.forward([5])
                lm.commit([])
            for k in args.sizes:
                block = [(11 * i) % 1000 + 50 for i in range(k)]
                walls = []
                lm.take_timings()  # the warm-up's and the previous sizes' forwards
                for _ in range(args.repeats + 2):
                    t0 = time.perf_counter()
                    lm.forward(block)
                    lm.commit([0])  # keep one token, drop the rest: the cache is back to context + 1
                    walls.append((time.perf_counter() - t0) * 1000)
                    lm.forward([5])  # the crop rides on this forward; then roll back to the context
                    lm.commit([])
                steps = lm.take_timings()[::2][2:]  # the K-token forwards, past the first two
                rows.append({
                    "tokens": k,
                    "total_ms": statistics.median(walls[2:]),
                    "local_ms": statistics.median(t.local_before_ms + t.local_after_ms for t in steps),
                    "cloud_ms": statistics.median(t.cloud_ms for t in steps),
                    "serialize_ms": statistics.median(t.serialize_ms for t in steps),
                    "network_ms": statistics.median(t.network_ms for t in steps),
                })
                r = rows[-1]
                print(f"{kernels:5s} K={k:3d}: {r['total_ms']:7.1f} ms (local {r['local_ms']:.1f}, cloud {r['cloud_ms']:.1f})")
        return rows, bed.local


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = {}
    for kernels in args.compare:
        results[kernels], local = measure(args, kernels)
    run = settings(args, local)
    write_json(args.out, {**provenance(run, local.model_dir), "kernels": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
