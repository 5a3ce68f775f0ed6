"""What the split costs, from the benchmarks (benchmarks/split_overhead.py, step_cost.py, memory.py, load.py):
their tables and values in the documents."""

from __future__ import annotations

from .registry import CLOUD_COMPUTE, PROMPTS, SPLIT_NUMERICS, f2, load, markdown_table, pct, produced_by, source, table, values

produced_by("overhead", outputs=["split_overhead"],
            code=["benchmarks/split_overhead.py", *SPLIT_NUMERICS, *PROMPTS, *CLOUD_COMPUTE])
produced_by("step-cost", outputs=["step_cost", "gpu/step_cost"],
            code=["benchmarks/step_cost.py", "splitinfer/experiments/testbed.py", *SPLIT_NUMERICS, *CLOUD_COMPUTE])
produced_by("memory", outputs=["memory"],
            code=["benchmarks/memory.py", "splitinfer/cloud/memory.py", "splitinfer/cloud/sessions.py", "splitinfer/hf.py",
                  "splitinfer/kv.py"])
produced_by("load", outputs=["load"], code=["benchmarks/load.py", "splitinfer/cloud", *SPLIT_NUMERICS, *PROMPTS])
produced_by("first-hour", outputs=["first_hour"], code=["benchmarks/first_hour.py"])


@table("overhead")
def overhead_table() -> str:
    d = load("split_overhead")
    s, m, f = d["split"], d["memory"], d["full_model"]
    b = s["breakdown_ms_per_step"]
    rows = [
        ["split, loopback (sequential)", f2(s["tokens_per_second"]), f"{s['ms_per_step']:.1f}", pct(s["serialization_share"], 2)],
        ["full model, one process", f2(f["tokens_per_second"]), f"{1000 / f['tokens_per_second']:.1f}", "-"],
    ]
    mem = markdown_table(
        ["", "parameters", "peak RSS (MB)"],
        [
            ["local side", f"{m['local_parameters'] / 1e6:.1f}M ({pct(m['local_share_of_parameters'], 0)})", f"{m['local_peak_rss_mb']:.0f}"],
            ["cloud side", f"{m['cloud_parameters'] / 1e6:.1f}M", f"{m['cloud_peak_rss_mb']:.0f}"],
            ["whole model", f"{m['whole_model_parameters'] / 1e6:.1f}M", f"{m['whole_model_peak_rss_mb']:.0f}"],
        ],
    )
    parts = ", ".join(f"{k.removesuffix('_ms')} {v:.1f}" for k, v in b.items())
    return (
        markdown_table(["", "tokens/s", "ms/step", "serialisation share"], rows)
        + f"\n\nPer step (ms): {parts}.\n\n" + mem + source("split_overhead")
    )


@values("overhead")
def overhead_value(prefix: str, what: str) -> str:
    """overhead.serialization_share / .local_share / .float32_weights_mb / .split_tps / .full_tps."""
    d = load("split_overhead")
    if what == "serialization_share":
        return pct(d["split"]["serialization_share"], 2)
    if what == "local_share":
        return pct(d["memory"]["local_share_of_parameters"], 0)
    if what == "float32_weights_mb":  # what a step reads: the whole model's weights in float32, in MB
        return f"{d['memory']['whole_model_parameters'] * 4 / 1e6:.0f}"
    return f2(d["split" if what == "split_tps" else "full_model"]["tokens_per_second"])


@table("step-cost")
def step_cost_table() -> str:
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
    return markdown_table(head, rows) + source("step_cost")


def gpu_step_cost_table() -> str:
    rows = [[str(r["tokens"]), f"{r['total_ms']:.1f}", f"{r['local_ms']:.1f}", f"{r['cloud_ms']:.1f}"]
            for r in load("gpu/step_cost")["kernels"]["auto"]]
    return markdown_table(["tokens verified (K)", "step ms", "local ms", "cloud ms"], rows) + source("gpu/step_cost")


@values("step", "gpu_step")
def step_value(prefix: str, what: str) -> str:
    """step.<K> / gpu_step.<K>: the step's total ms with splitinfer's kernels."""
    rows = load("step_cost" if prefix == "step" else "gpu/step_cost")["kernels"]["auto"]
    return f"{next(r['total_ms'] for r in rows if r['tokens'] == int(what)):.0f}"


@table("memory")
def memory_table() -> str:
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
    text = markdown_table(["what", "cache (formula), MiB", "held, MiB", "peak growth, MiB", "bound used for the limits, MiB"],
                          rows)
    defaults = d["defaults_on_24_gib"]
    text += (f"\n\nAfter {long['sessions']} sessions of {long['tokens']} tokens were filled and closed, the cloud's RSS went "
             f"from {long['rss_start_mb']:.0f} MiB through a peak of {long['rss_peak_mb']:.0f} MiB back to "
             f"{long['rss_after_mb']:.0f} MiB ({100 * long['change']:+.1f}%).  On a machine with 24 GiB available the "
             f"defaults come out at {defaults['max_sessions']} sessions and {defaults['max_connections']} connections, "
             f"frames up to {defaults['per_frame_mb']:.1f} MiB.")
    return text + source("memory")


@values("first_hour")
def first_hour_value(prefix: str, what: str) -> str:
    """first_hour.install / .prepare / .demo (seconds, or minutes where marked _min) / .tests_min / .tests_passed
    / .help_max: a fresh clone's first steps on the recorded machine (benchmarks/first_hour.py)."""
    d = load("first_hour")
    tests = d.get("tests", {})
    return {
        "install_min": lambda: f"{d['install_seconds'] / 60:.1f}",
        "prepare": lambda: f"{d['prepare_model_seconds']:.0f}",
        "demo": lambda: f"{d['demo_seconds']:.0f}",
        "tests_min": lambda: f"{tests['seconds'] / 60:.1f}",
        "tests_passed": lambda: str(tests["counts"].get("passed", 0)),
        "help_max": lambda: f"{max(d['help_seconds'].values()):.2f}",
    }[what]()


@table("load")
def load_table() -> str:
    """Sessions on one cloud (benchmarks/load.py): throughput and cloud step latency as sessions are added."""
    d = load("load")
    rows = [[str(p["sessions"]), f"{p['rtt_ms']:g}", f2(p["aggregate_tokens_per_second"]),
             f2(p["per_session_tokens_per_second"]), f"{p['step_ms_p50']:.0f}", f"{p['step_ms_p99']:.0f}",
             f"{p['mean_sessions_per_pass']:.1f}", "yes" if p["replies_within_float16_rounding"] else "**no**"]
            for p in d["sweep"]]
    text = markdown_table(["sessions", "RTT, ms", "tokens/s, all", "tokens/s, per session", "step p50, ms",
                           "step p99, ms", "sessions per pass", "replies as solo"], rows)
    s = d["settings"]
    text += (f"\n\n{s['mode'].capitalize()} generations of {s['max_new_tokens']} tokens, recorded once and replayed "
             f"(frames only, no local compute) by one load generator; the cloud ran {s['cloud_threads']} torch "
             f"thread(s) in {s['dtype']}.  Step latency is send to reply with the emulated RTT left out.")
    return text + source("load")


@values("load")
def load_value(prefix: str, what: str) -> str:
    """load.x<N>_rtt<R> (throughput ratio, N sessions against one) / load.lat<N>_rtt<R> (step p50 ratio) /
    load.tps<N>_rtt<R> (aggregate tokens/s) / load.all_as_solo (yes or no)."""
    d = load("load")
    if what == "all_as_solo":
        return "yes" if all(p["replies_within_float16_rounding"] for p in d["sweep"]) else "no"
    kind, _, rest = what.partition("_rtt")
    key, n = kind.rstrip("0123456789"), int(kind[len(kind.rstrip("0123456789")):])
    if key == "tps":
        return f2(next(p["aggregate_tokens_per_second"] for p in d["sweep"]
                       if p["sessions"] == n and p["rtt_ms"] == float(rest)))
    h = next(h for h in d["headlines"] if h["sessions"] == n and h["rtt_ms"] == float(rest))
    return f2(h["throughput_ratio"] if key == "x" else h["step_p50_ratio"])


produced_by("big-models", outputs=["big_models"],
            code=["benchmarks/big_models.py", "splitinfer/experiments/big.py", "splitinfer/random_model.py",
                  "splitinfer/models.py", "splitinfer/local.py", *SPLIT_NUMERICS, *CLOUD_COMPUTE])

_SHAPE_NAMES = {"mistral-7b": "Mistral 7B", "mistral-nemo-12b": "Mistral NeMo 12B"}


@table("big_models")
def big_models_table() -> str:
    """The seed's shapes with seeded random weights (benchmarks/big_models.py): each side's weights and peak memory."""
    d = load("big_models")
    gb = 1e9
    rows = []
    for s in d["shapes"]:
        w, ref = s["weights_bytes"], s["reference"]
        rows.append([
            _SHAPE_NAMES[s["like"]], f"{w['whole'] / 2 / gb:.2f}B",
            f"{w['local'] / gb:.2f}", f"{s['local']['VmHWM'] / gb:.2f}", f"{s['spec_local_gb']:.1f}",
            f"{w['cloud'] / gb:.2f}", f"{s['cloud']['VmHWM'] / gb:.2f}",
            f"{ref['VmHWM'] / gb:.2f}" if "VmHWM" in ref else "does not fit",
            {True: "yes", False: "**no**", None: "not run (memory)"}[s["split_equals_unsplit"]],
        ])
    text = markdown_table(["shape", "parameters", "local weights, GB", "local peak, GB", "spec: local, GB",
                           "cloud weights, GB", "cloud peak, GB", "unsplit peak, GB",
                           f"split = unsplit ({d['settings']['tokens']} tokens)"], rows)
    text += (f"\n\n{d['settings']['dtype']} on this CPU, {d['settings']['threads']} torch threads per process, weights "
             "drawn from a seed (`--random-weights`; the real checkpoints cannot be downloaded here).  Peak is the "
             "process's peak resident memory (VmHWM): weights plus torch, the tokenizer and the activations.  The "
             "spec's local figures are GPU memory in float16 (2 bytes per parameter, as bfloat16).  Where both "
             "sides do not fit this 24 GB machine at once (NeMo), each was measured alone.")
    return text + source("big_models")


@values("big_models")
def big_models_value(prefix: str, what: str) -> str:
    """big_models.<shape>.<local_gb|local_peak_gb|cloud_gb|cloud_peak_gb|unsplit_peak_gb|equal>, shape as in
    random_model.LIKE with '-' as '_'."""
    d = load("big_models")
    shape, _, field = what.partition(".")
    s = next(s for s in d["shapes"] if s["like"] == shape.replace("_", "-"))
    gb = 1e9
    return {
        "local_gb": lambda: f"{s['weights_bytes']['local'] / gb:.2f}",
        "local_peak_gb": lambda: f"{s['local']['VmHWM'] / gb:.2f}",
        "cloud_gb": lambda: f"{s['weights_bytes']['cloud'] / gb:.2f}",
        "cloud_peak_gb": lambda: f"{s['cloud']['VmHWM'] / gb:.2f}",
        "unsplit_peak_gb": lambda: f"{s['reference']['VmHWM'] / gb:.2f}",
        "equal": lambda: "yes" if s["split_equals_unsplit"] else "no",
    }[field]()


produced_by("pass-cost", outputs=["pass_cost"], code=["benchmarks/pass_cost.py", *SPLIT_NUMERICS, *CLOUD_COMPUTE])


@values("pass_cost")
def pass_cost_value(prefix: str, what: str) -> str:
    """pass_cost.pass<N> (median ms of one pass of N one-token sessions) / pass_cost.one_thread /
    pass_cost.two_threads (a one-session pass from one thread, and from two threads in turn, ms)."""
    d = load("pass_cost")
    if what == "one_thread":
        return f"{d['by_thread']['one_thread_ms_p50']:.0f}"
    if what == "two_threads":
        return f"{d['by_thread']['two_threads_in_turn_ms_p50']:.0f}"
    n = int(what.removeprefix("pass"))
    return f"{next(p['pass_ms_p50'] for p in d['by_sessions'] if p['sessions'] == n):.0f}"
