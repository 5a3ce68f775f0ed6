#!/usr/bin/env python3
"""What one cloud pass costs, in this process, without the network: by sessions per pass, and by thread.

1. Sessions: N sessions, each with --context tokens in its cache, send one token each; one batched pass
   (splitinfer/cloud/batch.py, as the cloud runs it) over all N is timed, median of --repeats.
2. Threads: the same one-session pass run always from one thread, then from two threads taking turns
   (as when frames were computed in asyncio's executor threads).  On a CPU each thread that runs
   parallel torch operations keeps its own OpenMP team; this measures what two teams cost.

The cloud's layers of --model, kernels as the cloud chooses them.  Writes experiment_data/pass_cost.json
with provenance; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from splitinfer import hf, masks
from splitinfer.cli import HelpFormatter, add_model_args, setup
from splitinfer.cloud import batch
from splitinfer.cloud.cache import SessionCache
from splitinfer.config import OUT_HELP, Split, experiment_out
from splitinfer.experiments.record import provenance, write_json
from splitinfer.kernels import use_kernels
from splitinfer.models import default_device, dtype_name, load_config, resolve_dtype, resolve_model
from splitinfer.parts import CloudSpan, load_cloud


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="sessions per pass")
    p.add_argument("--context", type=int, default=64, help="tokens in each session's cache")
    p.add_argument("--repeats", type=int, default=30, help="timed passes per point (after 5 untimed)")
    p.add_argument("--out", type=Path, default=experiment_out("pass_cost.json"), help=OUT_HELP)
    return p.parse_args(argv)


class Bench:
    """The cloud's span and sessions with a filled cache each, for one-token passes that are undone after."""

    def __init__(self, span: CloudSpan, config, device: str, dtype: torch.dtype, sessions: int, context: int):
        self.span, self.dtype, self.device = span, dtype, device
        self.rotary = hf.rotary_for(config).to(device)
        gen = torch.Generator().manual_seed(0)
        self.caches = [SessionCache(span.indices, context + 8, span.devices) for _ in range(sessions)]
        self.hidden = [torch.randn(1, 1, config.hidden_size, generator=gen).to(device, dtype) for _ in range(sessions)]
        with torch.inference_mode():
            for cache in self.caches:  # the context, as a prompt's prefill
                prompt = torch.randn(1, context, config.hidden_size, generator=gen).to(device, dtype)
                batch.run(span, [self.rows(cache, 0, prompt)])
        self.context = context

    def rows(self, cache: SessionCache, at: int, hidden: torch.Tensor) -> batch.Rows:
        q = hidden.shape[1]
        cos, sin = hf.rope(self.rotary, masks.positions(at, masks.chain(q)), self.dtype)
        mask = masks.additive(masks.full_mask(at, masks.causal(q)), self.dtype).to(self.device)
        return batch.Rows(cache, at, hidden, cos, sin, mask)

    def one_pass(self) -> float:
        """Seconds for one pass of one token per session; the caches are cropped back after."""
        rows = [self.rows(c, self.context, h) for c, h in zip(self.caches, self.hidden)]
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = batch.run(self.span, rows)
            out[-1].sum().item()  # settled (a GPU runs asynchronously)
            took = time.perf_counter() - t0
        for c in self.caches:
            c.crop(self.context)
        return took


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1000.0


def by_sessions(span, config, device, dtype, args) -> list[dict]:
    points = []
    for n in args.sessions:
        bench = Bench(span, config, device, dtype, n, args.context)
        for _ in range(5):
            bench.one_pass()
        times = [bench.one_pass() for _ in range(args.repeats)]
        points.append({"sessions": n, "pass_ms_p50": median_ms(times), "per_session_ms": median_ms(times) / n})
        print(f"{n:3d} session(s): pass {points[-1]['pass_ms_p50']:.1f} ms")
    return points


def by_thread(span, config, device, dtype, args) -> dict:
    """One session's pass from this thread always, then from two worker threads in turn."""
    bench = Bench(span, config, device, dtype, 1, args.context)
    for _ in range(5):
        bench.one_pass()
    one = [bench.one_pass() for _ in range(args.repeats)]
    workers = [ThreadPoolExecutor(1) for _ in range(2)]
    try:
        for w in workers:  # each worker's first pass makes its thread's team
            w.submit(bench.one_pass).result()
        turns = [workers[i % 2].submit(bench.one_pass).result() for i in range(args.repeats)]
    finally:
        for w in workers:
            w.shutdown()
    result = {"one_thread_ms_p50": median_ms(one), "two_threads_in_turn_ms_p50": median_ms(turns)}
    print(f"one session, one thread: {result['one_thread_ms_p50']:.1f} ms; two threads in turn: "
          f"{result['two_threads_in_turn_ms_p50']:.1f} ms")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup(args)
    model_dir = resolve_model(args.model)
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    split = Split.of(load_config(model_dir).num_hidden_layers)
    span, config, _ = load_cloud(model_dir, split, device, dtype)
    use_kernels([span], config, args.kernels, device, dtype)
    batch.use_batching(config)
    result = {
        **provenance({"sessions": args.sessions, "context": args.context, "repeats": args.repeats,
                      "threads": torch.get_num_threads(), "kernels": args.kernels, "device": device,
                      "dtype": dtype_name(dtype)}, model_dir),
        "by_sessions": by_sessions(span, config, device, dtype, args),
        "by_thread": by_thread(span, config, device, dtype, args),
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
