"""Starting and stopping a cloud server process on this machine (demo, tests, experiments)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests


def free_port(pair: bool = False) -> int:
    """A free loopback port; with pair=True, one whose successor is free too (HTTP + WebSocket)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not pair or port_is_free(port + 1):
            return port
    raise RuntimeError("no free port pair found")


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 180.0) -> dict:
    """Poll GET /health until it answers; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            r = requests.get(f"{url}/health", timeout=2)
            if r.ok:
                return r.json()
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def command_process(
    command: str,
    args: list[str],
    port: int,
    model: Path | None = None,
    threads: int | None = None,
    extra: list[str] | None = None,
    log_file: Path | None = None,
    wait: bool = True,
    timeout: float = 180.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m splitinfer COMMAND` (a server) on loopback; yields (http url, process) and stops it on exit.

    The package, not a script path: it runs the same from a checkout, a wheel or any working directory.
    """
    cmd = [sys.executable, "-m", "splitinfer", command, *args]
    if model is not None:
        cmd += ["--model", str(model)]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += extra or []
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if log_file else subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        if wait:
            wait_healthy(url, proc, timeout)
        yield url, proc
    finally:
        stop(proc)
        if log_file:
            out.close()


@contextmanager
def cloud_process(
    model: Path | None = None,
    port: int | None = None,
    extra: list[str] | None = None,
    threads: int | None = None,
    log_file: Path | None = None,
    timeout: float = 180.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real cloud server process on loopback; yields (http url, process) and stops it on exit (`timeout`: for
    its start)."""
    port = port or free_port(pair=True)
    args = ["--port", str(port), "--ws-port", str(port + 1)]
    with command_process("cloud", args, port, model, threads, extra, log_file, timeout=timeout) as running:
        yield running
