#!/usr/bin/env python3
"""A fresh interactive process with lookahead's memory kept on disk vs a warm long-running one, same prompts.

One cloud server process, behind the WAN emulator (--rtt-ms); the prompt sets split
per category into warm-up prompts (the first --warmup of each) and measured prompts
(the next --measured):

  warm   one local side answers the warm-up prompts, saves its memory (as a process
         leaving would), then answers the measured prompts, still running;
  fresh  each measured prompt in a new `python -m splitinfer chat --prompt ... --json`
         process with --memory-dir: the first starts from the file the warm-up left,
         each later one from the file the one before it left;
  cold   the same processes with --no-memory: each starts empty (what every fresh
         process got before the memory was kept).

Reports tokens per round trip of each over the measured prompts, and fresh / warm.
Writes experiment_data/warm_start.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from splitinfer.cli import HelpFormatter, add_drafter_arg, add_model_args, add_testbed_args
from splitinfer.config import OUT_HELP, experiment_out
from splitinfer.experiments import prompts as prompt_sets
from splitinfer.experiments.record import provenance, write_json
from splitinfer.experiments.side_by_side import warm_start_summary
from splitinfer.experiments.testbed import Bed, settings, testbed_for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--rtt-ms", type=float, default=80.0, help="emulated round-trip time")
    p.add_argument("--warmup", type=int, default=4, help="warm-up prompts per category (the first ones)")
    p.add_argument("--measured", type=int, default=2, help="measured prompts per category (the ones after them)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_testbed_args(p, existing_cloud=False)
    add_drafter_arg(p)
    p.add_argument("--out", type=Path, default=experiment_out("warm_start.json"), help=OUT_HELP)
    return p.parse_args(argv)


def split_prompts(warmup: int, measured: int) -> tuple[list[dict], list[dict]]:
    by_category = [prompt_sets.load([c]) for c in prompt_sets.CATEGORIES]
    if any(len(ps) < warmup + measured for ps in by_category):
        raise SystemExit(f"error: --warmup {warmup} + --measured {measured} is more than a category's prompts")
    return ([p for ps in by_category for p in ps[:warmup]],
            [p for ps in by_category for p in ps[warmup : warmup + measured]])


def row(p: dict, g: dict[str, Any]) -> dict[str, Any]:
    return {"category": p["category"], "prompt": p["prompt"], "new_tokens": g["new_tokens"], "steps": g["steps"],
            "accepted_per_step": g["accepted_per_step"], "token_ids": g["token_ids"]}


def in_new_process(bed: Bed, args: argparse.Namespace, prompt: str, memory: list[str]) -> dict[str, Any]:
    """One prompt through the chat command in a process of its own; its --json report."""
    cmd = [sys.executable, "-m", "splitinfer", "chat", "--prompt", prompt, "--json", "--model", str(bed.local.model_dir),
           "--cloud", bed.cloud_http, "--cloud-ws", bed.url, "--max-new-tokens", str(args.max_new_tokens),
           "--drafter", str(bed.local.drafter_path or "none"), "--kernels", args.kernels,
           "--threads", str(args.threads or 1), *memory]  # the testbed's local side runs on args.threads or 1
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warmup, measured = split_prompts(args.warmup, args.measured)
    phases: dict[str, list[dict]] = {"warm": [], "fresh": [], "cold": []}
    bar = tqdm(total=len(warmup) + 3 * len(measured), desc="warm start", unit="prompt")
    with tempfile.TemporaryDirectory() as tmp, testbed_for(args, rtt_ms=args.rtt_ms) as bed:
        local = bed.local
        for p in warmup:
            bed.generate(local.encode(p["prompt"]), "lookahead", args.max_new_tokens)
            bar.update()
        # The warm-up process leaves: its memory goes where the fresh processes will look for it.
        local.memory_file_in(Path(tmp)).save(local.memory)
        entries = len(local.memory.recycle)
        for p in measured:  # still running: the warm process
            g = bed.generate(local.encode(p["prompt"]), "lookahead", args.max_new_tokens)
            phases["warm"].append(row(p, g.as_dict()))
            bar.update()
        for phase, memory in (("fresh", ["--memory-dir", tmp]), ("cold", ["--no-memory"])):
            for p in measured:
                phases[phase].append(row(p, in_new_process(bed, args, p["prompt"], memory)))
                bar.update()
    bar.close()
    summary, ratio = warm_start_summary(phases)
    same = all(f["token_ids"] == w["token_ids"] == c["token_ids"]
               for f, w, c in zip(phases["fresh"], phases["warm"], phases["cold"]))
    run = settings(args, local) | {"warmup_prompts": len(warmup), "measured_prompts": len(measured)}
    write_json(args.out, {**provenance(run, local.model_dir), "summary": summary, "fresh_over_warm": ratio,
                          "recycling_entries_after_warmup": entries, "identical_outputs": same, "phases": phases})
    print("tokens per round trip on the measured prompts: " + ", ".join(
        f"{phase} {s['tokens_per_round_trip']:.2f}" for phase, s in summary.items())
          + f"; fresh / warm {ratio:.3f}; identical outputs: {same}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
