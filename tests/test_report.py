"""The numbers in README.md and paper.md are the ones in experiment_data/ (never typed by hand)."""

from pathlib import Path

import pytest

from splitinfer.experiments import report
from splitinfer.procs import ROOT

DOCS = [ROOT / "README.md", ROOT / "paper.md"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_generated_numbers_match_the_json(doc: Path):
    if not doc.exists():
        pytest.skip(f"{doc.name} not written yet")
    assert report.stale(doc) == []


def test_render_replaces_only_marked_text(tmp_path, monkeypatch):
    monkeypatch.setitem(report.BLOCKS, "table:demo", lambda: "| a |\n|---|\n| 1 |")
    doc = tmp_path / "doc.md"
    doc.write_text("intro 3.14\n<!--BEGIN table:demo-->\nold\n<!--END table:demo-->\nend\n")
    assert report.stale(doc) == ["table:demo"]
    report.render(doc)
    assert doc.read_text() == "intro 3.14\n<!--BEGIN table:demo-->\n| a |\n|---|\n| 1 |\n<!--END table:demo-->\nend\n"
    assert report.stale(doc) == []
