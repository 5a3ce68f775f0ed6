"""A user-space WAN emulator: TCP port forwarding (like `ssh -L`) with added latency.

The split-inference experiments need to know how the local/cloud split behaves when the
cloud is tens of milliseconds away, but on a test machine both halves run on loopback and
this kernel has no `tc netem`. So we put a small proxy between them:

    client --> 127.0.0.1:6000 [WanEmulator] --> 127.0.0.1:5000 server

Every chunk read from one side is delivered to the other side one-way delay (rtt_ms / 2)
later, independently in each direction, never reordered. Optional jitter adds a random
non-negative extra delay per chunk; an optional bandwidth cap adds serialisation delay,
with chunks serialised one after another on a link shared by all connections. EOF
(half-close) and close travel through the same queue, so they arrive after the data sent
before them. Zero delay is a near-pure passthrough.

Use it from the command line:

    python -m splitinfer wan --rtt-ms 80 -L 6000:127.0.0.1:5000 -L 6001:127.0.0.1:5001

or as a library, with the event loop in a background thread:

    with WanEmulator(Link(rtt_ms=80), [Forward(6000, "127.0.0.1", 5000)]).running() as wan:
        ...                          # talk to 127.0.0.1:6000
        wan.set_link(Link(rtt_ms=20))  # sweep the RTT without restarting
        wan.cut()                    # drop every live connection (fault tests)

or inside your own event loop with `await wan.start()` / `await wan.stop()`.

Timing accuracy: an event loop wakes from a timed sleep late (epoll rounds timeouts up to
whole milliseconds). The emulator learns that lateness, wakes that much early and busy-waits
the rest, so chunks are delivered within tens of microseconds of their time; the price is
up to ~1.5 ms of spinning per delivery.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import re
import signal
import socket
import sys
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

# A direction index into per-direction state: UP is client -> server (near -> far).
UP, DOWN = 0, 1

# Without a bandwidth cap a pipe stops reading its source once this much is queued and not
# yet delivered, and resumes below LOW_WATER. This only bounds memory.
HIGH_WATER = 16 * 1024 * 1024
LOW_WATER = 4 * 1024 * 1024

# With a cap, a pipe holds what is in flight plus at most this much waiting to be sent, like
# a router buffer: a bulk sender then backs up into its own socket instead of queueing
# seconds of data in front of everyone else's small messages.
CAPPED_QUEUE_S = 0.1

# With a bandwidth cap, big reads are scheduled in slices so that the far side sees bytes
# trickle in at the capped rate instead of in one burst per 256 KiB read.
CAPPED_SLICE = 16 * 1024

# How long the threaded form waits for start/stop/cut to run on its loop.
CALL_TIMEOUT_S = 10.0

_DATA, _EOF, _CLOSE = "data", "eof", "close"


@dataclass(frozen=True)
class Link:
    """What the emulated network path does to every chunk."""

    # Round-trip time; each direction adds half of it, so a request/response costs this much.
    rtt_ms: float = 0.0
    # Extra per-chunk delay drawn uniformly from [0, jitter_ms], per direction. Non-negative
    # so rtt_ms stays the floor; it never reorders (a chunk waits for the one before it).
    jitter_ms: float = 0.0
    # Bandwidth cap in megabits/s per direction, shared by all connections; None = unlimited.
    mbit: float | None = None
    # Seed for the jitter draws, for reproducible runs; None = a fresh random seed.
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.rtt_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"rtt_ms and jitter_ms must be >= 0, got {self.rtt_ms} and {self.jitter_ms}")
        if self.mbit is not None and self.mbit <= 0:
            raise ValueError(f"mbit must be > 0 (or None for unlimited), got {self.mbit}")

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000.0

    def serialisation_s(self, nbytes: int) -> float:
        """How long `nbytes` occupy the link at the cap (0 when unlimited)."""
        return 0.0 if self.mbit is None else nbytes * 8 / (self.mbit * 1e6)

    def describe(self) -> str:
        bandwidth = "unlimited bandwidth" if self.mbit is None else f"{self.mbit:g} Mbit/s"
        return f"rtt {self.rtt_ms:g} ms, jitter {self.jitter_ms:g} ms, {bandwidth}"


# [LISTEN_HOST:]LISTEN_PORT:HOST:PORT, where a host may be an [IPv6] literal in brackets.
_HOST = r"\[[^\]]*\]|[^:\[\]]*"
_FORWARD_RE = re.compile(rf"(?:(?P<lhost>{_HOST}):)?(?P<lport>\d+):(?P<host>{_HOST}):(?P<port>\d+)")


@dataclass(frozen=True)
class Forward:
    """One forwarded port: connections to listen_host:listen_port go to target_host:target_port."""

    # Port 0 picks a free port; read the real one from WanEmulator.addresses after start.
    listen_port: int
    target_host: str
    target_port: int
    # Loopback by default, like ssh -L, so an emulator never exposes a server by accident.
    listen_host: str = "127.0.0.1"

    @classmethod
    def parse(cls, spec: str) -> Forward:
        """Parse ssh -L syntax: "6000:127.0.0.1:5000" or "LISTEN_HOST:6000:127.0.0.1:5000"."""
        m = _FORWARD_RE.fullmatch(spec.strip())
        if m is None:
            raise ValueError(f"bad forward {spec!r}: expected [LISTEN_HOST:]LISTEN_PORT:HOST:PORT, "
                             "e.g. 6000:127.0.0.1:5000")
        listen_port, target_port = int(m["lport"]), int(m["port"])
        target_host = m["host"].strip("[]")
        if not target_host:
            raise ValueError(f"bad forward {spec!r}: empty target host")
        if not 0 <= listen_port <= 65535 or not 1 <= target_port <= 65535:
            raise ValueError(f"bad forward {spec!r}: ports must be 0-65535 (target 1-65535)")
        listen_host = m["lhost"]
        if listen_host is None:
            listen_host = "127.0.0.1"
        elif listen_host.strip("[]") in ("", "*"):
            listen_host = "0.0.0.0"  # ssh: an empty address or "*" means every interface
        return cls(listen_port, target_host, target_port, listen_host.strip("[]"))

    def __str__(self) -> str:
        return f"{self.listen_host}:{self.listen_port} -> {self.target_host}:{self.target_port}"


class _Pipe:
    """One direction of one proxied connection: a queue of chunks, each with a delivery time."""

    def __init__(self, wan: WanEmulator, direction: int, src: _Endpoint, dst: _Endpoint) -> None:
        self.wan, self.direction, self.src, self.dst = wan, direction, src, dst
        self.loop = wan._loop
        self.queue: deque[tuple[float, str, bytes]] = deque()
        self.last_at = 0.0  # delivery time of the newest chunk; later chunks never go earlier
        self.queued_bytes = 0
        self.timer: asyncio.Handle | None = None
        self.eof_delivered = False
        self.dead = False  # the destination is gone; nothing more can be delivered

    def push(self, data: bytes) -> None:
        now = self.loop.time()
        step = CAPPED_SLICE if self.wan.link.mbit is not None else len(data)
        for i in range(0, len(data), step):
            self._enqueue(now, _DATA, data[i:i + step])
        if self.queued_bytes > self._water_marks()[0]:
            self.src.pause("queue")

    def _water_marks(self) -> tuple[int, int]:
        """(pause above, resume at or below) for the bytes queued in this pipe."""
        link = self.wan.link
        if link.mbit is None:
            return HIGH_WATER, LOW_WATER
        bytes_per_s = link.mbit * 1e6 / 8
        in_flight_s = link.one_way_s + link.jitter_ms / 1000
        return (max(CAPPED_SLICE, int(bytes_per_s * (in_flight_s + CAPPED_QUEUE_S))),
                int(bytes_per_s * (in_flight_s + CAPPED_QUEUE_S / 2)))

    def push_eof(self) -> None:
        self._enqueue(self.loop.time(), _EOF, b"")

    def push_close(self) -> None:
        self._enqueue(self.loop.time(), _CLOSE, b"")

    def drop(self) -> None:
        """Forget everything queued (the destination is gone or the link was cut)."""
        self.dead = True
        self.queue.clear()
        self.queued_bytes = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _enqueue(self, now: float, kind: str, payload: bytes) -> None:
        if self.dead:
            return
        at = max(self.last_at, self.wan._arrival_time(self.direction, len(payload), now))
        self.last_at = at
        self.queue.append((at, kind, payload))
        self.queued_bytes += len(payload)
        if self.timer is None:  # an armed timer is already waiting for an earlier chunk
            self._pump()

    def kick(self) -> None:
        """Start delivering (the destination socket just appeared)."""
        if self.timer is not None:
            self.timer.cancel()
        self._pump()

    def _pump(self) -> None:
        """Deliver everything that is due, then wait until the next chunk is (absolute time)."""
        self.timer = None
        while self.queue and self.dst.transport is not None:
            at = self.queue[0][0]
            wait = at - self.loop.time()
            if wait <= 0:
                self._deliver(*self.queue.popleft())
            elif wait > self.wan._wake.lead:
                # Sleep, but wake early by the loop's usual lateness ...
                self.timer = self.loop.call_at(at - self.wan._wake.lead, self._woken, at - self.wan._wake.lead)
                return
            else:
                # ... and spin through the last fraction of a millisecond.
                self.timer = self.loop.call_soon(self._pump)
                return

    def _woken(self, asked_for: float) -> None:
        self.wan._wake.observe(self.loop.time() - asked_for)
        self._pump()

    def _deliver(self, _at: float, kind: str, payload: bytes) -> None:
        transport = self.dst.transport
        assert transport is not None
        if kind == _DATA:
            self.queued_bytes -= len(payload)
            if not transport.is_closing():
                transport.write(payload)
            if self.queued_bytes <= self._water_marks()[1]:
                self.src.resume("queue")
        elif kind == _EOF:
            if not transport.is_closing() and transport.can_write_eof():
                transport.write_eof()
            self.eof_delivered = True
            self.src.conn.maybe_finish()
        else:
            transport.close()  # flushes what was written before, then FIN


class _WakeLead:
    """How early to wake before a delivery time, learned from how late timers fire.

    An event loop wakes from a timed sleep late: up to 1 ms with epoll, ~0.1-0.3 ms with
    select() on a VM. Sleeping that much less and spinning the rest keeps deliveries within
    tens of microseconds of their time, at the cost of a short busy wait per delivery.
    The estimate follows a high percentile of the lateness: it rises fast and decays slowly.
    """

    MAX_S = 0.0015  # never spin longer than this per delivery
    UP, DOWN = 0.3, 0.02

    def __init__(self) -> None:
        self.lead = 0.001  # epoll's worst case; decays on loops that wake more precisely

    def observe(self, lateness: float) -> None:
        alpha = self.UP if lateness > self.lead else self.DOWN
        self.lead = min(self.MAX_S, max(0.0, self.lead + alpha * (lateness - self.lead)))


class _Endpoint(asyncio.Protocol):
    """One of the two sockets of a proxied connection ("near" = client side, "far" = target)."""

    def __init__(self, conn: _Connection, name: str) -> None:
        self.conn, self.name = conn, name
        self.transport: asyncio.Transport | None = None
        self.outgoing: _Pipe  # reads from this socket
        self.incoming: _Pipe  # writes into this socket
        self.lost = False
        self._pause_reasons: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        _set_nodelay(transport)  # asyncio does this too, but the emulator must not batch
        if self._pause_reasons:
            transport.pause_reading()
        self.conn.endpoint_made(self)
        self.incoming.kick()  # data may have been waiting for this socket to exist

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.outgoing.push_eof()
        return True  # keep the socket open for writing: a half-close is not a close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.incoming.drop()
        self.outgoing.push_close()
        self.conn.maybe_finish()

    # The socket we write into is full: stop reading the socket that feeds it.
    def pause_writing(self) -> None:
        self.incoming.src.pause("dest")

    def resume_writing(self) -> None:
        self.incoming.src.resume("dest")

    def pause(self, reason: str) -> None:
        self._pause_reasons.add(reason)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self, reason: str) -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Connection:
    """A proxied connection: the accepted client socket, the target socket and two pipes."""

    def __init__(self, wan: WanEmulator, forward: Forward) -> None:
        self.wan, self.forward = wan, forward
        self.near = _Endpoint(self, "near")
        self.far = _Endpoint(self, "far")
        self.near.outgoing = self.far.incoming = _Pipe(wan, UP, self.near, self.far)
        self.far.outgoing = self.near.incoming = _Pipe(wan, DOWN, self.far, self.near)
        self.connect_task: asyncio.Task[None] | None = None

    def endpoint_made(self, endpoint: _Endpoint) -> None:
        if endpoint is self.near:
            self.wan._connections.add(self)
            # The SYN travels too: the target sees the connection one-way delay after the client.
            loop = self.wan._loop
            self.connect_task = loop.create_task(self._connect_far(loop.time() + self.wan.link.one_way_s))

    async def _connect_far(self, deadline: float) -> None:
        loop = self.wan._loop
        await asyncio.sleep(max(0.0, deadline - loop.time()))
        try:
            await loop.create_connection(lambda: self.far, self.forward.target_host, self.forward.target_port)
        except OSError as exc:
            log.warning("wan: %s: cannot connect to the target: %s", self.forward, exc)
            self.far.lost = True
            self.far.incoming.drop()
            self.far.outgoing.push_close()  # the client learns one-way delay later, like a RST
            self.maybe_finish()

    def maybe_finish(self) -> None:
        # Both directions half-closed and delivered: nothing more can flow, close both sockets.
        if self.near.incoming.eof_delivered and self.far.incoming.eof_delivered:
            for endpoint in (self.near, self.far):
                if endpoint.transport is not None:
                    endpoint.transport.close()
        if self.near.lost and self.far.lost:
            self.wan._connections.discard(self)

    def abort(self) -> None:
        """Cut the connection now: queued data is lost, both sockets are reset/closed."""
        self.near.incoming.drop()
        self.far.incoming.drop()
        if self.connect_task is not None and not self.connect_task.done():
            self.connect_task.cancel()
            self.far.lost = True
        self.near.abort()
        self.far.abort()


class WanEmulator:
    """Forwards TCP ports through an emulated WAN link; see the module docstring.

    Three ways to run it:
      * `await start()` / `await stop()` inside a running event loop;
      * `with wan.running(): ...` runs its own loop in a background thread (for experiments);
      * `main()` / `python -m splitinfer wan` runs it until Ctrl-C.
    `set_link()` and `cut()` may be called from any thread.
    """

    def __init__(self, link: Link, forwards: Sequence[Forward]) -> None:
        if not forwards:
            raise ValueError("WanEmulator needs at least one Forward")
        self.forwards = list(forwards)
        self._link = link
        self._rng = random.Random(link.seed)
        self._link_free_at = [0.0, 0.0]  # per direction: when the link finishes sending what it has
        self._wake = _WakeLead()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[_Connection] = set()

    # -- what the link does --------------------------------------------------------------

    @property
    def link(self) -> Link:
        return self._link

    def set_link(self, link: Link) -> None:
        """Change the link for every chunk read from now on; queued chunks keep their times."""
        def apply() -> None:
            self._link = link
            self._rng = random.Random(link.seed)
        self._call_in_loop(apply)

    def _arrival_time(self, direction: int, nbytes: int, now: float) -> float:
        """When a chunk read `now` reaches the other side (before the no-reordering max)."""
        link = self._link
        sent_at = now
        if link.mbit is not None:
            # Serialised after whatever the link is still sending in this direction.
            sent_at = max(now, self._link_free_at[direction]) + link.serialisation_s(nbytes)
            self._link_free_at[direction] = sent_at
        jitter_s = self._rng.uniform(0.0, link.jitter_ms) / 1000.0 if link.jitter_ms else 0.0
        return sent_at + link.one_way_s + jitter_s

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on every forward's port (in the running loop)."""
        if self._servers:
            raise RuntimeError("WanEmulator already started")
        self._loop = asyncio.get_running_loop()
        try:
            for forward in self.forwards:
                self._servers.append(await self._loop.create_server(
                    lambda f=forward: _Connection(self, f).near,
                    forward.listen_host, forward.listen_port, reuse_address=True))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop listening, cut live connections and wait until they are gone."""
        for server in self._servers:
            server.close()
        tasks = [c.connect_task for c in self._connections if c.connect_task is not None]
        self._cut_now()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        # connection_lost callbacks run on the next loop iterations; let them.
        for _ in range(100):
            if not self._connections:
                break
            await asyncio.sleep(0.001)
        self._connections.clear()

    def cut(self) -> None:
        """Abort every live proxied connection, both ends, like a link failure. Keeps listening."""
        self._call_in_loop(self._cut_now)

    def _cut_now(self) -> None:
        for conn in list(self._connections):
            conn.abort()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) actually listened on, one per forward (useful with listen_port 0)."""
        return [server.sockets[0].getsockname()[:2] for server in self._servers]

    @property
    def connection_count(self) -> int:
        """Live proxied connections (a closed one disappears once both its sockets are closed)."""
        return self._call_in_loop(lambda: len(self._connections))

    @contextlib.contextmanager
    def running(self) -> Iterator[WanEmulator]:
        """Run the emulator on its own event loop in a daemon thread for the `with` block.

        The thread shares the GIL with the caller: if the caller keeps a CPU busy in Python,
        deliveries can be late by a GIL switch interval (5 ms). For timing-critical runs next
        to busy Python code, run the emulator as its own process (the CLI) instead.
        """
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="wan-emulator", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(CALL_TIMEOUT_S)
            try:
                yield self
            finally:
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(CALL_TIMEOUT_S)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(CALL_TIMEOUT_S)
            loop.close()
            self._loop = None

    def _call_in_loop(self, fn: Callable[[], T]) -> T:
        """Run fn on the emulator's loop (directly when already on it, or before start)."""
        loop = self._loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            return fn()

        async def call() -> T:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), loop).result(CALL_TIMEOUT_S)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _set_nodelay(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- command line ----------------------------------------------------------------------------

DESCRIPTION = """\
Forward local TCP ports to targets through an emulated WAN link, like `ssh -L` port
forwarding with added latency: each chunk is delivered rtt/2 later in each direction,
in order, optionally with jitter and a bandwidth cap. Runs until Ctrl-C."""

EPILOG = """\
example: emulate an 80 ms path to a cloud server's HTTP and WebSocket ports
  python -m splitinfer wan --rtt-ms 80 -L 6000:127.0.0.1:5000 -L 6001:127.0.0.1:5001
then point the client at 127.0.0.1:6000 / :6001 instead of :5000 / :5001."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rtt-ms", type=float, default=0.0, metavar="MS",
                        help="round-trip time to add; each direction gets half (default: 0)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, metavar="MS",
                        help="extra per-chunk delay, uniform in [0, MS] per direction; never reorders (default: 0)")
    parser.add_argument("--mbit", type=float, default=None, metavar="MBIT",
                        help="bandwidth cap per direction in megabits/s, shared by all connections "
                             "(default: unlimited)")
    parser.add_argument("--seed", type=int, default=None, help="seed for the jitter draws (default: random)")
    parser.add_argument("-L", dest="forwards", metavar="SPEC", action="append", required=True,
                        type=_forward_arg,
                        help="forward [LISTEN_HOST:]LISTEN_PORT:HOST:PORT, as in ssh -L; "
                             "repeat for several ports (listen host defaults to 127.0.0.1)")


def add_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `wan` subcommand; its `func` default runs it (returns an exit code)."""
    parser = subparsers.add_parser("wan", help="forward ports through an emulated WAN link (added RTT)",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitinfer.wan", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


def run_cli(args: argparse.Namespace) -> int:
    """Run the emulator described by parsed arguments until Ctrl-C or SIGTERM."""
    try:
        link = Link(args.rtt_ms, args.jitter_ms, args.mbit, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return asyncio.run(_serve_until_signal(WanEmulator(link, args.forwards)))


async def _serve_until_signal(wan: WanEmulator) -> int:
    try:
        await wan.start()
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 1
    for forward, (host, port) in zip(wan.forwards, wan.addresses):
        print(f"wan: {host}:{port} -> {forward.target_host}:{forward.target_port} ({wan.link.describe()})",
              flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread / Windows
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await wan.stop()
    return 0


def _forward_arg(spec: str) -> Forward:
    try:
        return Forward.parse(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


if __name__ == "__main__":
    raise SystemExit(main())
