"""Per-sequence scores and their aggregates with 95% bootstrap confidence intervals over sequences."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .texts import PII_FIELDS


def score(true: Sequence[int], pred: Sequence[int]) -> tuple[int, int, bool]:
    """(correct positions, length, exact) of a recovered sequence against the truth, position by position."""
    n = len(true)
    correct = sum(int(a == b) for a, b in zip(true, pred))
    return correct, n, correct == n and len(pred) == n


def pii_recovered(fields: dict[str, str], recovered_text: str) -> dict[str, bool]:
    """Each personal-data field counts as recovered when its exact string appears in the decoded recovery."""
    return {name: value in recovered_text for name, value in fields.items()}


def _ci(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def summarise(records: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Aggregates over per-sequence records {correct, n, exact, pii?, seconds}.

    Token accuracy is pooled (sum correct / sum tokens); its CI, the exact-sequence rate's and the PII
    recovery's come from resampling whole sequences with replacement.
    """
    if not records:
        return {}
    rng = np.random.default_rng(seed)
    correct = np.array([r["correct"] for r in records], dtype=float)
    n = np.array([r["n"] for r in records], dtype=float)
    exact = np.array([float(r["exact"]) for r in records])
    m = len(records)
    idx = rng.integers(0, m, size=(n_boot, m))
    acc_b = correct[idx].sum(1) / np.maximum(n[idx].sum(1), 1)
    exact_b = exact[idx].mean(1)
    out = {
        "sequences": m,
        "tokens": int(n.sum()),
        "token_accuracy": {"mean": float(correct.sum() / max(n.sum(), 1)), "ci95": _ci(acc_b)},
        "exact_sequence_rate": {"mean": float(exact.mean()), "ci95": _ci(exact_b)},
    }
    with_pii = [r for r in records if r.get("pii")]
    if with_pii:
        per_seq = np.array([np.mean(list(r["pii"].values())) for r in with_pii])
        pidx = rng.integers(0, len(with_pii), size=(n_boot, len(with_pii)))
        out["pii_recovery"] = {"mean": float(per_seq.mean()), "ci95": _ci(per_seq[pidx].mean(1)),
                               "fields": {f: float(np.mean([r["pii"][f] for r in with_pii if f in r["pii"]]))
                                          for f in PII_FIELDS if any(f in r["pii"] for r in with_pii)}}
    seconds = sum(r.get("seconds", 0.0) for r in records)
    out["seconds_per_token"] = seconds / max(n.sum(), 1)
    return out
