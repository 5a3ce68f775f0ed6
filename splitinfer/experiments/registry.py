"""What each experiment contributes to the documents, registered beside its aggregation.

    @table("ablation")                       # <!--BEGIN table:ablation--> ... <!--END table:ablation-->
    def ablation_table() -> str: ...

    @values("ablation")                      # <!--v:ablation.main.code-->2.31<!--/v-->
    def ablation_value(prefix: str, what: str) -> str: ...

    produced_by("ablation", outputs=["lookahead_ablation"], code=["lookahead_ablation.py", ...])

    @recomputed("lookahead_ablation")        # summary fields against the raw steps stored beside them
    def check(data: dict) -> list[str]: ...

Also the shared formatting (two decimals, percentages, Markdown tables, the source line).
Nothing here imports torch: `python -m splitinfer report --check` stays cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..config import CHECKOUT

# The documents and the results they quote live in the checkout (else: the current directory).
ROOT = CHECKOUT or Path()
DATA = ROOT / "experiment_data"

# The code a split forward's numbers come from (old names too: kv.py became hf.py), and the decoding strategies
# that choose the tokens.  Transport, logging and the command lines are left out: they change no number.
SPLIT_NUMERICS = ("splitinfer/engine.py", "splitinfer/parts.py", "splitinfer/hf.py", "splitinfer/kv.py",
                  "splitinfer/masks.py", "splitinfer/kernels.py")
DECODING = ("splitinfer/decoding", "splitinfer/drafting", "drafters")  # strategies, the draft head, its weights
# What a real cloud process's step costs: its passes, caches and the threads they run in (a timing changes
# with them even where the numbers computed do not; tests/test_batching.py checks those stay bitwise).
CLOUD_COMPUTE = ("splitinfer/cloud/sessions.py", "splitinfer/cloud/batch.py", "splitinfer/cloud/cache.py",
                 "splitinfer/cloud/server.py")
PROMPTS = ("prompts", "splitinfer/prompts")  # the prompt sets, before and after they became package data

Table = Callable[[], str]
Value = Callable[[str, str], str]  # (prefix, the rest of the name) -> text
Check = Callable[[dict[str, Any]], list[str]]  # a result file -> its summary fields that disagree


@dataclass(frozen=True)
class Producer:
    """The code whose change makes an experiment's result files stale."""

    experiment: str  # the name neutral_changes.json uses
    outputs: tuple[str, ...]  # result files, by name under experiment_data/ without ".json"
    code: tuple[str, ...]  # git pathspecs in the checkout, old names included (a move must not hide a change)


TABLES: dict[str, Table] = {}
VALUES: dict[str, Value] = {}
PRODUCERS: list[Producer] = []
CHECKS: dict[str, Check] = {}


def table(name: str) -> Callable[[Table], Table]:
    """Register the block `<!--BEGIN table:NAME-->`."""

    def register(fn: Table) -> Table:
        TABLES[f"table:{name}"] = fn
        return fn

    return register


def values(*prefixes: str) -> Callable[[Value], Value]:
    """Register the inline values whose names start with one of `prefixes` (then "." or "/")."""

    def register(fn: Value) -> Value:
        for prefix in prefixes:
            VALUES[prefix] = fn
        return fn

    return register


def produced_by(experiment: str, outputs: Iterable[str], code: Iterable[str]) -> None:
    """Register the measuring code of an experiment's result files.  The aggregation need not be listed: its
    check (`recomputed`) recomputes the summaries from the raw records instead."""
    PRODUCERS.append(Producer(experiment, tuple(outputs), tuple(code)))


def recomputed(*names: str) -> Callable[[Check], Check]:
    """Register a check of the summary fields of these result files against their raw records."""

    def register(fn: Check) -> Check:
        for name in names:
            CHECKS[name] = fn
        return fn

    return register


@lru_cache(maxsize=None)
def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"{name}.json").read_text())


def differences(stored: Any, recomputed: Any, where: str = "") -> list[str]:
    """Where two JSON-like values disagree: numbers up to float rounding, everything else exactly."""
    if isinstance(stored, dict) and isinstance(recomputed, dict):
        out = [f"{where}.{k}".lstrip(".") + " is missing" for k in recomputed if k not in stored]
        for k in recomputed:
            if k in stored:
                out += differences(stored[k], recomputed[k], f"{where}.{k}")
        return out
    if isinstance(stored, list) and isinstance(recomputed, list) and len(stored) == len(recomputed):
        return [d for i, (a, b) in enumerate(zip(stored, recomputed)) for d in differences(a, b, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(stored, numbers) and isinstance(recomputed, numbers) and not isinstance(stored, bool):
        if math.isclose(stored, recomputed, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(stored) and math.isnan(recomputed)):
            return []
    elif stored == recomputed:
        return []
    return [f"{where.lstrip('.')}: stored {stored!r}, recomputed {recomputed!r}"]


# -- formatting -------------------------------------------------------------------------------


def f2(x: float) -> str:
    return f"{x:.2f}"


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def short(commit: str) -> str:
    """A 12-character hash, keeping a "+dirty" mark."""
    head, plus, mark = commit.partition("+")
    return head[:12] + plus + mark


def source(name: str) -> str:
    """The line under a table: which file, which command, at which commit, when."""
    d = load(name)
    return f"\n\n<sub>From `experiment_data/{name}.json`: `{d['command']}` at {short(d['commit'])}, {d['date']}.</sub>"
