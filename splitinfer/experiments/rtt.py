"""Where the time goes, and tokens per second at any round-trip time.

Measurement: each mode runs the prompt set at each emulated RTT; every decoding
step records its block size K and its local, serialisation, network and cloud
milliseconds (`StepTiming`), and every generation its wall time, so the time the
decoding strategy spends between steps (tree building, bookkeeping) is known too.

Model, per mode: time per step(RTT, K) = RTT + net0 + net1*K + local0 +
local1*K + cloud0 + cloud1*K + ser0 + ser1*K + other; tokens per step and the
mean K are linear in RTT (the cost-based budget grows the tree as the link
slows).  Tokens/s = tokens per step / time.  Each term is a least-squares fit
over steps; the leave-one-RTT-out cross-validation refits everything without
one RTT and predicts its tokens/s.
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from . import prompts as prompt_sets
from .registry import CLOUD_COMPUTE, DECODING, PROMPTS, SPLIT_NUMERICS, differences, f2, load, markdown_table, pct, produced_by, recomputed, source, table, values

if TYPE_CHECKING:  # the testbed imports torch; the report reads this module's tables without it
    from .testbed import Bed

PARTS = ("network", "local", "cloud", "serialize", "other")


def key(rtt: float) -> str:
    """How an RTT names its entry in the JSON: "0", "20", "12.5"."""
    return f"{float(rtt):g}"


def measure(bed: Bed, rtts: list[float], rows: dict[str, tuple[str, dict]], per_category: int, max_new: int) -> list[dict]:
    """One record per (rtt, row, prompt), with every step's timing; `rows` as experiments.rows_for gives them
    (a record's "mode" is its row's name).

    Prompt by prompt, every RTT and mode in turn (see `schedule`): the machine's speed
    drifts over a long run (other load, clocks), and interleaving spreads that drift
    over all RTTs instead of confounding it with one of them.
    """
    from ..decoding.lookahead import Memory  # torch: only where generations run

    prompts = prompt_sets.load(per_category=per_category)
    encoded = [bed.local.encode(p["prompt"]) for p in prompts]
    # Each (rtt, mode) learns its own cost model and tables, as a local side on that link would.
    modes = list(rows)
    memories = {(rtt, mode): Memory() for rtt in rtts for mode in modes}
    records = []
    bar = tqdm(total=len(rtts) * len(modes) * len(prompts), desc="rtt analysis", unit="run")
    for i, (p, ids) in enumerate(zip(prompts, encoded)):
        for rtt, run_modes in schedule(i, rtts, modes):
            bed.set_rtt(rtt)
            for mode in run_modes:
                decoding, options = rows[mode]
                g = bed.generate(ids, decoding, max_new, memory=memories[(rtt, mode)], **options)
                steps = g.timings
                step_ms = sum(_local(t) + t["serialize_ms"] + t["wait_ms"] for t in steps)
                records.append(
                    {
                        "rtt_ms": float(rtt),
                        "mode": mode,
                        "category": p["category"],
                        "new_tokens": len(g.token_ids),
                        "steps": g.steps,
                        "decoded_tokens": sum(g.per_step),
                        "decode_seconds": g.decode_seconds,
                        "tokens_per_second": g.tokens_per_second,
                        "other_ms_per_step": (g.decode_seconds * 1000.0 - step_ms) / g.steps if g.steps else 0.0,
                        "timings": steps,
                    }
                )
                bar.update()
    bar.close()
    bed.stop_wan()
    return records


def schedule(i: int, rtts: list[float], modes: list[str]) -> list[tuple[float, list[str]]]:
    """The order of prompt i's runs: RTTs rotated by i, modes reversed on odd prompts.

    A fixed order would give each RTT a fixed place in every cycle (always first after a
    new prompt, always right after the longest idle gap), and any cost tied to that place
    would look like an effect of the RTT; rotating moves every RTT through every place.
    """
    shift = i % len(rtts) if rtts else 0
    order = modes[::-1] if i % 2 else list(modes)
    return [(rtt, order) for rtt in rtts[shift:] + rtts[:shift]]


def _local(t: dict) -> float:
    return t["local_before_ms"] + t["local_after_ms"]


def aggregate(records: list[dict]) -> dict[str, Any]:
    """Measured tokens/s and time shares per (mode, rtt)."""
    out: dict[str, Any] = {}
    for mode in sorted({r["mode"] for r in records}):
        out[mode] = {}
        for rtt in sorted({r["rtt_ms"] for r in records}):
            sel = [r for r in records if r["mode"] == mode and r["rtt_ms"] == rtt]
            if not sel:
                continue
            steps = [t for r in sel for t in r["timings"]]
            totals = {
                "network": sum(t["network_ms"] for t in steps),
                "local": sum(_local(t) for t in steps),
                "cloud": sum(t["cloud_ms"] for t in steps),
                "serialize": sum(t["serialize_ms"] for t in steps),
                "other": sum(r["other_ms_per_step"] * r["steps"] for r in sel),
            }
            whole = sum(totals.values())
            decoded = sum(r["decoded_tokens"] for r in sel)
            seconds = sum(r["decode_seconds"] for r in sel)
            out[mode][key(rtt)] = {
                "tokens_per_second": decoded / seconds,
                "tokens_per_step": decoded / sum(r["steps"] for r in sel),
                "mean_verified": statistics.mean(t["tokens"] for t in steps),
                "ms_per_step": {k: v / len(steps) for k, v in totals.items()},
                "shares": {k: v / whole for k, v in totals.items()},
            }
    return out


class Decomposition:
    """The fitted model (see the module docstring)."""

    def __init__(self, records: list[dict]):
        self.modes: dict[str, dict[str, Any]] = {}
        for mode in sorted({r["mode"] for r in records}):
            sel = [r for r in records if r["mode"] == mode]
            rtts = np.array([r["rtt_ms"] for r in sel], float)
            tps = np.array([r["decoded_tokens"] / r["steps"] for r in sel])
            kk = np.array([statistics.mean(t["tokens"] for t in r["timings"]) for r in sel])
            self.modes[mode] = {
                # Per mode: a step's cost is far from linear in K over 1..64 (a single token uses a
                # cheaper kernel), so each mode's line is fitted over the block sizes it actually uses.
                "terms": _terms([(r["rtt_ms"], t) for r in sel for t in r["timings"]]),
                "tokens_per_step": _line(rtts, tps),
                "mean_verified": _line(rtts, kk),
                "other_ms": float(np.mean([r["other_ms_per_step"] for r in sel])),
            }

    def step_ms(self, mode: str, rtt: float) -> float:
        m = self.modes[mode]
        k = _at(m["mean_verified"], rtt)
        return rtt + sum(_at(line, k) for line in m["terms"].values()) + m["other_ms"]

    def tokens_per_second(self, mode: str, rtt: float) -> float:
        return _at(self.modes[mode]["tokens_per_step"], rtt) * 1000.0 / self.step_ms(mode, rtt)

    def as_dict(self) -> dict[str, Any]:
        return {
            m: {
                "terms_ms": {name: {"intercept": a, "per_token": b} for name, (a, b) in v["terms"].items()},
                "tokens_per_step": {"intercept": v["tokens_per_step"][0], "per_rtt_ms": v["tokens_per_step"][1]},
                "mean_verified": {"intercept": v["mean_verified"][0], "per_rtt_ms": v["mean_verified"][1]},
                "other_ms_per_step": v["other_ms"],
            }
            for m, v in self.modes.items()
        }


def _terms(steps: list[tuple[float, dict]]) -> dict[str, tuple[float, float]]:
    """Each time term as intercept + slope x K, over (rtt, step timing) pairs; network is net of the RTT."""
    k = np.array([t["tokens"] for _, t in steps], float)
    rtt = np.array([x for x, _ in steps], float)
    return {
        "network": _line(k, np.array([t["network_ms"] for _, t in steps]) - rtt),
        "local": _line(k, np.array([_local(t) for _, t in steps])),
        "cloud": _line(k, np.array([t["cloud_ms"] for _, t in steps])),
        "serialize": _line(k, np.array([t["serialize_ms"] for _, t in steps])),
    }


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares intercept and slope; a flat line when x does not vary."""
    if len(x) == 0:
        return 0.0, 0.0
    if np.ptp(x) == 0:
        return float(np.mean(y)), 0.0
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def _at(line: tuple[float, float], x: float) -> float:
    return line[0] + line[1] * x


def cross_validate(records: list[dict], measured: dict[str, Any]) -> dict[str, Any]:
    """Leave one RTT out: fit on the others, predict its tokens/s per mode."""
    rtts = sorted({r["rtt_ms"] for r in records})
    rows, errors = [], []
    for held in rtts:
        model = Decomposition([r for r in records if r["rtt_ms"] != held])
        for mode in sorted(model.modes):
            actual = measured[mode][key(held)]["tokens_per_second"]
            predicted = model.tokens_per_second(mode, held)
            err = abs(predicted - actual) / actual
            errors.append(err)
            rows.append({"held_out_rtt_ms": held, "mode": mode, "measured": actual, "predicted": predicted, "error": err})
    return {"folds": rows, "mean_abs_error": float(np.mean(errors)), "max_abs_error": float(np.max(errors))}


# -- in the documents -------------------------------------------------------------------------

NAME = "rtt_analysis"
FILES = {"rtt": NAME, "gpu_rtt": f"gpu/{NAME}"}  # value prefixes: the CPU run, the GPU run of make experiments-gpu

produced_by("rtt", outputs=FILES.values(),
            code=["rtt_analysis.py", "splitinfer/experiments/rtt.py", "splitinfer/experiments/testbed.py",
                  *SPLIT_NUMERICS, *DECODING, *PROMPTS, *CLOUD_COMPUTE])


@recomputed(*FILES.values())
def check(data: dict[str, Any]) -> list[str]:
    """The measured table, the model, its cross-validation and its projection, from the stored runs."""
    runs = data["runs"]
    measured = aggregate(runs)
    model = Decomposition(runs)
    projection = {m: {r: model.tokens_per_second(m, float(r)) for r in p} for m, p in data["projection"].items()}
    out = differences(data["measured"], measured, "measured")
    out += differences(data["model"], model.as_dict(), "model")
    out += differences(data["projection"], projection, "projection")
    if data.get("cross_validation"):
        out += differences(data["cross_validation"], cross_validate(runs, measured), "cross_validation")
    return out


@table("rtt")
def rtt_table(name: str = NAME) -> str:
    d = load(name)
    modes = sorted(d["measured"])
    rtts = list(d["measured"][modes[0]])
    rows = [[m, *(f2(d["measured"][m][r]["tokens_per_second"]) for r in rtts)] for m in modes]
    text = markdown_table(["tokens/s at RTT (ms)", *rtts], rows)
    shares = []
    for m in modes:
        for r in ("0", "80"):
            if r in d["measured"][m]:
                sh = d["measured"][m][r]["shares"]
                shares.append([f"{m} @ {r} ms", *(pct(sh[k], 0) for k in PARTS)])
    text += "\n\n" + markdown_table(["latency breakdown", "network", "local", "cloud", "serialisation", "decoding logic"],
                                     shares)
    if d.get("cross_validation"):
        cv = d["cross_validation"]
        text += (f"\n\nLeave-one-RTT-out error of the decomposition model: mean {pct(cv['mean_abs_error'])}, "
                 f"max {pct(cv['max_abs_error'])}.")
    proj = d["projection"]
    text += "\n\n" + markdown_table(["projected tokens/s at RTT (ms)", *proj[modes[0]]],
                                     [[m, *(f2(v) for v in proj[m].values())] for m in modes])
    return text + source(name)


@values(*FILES)
def rtt_value(prefix: str, what: str) -> str:
    """<prefix>.<mode>.<rtt>: measured tokens/s; .k.<mode>.<rtt>: the mean block size K of that mode's steps
    there; .compute.<mode>.<rtt>: their mean local + cloud ms; .cv.<field>: the cross-validation's error;
    .cv.worst_rtt: the held-out RTT of the worst fold."""
    d = load(FILES[prefix])
    if what.startswith(("k.", "compute.")):
        field, _, rest = what.partition(".")
        mode, _, r = rest.partition(".")
        steps = [t for run in d["runs"] if run["mode"] == mode and key(run["rtt_ms"]) == r for t in run["timings"]]
        if field == "k":
            return f"{sum(t['tokens'] for t in steps) / len(steps):.0f}"
        return f"{sum(_local(t) + t['cloud_ms'] for t in steps) / len(steps):.0f}"
    if what == "cv.worst_rtt":
        return f"{max(d['cross_validation']['folds'], key=lambda f: f['error'])['held_out_rtt_ms']:g}"
    if what.startswith("cv."):
        return pct(d["cross_validation"][what[3:]])
    mode, _, r = what.partition(".")
    return f2(d["measured"][mode][r]["tokens_per_second"])
