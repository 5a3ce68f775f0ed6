"""Starting and stopping a local server process (jacobi_server.py) on this machine, for tests and demos."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..procs import command_process, free_port


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
    args = ["--cloud", cloud, "--host", "127.0.0.1", "--port", str(port)]
    with command_process("serve", args, port, model, threads, extra, log_file, wait, timeout) as running:
        yield running
