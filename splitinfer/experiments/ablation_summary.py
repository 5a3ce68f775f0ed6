"""The lookahead ablation's aggregation, and its table and values in the documents (no torch: see ablation.py
for the runs)."""

from __future__ import annotations

import json
import statistics
from typing import Any

from . import prompts as prompt_sets
from .registry import CLOUD_COMPUTE, DECODING, PROMPTS, ROOT, differences, f2, load, markdown_table, produced_by, recomputed, source, table, values

NAME = "lookahead_ablation"
CATEGORIES = ["all", "code", "structured", "conversational", "creative"]

produced_by("ablation", outputs=[NAME],
            code=["lookahead_ablation.py", "splitinfer/experiments/ablation.py", *DECODING, *PROMPTS, *CLOUD_COMPUTE])


def summarise(rows: list[dict]) -> dict[str, Any]:
    """Tokens per step pooled over steps (total tokens / total steps), overall and per category."""

    def pooled(sel: list[dict]) -> dict[str, float]:
        steps = sum(r["steps"] for r in sel)
        tokens = sum(sum(r["accepted_per_step"]) for r in sel)
        return {
            "tokens_per_step": tokens / steps if steps else 0.0,
            "tokens_per_second": statistics.mean(r["tokens_per_second"] for r in sel),
            "mean_verified_per_step": statistics.mean(v for r in sel for v in r["verified_per_step"]),
            "prompts": len(sel),
        }

    cats = sorted({r["category"] for r in rows}, key=prompt_sets.CATEGORIES.index)
    return {"all": pooled(rows), **{c: pooled([r for r in rows if r["category"] == c]) for c in cats}}


@recomputed(NAME)
def check(data: dict[str, Any]) -> list[str]:
    """Each prompt's tokens per step from its accepted_per_step, each configuration's summary from its prompts."""
    out = []
    for c in data["configs"]:
        name = c["config"]["name"]
        for i, r in enumerate(c["prompts"]):
            per_step = sum(r["accepted_per_step"]) / r["steps"] if r["steps"] else 0.0
            out += differences(r["tokens_per_step"], per_step, f"{name}: prompts[{i}].tokens_per_step")
            out += differences(r["steps"], len(r["accepted_per_step"]), f"{name}: prompts[{i}].steps")
        out += differences(c["summary"], summarise(c["prompts"]), f"{name}: summary")
    return out


@table("ablation")
def ablation_table() -> str:
    d = load(NAME)
    rows = []
    for c in d["configs"]:
        s = c["summary"]
        rows.append([c["config"]["name"], *(f2(s[k]["tokens_per_step"]) if k in s else "-" for k in CATEGORIES),
                     f"{s['all']['mean_verified_per_step']:.1f}", f2(s["all"]["tokens_per_second"])])
    return markdown_table(["config", *CATEGORIES, "nodes/step", "tokens/s"], rows) + source(NAME)


@values("ablation")
def ablation_value(prefix: str, what: str) -> str:
    """ablation.<config name, "_" for a space>.<category>: its tokens per step; config "main" is the headline
    run (the first), whatever its tree size, and "main model-free" the headline without the drafter (when
    the run had one); category "budget" is that run's tree size."""
    config, _, key = what.rpartition(".")
    config = config.replace("_", " ")
    for i, c in enumerate(load(NAME)["configs"]):
        name = c["config"]["name"]
        free_headline = name.startswith("main ") and name.endswith(" model-free")
        if name == config or (config == "main" and i == 0) or (config == "main model-free" and free_headline):
            return str(c["config"]["max_verify"]) if key == "budget" else f2(c["summary"][key]["tokens_per_step"])
    raise KeyError(f"no ablation config {config!r}")


DRAFTER = "drafters/smollm2-135m-instruct"  # the default model's committed draft head (make drafter)


@values("drafter")
def drafter_value(prefix: str, what: str) -> str:
    """drafter.<field> of the committed draft head, from its provenance.json (train-drafter writes it):
    .size_mb (model.safetensors), .minutes (the whole run, as one uninterrupted run timed it), .answer_tokens (thousands), .answers,
    .held_out_top1 / .train_top1 (%, the last curve point), .draft_vocab."""
    d = json.loads((ROOT / DRAFTER / "provenance.json").read_text())
    final, data = d["final"], d["data"]
    return {
        "size_mb": lambda: f"{(ROOT / DRAFTER / 'model.safetensors').stat().st_size / 1e6:.1f}",
        "minutes": lambda: f"{d['timings']['total_this_run_s'] / 60:.0f}",
        "answer_tokens": lambda: f"{sum(data['answer_tokens'].values()) / 1000:.0f}",
        "answers": lambda: str(sum(data["answers"].values())),
        "held_out_top1": lambda: f"{100 * final['held_out']['top1']:.1f}",
        "train_top1": lambda: f"{100 * final['train']['top1']:.1f}",
        "draft_vocab": lambda: str(d["settings"]["training"]["draft_vocab"]),
    }[what]()
