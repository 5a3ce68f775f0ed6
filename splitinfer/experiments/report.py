"""Numbers in the documents, rendered from experiment_data/*.json, never typed by hand.

A document marks each generated piece:

    <!--BEGIN table:rtt-->  ...markdown table...  <!--END table:rtt-->
    tokens per step <!--v:ablation.main.code-->2.31<!--/v-->

`render` rewrites every marked piece; `stale` lists pieces whose text differs from what the JSON gives.
The engine knows no experiment: each registers its tables, values, producing code and summary checks beside
its aggregation (see registry.py); MODULES lists the modules that register.

`check` also fails when a result file is older than its code: a commit after the recorded one that touches
the experiment's code (unless experiment_data/neutral_changes.json declares it harmless, naming the test that
shows the outputs unchanged), or a stored summary that its own raw records no longer give.  A stale file that
cannot be rerun here (the GPU results, when no GPU is lent) can be kept only by an entry in
experiment_data/awaiting_rerun.json that says why; the documents then show it in the block
`table:awaiting-rerun`, so a reader sees which figures predate which code.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from .registry import CHECKS, DATA, PRODUCERS, ROOT, TABLES, VALUES, Producer, markdown_table, short, table

# The documents `make report` renders, relative to the checkout.
DOCUMENTS = ("README.md", "paper.md", "docs/privacy.md", "docs/security.md", "docs/drafter.md", "docs/batching.md",
             "docs/scaling.md")
MODULES = ("ablation_summary", "costs", "identity_summary", "inversion", "overview", "rtt", "side_by_side")
NEUTRAL = "neutral_changes.json"
AWAITING = "awaiting_rerun.json"

BLOCK = re.compile(r"(<!--BEGIN (?P<name>[\w:.\-]+)-->)(?P<body>.*?)(<!--END (?P=name)-->)", re.S)
VALUE = re.compile(r"(<!--v:(?P<name>[\w.\-:/]+)-->)(?P<body>.*?)(<!--/v-->)", re.S)
NAMES_A_TEST = re.compile(r"\btest_\w+")


@cache
def registered() -> None:
    """Import the modules that register (once)."""
    for name in MODULES:
        importlib.import_module(f"{__package__}.{name}")


def block(name: str) -> str:
    registered()
    return TABLES[name]()


def value(name: str) -> str:
    """An inline value by name: prefix, then "." or "/", then what the prefix's function reads."""
    registered()
    prefix, what = re.split(r"[./]", name, maxsplit=1) if re.search(r"[./]", name) else (name, "")
    if prefix not in VALUES:
        raise KeyError(f"unknown value {name!r}")
    return VALUES[prefix](prefix, what)


# -- documents --------------------------------------------------------------------------------


def render_text(text: str) -> str:
    text = BLOCK.sub(lambda m: f"{m.group(1)}\n{block(m.group('name'))}\n{m.group(4)}", text)
    return VALUE.sub(lambda m: f"{m.group(1)}{value(m.group('name'))}{m.group(4)}", text)


def stale(path: Path) -> list[str]:
    """Names of the marked pieces whose text differs from the JSON."""
    text = path.read_text()
    out = [m.group("name") for m in BLOCK.finditer(text) if m.group("body").strip() != block(m.group("name")).strip()]
    out += [m.group("name") for m in VALUE.finditer(text) if m.group("body") != value(m.group("name"))]
    return out


def render(path: Path) -> None:
    path.write_text(render_text(path.read_text()))


# -- result files against their code ----------------------------------------------------------


def result_files(data: Path) -> list[Path]:
    return [p for p in sorted(data.glob("*.json")) + sorted(data.glob("gpu/*.json")) if p.name not in (NEUTRAL, AWAITING)]


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def neutral_changes(data: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Declared-harmless commits: {commit: experiments}, and the problems of entries that do not say why."""
    path = data / NEUTRAL
    if not path.exists():
        return {}, []
    declared, problems = {}, []
    for entry in json.loads(path.read_text()):
        if not NAMES_A_TEST.search(entry.get("reason", "")):
            problems.append(f"{path.relative_to(data.parent)}: the entry for {entry.get('commit')} must name the test "
                            "that shows the outputs unchanged")
            continue
        declared[entry["commit"]] = set(entry["experiments"])
    return declared, problems


def awaiting_rerun(data: Path) -> tuple[dict[str, str], list[str]]:
    """Stale result files kept on purpose: {name under experiment_data/ without ".json": why}, and the
    problems of entries that give no reason."""
    path = data / AWAITING
    if not path.exists():
        return {}, []
    kept, problems = {}, []
    for entry in json.loads(path.read_text()):
        if not entry.get("reason", "").strip():
            problems.append(f"{path.relative_to(data.parent)}: the entry for {entry.get('file')} must say why it "
                            "cannot be rerun")
            continue
        kept[entry["file"].removesuffix(".json")] = entry["reason"].strip()
    return kept, problems


@table("awaiting-rerun")
def awaiting_table() -> str:
    """The result files kept although their code changed since they were recorded, and why."""
    kept, _ = awaiting_rerun(DATA)
    if not kept:
        return "Every result file quoted here was recorded with the code as it is now."
    rows = []
    for name, reason in sorted(kept.items()):
        d = json.loads((DATA / f"{name}.json").read_text())
        rows.append([f"`experiment_data/{name}.json`", short(d.get("commit", "unknown")), d.get("date", "?")[:10], reason])
    return ("These result files were recorded before later changes to the code that produced them and are "
            "kept until they can be rerun (`python -m splitinfer report --check` lists the commits):\n\n"
            + markdown_table(["file", "recorded at", "on", "why not rerun yet"], rows))


def _is_neutral(commit: str, experiment: str, declared: dict[str, set[str]]) -> bool:
    return any(commit.startswith(c) and experiment in exps for c, exps in declared.items() if len(c) >= 7)


def outdated(root: Path = ROOT, producers: Sequence[Producer] | None = None) -> tuple[list[str], list[str]]:
    """(problems, notes): result files recorded before a change to their producing code; notes say what
    cannot be told (no git checkout, a recorded commit this clone lacks)."""
    if producers is None:
        registered()
        producers = PRODUCERS
    data = root / "experiment_data"
    if _git(root, "rev-parse", "--is-inside-work-tree").returncode != 0:
        return [], [f"cannot tell whether {data.name}/ is older than its code: {root} is not a git checkout"]
    declared, problems = neutral_changes(data)
    kept, kept_problems = awaiting_rerun(data)
    problems += kept_problems
    by_output = {out: p for p in producers for out in p.outputs}
    notes = []
    for path in result_files(data):
        rel = path.relative_to(root).as_posix()
        name = path.relative_to(data).with_suffix("").as_posix()
        if name not in by_output:
            problems.append(f"{rel}: no experiment registers the code that produces it")
            continue
        recorded = json.loads(path.read_text()).get("commit", "unknown").partition("+")[0]
        if recorded == "unknown":
            problems.append(f"{rel}: no recorded commit")
            continue
        producer = by_output[name]
        log = _git(root, "log", "--format=%H %s", f"{recorded}..HEAD", "--", *producer.code)
        if log.returncode != 0:
            notes.append(f"cannot tell whether {rel} is older than its code: commit {short(recorded)} is not in this clone")
            continue
        changes = [f"{rel}: recorded at {short(recorded)}, code changed since in {short(commit)} {subject}"
                   for commit, _, subject in (line.partition(" ") for line in log.stdout.splitlines())
                   if not _is_neutral(commit, producer.experiment, declared)]
        if name in kept:
            notes += [f"{c} (kept: {kept[name]})" for c in changes]
            if not changes:
                problems.append(f"{data.name}/{AWAITING}: {name} is current; remove its entry")
        else:
            problems += changes
    problems += [f"{data.name}/{AWAITING}: {name}.json does not exist" for name in kept
                 if not (data / f"{name}.json").exists()]
    return problems, notes


def disagreeing_summaries(data: Path = DATA) -> list[str]:
    """Result files whose stored summary fields differ from what their raw records give."""
    registered()
    out = []
    for path in result_files(data):
        check = CHECKS.get(path.relative_to(data).with_suffix("").as_posix())
        if check is None:
            continue
        for problem in check(json.loads(path.read_text()))[:5]:
            out.append(f"{data.name}/{path.relative_to(data).as_posix()}: summary disagrees with its records: {problem}")
    return out


def check(files: Sequence[Path]) -> tuple[list[str], list[str]]:
    """(problems, notes) of the documents and of the result files they quote."""
    problems = [f"{path}: {name} differs from experiment_data/" for path in files for name in stale(path)]
    stale_results, notes = outdated()
    return problems + stale_results + disagreeing_summaries(), notes


def main(files: Sequence[Path], check_only: bool) -> int:
    """`python -m splitinfer report [--check] [FILE ...]`: render (or verify) the documents."""
    files = list(files) or [ROOT / doc for doc in DOCUMENTS]
    if not check_only:
        for path in files:
            render(path)
            print(f"rendered {path}")
        return 0
    problems, notes = check(files)
    for line in notes + problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0
