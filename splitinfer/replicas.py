"""Several cloud replicas behind HAProxy (docs/scaling.md, "Several replicas behind HAProxy").

A session lives on one WebSocket connection, so a balancer in TCP mode keeps it
on one replica for its whole life without knowing anything about the protocol:
it only picks a replica when a connection opens.  When that replica dies, the
local side's RemoteSpan (remote/recovery.py) reconnects to the same address,
the balancer hands the new connection to a live replica, and the context is
replayed there: the generation goes on with identical tokens, at the cost of
one re-prefill.

The balancer mirrors a single cloud's port layout: /health on `listen_port`,
frames on `listen_port + 1`, so a local side reaches it with the same flags as
one cloud (`--cloud http://BALANCER:PORT`).  /health is balanced too (to any
live replica): the local server's start-up check (same model, same layers,
token accepted) is the same for every replica, so any one answering is right;
its `sessions_open` is that one replica's count, not the total.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .procs import stop

INSTALL_HINT = "install it with `apt-get install haproxy` (Debian/Ubuntu) or your system's package manager"

# Health checks: a replica that stops answering GET /health is out of rotation after FALL failed checks
# CHECK_INTERVAL apart, and back after RISE good ones: 3 s when it refuses; up to about 6 s when its machine
# is gone and each check times out (a check's connect waits min(inter, timeout connect)).  A replica whose
# process dies refuses connections at once, so `retries` + `redispatch` send a reconnect elsewhere before
# the checks notice; the checks matter most for a replica whose machine vanished (no RST).
CHECK_INTERVAL, FALL, RISE = "1s", 3, 2

# A replica on another machine answers a TCP connect in milliseconds; a connect that takes seconds is to
# a dead machine, and is better retried on another replica (`retries` times, redispatched) at once.
CONNECT_TIMEOUT = "2s"

# A WebSocket may be silent for minutes between steps (a local side paused, stalled on a slow client, or a
# program holding a cloud_session open between its own turns).  Idle connections are the cloud's business:
# it drops a session idle for --idle-timeout (300 s by default) and closes a connection silent for twice
# that (cloud/server.py).  The balancer's limit is above 2 x 300 s, so HAProxy never cuts a connection the
# cloud would keep (that would cost a reconnect and a replay); with a longer --idle-timeout, pass more.
IDLE_TIMEOUT = "11m"


def haproxy_config(
    listen_port: int,
    backends: Sequence[tuple[str, int]],
    *,
    listen_host: str = "127.0.0.1",
    balance: str = "leastconn",
    connect_timeout: str = CONNECT_TIMEOUT,
    idle_timeout: str = IDLE_TIMEOUT,
    log: bool = True,
) -> str:
    """An HAProxy configuration balancing cloud replicas in TCP mode.

    `backends` are (host, ws_port) pairs of `splitinfer cloud` replicas; each one's /health port is
    ws_port - 1 (the cloud's usual layout, `--port P --ws-port P+1`).  The balancer listens on
    `listen_host`:`listen_port` for /health and on `listen_port + 1` for frames, like one cloud.

    leastconn, not roundrobin: connections are long-lived (a session each), so the replica holding the
    fewest is the least loaded one.  A replica is checked with GET /health (`option httpchk`) rather than a
    bare TCP connect: the kernel accepts connections on a process that no longer answers.  `log`: one line per
    connection (which replica served it) and each replica going down or up, on HAProxy's stderr.
    """
    if not backends:
        raise ValueError("at least one backend replica is needed")
    if balance not in ("leastconn", "roundrobin"):
        raise ValueError(f"balance must be leastconn or roundrobin, not {balance!r}")
    numbered = list(enumerate(backends, 1))
    ws_servers = [f"    server r{i} {host}:{ws} check port {ws - 1}" for i, (host, ws) in numbered]
    # The same replicas' /health ports, in or out of rotation with their frames ports (checked once, there).
    http_servers = [f"    server r{i} {host}:{ws - 1} track replicas_ws/r{i}" for i, (host, ws) in numbered]
    log_lines = ["    log stderr format raw local0 info"] if log else []
    return "\n".join([
        "# splitinfer cloud replicas behind HAProxy (splitinfer/replicas.py, docs/scaling.md)",
        "global",
        *log_lines,
        "",
        "defaults",
        "    mode tcp",
        *(["    log global", "    option tcplog"] if log else []),
        f"    balance {balance}",
        f"    timeout connect {connect_timeout}",
        "    # silent WebSockets: kept longer than the cloud keeps them (2 x its --idle-timeout)",
        f"    timeout client {idle_timeout}",
        f"    timeout server {idle_timeout}",
        "    # a connect to a dead replica is retried, on another one",
        "    retries 2",
        "    option redispatch 1",
        "    option httpchk",
        "    http-check send meth GET uri /health",
        "    http-check expect status 200",
        "    timeout check 2s",
        "    # a replica taken out (its machine gone, say) closes its connections, so the local side",
        "    # reconnects and replays now instead of waiting for a reply that will never come",
        f"    default-server inter {CHECK_INTERVAL} fall {FALL} rise {RISE} on-marked-down shutdown-sessions",
        "",
        "frontend frames",
        f"    bind {_address(listen_host, listen_port + 1)}",
        "    default_backend replicas_ws",
        "",
        "backend replicas_ws",
        *ws_servers,
        "",
        "frontend health",
        f"    bind {_address(listen_host, listen_port)}",
        "    default_backend replicas_health",
        "",
        "backend replicas_health",
        *http_servers,
        "",
    ])


def _address(host: str, port: int) -> str:
    """host:port as HAProxy reads it (an IPv6 address without brackets: HAProxy splits at the last colon)."""
    return f"{host.strip('[]')}:{port}"


def haproxy_binary() -> str:
    """The haproxy executable, or a RuntimeError that says how to install it."""
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if path is None:
        raise RuntimeError(f"haproxy was not found on PATH nor in /usr/sbin: {INSTALL_HINT}")
    return path


def check_config(config_file: Path, binary: str | None = None) -> None:
    """`haproxy -c`: refuse a configuration HAProxy would refuse, with its own words."""
    result = subprocess.run(
        [binary or haproxy_binary(), "-c", "-f", str(config_file)], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise ValueError(f"haproxy refused {config_file}:\n{result.stdout}{result.stderr}")


def bound_addresses(config_text: str) -> list[tuple[str, int]]:
    """The (host, port) of every `bind` line, to wait for; a wildcard host is reached on loopback."""
    found = []
    for host, port in re.findall(r"^\s*bind\s+(\S*):(\d+)", config_text, re.MULTILINE):
        found.append((host if host not in ("", "*", "0.0.0.0", "::") else "127.0.0.1", int(port)))
    return found


def wait_listening(addresses: Sequence[tuple[str, int]], proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Until every address accepts a TCP connection; fail early if the process died.

    HAProxy forwards each probe to a replica as a connection that closes at once, which a cloud ignores.
    """
    deadline = time.monotonic() + timeout
    pending = list(addresses)
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with code {proc.returncode} before it listened")
        if time.monotonic() > deadline:
            raise TimeoutError(f"haproxy did not listen on {pending} within {timeout:g} s")
        try:
            socket.create_connection(pending[0], timeout=0.5).close()
            pending.pop(0)
        except OSError:
            time.sleep(0.05)


@contextmanager
def haproxy_process(config_text: str, log_file: Path | None = None) -> Iterator[subprocess.Popen]:
    """HAProxy in the foreground (`-db`) on `config_text`, checked first; yields the process, stops it on exit.

    Ready means listening on every `bind` address: whether a replica is up is the health checks' business.
    """
    binary = haproxy_binary()
    with tempfile.TemporaryDirectory(prefix="splitinfer-haproxy-") as tmp:
        config_file = Path(tmp) / "haproxy.cfg"
        config_file.write_text(config_text)
        check_config(config_file, binary)
        out = open(log_file, "ab") if log_file else subprocess.DEVNULL
        proc = subprocess.Popen([binary, "-db", "-f", str(config_file)], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_listening(bound_addresses(config_text), proc)
            yield proc
        finally:
            stop(proc)  # SIGTERM: HAProxy's hard stop, open connections are closed
            if log_file:
                out.close()
