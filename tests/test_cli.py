"""The command line: one `splitinfer` command, cheap parsers, consistent help and flags, one-line errors, the REPL."""

from __future__ import annotations

import argparse
import importlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from splitinfer import config
from splitinfer.__main__ import DELEGATED, build_parser
from splitinfer.commands import chat
from splitinfer.procs import cloud_process

CHECKOUT = Path(__file__).resolve().parent.parent
SCRIPTS = {  # the top-level scripts (thin shims) and the module holding each one's code
    "cloud_server_kv.py": "cloud",
    "interactive.py": "chat",
    "jacobi_server.py": "serve",
    "mac_client.py": "client",
    "inversion_experiment.py": "inversion_experiment",
    "lookahead_ablation.py": "lookahead_ablation",
    "rtt_analysis.py": "rtt_analysis",
    "perplexity_comparison.py": "perplexity_comparison",
}
COMMANDS = [*DELEGATED, "demo", "prepare-model", "report", "wan"]
MODULES = {*SCRIPTS.values(), "train_drafter"}  # every splitinfer.commands module with a build_parser


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser: each command module's, and each subcommand of the top-level one."""
    out = {name: importlib.import_module(f"splitinfer.commands.{name}").build_parser()
           for name in MODULES}
    top = build_parser()
    out["splitinfer"] = top
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    out.update({f"splitinfer {name}": p for name, p in sub.choices.items() if name not in DELEGATED})
    return out


@pytest.mark.parametrize("module", sorted({*MODULES, "demo"}))
def test_building_a_parser_does_not_import_torch(module):
    build = "add_arguments(__import__('argparse').ArgumentParser())" if module == "demo" else "build_parser()"
    code = f"import sys; from splitinfer.commands import {module} as m; m.{build}; print('torch' in sys.modules)"
    assert run("-c", code).stdout.strip() == "False"


def test_the_top_level_parser_does_not_import_torch():
    code = "import sys; from splitinfer.__main__ import build_parser; build_parser(); print('torch' in sys.modules)"
    assert run("-c", code).stdout.strip() == "False"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_each_script_answers_help(script):
    done = run(str(CHECKOUT / script), "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {script}") and not done.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_answers_help(command):
    done = run("-m", "splitinfer", command, "--help")
    assert done.returncode == 0 and done.stdout.startswith(f"usage: splitinfer {command}"), done.stderr


def test_top_level_help_lists_every_command():
    done = run("-m", "splitinfer", "--help")
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("    ") and line.split()}
    assert set(COMMANDS) <= listed


def test_every_option_has_help_and_states_its_default_once():
    for name, parser in parsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            text = formatter._expand_help(action)  # with %(default)s filled in
            assert text.lower().count("default") <= 1, f"{name} {action.option_strings[0]}: {text}"


def test_mode_names_are_the_registered_strategies():
    from splitinfer.decoding.strategies import STRATEGIES

    assert set(config.MODES) == set(STRATEGIES) and config.DEFAULT_MODE in config.MODES


def test_lookahead_is_the_default_mode_where_a_user_generates():
    for module in ("chat", "serve"):
        assert importlib.import_module(f"splitinfer.commands.{module}").parse_args([]).mode == "lookahead"
    assert build_parser().parse_args(["demo"]).mode == "lookahead"


def test_flags_are_spelled_alike():
    """--max-new-tokens everywhere a token limit is set; the client's old spellings still parse."""
    for name, parser in parsers().items():
        flags = {flag for action in parser._actions for flag in action.option_strings}
        assert "--max-tokens" not in flags or "--max-new-tokens" in flags, name
    from splitinfer.commands import client

    assert client.parse_args(["--max-tokens", "3", "--server", "h:1"]).max_new_tokens == 3


def test_experiment_results_default_into_the_checkout(tmp_path):
    """Wherever it is started from, a run from this checkout writes to its experiment_data/."""
    code = "from splitinfer.commands import rtt_analysis as m; print(m.parse_args([]).out)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(done.stdout.strip()) == CHECKOUT / "experiment_data" / "rtt_analysis.json"


@pytest.fixture
def bad_models(tmp_path) -> dict[str, tuple[Path, str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    unweighted = tmp_path / "unweighted"
    unweighted.mkdir()
    (unweighted / "config.json").write_text("{}")
    return {"missing": (tmp_path / "absent", "no such directory"), "no config": (empty, "no config.json"),
            "no weights": (unweighted, "no *.safetensors weights")}


@pytest.mark.parametrize("entry", [["-m", "splitinfer", "cloud"], ["-m", "splitinfer", "chat", "--prompt", "hi"],
                                   ["-m", "splitinfer", "serve"], ["-m", "splitinfer", "demo"],
                                   [str(CHECKOUT / "lookahead_ablation.py"), "--out", "x.json"]],
                         ids=["cloud", "chat", "serve", "demo", "experiment"])
def test_a_bad_model_is_one_line_naming_the_path(entry, bad_models):
    for path, missing in bad_models.values():
        done = run(*entry, "--model", str(path))
        assert done.returncode == 1 and done.stdout == "", done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --model {path}: {missing}"), done.stderr


def test_health_counts_a_refused_token_as_a_problem():
    from splitinfer.serve.app import token_problem

    refusing = {"reachable": True, "auth_required": True}  # sessions_open shown only to an accepted token
    assert "has none" in token_problem(SimpleNamespace(token=None), refusing)
    assert "refuses" in token_problem(SimpleNamespace(token="t"), refusing)
    assert token_problem(SimpleNamespace(token="t"), {**refusing, "sessions_open": 0}) is None
    assert token_problem(SimpleNamespace(token=None), {"reachable": True, "auth_required": False}) is None


class Pipe:
    """A child's stream read on a thread, so the test can wait for text without blocking on it."""

    def __init__(self, stream):
        self.text = ""
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        while chunk := stream.read1(256) if hasattr(stream, "read1") else stream.read(1):
            self.text += chunk.decode(errors="replace") if isinstance(chunk, bytes) else chunk

    def wait_for(self, predicate, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            assert time.monotonic() < deadline, f"timed out; got {self.text[-2000:]!r}"
            time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_stops_an_answer_and_keeps_the_chat_then_leaves_at_the_prompt(default_model, tmp_path):
    with cloud_process(default_model, threads=1, log_file=tmp_path / "cloud.log") as (url, _):
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitinfer", "chat", "--cloud", url, "--model", str(default_model),
             "--threads", "1", "--max-new-tokens", "400"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out, err = Pipe(proc.stdout), Pipe(proc.stderr)
        try:
            out.wait_for(lambda t: "you> " in t)
            proc.stdin.write(b"Tell me a very long story about a lighthouse keeper.\n")
            proc.stdin.flush()
            out.wait_for(lambda t: "model> " in t and len(t.split("model> ", 1)[1]) > 20)  # well into the answer
            proc.send_signal(signal.SIGINT)
            err.wait_for(lambda t: chat.INTERRUPTED in t)
            out.wait_for(lambda t: t.count("you> ") == 2)
            proc.stdin.write(b"Say hi.\n")
            proc.stdin.flush()
            err.wait_for(lambda t: "tokens/s]" in t)  # the second answer finished, with its stats line
            out.wait_for(lambda t: t.count("you> ") == 3)
            proc.send_signal(signal.SIGINT)  # at the prompt: leave
            assert proc.wait(timeout=60) == 0
        finally:
            proc.kill()
        assert "Traceback" not in err.text and "KeyboardInterrupt" not in err.text, err.text


def test_one_split_vocabulary_on_both_sides():
    """Local and cloud parse the cloud's layer range the same way; the spec's local spelling lands there too."""
    from splitinfer.commands import chat, cloud

    for parser in (chat.build_parser(), cloud.build_parser()):
        args = parser.parse_args(["--cloud-start", "4", "--cloud-end", "-5"])
        assert (args.cloud_start, args.cloud_end) == (4, -5)
        assert (parser.parse_args([]).cloud_start, parser.parse_args([]).cloud_end) == (None, None)
    spec = chat.build_parser().parse_args(["--split-after", "3", "--resume-at", "-4"])
    assert (spec.cloud_start, spec.cloud_end) == (4, -5)
    assert config.Split.of(30, spec.cloud_start, spec.cloud_end) == config.Split(30, 4, 25)
    with pytest.raises(ValueError, match="at least one local layer"):
        config.Split(30, 2, 29)  # no local layer after the cloud
