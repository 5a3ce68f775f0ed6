"""What a stranger's connections may cost the cloud server before it knows who they are.

Every TCP connection costs a file descriptor, and a process that runs out of
them can no longer accept anyone: authenticated WebSocket handshakes (and every
reconnect after a restart) fail with EMFILE.  So the descriptors are budgeted
at start-up (`plan_descriptors`): a reserve for the process itself and for every
authenticated WebSocket connection it allows, and what is left is shared between
the HTTP port's connection cap and the WebSocket port's cap on connections still
in their handshake (`PendingHandshakes`).  Neither cap can eat into the reserve.

A connection is "pending" from the moment it is accepted until its handshake
succeeds or it closes; a handshake that does not complete is closed by
websockets' `open_timeout`.  At the pending cap the *oldest* pending connection
is closed to make room for the new one, so idle connections cannot lock out
an honest client, whose handshake completes within a round trip.
"""

from __future__ import annotations

import asyncio
import resource
from dataclasses import dataclass
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection
from websockets.protocol import OPEN

# Descriptors the process needs besides its connections: stdio, the log, both listening sockets, the
# event loop's and waitress's wake-up pipes, epoll, files opened while loading, /proc reads.  Measured
# at about 10 once serving; the rest is headroom.
FD_BASE = 64
# asyncio accepts up to `backlog` connections per wake-up of the listening socket before any of them
# reaches connection_made, where PendingHandshakes counts it; serve_ws passes this as the backlog.
WS_ACCEPT_BURST = 100
HTTP_CONNECTIONS = 128  # /health needs few, and at the cap the longest-idle one makes room (webserver.py)
PENDING_HANDSHAKES = 256  # an honest handshake is pending for one round trip
MIN_CAP = 8  # neither cap goes below this: fewer authenticated connections are allowed instead
HANDSHAKE_TIMEOUT_S = 10  # websockets' open_timeout: a connection must finish its handshake within this


@dataclass(frozen=True)
class Descriptors:
    """How the open-file limit is shared out (see the module doc)."""

    limit: int  # the soft RLIMIT_NOFILE, after raising it to the hard limit
    max_connections: int  # authenticated WebSocket connections (HTTP 503 beyond)
    http_connections: int  # HTTP connections held at once
    pending_handshakes: int  # WebSocket connections not yet through their handshake

    @property
    def reserve(self) -> int:
        """Descriptors kept for the process and its authenticated connections: never used by strangers."""
        return FD_BASE + WS_ACCEPT_BURST + self.max_connections

    def describe(self) -> str:
        return (
            f"open-file limit {self.limit}: {self.reserve} reserved ({FD_BASE} for the process, {WS_ACCEPT_BURST} "
            f"for an accept burst, {self.max_connections} for authenticated WebSocket connections); "
            f"at most {self.http_connections} HTTP connections and {self.pending_handshakes} pending WebSocket "
            f"handshakes (closed after {HANDSHAKE_TIMEOUT_S} s)"
        )


def open_file_limit() -> int:
    """The soft RLIMIT_NOFILE as a number (unlimited counts as 2**20, the usual kernel ceiling)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def plan_descriptors(limit: int, max_connections: int) -> Descriptors:
    """Share `limit` descriptors: reserve + HTTP cap + pending cap <= limit, whatever strangers do.

    reserve = FD_BASE + WS_ACCEPT_BURST + max_connections; of the rest, the HTTP cap takes half (at
    most HTTP_CONNECTIONS) and the pending cap what remains (at most PENDING_HANDSHAKES).  When the
    limit cannot give both caps MIN_CAP, max_connections is lowered to fit; below that, ValueError.
    """
    spare = limit - FD_BASE - WS_ACCEPT_BURST - max_connections
    if spare < 2 * MIN_CAP:
        max_connections = limit - FD_BASE - WS_ACCEPT_BURST - 2 * MIN_CAP
        if max_connections < 1:
            raise ValueError(
                f"an open-file limit of {limit} is too low to serve (needs {FD_BASE + WS_ACCEPT_BURST + 2 * MIN_CAP + 1}"
                " or more; raise it with `ulimit -n`)"
            )
        spare = 2 * MIN_CAP
    http = min(HTTP_CONNECTIONS, spare // 2)
    return Descriptors(limit, max_connections, http, min(PENDING_HANDSHAKES, spare - http))


class PendingHandshakes:
    """WebSocket-port connections accepted but not through their handshake, oldest first, at most `cap`.

    Only the event loop touches it (connection callbacks), so it needs no lock.
    """

    def __init__(self, cap: int, on_evict: Callable[[], None]):
        if cap < 1:
            raise ValueError("the pending-handshake cap must be at least 1")
        self.cap, self.on_evict = cap, on_evict
        self._conns: dict[ServerConnection, None] = {}  # a dict keeps insertion order: the first is the oldest

    def __len__(self) -> int:
        return len(self._conns)

    def add(self, conn: ServerConnection) -> None:
        """Count a new connection; beyond the cap, close the oldest (never the new one: it is the likeliest honest)."""
        self._conns[conn] = None
        while len(self._conns) > self.cap:
            oldest = next(iter(self._conns))
            del self._conns[oldest]
            oldest.transport.abort()  # its handshake task sees the connection lost and ends quietly
            self.on_evict()

    def discard(self, conn: ServerConnection) -> None:
        self._conns.pop(conn, None)


def counted_connection(pending: PendingHandshakes) -> type[ServerConnection]:
    """A ServerConnection class (serve's `create_connection`) whose connections are counted in `pending`."""

    class CountedConnection(ServerConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            pending.add(self)

        def connection_lost(self, exc: Exception | None) -> None:
            pending.discard(self)
            super().connection_lost(exc)

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            try:
                await super().handshake(*args, **kwargs)
            finally:
                # Through: now counted by the server's authenticated-connection cap instead.  A refused
                # connection stays pending until websockets closes it, a moment later.
                if self.protocol.state is OPEN:
                    pending.discard(self)

    return CountedConnection


async def close_if_failed(connection: ServerConnection) -> bool:
    """Close a connection whose parser failed during its handshake; True if it did.

    A peer that sends bytes that are not WebSocket frames right behind its handshake request (before the
    answer) makes websockets fail the connection and send EOF while the handshake is still open; sending
    the answer afterwards trips `assert not self.eof_sent` inside websockets and logs a traceback.  So
    such a connection gets no answer: it is aborted here, and waiting for the loss moves the protocol to
    CLOSED, which makes websockets skip the answer.
    """
    if not connection.protocol.eof_sent:
        return False
    connection.transport.abort()
    await asyncio.shield(connection.connection_lost_waiter)
    return True
