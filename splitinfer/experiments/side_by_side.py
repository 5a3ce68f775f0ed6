"""Sequential and lookahead decoding side by side over one emulated WAN link (benchmarks/wan_side_by_side.py),
and a fresh process against a warm one (benchmarks/warm_start.py): the aggregation, and their tables and
values in the documents."""

from __future__ import annotations

import statistics
from typing import Any

from . import MODEL_FREE
from .registry import CLOUD_COMPUTE, DECODING, PROMPTS, SPLIT_NUMERICS, differences, f2, load, markdown_table, pct, produced_by, recomputed, source, table, values

FILES = {"sbs": "wan_side_by_side", "gpu_sbs": "gpu/wan_side_by_side",  # value prefixes and their files
         "gpu_sbs_cpu_local": "gpu/wan_side_by_side_cpu_local",
         "sbs_pinned": "wan_side_by_side_pinned"}  # the same run with lookahead's tree pinned (--max-verify 32)

produced_by("side-by-side", outputs=FILES.values(),
            code=["benchmarks/wan_side_by_side.py", "splitinfer/experiments/testbed.py", *SPLIT_NUMERICS, *DECODING,
                  *PROMPTS, *CLOUD_COMPUTE])


WARM = {"warm_start": "warm_start", "warm_start_free": "warm_start_model_free"}  # value prefixes: with the drafter, without
produced_by("warm-start", outputs=WARM.values(),
            code=["benchmarks/warm_start.py", "splitinfer/memory_file.py", "splitinfer/local.py",
                  "splitinfer/commands/chat.py", "splitinfer/experiments/testbed.py", *SPLIT_NUMERICS, *DECODING,
                  *PROMPTS, *CLOUD_COMPUTE])


def summarise(runs: dict[str, list[dict]], rtt_ms: float) -> tuple[dict[str, Any], float]:
    """Per mode: tokens/s and per step pooled over its runs, mean local and cloud ms per step, and the physical
    limit (one token per RTT + local + cloud); with lookahead's speed over sequential's."""
    summary = {}
    for mode, rs in runs.items():
        decoded = sum(sum(r["accepted_per_step"]) for r in rs)
        seconds = sum(r["decode_seconds"] for r in rs)
        steps = [t for r in rs for t in r["timings"]]
        local = statistics.mean(t["local_before_ms"] + t["local_after_ms"] for t in steps)
        cloud = statistics.mean(t["cloud_ms"] for t in steps)
        summary[mode] = {
            "tokens_per_second": decoded / seconds,
            "tokens_per_step": decoded / len(steps),
            "ms_per_step": seconds * 1000 / len(steps),
            "local_ms_per_step": local,
            "cloud_ms_per_step": cloud,
            "physical_limit_tokens_per_second": 1000.0 / (rtt_ms + local + cloud),
        }
    seq, la = summary["sequential"], summary["lookahead"]
    seq["share_of_physical_limit"] = seq["tokens_per_second"] / seq["physical_limit_tokens_per_second"]
    return summary, la["tokens_per_second"] / seq["tokens_per_second"]


@recomputed(*FILES.values())
def check(data: dict[str, Any]) -> list[str]:
    """Each run's tokens per step from its accepted_per_step; the summary and the ratio from the runs."""
    out = []
    for mode, rs in data["runs"].items():
        for i, r in enumerate(rs):
            per_step = round(sum(r["accepted_per_step"]) / r["steps"], 4) if r["steps"] else 0.0
            out += differences(r["tokens_per_step"], per_step, f"runs.{mode}[{i}].tokens_per_step")
    summary, ratio = summarise(data["runs"], data["settings"]["rtt_ms"])
    out += differences(data["summary"], summary, "summary")
    return out + differences(data["lookahead_over_sequential"], ratio, "lookahead_over_sequential")


@table("side-by-side")
def side_by_side_table(name: str = FILES["sbs"]) -> str:
    d = load(name)
    s = d["summary"]
    rows = [[m, f2(v["tokens_per_second"]), f2(v["tokens_per_step"]), f"{v['ms_per_step']:.0f}",
             f"{v['local_ms_per_step']:.0f}", f"{v['cloud_ms_per_step']:.0f}"] for m, v in s.items()]
    text = markdown_table(["mode", "tokens/s", "tokens/step", "ms/step", "local ms", "cloud ms"], rows)
    drafter = d["settings"].get("drafter")
    free = (f" ({s[MODEL_FREE]['tokens_per_second'] / s['sequential']['tokens_per_second']:.2f}x without the drafter)"
            if MODEL_FREE in s else "")
    text += (f"\n\nLookahead / sequential: {d['lookahead_over_sequential']:.2f}x"
             f"{' with the drafter' if drafter else ''}{free}; sequential reaches "
             f"{pct(s['sequential']['share_of_physical_limit'])} of its physical limit "
             f"({f2(s['sequential']['physical_limit_tokens_per_second'])} tokens/s).")
    return text + source(name)


def tree_steps(d: dict[str, Any], what: str) -> str:
    """Of lookahead's steps in a side-by-side run: the share that verified the root alone (no
    source had a guess after it), or the tokens committed per step among the others."""
    steps = [(t["tokens"], a) for r in d["runs"]["lookahead"] for t, a in zip(r["timings"], r["accepted_per_step"])]
    trees = [a for k, a in steps if k > 1]
    if what == "root_only_share":
        return pct(1 - len(trees) / len(steps), 0)
    return f2(sum(trees) / len(trees))


@values(*FILES)
def side_by_side_value(prefix: str, what: str) -> str:
    """<prefix>.ratio, .model_free_ratio; .root_only_share / .tokens_per_tree_step (see tree_steps);
    .<mode>.<summary field>."""
    d = load(FILES[prefix])
    if what == "ratio":
        return f2(d["lookahead_over_sequential"])
    if what == "model_free_ratio":  # lookahead without the drafter over sequential
        s = d["summary"]
        return f2(s[MODEL_FREE]["tokens_per_second"] / s["sequential"]["tokens_per_second"])
    if what in ("root_only_share", "tokens_per_tree_step"):
        return tree_steps(d, what)
    mode, _, field = what.partition(".")
    v = d["summary"][mode][field]
    return pct(v) if field.startswith("share") else f2(v)


def warm_start_summary(phases: dict[str, list[dict]]) -> tuple[dict[str, Any], float]:
    """Per phase: tokens per round trip pooled over its prompts (decoded tokens over decoding steps); with
    fresh over warm."""
    summary = {phase: {"tokens_per_round_trip": sum(sum(r["accepted_per_step"]) for r in rows)
                       / sum(r["steps"] for r in rows), "prompts": len(rows)} for phase, rows in phases.items()}
    return summary, summary["fresh"]["tokens_per_round_trip"] / summary["warm"]["tokens_per_round_trip"]


@recomputed(*WARM.values())
def check_warm_start(data: dict[str, Any]) -> list[str]:
    summary, ratio = warm_start_summary(data["phases"])
    return differences(data["summary"], summary, "summary") + differences(data["fresh_over_warm"], ratio, "fresh_over_warm")


@values(*WARM)
def warm_start_value(prefix: str, what: str) -> str:
    """warm_start.<phase> (warm, fresh, cold): tokens per round trip on the measured prompts; .ratio: fresh over
    warm; .rtt: the emulated RTT (ms).  Prefix warm_start_free: the run without
    the drafter."""
    d = load(WARM[prefix])
    if what == "ratio":
        return f"{d['fresh_over_warm']:.3f}"
    if what == "rtt":
        return f"{d['settings']['rtt_ms']:g}"
    return f2(d["summary"][what]["tokens_per_round_trip"])
