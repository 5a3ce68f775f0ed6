"""The numbers in the documents are the ones in experiment_data/ (never typed by hand), and those are not older
than the code that produced them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitinfer.experiments import registry, report
from splitinfer.experiments.registry import Producer


@pytest.mark.parametrize("doc", report.DOCUMENTS)
def test_generated_numbers_match_the_json(doc: str):
    assert report.stale(registry.ROOT / doc) == []


def test_committed_summaries_agree_with_their_raw_records():
    assert report.disagreeing_summaries() == []


def test_render_rewrites_marked_pieces_from_the_registered_tables_and_leaves_the_rest(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro 3.14\n<!--BEGIN table:ablation-->\nold\n<!--END table:ablation-->\n"
                   "tokens per step <!--v:ablation.main.all-->9.99<!--/v--> end\n")
    assert report.stale(doc) == ["table:ablation", "ablation.main.all"]
    report.render(doc)
    main = registry.load("lookahead_ablation")["configs"][0]["summary"]["all"]["tokens_per_step"]
    assert doc.read_text() == (f"intro 3.14\n<!--BEGIN table:ablation-->\n{report.block('table:ablation')}\n"
                               f"<!--END table:ablation-->\ntokens per step <!--v:ablation.main.all-->{main:.2f}<!--/v--> end\n")
    assert "| config | all | code |" in report.block("table:ablation")
    assert report.stale(doc) == []


def test_unknown_names_are_errors_not_blanks(tmp_path):
    with pytest.raises(KeyError):
        report.value("nothing.here")
    doc = tmp_path / "doc.md"
    doc.write_text("<!--BEGIN table:nothing-->\n<!--END table:nothing-->\n")
    with pytest.raises(KeyError):
        report.stale(doc)


@pytest.fixture
def results(tmp_path, monkeypatch):
    """Literal result files in place of experiment_data/: write(name, data)."""
    monkeypatch.setattr(registry, "DATA", tmp_path)
    registry.load.cache_clear()

    def write(name: str, data: dict) -> None:
        (tmp_path / f"{name}.json").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        registry.load.cache_clear()

    yield write
    registry.load.cache_clear()


def test_values_derived_from_recorded_steps(results):
    """Shares and means that the docs quote are computed from the per-step records, not stored."""
    step = lambda k: {"tokens": k, "local_before_ms": 1.0, "local_after_ms": 2.0, "cloud_ms": 10.0 * k}  # noqa: E731
    results("wan_side_by_side", {"runs": {"lookahead": [{"timings": [step(1), step(8), step(1), step(12)],
                                                         "accepted_per_step": [1, 3, 1, 2]}]}})
    rtt = {"runs": [{"mode": "lookahead", "rtt_ms": 0.0, "timings": [step(1), step(9)]},
                    {"mode": "lookahead", "rtt_ms": 20.0, "timings": [step(64)]},
                    {"mode": "sequential", "rtt_ms": 0.0, "timings": [step(1)]}],
           "cross_validation": {"folds": [{"held_out_rtt_ms": 0.0, "error": 0.01}, {"held_out_rtt_ms": 20.0, "error": 0.06}]}}
    results("gpu/rtt_analysis", rtt)
    results("step_cost", {"kernels": {"auto": [{"tokens": 1, "total_ms": 103.7}, {"tokens": 16, "total_ms": 163.8}]}})
    assert report.value("sbs.root_only_share") == "50%"
    assert report.value("sbs.tokens_per_tree_step") == "2.50"
    assert report.value("gpu_rtt.k.lookahead.0") == "5"
    assert report.value("gpu_rtt.k.lookahead.20") == "64"
    assert report.value("step.16") == "164"
    assert report.value("gpu_rtt.cv.worst_rtt") == "20"
    assert report.value("gpu_rtt.compute.lookahead.20") == "643"  # 1 + 2 + 640
    assert report.value("gpu_rtt.compute.lookahead.0") == "53"  # (13 + 93) / 2


def _side_by_side(ratio: float | None = None) -> dict:
    from splitinfer.experiments.side_by_side import summarise

    timing = {"tokens": 1, "local_before_ms": 1.0, "local_after_ms": 2.0, "cloud_ms": 10.0}
    run = lambda accepted, seconds: {"steps": len(accepted), "accepted_per_step": accepted,  # noqa: E731
                                     "tokens_per_step": round(sum(accepted) / len(accepted), 4),
                                     "decode_seconds": seconds, "timings": [timing] * len(accepted)}
    runs = {"sequential": [run([1, 1, 1], 0.3)], "lookahead": [run([3, 1, 2], 0.3)]}
    summary, computed = summarise(runs, 80.0)
    return {"settings": {"rtt_ms": 80.0}, "runs": runs, "summary": summary,
            "lookahead_over_sequential": computed if ratio is None else ratio}


def test_a_summary_that_its_raw_steps_no_longer_give_fails(results):
    from splitinfer.experiments.side_by_side import check

    good = _side_by_side()
    assert good["lookahead_over_sequential"] == pytest.approx(2.0)
    assert check(good) == []
    assert check(_side_by_side(ratio=2.5)) == ["lookahead_over_sequential: stored 2.5, recomputed 2.0"]
    tampered = _side_by_side()
    tampered["runs"]["lookahead"][0]["tokens_per_step"] = 3.0
    tampered["summary"]["lookahead"]["tokens_per_step"] = 3.0
    assert check(tampered) == ["runs.lookahead[0].tokens_per_step: stored 3.0, recomputed 2.0",
                               "summary.lookahead.tokens_per_step: stored 3.0, recomputed 2.0"]
    results("wan_side_by_side", tampered)
    assert [p.split(": ", 1)[0] for p in report.disagreeing_summaries(registry.DATA)] == [
        f"{registry.DATA.name}/wan_side_by_side.json"] * 2


def test_ablation_summary_is_recomputed_from_accepted_per_step():
    from splitinfer.experiments.ablation_summary import check, summarise

    prompts = [{"category": "code", "steps": 2, "accepted_per_step": [3, 1], "tokens_per_step": 2.0,
                "tokens_per_second": 5.0, "verified_per_step": [8, 4]}]
    data = {"configs": [{"config": {"name": "main 32"}, "prompts": prompts, "summary": summarise(prompts)}]}
    assert check(data) == []
    data["configs"][0]["summary"]["all"]["tokens_per_step"] = 2.5
    assert check(data) == ["main 32: summary.all.tokens_per_step: stored 2.5, recomputed 2.0"]


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                          capture_output=True, text=True)
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A checkout whose experiment_data/x.json was recorded at its first commit, by code.py."""
    (tmp_path / "experiment_data").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "other.py").write_text("y = 1\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "start")
    (tmp_path / "experiment_data" / "x.json").write_text(json.dumps({"commit": git(tmp_path, "rev-parse", "HEAD") + "+dirty"}))
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "results")
    return tmp_path


PRODUCERS = [Producer("exp", ("x",), ("code.py", "old_code.py"))]


def commit_change(root: Path, path: str, text: str, message: str) -> str:
    (root / path).write_text(text)
    git(root, "add", "-A")
    git(root, "commit", "-qm", message)
    return git(root, "rev-parse", "HEAD")


def test_results_are_stale_once_their_code_changes(repo):
    assert report.outdated(repo, PRODUCERS) == ([], [])
    commit_change(repo, "other.py", "y = 2\n", "unrelated")
    assert report.outdated(repo, PRODUCERS) == ([], [])
    recorded = json.loads((repo / "experiment_data" / "x.json").read_text())["commit"][:12]
    change = commit_change(repo, "code.py", "x = 2\n", "faster x")
    assert report.outdated(repo, PRODUCERS) == (
        [f"experiment_data/x.json: recorded at {recorded}, code changed since in {change[:12]} faster x"], [])


def test_a_declared_neutral_change_must_name_its_test(repo):
    change = commit_change(repo, "code.py", "x = 1  # why\n", "comment")
    neutral = repo / "experiment_data" / "neutral_changes.json"
    neutral.write_text(json.dumps([{"commit": change, "experiments": ["exp"], "reason": "a comment"}]))
    problems, _ = report.outdated(repo, PRODUCERS)
    assert any("must name the test" in p for p in problems) and any("code changed since" in p for p in problems)
    neutral.write_text(json.dumps([{"commit": change[:10], "experiments": ["exp"],
                                    "reason": "comment only; tests/test_x.py::test_x_is_one shows x unchanged"}]))
    assert report.outdated(repo, PRODUCERS) == ([], [])
    neutral.write_text(json.dumps([{"commit": change, "experiments": ["another"], "reason": "test_x_is_one"}]))
    assert len(report.outdated(repo, PRODUCERS)[0]) == 1  # declared for another experiment only


def test_a_move_counts_under_the_old_name(repo):
    git(repo, "mv", "code.py", "old_code.py")  # the producer lists both names
    git(repo, "commit", "-qm", "move")
    assert [p.rsplit(" ", 1)[-1] for p in report.outdated(repo, PRODUCERS)[0]] == ["move"]


def test_unregistered_or_unrecorded_results_fail(repo):
    (repo / "experiment_data" / "gpu").mkdir()
    (repo / "experiment_data" / "gpu" / "y.json").write_text(json.dumps({"commit": "unknown"}))
    assert report.outdated(repo, PRODUCERS)[0] == ["experiment_data/gpu/y.json: no experiment registers the code that produces it"]
    producers = [*PRODUCERS, Producer("y", ("gpu/y",), ("code.py",))]
    assert report.outdated(repo, producers)[0] == ["experiment_data/gpu/y.json: no recorded commit"]


def test_outside_a_git_checkout_it_cannot_tell_and_does_not_fail(tmp_path):
    (tmp_path / "experiment_data").mkdir()
    (tmp_path / "experiment_data" / "x.json").write_text(json.dumps({"commit": "0" * 40}))
    problems, notes = report.outdated(tmp_path, PRODUCERS)
    assert problems == [] and len(notes) == 1 and "cannot tell" in notes[0]


def test_every_committed_result_file_has_a_registered_producer():
    report.registered()
    outputs = {out for p in registry.PRODUCERS for out in p.outputs}
    names = {p.relative_to(registry.DATA).with_suffix("").as_posix() for p in report.result_files(registry.DATA)}
    assert names <= outputs


def test_commit_is_dirty_for_code_changes_but_not_for_the_experiments_outputs(tmp_path):
    from splitinfer.experiments.record import commit

    (tmp_path / "experiment_data").mkdir()
    (tmp_path / "experiment_data" / "a.json").write_text("1")
    (tmp_path / "README.md").write_text("x")
    (tmp_path / "code.py").write_text("x = 1")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-qm", "start")
    head = commit(tmp_path)
    assert len(head) == 40
    (tmp_path / "experiment_data" / "a.json").write_text("2")  # an earlier script of the same run wrote this
    (tmp_path / "README.md").write_text("rendered")
    assert commit(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2")
    assert commit(tmp_path) == head + "+dirty"


def test_the_engine_imports_no_torch():
    code = "import sys; from splitinfer.experiments import report; report.registered(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_stale_file_can_be_kept_only_with_a_reason_and_only_while_stale(repo):
    awaiting = repo / "experiment_data" / "awaiting_rerun.json"
    awaiting.write_text(json.dumps([{"file": "x.json", "reason": "no GPU lent"}]))
    assert report.outdated(repo, PRODUCERS)[0] == ["experiment_data/awaiting_rerun.json: x is current; remove its entry"]
    change = commit_change(repo, "code.py", "x = 2\n", "faster x")
    problems, notes = report.outdated(repo, PRODUCERS)
    assert problems == [] and len(notes) == 1 and change[:12] in notes[0] and "kept: no GPU lent" in notes[0]
    awaiting.write_text(json.dumps([{"file": "x.json", "reason": " "}]))
    problems, _ = report.outdated(repo, PRODUCERS)
    assert any("must say why" in p for p in problems) and any("faster x" in p for p in problems)
    awaiting.write_text(json.dumps([{"file": "x.json", "reason": "r"}, {"file": "gone", "reason": "r"}]))
    assert report.outdated(repo, PRODUCERS)[0] == ["experiment_data/awaiting_rerun.json: gone.json does not exist"]
