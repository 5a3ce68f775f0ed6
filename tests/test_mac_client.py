"""mac_client.py (splitinfer/commands/client.py) against a real local server and cloud (loopback processes),
and without one."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests

from splitinfer.commands import client as mac_client
from splitinfer.procs import cloud_process, free_port, wait_healthy
from splitinfer.serve.process import local_server_process

CLIENT = str(Path(__file__).resolve().parent.parent / "mac_client.py")  # the script as users run it
STATUS = re.compile(
    r"^\[(\d+) tokens, [\d.]+ tokens/s, 1\.00 tokens/round trip, cloud round trip \d+ ms, \d+ round trips, sequential"
)


def client(*args: str, stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CLIENT, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def test_importing_the_client_imports_only_requests():
    """What lets mac_client.py run from a copy of the repository with nothing but requests installed."""
    code = ("import splitinfer.commands.client, sys; "
            "print(sorted({'torch', 'numpy', 'platformdirs', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "[]"


def test_help_describes_the_client():
    out = client("--help", timeout=30)
    assert out.returncode == 0 and "--local-server" in out.stdout and "--prompt" in out.stdout
    assert "5002" in out.stdout and "--max-new-tokens" in out.stdout


def test_the_old_flag_spellings_still_work():
    old = mac_client.parse_args(["--server", "http://h:1", "--max-tokens", "7"])
    new = mac_client.parse_args(["--local-server", "http://h:1", "--max-new-tokens", "7"])
    assert vars(old) == vars(new) and mac_client.request_options(new)["max_tokens"] == 7


@pytest.mark.parametrize("args", [["--prompt", "hi"], []], ids=["one-shot", "chat"])
def test_server_down_is_one_clear_line_and_exit_1(args):
    port = free_port()
    out = client("--local-server", f"http://127.0.0.1:{port}", *args, stdin="hello\n", timeout=60)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot reach the local server at http://127.0.0.1:{port}")
    assert "Connection refused" in lines[0] and "Traceback" not in out.stderr and out.stdout == ""


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    cloud_port = free_port(pair=True)
    with ExitStack() as stack:
        url, proc = stack.enter_context(local_server_process(
            f"http://127.0.0.1:{cloud_port}", default_model, threads=1, wait=False, log_file=logs / "local.log",
            extra=["--mode", "sequential"],  # the status lines below count one token per round trip
        ))
        stack.enter_context(cloud_process(default_model, port=cloud_port, threads=1, log_file=logs / "cloud.log"))
        wait_healthy(url, proc)
        yield url


def answer(server: str, content: str, max_tokens: int, history: list[dict] | None = None) -> str:
    messages = [*(history or []), {"role": "user", "content": content}]
    r = requests.post(f"{server}/v1/chat/completions", json={"messages": messages, "max_tokens": max_tokens}, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_one_shot_prints_the_answer_and_a_status_line(server):
    out = client("--local-server", server, "--prompt", "Name three colors.", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == answer(server, "Name three colors.", 8).strip()
    status = out.stderr.strip().splitlines()[-1]
    m = STATUS.match(status)
    assert m and int(m.group(1)) <= 8, status


@pytest.mark.slow
def test_text_is_written_as_it_arrives(server):
    class Recorder:
        def __init__(self):
            self.writes: list[tuple[float, str]] = []

        def write(self, text: str) -> None:
            self.writes.append((time.monotonic(), text))

        def flush(self) -> None:
            pass

    out = Recorder()
    got = mac_client.Client(server).chat([{"role": "user", "content": "Tell me a story."}], {"max_tokens": 8}, out)
    assert len(out.writes) >= 4 and "".join(t for _, t in out.writes) == got.text
    assert out.writes[-1][0] - out.writes[0][0] > 0.05  # pieces came over time, not all at the end
    assert got.usage["completion_tokens"] == 8 and got.finish_reason == "length" and got.stats["steps"] == 8


@pytest.mark.slow
def test_chat_keeps_the_history(server):
    out = client("--local-server", server, "--max-new-tokens", "10", stdin="My name is Ada.\nWhat is my name?\n")
    assert out.returncode == 0, out.stderr
    first = answer(server, "My name is Ada.", 10)
    second = answer(server, "What is my name?", 10, [
        {"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": first},
    ])
    assert f"model> {first}\n" in out.stdout and f"model> {second}\n" in out.stdout
    assert len([line for line in out.stderr.splitlines() if STATUS.match(line)]) == 2
    assert "splitinfer chat with smollm2-135m-instruct" in out.stderr


@pytest.mark.slow
def test_server_error_is_one_clear_line_and_exit_1(server):
    out = client("--local-server", server, "--prompt", "hi", "--max-new-tokens", "100000")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the server answered HTTP 400: This model's maximum context")
