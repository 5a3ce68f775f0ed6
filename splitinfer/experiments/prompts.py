"""The project's prompt sets, kept in the repo (prompts/*.json), by category."""

from __future__ import annotations

import json
from pathlib import Path

from ..procs import ROOT

PROMPT_DIR = ROOT / "prompts"
CATEGORIES = ("code", "structured", "conversational", "creative")


def load(categories: tuple[str, ...] | list[str] = CATEGORIES, per_category: int | None = None) -> list[dict]:
    """[{"category": ..., "prompt": ...}, ...] in a stable order."""
    out = []
    for cat in categories:
        prompts = json.loads((PROMPT_DIR / f"{cat}.json").read_text())
        out += [{"category": cat, "prompt": p} for p in prompts[:per_category]]
    return out
