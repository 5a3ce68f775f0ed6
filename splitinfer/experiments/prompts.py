"""The project's prompt sets, shipped as package data (splitinfer/prompts/*.json), by category."""

from __future__ import annotations

import json
from importlib import resources

CATEGORIES = ("code", "structured", "conversational", "creative")


def load(categories: tuple[str, ...] | list[str] = CATEGORIES, per_category: int | None = None) -> list[dict]:
    """[{"category": ..., "prompt": ...}, ...] in a stable order."""
    out = []
    for cat in categories:
        prompts = json.loads((resources.files("splitinfer") / "prompts" / f"{cat}.json").read_text())
        out += [{"category": cat, "prompt": p} for p in prompts[:per_category]]
    return out
