#!/usr/bin/env python3
"""Sequential split decoding on loopback vs the full model in one process.

Reports tokens/s of both, serialisation + framing as a share of the split's
step time, and peak memory: the local process, the cloud process and the whole
model (the spec's "local VRAM in split mode" figure, here as parameter bytes
and peak RSS on a CPU).  Measures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import requests
import torch
from transformers import AutoModelForCausalLM

from splitinfer.cli import HelpFormatter, add_model_args, add_testbed_args
from splitinfer.config import OUT_HELP, experiment_out
from splitinfer.experiments import prompts as prompt_sets
from splitinfer.experiments.record import peak_rss_mb, provenance, write_json
from splitinfer.local import LocalSide
from splitinfer.models import resolve_model
from splitinfer.procs import cloud_process
from splitinfer.remote import cloud_session, ws_url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--per-category", type=int, default=2, help="prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_testbed_args(p, existing_cloud=False, cloud_device=False)  # a CPU float32 measurement by design
    p.add_argument("--out", type=Path, default=experiment_out("split_overhead.json"), help=OUT_HELP)
    p.add_argument("--full-model-memory", action="store_true", help=argparse.SUPPRESS)  # child-process mode
    return p.parse_args(argv)


def full_model_child(args: argparse.Namespace) -> int:
    """Child process: load the whole model, generate once, print peak RSS (so the parent's memory does not count)."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32).eval()
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, do_sample=False)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "parameters": params, "parameter_mb": params * 4 / 2**20}))
    return 0


def full_model_speed(model_dir: Path, prompts: list[list[int]], max_new: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rates = []
    for ids in prompts:
        with torch.inference_mode():
            out = model(torch.tensor([ids]), use_cache=True)
            cache, token = out.cache, out.logits[0, -1].argmax()
            t0 = time.perf_counter()
            for _ in range(max_new - 1):
                out = model(token.view(1, 1), cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[0, -1].argmax()
            rates.append((max_new - 1) / (time.perf_counter() - t0))
    return {"tokens_per_second": statistics.mean(rates), "per_prompt": rates}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads or 1)
    if args.full_model_memory:
        return full_model_child(args)
    local = LocalSide(args.model)
    prompts = [local.encode(p["prompt"]) for p in prompt_sets.load(per_category=args.per_category)]
    runs = []
    with cloud_process(local.model_dir, threads=args.cloud_threads) as (url, proc):
        for ids in prompts:
            with cloud_session(ws_url(url), expected=local.identity) as span:
                # No EOS: every prompt decodes exactly max_new tokens, the same work as the full-model loop.
                local.eos = frozenset()
                g = local.generate(span, ids, args.max_new_tokens, "sequential")
            runs.append(g.as_dict())
        health = requests.get(f"{url}/health", timeout=5).json()
        cloud_rss = peak_rss_mb(proc.pid)
        # The local side's memory, measured in a process of its own doing one generation.
        one = subprocess.run(
            [sys.executable, "-m", "splitinfer", "chat", "--cloud", url, "--model", str(local.model_dir), "--json",
             "--mode", "sequential",
             "--prompt", prompt_sets.load(per_category=1)[0]["prompt"], "--max-new-tokens", str(args.max_new_tokens),
             "--threads", str(torch.get_num_threads())],
            capture_output=True, text=True, check=True,
        )
        local_rss = json.loads(one.stdout)["peak_rss_mb"]
    steps = [t for r in runs for t in r["timings"]]
    parts = {k: sum(t[k] for t in steps) for k in ("local_before_ms", "local_after_ms", "serialize_ms", "cloud_ms", "network_ms", "wait_ms")}
    step_total = parts["local_before_ms"] + parts["local_after_ms"] + parts["serialize_ms"] + parts["wait_ms"]
    full = full_model_speed(local.model_dir, prompts, args.max_new_tokens)
    child = subprocess.run(
        [sys.executable, __file__, "--full-model-memory", *(["--model", str(args.model)] if args.model else [])],
        capture_output=True, text=True, check=True,
    )
    whole = json.loads(child.stdout.strip().splitlines()[-1])
    local_params = local.held["parameters"]
    result = {
        **provenance(
            {"max_new_tokens": args.max_new_tokens, "prompts": len(prompts), "local_threads": torch.get_num_threads(),
             "cloud_threads": args.cloud_threads, "dtype": "float32", "wire": "float16", "transport": "loopback"},
            local.model_dir,
        ),
        "split": {
            "tokens_per_second": statistics.mean(r["tokens_per_second"] for r in runs),
            "ms_per_step": step_total / len(steps),
            "breakdown_ms_per_step": {k: v / len(steps) for k, v in parts.items()},
            "serialization_share": parts["serialize_ms"] / step_total,
        },
        "full_model": full,
        "memory": {
            "local_parameters": local_params,
            "local_parameter_mb": local_params * 4 / 2**20,
            "cloud_parameters": health["held"]["parameters"],
            "whole_model_parameters": whole["parameters"],
            "local_share_of_parameters": local_params / whole["parameters"],
            "local_peak_rss_mb": local_rss,
            "cloud_peak_rss_mb": cloud_rss,
            "whole_model_peak_rss_mb": whole["peak_rss_mb"],
        },
        "runs": runs,
    }
    write_json(args.out, result)
    s, m = result["split"], result["memory"]
    print(f"split (loopback): {s['tokens_per_second']:.2f} tok/s, {s['ms_per_step']:.1f} ms/step, "
          f"serialisation {100 * s['serialization_share']:.2f}% of step time")
    print(f"full model, one process: {full['tokens_per_second']:.2f} tok/s")
    print(f"parameters held locally: {m['local_parameters'] / 1e6:.1f}M of {m['whole_model_parameters'] / 1e6:.1f}M "
          f"({100 * m['local_share_of_parameters']:.0f}%); peak RSS local {m['local_peak_rss_mb']:.0f} MB, cloud {m['cloud_peak_rss_mb']:.0f} MB, "
          f"whole model {m['whole_model_peak_rss_mb']:.0f} MB")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
