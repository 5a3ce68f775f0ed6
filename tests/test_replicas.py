"""Several cloud replicas behind HAProxy (splitinfer/replicas.py, docs/scaling.md).

* the configuration text: what each line is there for, and `haproxy -c` accepting it;
* stand-in replicas (plain sockets): a connect refused by one is redispatched to another;
* two real replicas of the default model behind a real HAProxy on loopback: the replica
  holding a session is killed with SIGKILL mid-generation, the local side reconnects
  through the balancer, the other replica gets the replayed context, and the tokens
  are those of an uninterrupted generation.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import signal
import socket
import socketserver
import threading
import time
from pathlib import Path

import pytest

from splitinfer import replicas
from splitinfer.decoding.lookahead import Memory
from splitinfer.procs import free_port, wait_healthy
from splitinfer.remote import cloud_session
from splitinfer.replicas import bound_addresses, check_config, haproxy_config, haproxy_process

from test_reliability import Cloud, CountingRelocations, default_side, one_torch_thread  # noqa: F401 (fixtures)


def have_haproxy() -> bool:
    try:
        replicas.haproxy_binary()
    except RuntimeError:
        return False
    return True


needs_haproxy = pytest.mark.skipif(not have_haproxy(), reason="haproxy is not installed (apt-get install haproxy)")


# ------------------------------------------------------------------------------ the configuration


def test_config_balances_tcp_with_fast_checks_and_long_idle_timeouts():
    text = haproxy_config(7000, [("10.0.0.1", 5001), ("10.0.0.2", 6001)])
    lines = {line.strip() for line in text.splitlines()}
    assert {
        "mode tcp",  # a session is one WebSocket connection: balanced whole, never per message
        "balance leastconn",
        "timeout connect 2s",
        "timeout client 11m",  # above the cloud's own idle closing, 2 x 300 s
        "timeout server 11m",
        "retries 2",
        "option redispatch 1",  # every retry of a refused connect goes to another replica
        "http-check send meth GET uri /health",
        "http-check expect status 200",
        "default-server inter 1s fall 3 rise 2 on-marked-down shutdown-sessions",
        # frames on the balancer's port + 1, /health on its port: the layout of one cloud
        "bind 127.0.0.1:7001",
        "bind 127.0.0.1:7000",
        # frames to each replica's WebSocket, checked on its /health port (ws - 1)
        "server r1 10.0.0.1:5001 check port 5000",
        "server r2 10.0.0.2:6001 check port 6000",
        # /health to each replica's /health, in rotation when its frames port is
        "server r1 10.0.0.1:5000 track replicas_ws/r1",
        "server r2 10.0.0.2:6000 track replicas_ws/r2",
    } <= lines
    assert bound_addresses(text) == [("127.0.0.1", 7001), ("127.0.0.1", 7000)]
    assert "balance roundrobin" in haproxy_config(7000, [("h", 5001)], balance="roundrobin")
    assert "log" not in haproxy_config(7000, [("h", 5001)], log=False)
    with pytest.raises(ValueError):
        haproxy_config(7000, [])
    with pytest.raises(ValueError):
        haproxy_config(7000, [("h", 5001)], balance="source")


@needs_haproxy
def test_haproxy_accepts_the_config(tmp_path: Path):
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(7000, [("127.0.0.1", 5001), ("127.0.0.1", 6001)], listen_host="0.0.0.0"))
    check_config(config)
    config.write_text("defaults\n    mode tcp\n    balance nonsense\n")
    with pytest.raises(ValueError, match="haproxy refused"):
        check_config(config)


@needs_haproxy
def test_haproxy_process_listens_and_stops():
    port = free_port(pair=True)
    with haproxy_process(haproxy_config(port, [("127.0.0.1", free_port())])) as proc:
        assert proc.poll() is None
    assert proc.returncode is not None


@needs_haproxy
def test_a_connect_refused_by_a_replica_is_redispatched_to_another(tmp_path: Path):
    """A replica whose frames port refuses (its process just died) but whose checks still pass: no client sees it.

    Stand-ins, no model: both replicas answer GET /health; only the second one's frames port listens (an echo).
    """
    (dead, _), (live, live_ws) = replica_ports = [(p, p + 1) for p in (free_port(pair=True), free_port(pair=True))]
    log = tmp_path / "haproxy.log"
    with contextlib.ExitStack() as stack:
        for server in (
            http.server.ThreadingHTTPServer(("127.0.0.1", dead), Healthy),
            http.server.ThreadingHTTPServer(("127.0.0.1", live), Healthy),
            socketserver.ThreadingTCPServer(("127.0.0.1", live_ws), Echo),
        ):
            stack.enter_context(server)
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # quick to shut down
            stack.callback(server.shutdown)
        port = free_port(pair=True)
        with haproxy_process(haproxy_config(port, [("127.0.0.1", ws) for _, ws in replica_ports]), log):
            for i in range(4):
                with socket.create_connection(("127.0.0.1", port + 1), timeout=5) as s:
                    s.sendall(b"frame %d" % i)
                    assert s.recv(100) == b"frame %d" % i
    # tcplog's counters end with the retries, "+N" when the connection was redispatched to another server.
    assert re.search(r"frames replicas_ws/r2 .*/\+\d+ ", log.read_text()), log.read_text()


class Healthy(http.server.BaseHTTPRequestHandler):
    """A stand-in replica's /health: 200."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass  # the checks, once a second: not worth a line each


class Echo(socketserver.BaseRequestHandler):
    """A stand-in replica's WebSocket port: answers one message with itself."""

    def handle(self) -> None:
        self.request.sendall(self.request.recv(100))


def test_a_missing_haproxy_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(replicas.shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(RuntimeError, match="apt-get install haproxy"):
        with haproxy_process(haproxy_config(7000, [("127.0.0.1", 5001)])):
            pass


# ------------------------------------------------------------------------------ real replicas


@pytest.fixture(scope="module")
def two_replicas(default_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("replicas")
    clouds = [Cloud(default_model, log_file=logs / f"replica{i}.log") for i in (1, 2)]
    yield clouds
    for cloud in clouds:
        cloud.stop()


@pytest.fixture
def balancer(two_replicas, tmp_path):
    """Both replicas up (one a previous test killed is started again; they load in parallel) behind a new HAProxy.

    Yields the balancer's WebSocket URL.  A new HAProxy per test starts with every replica in rotation, whereas
    one kept from the previous test would wait for `rise` good checks of the replica started again.
    """
    for cloud in two_replicas:
        if cloud.proc is None or cloud.proc.poll() is not None:
            cloud.start(wait=False)
    for cloud in two_replicas:
        wait_healthy(cloud.url, cloud.proc)
    port = free_port(pair=True)
    config = haproxy_config(port, [("127.0.0.1", cloud.port + 1) for cloud in two_replicas])
    with haproxy_process(config, tmp_path / "haproxy.log"):
        wait_healthy(f"http://127.0.0.1:{port}")  # /health through the balancer too
        yield f"ws://127.0.0.1:{port + 1}"


def holder_of_the_session(clouds: list[Cloud]) -> tuple[Cloud, Cloud]:
    """(the replica holding the one open session, the other one), from each replica's /health."""
    counts = [cloud.sessions_open() for cloud in clouds]
    assert sorted(counts) == [0, 1], counts
    return (clouds[0], clouds[1]) if counts[0] else (clouds[1], clouds[0])


@needs_haproxy
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "lookahead"])
def test_replica_killed_mid_generation_the_other_one_finishes(balancer, two_replicas, default_side, mode):
    """kill -9 the replica holding the session: the local side reconnects through HAProxy to the other one."""
    ids = default_side.encode("Count from 1 to 20, separated by commas.")

    def options() -> dict:
        # A pinned tree and fresh memory (test_reliability says why): the same tokens and relocations every run.
        return {"max_verify": 16, "memory": Memory()} if mode == "lookahead" else {}

    with cloud_session(balancer, expected=default_side.identity) as span:
        want = default_side.generate(span, ids, 40, mode, **options()).token_ids

    with cloud_session(balancer, expected=default_side.identity, reconnect_timeout=20.0) as span:
        holder, other = holder_of_the_session(two_replicas)
        relocations = CountingRelocations(span)
        produced, killed_at, after = [0], [], {}

        def kill_the_holder(chunk: list[int]) -> None:
            produced[0] += len(chunk)
            if killed_at:
                if not after:  # the first step after the kill: served by the replayed session
                    after["seconds"] = time.monotonic() - killed_at[0]
                    after["other_sessions"] = other.sessions_open()
                return
            if produced[0] >= 12 and (mode == "sequential" or relocations.count >= 1):
                holder.kill()
                killed_at.append(time.monotonic())

        got = default_side.generate(span, ids, 40, mode, on_tokens=kill_the_holder, **options()).token_ids

    assert killed_at, "the generation ended before the kill: the prompt no longer relocates, pick another"
    assert after, "no step came after the kill"
    print(f"\n{mode}: SIGKILL to the first token from the other replica: {after['seconds']:.2f} s "
          f"({span.replayed_tokens} cache entries replayed)")
    assert got == want
    assert span.recoveries == 1 and span.replayed_tokens >= len(ids) + 11
    assert holder.proc.returncode == -9
    assert after["other_sessions"] == 1  # the rest was served by the other replica
    assert other.sessions_open() == 0  # and the session was closed there at the end



@needs_haproxy
@pytest.mark.slow
def test_a_frozen_replica_is_taken_out_and_its_session_moves(balancer, two_replicas, default_side):
    """SIGSTOP the replica holding the session (a machine gone without a reset): its /health checks time out,
    HAProxy marks it down and closes its connections (on-marked-down shutdown-sessions), and the local side
    replays into the other replica long before its own 60 s reply timeout."""
    ids = default_side.encode("Count from 1 to 20, separated by commas.")
    with cloud_session(balancer, expected=default_side.identity) as span:
        want = default_side.generate(span, ids, 24, "sequential").token_ids

    with cloud_session(balancer, expected=default_side.identity, reconnect_timeout=20.0) as span:
        holder, other = holder_of_the_session(two_replicas)
        frozen_at: list[float] = []
        after: dict = {}

        def freeze_the_holder(chunk: list[int]) -> None:
            if frozen_at:
                after.setdefault("seconds", time.monotonic() - frozen_at[0])
                after.setdefault("other_sessions", other.sessions_open())
            else:  # after the first chunk: the session is open on the holder
                holder.proc.send_signal(signal.SIGSTOP)
                frozen_at.append(time.monotonic())

        try:
            got = default_side.generate(span, ids, 24, "sequential", on_tokens=freeze_the_holder).token_ids
        finally:
            holder.kill()  # SIGKILL ends a stopped process too; the fixture starts it again for the next test
    print(f"\nSIGSTOP to the first token from the other replica: {after['seconds']:.2f} s")
    assert got == want and span.recoveries == 1
    assert after["other_sessions"] == 1
    assert after["seconds"] < 20.0  # the checks (3 x 1 s, each waiting up to 1 s), not the 60 s reply timeout
