"""The asyncio side of the emulator: listening sockets, proxied connections, timed deliveries.

Each proxied connection has two endpoints (the accepted client socket, "near", and the
socket to the target, "far") and two pipes, one per direction. A pipe asks the link
model (link.py) when each chunk it reads arrives, queues it, and writes it into the
destination socket at that time. EOF (half-close) and close travel through the same
queue, so they arrive after the data sent before them.

An optional observer sees every chunk as it is written into its destination socket:
`observer(connection_id, direction, data)`, on the emulator's event loop, with
`direction` UP (client -> target) or DOWN. The privacy wire tap is such an observer.

Timing accuracy: an event loop wakes from a timed sleep late (epoll rounds timeouts up to
whole milliseconds). The emulator learns that lateness, wakes that much early and busy-waits
the rest, so chunks are delivered within tens of microseconds of their time; the price is
up to ~1.5 ms of spinning per delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
from collections import deque
from typing import Callable, Iterator, Sequence, TypeVar

from .forward import Forward
from .link import DOWN, UP, Link, LinkClock, in_order

T = TypeVar("T")
log = logging.getLogger(__name__)

# Called with (connection id, direction, bytes) for every chunk written to a destination socket.
Observer = Callable[[int, int, bytes], None]

# How long the threaded form waits for start/stop/cut to run on its loop.
CALL_TIMEOUT_S = 10.0

_DATA, _EOF, _CLOSE = "data", "eof", "close"


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
        step = self.wan.link.slice_size(len(data))
        for i in range(0, len(data), step):
            self._enqueue(now, _DATA, data[i:i + step])
        if self.queued_bytes > self.wan.link.water_marks()[0]:
            self.src.pause("queue")

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
        at = in_order(self.last_at, self.wan._clock.arrival_time(self.direction, len(payload), now))
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
        lead = self.wan._wake.lead
        while self.queue and self.dst.transport is not None:
            at = self.queue[0][0]
            wait = at - self.loop.time()
            if wait <= 0:
                self._deliver(*self.queue.popleft())
            elif wait > lead:
                # Sleep, but wake early by the loop's usual lateness ...
                self.timer = self.loop.call_at(at - lead, self._woken, at - lead)
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
                self.wan._observe(self.src.conn.id, self.direction, payload)
            if self.queued_bytes <= self.wan.link.water_marks()[1]:
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

    def __init__(self, wan: WanEmulator, forward: Forward, conn_id: int) -> None:
        self.wan, self.forward, self.id = wan, forward, conn_id
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
    """Forwards TCP ports through an emulated WAN link; see the package docstring.

    Three ways to run it:
      * `await start()` / `await stop()` inside a running event loop;
      * `with wan.running(): ...` runs its own loop in a background thread (for experiments);
      * `python -m splitinfer wan` runs it until Ctrl-C.
    `set_link()` and `cut()` may be called from any thread. `observer`, if given, is called
    on the emulator's loop with (connection id, direction, bytes) for every forwarded chunk,
    as it is written to the destination socket; ids count up from 0 in accept order.
    """

    def __init__(self, link: Link, forwards: Sequence[Forward], observer: Observer | None = None) -> None:
        if not forwards:
            raise ValueError("WanEmulator needs at least one Forward")
        self.forwards = list(forwards)
        self._clock = LinkClock(link)
        self._observer = observer
        self._ids = itertools.count()
        self._wake = _WakeLead()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[_Connection] = set()

    # -- what the link does --------------------------------------------------------------

    @property
    def link(self) -> Link:
        return self._clock.link

    def set_link(self, link: Link) -> None:
        """Change the link for every chunk read from now on; queued chunks keep their times."""
        self._call_in_loop(lambda: self._clock.set_link(link))

    def _observe(self, conn_id: int, direction: int, data: bytes) -> None:
        if self._observer is not None:
            self._observer(conn_id, direction, data)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on every forward's port (in the running loop)."""
        if self._servers:
            raise RuntimeError("WanEmulator already started")
        self._loop = asyncio.get_running_loop()
        try:
            for forward in self.forwards:
                self._servers.append(await self._loop.create_server(
                    lambda f=forward: _Connection(self, f, next(self._ids)).near,
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
