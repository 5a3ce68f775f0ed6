"""Numbers in README.md and paper.md, rendered from experiment_data/*.json, never typed by hand.

A document marks each generated piece:

    <!--BEGIN table:rtt-->  ...markdown table...  <!--END table:rtt-->
    tokens per step <!--v:ablation.code-->2.31<!--/v-->

`render` rewrites every marked piece from the JSON; `stale` lists pieces whose
text differs from what the JSON gives (the test suite runs it on the committed
files).  Each value names the file it comes from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..procs import ROOT

DATA = ROOT / "experiment_data"
BLOCK = re.compile(r"(<!--BEGIN (?P<name>[\w:.\-]+)-->)(?P<body>.*?)(<!--END (?P=name)-->)", re.S)
VALUE = re.compile(r"(<!--v:(?P<name>[\w.\-:/]+)-->)(?P<body>.*?)(<!--/v-->)", re.S)


@lru_cache(maxsize=None)
def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())


def f2(x: float) -> str:
    return f"{x:.2f}"


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def short(commit: str) -> str:
    """A 12-character hash, keeping a "+dirty" mark."""
    head, plus, mark = commit.partition("+")
    return head[:12] + plus + mark


def _source(name: str) -> str:
    d = load(name)
    return f"\n\n<sub>From `experiment_data/{name}.json`: `{d['command']}` at {short(d['commit'])}, {d['date']}.</sub>"


# -- blocks -----------------------------------------------------------------------------------


def table_overhead() -> str:
    d = load("split_overhead")
    s, m, f = d["split"], d["memory"], d["full_model"]
    b = s["breakdown_ms_per_step"]
    rows = [
        ["split, loopback (sequential)", f2(s["tokens_per_second"]), f"{s['ms_per_step']:.1f}", pct(s["serialization_share"], 2)],
        ["full model, one process", f2(f["tokens_per_second"]), f"{1000 / f['tokens_per_second']:.1f}", "-"],
    ]
    mem = _table(
        ["", "parameters", "peak RSS (MB)"],
        [
            ["local side", f"{m['local_parameters'] / 1e6:.1f}M ({pct(m['local_share_of_parameters'], 0)})", f"{m['local_peak_rss_mb']:.0f}"],
            ["cloud side", f"{m['cloud_parameters'] / 1e6:.1f}M", f"{m['cloud_peak_rss_mb']:.0f}"],
            ["whole model", f"{m['whole_model_parameters'] / 1e6:.1f}M", f"{m['whole_model_peak_rss_mb']:.0f}"],
        ],
    )
    parts = ", ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in b.items())
    return (
        _table(["", "tokens/s", "ms/step", "serialisation share"], rows)
        + f"\n\nPer step (ms): {parts}.\n\n" + mem + _source("split_overhead")
    )


def table_ablation() -> str:
    d = load("lookahead_ablation")
    cats = ["all", "code", "structured", "conversational", "creative"]
    rows = []
    for c in d["configs"]:
        s = c["summary"]
        rows.append([c["config"]["name"], *(f2(s[k]["tokens_per_step"]) if k in s else "-" for k in cats),
                     f"{s['all']['mean_verified_per_step']:.1f}", f2(s["all"]["tokens_per_second"])])
    return _table(["config", *cats, "nodes/step", "tokens/s"], rows) + _source("lookahead_ablation")


def table_identity() -> str:
    d = load("perplexity_comparison")
    rows = []
    for key, s in d["summary"].items():
        if key == "hf_generate":
            continue
        rows.append([key.replace("_vs_", " vs "), pct(s["exact_sequence_rate"]), pct(s["token_agreement"], 2),
                     f"{s['mean_perplexity']:.3f}" if "mean_perplexity" in s else "-"])
    rows.append(["hf_generate (reference)", "-", "-", f"{d['summary']['hf_generate']['mean_perplexity']:.3f}"])
    diffs = [
        f"{r['category']} prompt, {mode}: first difference at token {c['first_difference']}, "
        f"reference top-2 margin {c.get('reference_top2_margin', float('nan')):.3f}"
        for r in d["prompts"] for mode, c in r["comparison"].items()
        if "_vs_" not in mode and not c["identical"]
    ]
    text = _table(["mode vs HF generate", "exact sequences", "tokens agreeing", "mean perplexity"], rows)
    if diffs:
        text += "\n\nDifferences: " + "; ".join(diffs) + "."
    return text + _source("perplexity_comparison")


def table_rtt(name: str = "rtt_analysis") -> str:
    d = load(name)
    modes = sorted(d["measured"])
    rtts = list(d["measured"][modes[0]])
    rows = [[m, *(f2(d["measured"][m][r]["tokens_per_second"]) for r in rtts)] for m in modes]
    text = _table(["tokens/s at RTT (ms)", *rtts], rows)
    shares = []
    for m in modes:
        for r in ("0", "80"):
            if r in d["measured"][m]:
                sh = d["measured"][m][r]["shares"]
                shares.append([f"{m} @ {r} ms", *(pct(sh[k], 0) for k in ("network", "local", "cloud", "serialize", "other"))])
    text += "\n\n" + _table(["latency breakdown", "network", "local", "cloud", "serialisation", "decoding logic"], shares)
    if d.get("cross_validation"):
        cv = d["cross_validation"]
        text += f"\n\nLeave-one-RTT-out error of the decomposition model: mean {pct(cv['mean_abs_error'])}, max {pct(cv['max_abs_error'])}."
    proj = d["projection"]
    text += "\n\n" + _table(["projected tokens/s at RTT (ms)", *proj[modes[0]]], [[m, *(f2(v) for v in proj[m].values())] for m in modes])
    return text + _source(name)


def table_side_by_side(name: str = "wan_side_by_side") -> str:
    d = load(name)
    s = d["summary"]
    rows = [[m, f2(v["tokens_per_second"]), f2(v["tokens_per_step"]), f"{v['ms_per_step']:.0f}",
             f"{v['local_ms_per_step']:.0f}", f"{v['cloud_ms_per_step']:.0f}"] for m, v in s.items()]
    text = _table(["mode", "tokens/s", "tokens/step", "ms/step", "local ms", "cloud ms"], rows)
    text += (f"\n\nLookahead / sequential: {d['lookahead_over_sequential']:.2f}x; sequential reaches "
             f"{pct(s['sequential']['share_of_physical_limit'])} of its physical limit "
             f"({f2(s['sequential']['physical_limit_tokens_per_second'])} tokens/s).")
    return text + _source(name)


def table_step_cost() -> str:
    d = load("step_cost")
    before, after = d["kernels"].get("torch"), d["kernels"].get("auto")
    rows = []
    for i, r in enumerate(after or before):
        b = before[i]["total_ms"] if before else None
        rows.append([str(r["tokens"]), f"{b:.1f}" if b is not None else "-", f"{r['total_ms']:.1f}" if after else "-",
                     f"{b / r['total_ms']:.2f}×" if before and after else "-",
                     f"{r['local_ms']:.1f}", f"{r['cloud_ms']:.1f}", f"{r['serialize_ms']:.2f}"])
    head = ["tokens verified (K)", "step ms, before (transformers' kernels)", "step ms, after (splitinfer/kernels.py)", "speed-up",
            "after: local ms", "after: cloud ms", "after: serialisation ms"]
    return _table(head, rows) + _source("step_cost")


def table_gpu() -> str:
    """The speed figures from `make experiments-gpu` (experiment_data/gpu/), beside the CPU ones."""
    from ..models import dtype_name, resolve_dtype

    steps, ident = load("gpu/step_cost"), load("gpu/perplexity_comparison")
    gpu = steps["machine"]["cuda"]
    dtype = dtype_name(resolve_dtype(steps["settings"].get("dtype"), "cuda"))
    rows = [[str(r["tokens"]), f"{r['total_ms']:.1f}", f"{r['local_ms']:.1f}", f"{r['cloud_ms']:.1f}"]
            for r in steps["kernels"]["auto"]]
    text = f"{gpu}, {dtype}, both sides and the WAN emulator on one machine unless a table says otherwise.\n\n"
    text += _table(["tokens verified (K)", "step ms", "local ms", "cloud ms"], rows) + _source("gpu/step_cost")
    text += "\n\nAt 80 ms RTT, both sides on the GPU:\n\n" + table_side_by_side("gpu/wan_side_by_side")
    if (DATA / "gpu/wan_side_by_side_cpu_local.json").exists():
        local = load("gpu/wan_side_by_side_cpu_local")["settings"]
        text += (f"\n\nAt 80 ms RTT, as deployed: the local side on the CPU ({local['dtype']}, "
                 f"{local['local_threads']} threads), the cloud on the GPU:\n\n" + table_side_by_side("gpu/wan_side_by_side_cpu_local"))
    if (DATA / "gpu/rtt_analysis.json").exists():
        text += "\n\nThe RTT sweep, both sides on the GPU:\n\n" + table_rtt("gpu/rtt_analysis")
    rows = [[key.replace("_vs_", " vs "), pct(v["exact_sequence_rate"]), pct(v["token_agreement"], 2), str(v["prompts"])]
            for key, v in ident["summary"].items() if "exact_sequence_rate" in v]
    text += "\n\n" + _table(["output identity (vs HF generate on the same GPU and dtype)", "exact sequences",
                               "tokens agreeing", "prompts"], rows) + _source("gpu/perplexity_comparison")
    return text


def table_inversion() -> str:
    from ..privacy.report import render as render_inversion

    return render_inversion(load("inversion"))


def table_memory() -> str:
    """Measured memory of the cloud process (benchmarks/memory.py) against the bounds the limits are sized by."""
    d = load("memory")
    rows = [[f"one session, {s['tokens']} tokens", f"{s['cache_mb']:.0f}", f"{s['held_mb']:.0f}",
             f"{s['peak_growth_mb']:.0f}", f"{s['bound_mb']:.0f}"] for s in d["sessions"]]
    c = d["connections"]
    frame_mb = c["frame_bytes"] / 2**20
    rows.append([f"one connection, frames of {frame_mb:.1f} MiB sent to a busy server", "-",
                 f"{c['frames_held_per_connection'] * frame_mb:.0f} ({c['frames_held_per_connection']:.1f} frames)", "-",
                 f"{c['bound_frames'] * frame_mb:.0f} ({c['bound_frames']} frames)"])
    long = d["long_sessions"]
    table = _table(["what", "cache (formula), MiB", "held, MiB", "peak growth, MiB", "bound used for the limits, MiB"],
                   rows)
    defaults = d["defaults_on_24_gib"]
    text = (f"\n\nAfter {long['sessions']} sessions of {long['tokens']} tokens were filled and closed, the cloud's RSS went "
            f"from {long['rss_start_mb']:.0f} MiB through a peak of {long['rss_peak_mb']:.0f} MiB back to "
            f"{long['rss_after_mb']:.0f} MiB ({100 * long['change']:+.1f}%).  On a machine with 24 GiB available the "
            f"defaults come out at {defaults['max_sessions']} sessions and {defaults['max_connections']} connections, "
            f"frames up to {defaults['per_frame_mb']:.1f} MiB.")
    return table + text + _source("memory")


# What `make experiments` writes, in its order.
REPRODUCED = ("perplexity_comparison", "lookahead_ablation", "rtt_analysis", "wan_side_by_side", "split_overhead",
              "step_cost", "inversion")


def reproduce_minutes() -> float:
    """The wall time of the whole `make experiments` run: the sum of what each script recorded."""
    return sum(load(name).get("wall_seconds") or 0.0 for name in REPRODUCED) / 60.0


def table_reproduce() -> str:
    rows = []
    for name in REPRODUCED:
        d = load(name)
        seconds = d.get("wall_seconds")
        rows.append([f"`{d['command']}`", f"{seconds / 60:.1f}" if seconds is not None else "not recorded",
                     short(d["commit"]), d["date"]])
    rows.append(["**total**", f"{reproduce_minutes():.1f}", "", ""])
    cpu = load(REPRODUCED[0])["machine"]
    return (_table(["command", "minutes", "commit", "finished"], rows)
            + f"\n\n<sub>Wall times recorded by each script in `experiment_data/*.json`; machine: "
              f"{cpu['cpu_count']} CPU cores, {cpu['platform']}, torch {cpu['torch']}.</sub>")


BLOCKS: dict[str, Callable[[], str]] = {
    "table:reproduce": table_reproduce,
    "table:inversion": table_inversion,
    "table:step-cost": table_step_cost,
    "table:overhead": table_overhead,
    "table:ablation": table_ablation,
    "table:identity": table_identity,
    "table:rtt": table_rtt,
    "table:side-by-side": table_side_by_side,
    "table:gpu": table_gpu,
    "table:memory": table_memory,
}


# -- inline values ----------------------------------------------------------------------------


def _ablation(config: str, key: str, field: str = "tokens_per_step") -> str:
    """`config` "main" is the headline run (the first), whatever its tree size; key "budget" is its size."""
    configs = load("lookahead_ablation")["configs"]
    for i, c in enumerate(configs):
        if c["config"]["name"] == config or (config == "main" and i == 0):
            return str(c["config"]["max_verify"]) if key == "budget" else f2(c["summary"][key][field])
    raise KeyError(f"no ablation config {config!r}")


def _tree_steps(d: dict[str, Any], what: str) -> str:
    """Of lookahead's steps in a side-by-side run: the share that verified the root alone (no
    source had a guess after it), or the tokens committed per step among the others."""
    steps = [(t["tokens"], a) for r in d["runs"]["lookahead"] for t, a in zip(r["timings"], r["accepted_per_step"])]
    trees = [a for k, a in steps if k > 1]
    if what == "root_only_share":
        return pct(1 - len(trees) / len(steps), 0)
    return f2(sum(trees) / len(trees))


# Value prefixes and the files they read: the CPU runs, and the GPU runs of `make experiments-gpu`.
SIDE_BY_SIDE = {"sbs": "wan_side_by_side", "gpu_sbs": "gpu/wan_side_by_side",
                "gpu_sbs_cpu_local": "gpu/wan_side_by_side_cpu_local"}
RTT = {"rtt": "rtt_analysis", "gpu_rtt": "gpu/rtt_analysis"}


def value(name: str) -> str:
    """Inline values, by dotted name: file.what[.detail]; the inversion's by path: inv/what/... ."""
    if name.startswith("inv/"):
        from ..privacy.report import value as inversion_value

        return inversion_value(load("inversion"), name.split("/")[1:])
    file, _, what = name.partition(".")
    if file == "ablation":  # ablation.<config name with _ for space>.<category>
        config, _, key = what.rpartition(".")
        return _ablation(config.replace("_", " "), key)
    if file in SIDE_BY_SIDE:
        d = load(SIDE_BY_SIDE[file])
        if what == "ratio":
            return f2(d["lookahead_over_sequential"])
        if what in ("root_only_share", "tokens_per_tree_step"):
            return _tree_steps(d, what)
        mode, _, field = what.partition(".")
        v = d["summary"][mode][field]
        return pct(v) if field.startswith("share") else f2(v)
    if file in RTT:
        d = load(RTT[file])
        # rtt.k.<mode>.<rtt>: the mean block size K of that mode's steps there;
        # rtt.compute.<mode>.<rtt>: their mean local + cloud milliseconds.
        if what.startswith(("k.", "compute.")):
            from .rtt import key as rtt_key  # lazily: rtt pulls in the testbed (torch, transformers)

            field, _, rest = what.partition(".")
            mode, _, r = rest.partition(".")
            steps = [t for run in d["runs"] if run["mode"] == mode and rtt_key(run["rtt_ms"]) == r for t in run["timings"]]
            if field == "k":
                return f"{sum(t['tokens'] for t in steps) / len(steps):.0f}"
            return f"{sum(t['local_before_ms'] + t['local_after_ms'] + t['cloud_ms'] for t in steps) / len(steps):.0f}"
        if what == "cv.worst_rtt":  # the held-out RTT of the worst fold
            return f"{max(d['cross_validation']['folds'], key=lambda f: f['error'])['held_out_rtt_ms']:g}"
        if what.startswith("cv."):
            return pct(d["cross_validation"][what[3:]])
        mode, _, r = what.partition(".")
        return f2(d["measured"][mode][r]["tokens_per_second"])
    if file == "overhead":
        d = load("split_overhead")
        if what == "serialization_share":
            return pct(d["split"]["serialization_share"], 2)
        if what == "local_share":
            return pct(d["memory"]["local_share_of_parameters"], 0)
        return f2(d["split" if what == "split_tps" else "full_model"]["tokens_per_second"])
    if file in ("step", "gpu_step"):  # step.<K>: the step's total ms with splitinfer's kernels
        rows = load("step_cost" if file == "step" else "gpu/step_cost")["kernels"]["auto"]
        return f"{next(r['total_ms'] for r in rows if r['tokens'] == int(what)):.0f}"
    if file == "threads":  # threads.local / threads.cloud: the torch threads of the speed runs
        return str(load("rtt_analysis")["settings"][f"{what}_threads"])
    if file == "reproduce" and what == "minutes":
        return f"{reproduce_minutes():.0f}"
    if file == "identity":
        return pct(load("perplexity_comparison")["summary"][what]["exact_sequence_rate"])
    raise KeyError(f"unknown value {name!r}")


# -- documents --------------------------------------------------------------------------------


def render_text(text: str) -> str:
    text = BLOCK.sub(lambda m: f"{m.group(1)}\n{BLOCKS[m.group('name')]()}\n{m.group(4)}", text)
    return VALUE.sub(lambda m: f"{m.group(1)}{value(m.group('name'))}{m.group(4)}", text)


def stale(path: Path) -> list[str]:
    """Names of the marked pieces whose text differs from the JSON."""
    text = path.read_text()
    out = [m.group("name") for m in BLOCK.finditer(text) if m.group("body").strip() != BLOCKS[m.group("name")]().strip()]
    out += [m.group("name") for m in VALUE.finditer(text) if m.group("body") != value(m.group("name"))]
    return out


def render(path: Path) -> None:
    path.write_text(render_text(path.read_text()))
