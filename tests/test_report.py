"""The numbers in README.md, paper.md and docs/privacy.md are the ones in experiment_data/ (never typed by hand)."""

from pathlib import Path

import pytest

from splitinfer.experiments import report
from splitinfer.procs import ROOT

DOCS = [ROOT / "README.md", ROOT / "paper.md", ROOT / "docs" / "privacy.md", ROOT / "docs" / "security.md"]


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


def test_commit_is_dirty_for_code_changes_but_not_for_the_experiments_outputs(tmp_path):
    import subprocess

    from splitinfer.experiments.record import commit

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "experiment_data").mkdir()
    (tmp_path / "experiment_data" / "a.json").write_text("1")
    (tmp_path / "README.md").write_text("x")
    (tmp_path / "code.py").write_text("x = 1")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    head = commit(tmp_path)
    assert len(head) == 40
    (tmp_path / "experiment_data" / "a.json").write_text("2")  # an earlier script of the same run wrote this
    (tmp_path / "README.md").write_text("rendered")
    assert commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2")
    assert commit(tmp_path) == head + "+dirty"


def test_values_derived_from_recorded_steps(monkeypatch):
    """Shares and means that the docs quote are computed from the per-step records, not stored."""
    step = lambda k: {"tokens": k, "local_before_ms": 1.0, "local_after_ms": 2.0, "cloud_ms": 10.0 * k}  # noqa: E731
    sbs = {"runs": {"lookahead": [{"timings": [step(1), step(8), step(1), step(12)], "accepted_per_step": [1, 3, 1, 2]}]}}
    rtt = {"runs": [{"mode": "lookahead", "rtt_ms": 0.0, "timings": [step(1), step(9)]},
                    {"mode": "lookahead", "rtt_ms": 20.0, "timings": [step(64)]},
                    {"mode": "sequential", "rtt_ms": 0.0, "timings": [step(1)]}]}
    steps = {"kernels": {"auto": [{"tokens": 1, "total_ms": 103.7}, {"tokens": 16, "total_ms": 163.8}]}}
    files = {"wan_side_by_side": sbs, "gpu/rtt_analysis": rtt, "step_cost": steps}
    monkeypatch.setattr(report, "load", lambda name: files[name])
    assert report.value("sbs.root_only_share") == "50%"
    assert report.value("sbs.tokens_per_tree_step") == "2.50"
    assert report.value("gpu_rtt.k.lookahead.0") == "5"
    assert report.value("gpu_rtt.k.lookahead.20") == "64"
    assert report.value("step.16") == "164"
    rtt["cross_validation"] = {"folds": [{"held_out_rtt_ms": 0.0, "error": 0.01}, {"held_out_rtt_ms": 20.0, "error": 0.06}]}
    assert report.value("gpu_rtt.cv.worst_rtt") == "20"
    assert report.value("gpu_rtt.compute.lookahead.20") == "643"  # 1 + 2 + 640
    assert report.value("gpu_rtt.compute.lookahead.0") == "53"  # (13 + 93) / 2
    with pytest.raises(KeyError):
        report.value("nothing.here")
