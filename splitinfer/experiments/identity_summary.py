"""Output identity's comparison and aggregation, and its table and values in the documents (no torch: see
identity.py for the runs)."""

from __future__ import annotations

import math
from typing import Any

from .registry import DECODING, PROMPTS, SPLIT_NUMERICS, differences, load, markdown_table, pct, produced_by, recomputed, source, table, values

REFERENCE = "hf_generate"
NAME = "perplexity_comparison"

produced_by("identity", outputs=[NAME, f"gpu/{NAME}"],
            code=["perplexity_comparison.py", "splitinfer/experiments/identity.py", *SPLIT_NUMERICS, *DECODING, *PROMPTS])


def compare(ref: list[int], out: list[int]) -> dict[str, Any]:
    n = max(len(ref), len(out))
    same = sum(a == b for a, b in zip(ref, out))
    first = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), None)
    if first is None and len(ref) != len(out):
        first = min(len(ref), len(out))
    return {"token_agreement": same / n if n else 1.0, "identical": ref == out, "first_difference": first}


def summarise(rows: list[dict], modes: list[str]) -> dict[str, Any]:
    out = {}
    keys = [*modes, *(f"{m}_vs_sequential" for m in modes if m != "sequential" and "sequential" in modes)]
    for key in keys:
        cmps = [r["comparison"][key] for r in rows]
        out[key] = {
            "exact_sequence_rate": sum(c["identical"] for c in cmps) / len(cmps),
            "token_agreement": sum(c["token_agreement"] for c in cmps) / len(cmps),
            "prompts": len(cmps),
        }
        if key in modes:
            ppl = [r["perplexity"][key] for r in rows if not math.isnan(r["perplexity"][key])]
            out[key]["mean_perplexity"] = sum(ppl) / len(ppl) if ppl else float("nan")
    ref_ppl = [r["perplexity"][REFERENCE] for r in rows]
    out[REFERENCE] = {"mean_perplexity": sum(ref_ppl) / len(ref_ppl)}
    return out


@recomputed(NAME, f"gpu/{NAME}")
def check(data: dict[str, Any]) -> list[str]:
    """Every comparison from the stored outputs, the summary from the comparisons."""
    modes = [k for k in data["summary"] if k != REFERENCE and "_vs_" not in k]
    out = []
    for i, row in enumerate(data["prompts"]):
        outputs = row["outputs"]
        for key, stored in row["comparison"].items():
            mode, _, against = key.partition("_vs_")
            cmp = compare(outputs[against or REFERENCE], outputs[mode])
            out += differences(stored, cmp, f"prompts[{i}].comparison.{key}")
    return out + differences(data["summary"], summarise(data["prompts"], modes), "summary")


@table("identity")
def identity_table() -> str:
    d = load(NAME)
    rows = []
    for key, s in d["summary"].items():
        if key == REFERENCE:
            continue
        rows.append([key.replace("_vs_", " vs "), pct(s["exact_sequence_rate"]), pct(s["token_agreement"], 2),
                     f"{s['mean_perplexity']:.3f}" if "mean_perplexity" in s else "-"])
    rows.append(["hf_generate (reference)", "-", "-", f"{d['summary'][REFERENCE]['mean_perplexity']:.3f}"])
    diffs = [
        f"{r['category']} prompt, {mode}: first difference at token {c['first_difference']}, "
        f"reference top-2 margin {c.get('reference_top2_margin', float('nan')):.3f}"
        for r in d["prompts"] for mode, c in r["comparison"].items()
        if "_vs_" not in mode and not c["identical"]
    ]
    text = markdown_table(["mode vs HF generate", "exact sequences", "tokens agreeing", "mean perplexity"], rows)
    if diffs:
        text += "\n\nDifferences: " + "; ".join(diffs) + "."
    return text + source(NAME)


def gpu_identity_table() -> str:
    """The GPU run's agreement, against HF generate on the same GPU and dtype."""
    name = f"gpu/{NAME}"
    rows = [[key.replace("_vs_", " vs "), pct(v["exact_sequence_rate"]), pct(v["token_agreement"], 2), str(v["prompts"])]
            for key, v in load(name)["summary"].items() if "exact_sequence_rate" in v]
    return markdown_table(["output identity (vs HF generate on the same GPU and dtype)", "exact sequences",
                           "tokens agreeing", "prompts"], rows) + source(name)


@values("identity")
def identity_value(prefix: str, what: str) -> str:
    """identity.<mode or mode_vs_sequential>: its exact-sequence rate."""
    return pct(load(NAME)["summary"][what]["exact_sequence_rate"])
