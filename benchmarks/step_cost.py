#!/usr/bin/env python3
"""Cost of one decoding step by the number of tokens verified (K), through a real cloud process.

For each K the local side sends a K-token block on top of a fixed context and
rolls it back, many times; the median local, cloud, serialisation and total
milliseconds are reported.  This is the curve the lookahead budget trades
against (budget.py).  Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from splitinfer.cli import add_model_args
from splitinfer.experiments.record import provenance, write_json
from splitinfer.experiments.testbed import testbed
from splitinfer.procs import ROOT
from splitinfer.remote import cloud_session


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--context", type=int, default=256, help="tokens already in the cache")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--cloud-threads", type=int, default=1)
    p.add_argument("--label", default="current", help="name of this measurement in the JSON (e.g. before/after)")
    p.add_argument("--out", type=Path, default=ROOT / "experiment_data" / "step_cost.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    with testbed(args.model, cloud_threads=args.cloud_threads, local_threads=args.threads or 1) as bed:
        with cloud_session(bed.url) as span:
            lm = bed.local.model(span)
            lm.prefill([(7 * i) % 1000 + 100 for i in range(args.context)])
            for k in args.sizes:
                block = [(11 * i) % 1000 + 50 for i in range(k)]
                walls = []
                for _ in range(args.repeats + 2):
                    t0 = time.perf_counter()
                    lm.forward(block)
                    lm.commit([0])  # keep one token, drop the rest: the cache is back to context + 1
                    walls.append((time.perf_counter() - t0) * 1000)
                    lm.forward([5])  # the crop rides on this forward; then roll back to the context
                    lm.commit([])
                steps = lm.timings[-2 * (args.repeats + 2) :: 2][2:]
                rows.append({
                    "tokens": k,
                    "total_ms": statistics.median(walls[2:]),
                    "local_ms": statistics.median(t.local_before_ms + t.local_after_ms for t in steps),
                    "cloud_ms": statistics.median(t.cloud_ms for t in steps),
                    "serialize_ms": statistics.median(t.serialize_ms for t in steps),
                    "network_ms": statistics.median(t.network_ms for t in steps),
                })
                print(f"K={k:3d}: {rows[-1]['total_ms']:7.1f} ms (local {rows[-1]['local_ms']:.1f}, cloud {rows[-1]['cloud_ms']:.1f})")
        model_dir = bed.local.model_dir
    previous = {}
    if args.out.is_file():
        import json

        previous = json.loads(args.out.read_text()).get("measurements", {})
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "model")}
    settings["local_threads"] = args.threads or 1
    measurement = {**provenance(settings, model_dir), "steps": rows}
    write_json(args.out, {"measurements": {**previous, args.label: measurement}})
    print(f"wrote {args.out} ({args.label})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
