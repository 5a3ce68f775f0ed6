"""Tables that gather several experiments: the GPU figures beside the CPU ones, and what reproducing them costs."""

from __future__ import annotations

from .costs import gpu_step_cost_table
from .identity_summary import gpu_identity_table
from .registry import DATA, load, markdown_table, short, table, values
from .rtt import rtt_table
from .side_by_side import side_by_side_table

# What `make experiments` writes, in its order.
REPRODUCED = ("perplexity_comparison", "lookahead_ablation", "rtt_analysis", "wan_side_by_side",
              "wan_side_by_side_pinned", "warm_start", "warm_start_model_free",
              "split_overhead", "step_cost", "inversion", "memory", "load")


@table("gpu")
def gpu_table() -> str:
    """The speed figures from `make experiments-gpu` (experiment_data/gpu/), beside the CPU ones."""
    steps = load("gpu/step_cost")
    dtype = steps["settings"].get("dtype") or "float16"  # unset: a GPU's default dtype
    text = f"{steps['machine']['cuda']}, {dtype}, both sides and the WAN emulator on one machine unless a table says otherwise.\n\n"
    text += gpu_step_cost_table()
    text += "\n\nAt 80 ms RTT, both sides on the GPU:\n\n" + side_by_side_table("gpu/wan_side_by_side")
    if (DATA / "gpu/wan_side_by_side_cpu_local.json").exists():
        local = load("gpu/wan_side_by_side_cpu_local")["settings"]
        text += (f"\n\nAt 80 ms RTT, as deployed: the local side on the CPU ({local['dtype']}, "
                 f"{local['local_threads']} threads), the cloud on the GPU:\n\n"
                 + side_by_side_table("gpu/wan_side_by_side_cpu_local"))
    if (DATA / "gpu/rtt_analysis.json").exists():
        text += "\n\nThe RTT sweep, both sides on the GPU:\n\n" + rtt_table("gpu/rtt_analysis")
    return text + "\n\n" + gpu_identity_table()


def reproduce_minutes() -> float:
    """The wall time of the whole `make experiments` run: the sum of what each script recorded."""
    return sum(load(name).get("wall_seconds") or 0.0 for name in REPRODUCED) / 60.0


@table("reproduce")
def reproduce_table() -> str:
    rows = []
    for name in REPRODUCED:
        d = load(name)
        seconds = d.get("wall_seconds")
        rows.append([f"`{d['command']}`", f"{seconds / 60:.1f}" if seconds is not None else "not recorded",
                     short(d["commit"]), d["date"]])
    rows.append(["**total**", f"{reproduce_minutes():.1f}", "", ""])
    cpu = load(REPRODUCED[0])["machine"]
    return (markdown_table(["command", "minutes", "commit", "finished"], rows)
            + f"\n\n<sub>Wall times recorded by each script in `experiment_data/*.json`; machine: "
              f"{cpu['cpu_count']} CPU cores, {cpu['platform']}, torch {cpu['torch']}.</sub>")


@values("reproduce")
def reproduce_value(prefix: str, what: str) -> str:
    """reproduce.minutes: the whole `make experiments` run."""
    if what != "minutes":
        raise KeyError(f"unknown value reproduce.{what}")
    return f"{reproduce_minutes():.0f}"


@values("threads")
def threads_value(prefix: str, what: str) -> str:
    """threads.local / threads.cloud: the torch threads of the speed runs."""
    return str(load("rtt_analysis")["settings"][f"{what}_threads"])
