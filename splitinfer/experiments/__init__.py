"""What the experiment scripts share: prompt sets, provenance-stamped JSON, plots."""

from __future__ import annotations

# With a drafter, the experiments keep lookahead without it as a row of its own, under this name.
MODEL_FREE = "lookahead-model-free"


def rows_for(modes: list[str], options: dict[str, dict], drafter: bool) -> dict[str, tuple[str, dict]]:
    """{row: (decoding mode, its options)}: each of `modes`, and with a drafter, lookahead once more on the
    model-free guesses alone (row MODEL_FREE)."""
    from ..decoding.lookahead import SOURCES  # torch: only where generations run

    rows = {mode: (mode, options.get(mode, {})) for mode in modes}
    if drafter and "lookahead" in modes:
        rows[MODEL_FREE] = ("lookahead", {**options.get("lookahead", {}), "sources": SOURCES - {"draft"}})
    return rows
