#!/usr/bin/env python3
"""Profile one decoding step of K tokens, both sides in this process (the cloud's layers behind an
in-process span with the float16 wire rounding), with torch.profiler.

Prints, per block size, the step's wall time and the operators that took the most time on the host
(and, on a GPU, on the device).  With --random-weights it builds a model of the same shape as --model
with random weights, so it runs where the real weights are not at hand: step cost does not depend
on the weights' values.  Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig, AutoModelForCausalLM

from splitinfer.cli import HelpFormatter, add_model_args, setup
from splitinfer.config import Split
from splitinfer.engine import SplitModel
from splitinfer.experiments.record import provenance, write_json
from splitinfer.kernels import use_kernels
from splitinfer.models import default_device, dtype_name, load_config, resolve_dtype, resolve_model
from splitinfer.parts import load_cloud, load_local
from splitinfer.remote import InProcessSpan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 8], help="block sizes K to profile")
    p.add_argument("--context", type=int, default=256, help="tokens already in the cache")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per size (after 3 warm-up steps)")
    p.add_argument("--top", type=int, default=12, help="operators to list per size")
    p.add_argument("--random-weights", action="store_true", help="same shape as --model, random weights")
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    return p.parse_args(argv)


def random_copy(model_dir: Path, out: Path) -> Path:
    """A model directory with model_dir's config and random weights."""
    config = AutoConfig.from_pretrained(model_dir)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


def split_model(model_dir: Path, device: str, dtype: torch.dtype, kernels: str) -> SplitModel:
    split = Split(load_config(model_dir).num_hidden_layers)
    head, tail, config, _ = load_local(model_dir, split, device, dtype)
    span, span_config, _ = load_cloud(model_dir, split, device, dtype)
    use_kernels([head, tail], config, kernels, device, dtype)
    use_kernels([span], span_config, kernels, device, dtype)
    return SplitModel(head, tail, InProcessSpan(span, dtype), dtype, device)


def roll_back(lm: SplitModel) -> None:
    """After a block's forward: back to the same context (keep one token, then drop it with the next forward)."""
    lm.commit([0])
    lm.forward([5])
    lm.commit([])


def profile_size(lm: SplitModel, k: int, repeats: int, top: int) -> dict:
    block = [(11 * i) % 1000 + 50 for i in range(k)]
    for _ in range(3):  # warm-up
        lm.forward(block)
        roll_back(lm)
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lm.forward(block)
        walls.append((time.perf_counter() - t0) * 1000.0)
        roll_back(lm)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        lm.forward(block)
    roll_back(lm)
    events = prof.key_averages()
    by_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    rows = [{"op": e.key, "calls": e.count, "host_ms": e.self_cpu_time_total / 1000.0,
             "device_ms": getattr(e, "self_device_time_total", 0.0) / 1000.0} for e in by_host]
    return {"tokens": k, "median_ms": statistics.median(walls), "top_ops": rows}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    torch.set_num_threads(args.threads or 1)
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    # Random weights need only a config: --model may then be a directory holding config.json alone.
    model_dir = Path(args.model) if args.random_weights and args.model else resolve_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_weights:
            model_dir = random_copy(model_dir, Path(tmp) / "random")
        lm = split_model(model_dir, device, dtype, args.kernels)
        lm.prefill([(7 * i) % 1000 + 100 for i in range(args.context)])
        results = []
        for k in args.sizes:
            r = profile_size(lm, k, args.repeats, args.top)
            results.append(r)
            print(f"K={k}: median {r['median_ms']:.1f} ms per forward ({device}, {dtype_name(dtype)})")
            for row in r["top_ops"]:
                print(f"  {row['host_ms']:8.2f} ms host {row['device_ms']:8.2f} ms device {row['calls']:5d}x  {row['op']}")
    if args.out:
        run = {k: v for k, v in vars(args).items() if k not in ("out", "model")}
        run.update(local_threads=torch.get_num_threads(), device=device, dtype=dtype_name(dtype))
        write_json(args.out, {**provenance(run, args.model or model_dir), "sizes": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
