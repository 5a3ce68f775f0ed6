"""The WAN emulator: the link model in plain numbers, then delay, order, bandwidth, close/EOF propagation,
cut, shutdown, the observer hook, parsing, CLI.

Everything runs on 127.0.0.1 with ports picked by the OS; every socket has a timeout so a
broken emulator fails a test instead of hanging it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import serve as ws_serve

from splitinfer.wan import DOWN, UP, Forward, Link, LinkClock, WanEmulator, add_subparser, main
from splitinfer.wan.link import CAPPED_QUEUE_S, CAPPED_SLICE, HIGH_WATER, LOW_WATER, in_order

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 5.0  # per blocking socket call


# -- small servers on loopback -------------------------------------------------------------

@contextmanager
def tcp_server(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A threaded TCP server running `handle(conn)` per connection; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve_one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                handle(conn)
            except OSError:
                pass  # the emulator cut or reset us: that is what some tests do

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(TIMEOUT)
        listener.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


@contextmanager
def wan_to(port: int, link: Link) -> Iterator[tuple[WanEmulator, int]]:
    """An emulator forwarding a free port to `port`; yields (emulator, listen port)."""
    with WanEmulator(link, [Forward(0, "127.0.0.1", port)]).running() as wan:
        yield wan, wan.addresses[0][1]


def client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_all(sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := sock.recv(65536):
        buf += chunk
    return bytes(buf)


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the peer has closed (EOF or reset) -- within the socket's timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def median_round_trip_ms(port: int, n: int = 20) -> float:
    with client(port) as sock:
        sock.sendall(b"warm-up!")
        recv_exactly(sock, 8)  # the first round trip also waits for the far connection
        samples = []
        for i in range(n):
            msg = f"ping{i:04d}".encode()
            t0 = time.perf_counter()
            sock.sendall(msg)
            assert recv_exactly(sock, len(msg)) == msg
            samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def median_ws_ping_ms(port: int, n: int = 20) -> float:
    with ws_connect(f"ws://127.0.0.1:{port}", proxy=None, open_timeout=TIMEOUT, ping_interval=None) as ws:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            assert ws.ping().wait(TIMEOUT)
            samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def least_median(measure: Callable[[], float], lo: float, hi: float, attempts: int = 3) -> float:
    """The smallest of up to `attempts` medians, stopping once one falls within [lo, hi].

    Other processes competing for the CPU only ever add delay, so on a busy machine the
    smallest median is the fair reading; a delivery that comes too early still fails `lo`.
    """
    medians = [measure()]
    while not lo <= min(medians) <= hi and len(medians) < attempts:
        medians.append(measure())
    return min(medians)


def rtt_bounds(rtt_ms: float, direct_ms: float) -> tuple[float, float]:
    """What a median round trip through a link of `rtt_ms` may measure, given the same round trip direct.

    Never under 98% of the rtt (an event loop may fire a timer up to its clock resolution early);
    at most 10% over it, on top of what the round trip costs without the emulator.
    """
    return 0.98 * rtt_ms, 1.1 * rtt_ms + direct_ms


@contextmanager
def ws_echo_server() -> Iterator[int]:
    def handler(ws) -> None:
        for message in ws:
            ws.send(message)

    with ws_serve(handler, "127.0.0.1", 0, ping_interval=None) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.socket.getsockname()[1]
        finally:
            server.shutdown()
            thread.join(TIMEOUT)


# -- the link model, in plain numbers (no sockets) ------------------------------------------

def test_clock_adds_one_way_delay_per_direction():
    clock = LinkClock(Link(rtt_ms=80))
    assert clock.arrival_time(UP, 1000, now=1.0) == pytest.approx(1.04)
    assert clock.arrival_time(DOWN, 10**6, now=1.0) == pytest.approx(1.04)  # unlimited: size costs nothing


def test_clock_serialises_chunks_behind_each_other_per_direction():
    clock = LinkClock(Link(rtt_ms=20, mbit=8))  # 1 MB/s: 1000 bytes take 1 ms
    assert clock.arrival_time(UP, 1000, now=0.0) == pytest.approx(0.001 + 0.01)
    assert clock.arrival_time(UP, 1000, now=0.0) == pytest.approx(0.002 + 0.01)  # waits for the first
    assert clock.arrival_time(DOWN, 1000, now=0.0) == pytest.approx(0.001 + 0.01)  # the other way is free
    assert clock.arrival_time(UP, 1000, now=1.0) == pytest.approx(1.001 + 0.01)  # the link drained meanwhile


def test_clock_jitter_is_bounded_non_negative_and_seeded():
    draws = [LinkClock(Link(rtt_ms=10, jitter_ms=4, seed=3)).arrival_time(UP, 1, 0.0) for _ in range(2)]
    assert draws[0] == draws[1]
    clock = LinkClock(Link(rtt_ms=10, jitter_ms=4, seed=3))
    times = [clock.arrival_time(UP, 1, 0.0) for _ in range(200)]
    assert all(0.005 <= t <= 0.009 for t in times) and max(times) - min(times) > 0.002


def test_clock_set_link_applies_to_later_chunks():
    clock = LinkClock(Link(rtt_ms=10))
    clock.set_link(Link(rtt_ms=50))
    assert clock.link.rtt_ms == 50 and clock.arrival_time(UP, 1, 0.0) == pytest.approx(0.025)


def test_in_order_never_lets_a_chunk_overtake():
    assert in_order(0.05, 0.03) == 0.05 and in_order(0.05, 0.07) == 0.07


def test_slices_and_water_marks():
    assert Link().slice_size(300_000) == 300_000 and Link(mbit=1).slice_size(300_000) == CAPPED_SLICE
    assert Link().water_marks() == (HIGH_WATER, LOW_WATER)
    high, low = Link(rtt_ms=20, mbit=8).water_marks()  # 1 MB/s, 10 ms in flight + 100 ms / 50 ms of queue
    assert (high, low) == (110_000, 60_000)
    assert Link(mbit=0.001).water_marks()[0] == CAPPED_SLICE  # never below one slice


# -- delay ----------------------------------------------------------------------------------

def test_round_trip_is_rtt():
    with tcp_server(echo) as port, wan_to(port, Link(rtt_ms=80)) as (_, wan_port):
        lo, hi = rtt_bounds(80, median_round_trip_ms(port))
        median = least_median(lambda: median_round_trip_ms(wan_port), lo, hi)
    print(f"\nTCP echo median round trip at rtt 80 ms: {median:.2f} ms (bounds {lo:.2f}..{hi:.2f})")
    assert lo <= median <= hi  # the configured rtt, within rtt_bounds' ratios of it


def test_websocket_ping_is_rtt():
    with ws_echo_server() as port, wan_to(port, Link(rtt_ms=80)) as (_, wan_port):
        lo, hi = rtt_bounds(80, median_ws_ping_ms(port))
        median = least_median(lambda: median_ws_ping_ms(wan_port), lo, hi)
    print(f"\nWebSocket ping median at rtt 80 ms: {median:.2f} ms (bounds {lo:.2f}..{hi:.2f})")
    assert lo <= median <= hi  # the configured rtt, within rtt_bounds' ratios of it


def test_zero_rtt_is_a_near_passthrough():
    with ws_echo_server() as port, wan_to(port, Link()) as (_, wan_port), \
            wan_to(port, Link(rtt_ms=2)) as (_, slow_port):
        reference = median_ws_ping_ms(slow_port)  # the smallest rtt worth emulating, with the emulator's own cost
        through = least_median(lambda: median_ws_ping_ms(wan_port), 0, 0.5 * reference)
    print(f"\nWebSocket ping median at rtt 0: {through:.3f} ms (at rtt 2 ms: {reference:.3f} ms)")
    # Half the 2 ms link's ping: a timer or poll on the path (a millisecond or more) would exceed it.
    assert through < 0.5 * reference


def test_set_link_changes_rtt_without_restart():
    with tcp_server(echo) as port, wan_to(port, Link()) as (wan, wan_port):
        assert median_round_trip_ms(wan_port, n=5) < 0.1 * 50  # a tenth of the rtt set next: no delay yet
        wan.set_link(Link(rtt_ms=50))
        assert wan.link.rtt_ms == 50
        lo, hi = rtt_bounds(50, median_round_trip_ms(port, n=5))
        assert lo <= least_median(lambda: median_round_trip_ms(wan_port, n=5), lo, hi) <= hi  # now the new rtt


def test_jitter_adds_bounded_non_negative_delay():
    with tcp_server(echo) as port, wan_to(port, Link(rtt_ms=20, jitter_ms=10, seed=1)) as (_, wan_port):
        with client(wan_port) as sock:
            sock.sendall(b"x")
            recv_exactly(sock, 1)
            samples = []
            for _ in range(20):
                t0 = time.perf_counter()
                sock.sendall(b"x")
                recv_exactly(sock, 1)
                samples.append((time.perf_counter() - t0) * 1000)
    assert min(samples) >= 20  # jitter only ever adds
    assert statistics.median(samples) <= 20 + 2 * 10
    assert statistics.pstdev(samples) > 0.1 * 10  # it does jitter: over a tenth of jitter_ms (two uniform draws: ~0.4)


# -- order and bandwidth --------------------------------------------------------------------

def test_order_preserved_across_concurrent_jittery_streams():
    n_streams, n_lines = 6, 300
    errors: list[str] = []

    def stream(wan_port: int, k: int) -> None:
        lines = [f"{k}:{i}\n".encode() for i in range(n_lines)]
        with client(wan_port) as sock:
            received = bytearray()
            for i, line in enumerate(lines):
                sock.sendall(line)  # separate small writes -> many chunks, each with its own jitter
                if i % 20 == 0:
                    time.sleep(0.001)
            sock.shutdown(socket.SHUT_WR)
            received += recv_all(sock)
        if bytes(received) != b"".join(lines):
            errors.append(f"stream {k} reordered or lost data")

    with tcp_server(echo) as port, wan_to(port, Link(rtt_ms=10, jitter_ms=15, seed=7)) as (wan, wan_port):
        threads = [threading.Thread(target=stream, args=(wan_port, k)) for k in range(n_streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_bandwidth_cap():
    size = 1_000_000
    arrived: list[float] = []

    def sink(conn: socket.socket) -> None:
        recv_exactly(conn, size)
        arrived.append(time.perf_counter())
        conn.sendall(b"k")

    def transfer(port: int) -> float:
        data = os.urandom(size)
        with client(port) as sock:
            t0 = time.perf_counter()
            sock.sendall(data)
            assert recv_exactly(sock, 1) == b"k"
        return arrived[-1] - t0

    link = Link(mbit=8)
    with tcp_server(sink) as port, wan_to(port, link) as (_, wan_port):
        direct = transfer(port)  # the same megabyte without the emulator: what loopback costs anyway
        elapsed = transfer(wan_port)
    capped = link.serialisation_s(size)  # 1.0 s
    print(f"\n1 MB at 8 Mbit/s took {elapsed:.3f} s (direct {direct:.3f} s)")
    # The cap's own time: never over 5% faster than it allows, at most 10% slower plus the direct cost.
    assert 0.95 * capped <= elapsed <= 1.1 * capped + direct


def test_bandwidth_cap_is_shared_and_adds_to_delay():
    size = 250_000  # 0.25 s at 8 Mbit/s; two at once share the link: 0.5 s for both
    done: list[float] = []

    def sink(conn: socket.socket) -> None:
        recv_exactly(conn, size)
        done.append(time.perf_counter())

    link = Link(rtt_ms=40, mbit=8)
    with tcp_server(sink) as port, wan_to(port, link) as (_, wan_port):
        socks = [client(wan_port) for _ in range(2)]
        t0 = time.perf_counter()
        for sock in socks:
            sock.sendall(os.urandom(size))
        deadline = time.monotonic() + TIMEOUT
        while len(done) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        for sock in socks:
            sock.close()
    assert len(done) == 2
    expected = link.serialisation_s(2 * size) + link.one_way_s  # both share the cap, then the one-way delay
    # 6% under to 15% over (the slack this had in milliseconds); a cap per connection would take about half.
    assert 0.94 * expected <= max(done) - t0 <= 1.15 * expected


def test_bulk_transfer_delays_others_by_at_most_a_router_buffer():
    size = 4_000_000  # 0.8 s at 40 Mbit/s

    def sink_or_echo(conn: socket.socket) -> None:
        if conn.recv(1) == b"B":
            recv_exactly(conn, size)
        else:
            echo(conn)

    with tcp_server(sink_or_echo) as port, wan_to(port, Link(rtt_ms=20, mbit=40)) as (_, wan_port):
        with client(wan_port) as bulk, client(wan_port) as ping:
            ping.sendall(b"E")
            sender = threading.Thread(target=bulk.sendall, args=(b"B" + bytes(size),))
            sender.start()
            time.sleep(0.15)  # let the bulk transfer fill the link's queue
            samples = []
            for _ in range(4):
                t0 = time.perf_counter()
                ping.sendall(b"x")
                recv_exactly(ping, 1)
                samples.append((time.perf_counter() - t0) * 1000)
            sender.join(TIMEOUT)
    print(f"\nping RTT during a bulk transfer: {samples}")
    # Waits behind CAPPED_QUEUE_S / 2 to CAPPED_QUEUE_S of queued bulk data, not behind all of it (0.8 s):
    # at least 80% of the half-full queue, at most 30% over a full one.
    queue_ms = CAPPED_QUEUE_S * 1000
    assert 20 + 0.8 * queue_ms / 2 <= statistics.median(samples) <= 1.3 * (20 + queue_ms), samples


# -- EOF, close, cut, shutdown --------------------------------------------------------------

def test_half_close_is_propagated():
    def count_then_reply(conn: socket.socket) -> None:
        data = recv_all(conn)  # returns only once the client's EOF arrived
        conn.sendall(str(len(data)).encode())

    with tcp_server(count_then_reply) as port, wan_to(port, Link(rtt_ms=20)) as (wan, wan_port):
        with client(wan_port) as sock:
            sock.sendall(b"a" * 100_000)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"100000"
        wait_for(lambda: wan.connection_count == 0)


def test_closed_far_end_closes_near_end_after_pending_data():
    def greet_and_close(conn: socket.socket) -> None:
        conn.sendall(b"bye")

    link = Link(rtt_ms=60)
    with tcp_server(greet_and_close) as port, wan_to(port, link) as (wan, wan_port):
        with client(wan_port) as sock:
            t0 = time.perf_counter()
            assert recv_all(sock) == b"bye"  # data first, then EOF
            elapsed = time.perf_counter() - t0
        # connect reaches the server after 30 ms, its reply comes back 30 ms later: one rtt (2.5 rtt at most,
        # the slack this had in milliseconds, for a loaded machine)
        rtt_s = link.rtt_ms / 1000
        assert rtt_s <= elapsed <= 2.5 * rtt_s
        wait_for(lambda: wan.connection_count == 0)


def test_unreachable_target_closes_the_client():
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        dead_port = placeholder.getsockname()[1]
    with wan_to(dead_port, Link(rtt_ms=20)) as (wan, wan_port):
        with client(wan_port) as sock:
            assert closed_by_peer(sock)
        wait_for(lambda: wan.connection_count == 0)


def test_cut_closes_both_ends_of_live_connections():
    server_side_closed = threading.Event()

    def echo_and_report(conn: socket.socket) -> None:
        try:
            echo(conn)
        finally:
            server_side_closed.set()

    with tcp_server(echo_and_report) as port, wan_to(port, Link(rtt_ms=10)) as (wan, wan_port):
        sock = client(wan_port)
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
        assert wan.connection_count == 1
        wan.cut()
        assert closed_by_peer(sock)
        assert server_side_closed.wait(TIMEOUT)
        wait_for(lambda: wan.connection_count == 0)
        sock.close()
        # still listening: a new connection works
        with client(wan_port) as again:
            again.sendall(b"ok")
            assert recv_exactly(again, 2) == b"ok"


def test_threaded_stop_is_clean(caplog):
    caplog.set_level(logging.DEBUG, logger="asyncio")
    threads_before = set(threading.enumerate())
    with tcp_server(echo) as port:
        with wan_to(port, Link(rtt_ms=10)) as (_, wan_port):
            live = client(wan_port)
            live.sendall(b"x")
            recv_exactly(live, 1)
        # stop() closed the live connection and the listening socket
        assert closed_by_peer(live)
        live.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", wan_port), timeout=TIMEOUT)
    assert not [t for t in set(threading.enumerate()) - threads_before if t.name == "wan-emulator"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_async_start_stop_leaves_no_tasks(caplog):
    caplog.set_level(logging.DEBUG, logger="asyncio")

    async def scenario(port: int) -> set[asyncio.Task]:
        wan = WanEmulator(Link(rtt_ms=200), [Forward(0, "127.0.0.1", port)])
        await wan.start()
        reader, writer = await asyncio.open_connection(*wan.addresses[0])
        writer.write(b"pending")  # still queued in the emulator when we stop
        await asyncio.sleep(0.01)
        await wan.stop()
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        await writer.wait_closed()
        return asyncio.all_tasks() - {asyncio.current_task()}

    with tcp_server(echo) as port:
        assert asyncio.run(scenario(port)) == set()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_start_failure_releases_everything():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        wan = WanEmulator(Link(), [Forward(0, "127.0.0.1", 9), Forward(port, "127.0.0.1", 9)])
        with pytest.raises(OSError):
            with wan.running():
                pass
        assert wan.addresses == []


# -- the observer hook ----------------------------------------------------------------------

def test_observer_sees_every_forwarded_byte_per_connection_and_direction():
    seen: list[tuple[int, int, bytes]] = []
    with tcp_server(echo) as port:
        wan = WanEmulator(Link(rtt_ms=4), [Forward(0, "127.0.0.1", port)],
                          observer=lambda conn, direction, data: seen.append((conn, direction, data)))
        with wan.running():
            for message in (b"first connection", b"second"):
                with client(wan.addresses[0][1]) as sock:
                    sock.sendall(message)
                    assert recv_exactly(sock, len(message)) == message
    for conn, message in ((0, b"first connection"), (1, b"second")):
        for direction in (UP, DOWN):
            assert b"".join(d for c, w, d in seen if (c, w) == (conn, direction)) == message


# -- parsing and the command line -----------------------------------------------------------

@pytest.mark.parametrize("spec, expected", [
    ("6000:127.0.0.1:5000", Forward(6000, "127.0.0.1", 5000)),
    ("0.0.0.0:6000:10.0.0.5:5000", Forward(6000, "10.0.0.5", 5000, "0.0.0.0")),
    ("localhost:6000:example.com:443", Forward(6000, "example.com", 443, "localhost")),
    ("*:6000:127.0.0.1:5000", Forward(6000, "127.0.0.1", 5000, "0.0.0.0")),
    (":6000:127.0.0.1:5000", Forward(6000, "127.0.0.1", 5000, "0.0.0.0")),
    ("[::1]:6000:[::1]:5000", Forward(6000, "::1", 5000, "::1")),
    ("0:127.0.0.1:5000", Forward(0, "127.0.0.1", 5000)),
])
def test_forward_parse(spec, expected):
    assert Forward.parse(spec) == expected


@pytest.mark.parametrize("spec", [
    "", "6000", "6000:5000", "6000:127.0.0.1", "x:127.0.0.1:5000", "6000:127.0.0.1:http",
    "6000::5000", "70000:127.0.0.1:5000", "6000:127.0.0.1:0", "6000:127.0.0.1:99999",
    "a:b:6000:127.0.0.1:5000", "6000:::1:5000",
])
def test_forward_parse_rejects(spec):
    with pytest.raises(ValueError, match="bad forward"):
        Forward.parse(spec)


_hosts = st.sampled_from(["127.0.0.1", "localhost", "10.1.2.3", "::1", "example.com"])


@given(lport=st.integers(0, 65535), host=_hosts, tport=st.integers(1, 65535), lhost=_hosts)
def test_forward_parse_round_trips(lport, host, tport, lhost):
    bracket = lambda h: f"[{h}]" if ":" in h else h  # noqa: E731
    forward = Forward(lport, host, tport, lhost)
    assert Forward.parse(f"{bracket(lhost)}:{lport}:{bracket(host)}:{tport}") == forward


def test_link_validation():
    with pytest.raises(ValueError):
        Link(rtt_ms=-1)
    with pytest.raises(ValueError):
        Link(mbit=0)
    assert Link(rtt_ms=80).one_way_s == pytest.approx(0.04)
    assert Link(mbit=8).serialisation_s(1_000_000) == pytest.approx(1.0)


def test_cli_help_and_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--rtt-ms" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--rtt-ms", "80"])  # no -L
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["-L", "nonsense"])
    assert exc.value.code == 2
    assert "bad forward" in capsys.readouterr().err


def test_add_subparser():
    parser = argparse.ArgumentParser(prog="python -m splitinfer")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["wan", "--rtt-ms", "80", "-L", "6000:127.0.0.1:5000", "-L", "6001:127.0.0.1:5001"])
    assert args.rtt_ms == 80
    assert args.forwards == [Forward(6000, "127.0.0.1", 5000), Forward(6001, "127.0.0.1", 5001)]
    assert callable(args.func)


def test_cli_runs_until_interrupted():
    command = [sys.executable, "-m", "splitinfer.wan", "--rtt-ms", "20", "-L", "0:127.0.0.1:{port}"]
    with tcp_server(echo) as port:
        with subprocess.Popen([arg.format(port=port) for arg in command], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            try:
                line = proc.stdout.readline()
                assert "-> 127.0.0.1:" in line and "rtt 20 ms" in line, line
                wan_port = int(line.split()[1].rsplit(":", 1)[1])
                lo, hi = rtt_bounds(20, median_round_trip_ms(port, n=5))
                assert lo <= least_median(lambda: median_round_trip_ms(wan_port, n=5), lo, hi) <= hi  # rtt 20 ms
                proc.send_signal(signal.SIGINT)
                assert proc.wait(TIMEOUT) == 0
                assert "Traceback" not in proc.stderr.read()
            finally:
                if proc.poll() is None:
                    proc.kill()


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
