"""Starting and stopping a local server process (jacobi_server.py) on this machine, for tests and demos."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..procs import ROOT, free_port, wait_healthy


@contextmanager
def local_server_process(
    cloud: str,
    model: Path | None = None,
    port: int | None = None,
    extra: list[str] | None = None,
    threads: int | None = None,
    log_file: Path | None = None,
    wait: bool = True,
    timeout: float = 180.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real jacobi_server.py on loopback serving clients, talking to the cloud at `cloud` (its HTTP url).

    Yields (http url, process).  With wait=False it yields at once (start the cloud meanwhile,
    then `procs.wait_healthy(url, proc)`: /health answers 200 once the cloud is reachable too).
    """
    port = port or free_port()
    cmd = [sys.executable, str(ROOT / "jacobi_server.py"), "--cloud", cloud, "--host", "127.0.0.1", "--port", str(port)]
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
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_file:
            out.close()
