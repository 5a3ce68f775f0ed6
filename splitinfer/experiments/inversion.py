"""The inversion experiment (inversion_experiment.py, splitinfer/privacy/) in the documents: its tables and
values are rendered by privacy/report.py; this registers them."""

from __future__ import annotations

from .registry import load, produced_by, table, values

NAME = "inversion"

produced_by("inversion", outputs=[NAME], code=["inversion_experiment.py", "splitinfer/privacy", ":(exclude)splitinfer/privacy/report.py"])


@table("inversion")
def inversion_table() -> str:
    from ..privacy.report import render

    return render(load(NAME))


@values("inv")
def inversion_value(prefix: str, what: str) -> str:
    """inv/<what>/...: see privacy.report.value."""
    from ..privacy.report import value

    return value(load(NAME), what.split("/"))
