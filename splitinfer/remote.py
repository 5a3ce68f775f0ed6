"""The local side's view of the cloud: one persistent WebSocket, one session, frames in and out.

A `RemoteSpan` behaves like the cloud's layers called in-process: `forward`
takes hidden states and returns hidden states.  Cache edits (`crop`, keep a
path) are queued and ride in the header of the next `forward`, so a decoding
step is exactly one request and one reply.  Nothing here knows about tokens.
"""

from __future__ import annotations

import logging
import random
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from . import protocol
from .config import RECONNECT_TIMEOUT_S
from .identity import Identity
from .protocol import ProtocolError

log = logging.getLogger(__name__)


class CloudError(RuntimeError):
    """The cloud refused a request or could not be reached; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"cloud: {code}: {message}")
        self.code, self.message = code, message


def ws_url(cloud: str, ws: str | None = None) -> str:
    """The WebSocket address: --cloud-ws as given, else --cloud's host with port + 1 (the spec's tunnel)."""
    if ws:
        return ws
    parts = urlsplit(cloud if "://" in cloud else f"http://{cloud}")
    if parts.hostname is None:
        raise ValueError(f"cannot read a host from --cloud {cloud!r}")
    port = (parts.port or (443 if parts.scheme == "https" else 80)) + 1
    scheme = "wss" if parts.scheme == "https" else "ws"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return urlunsplit((scheme, f"{host}:{port}", "", "", ""))


@dataclass
class WireTiming:
    """One round trip as the local side saw it."""

    serialize_ms: float  # encoding the request + decoding the reply
    wait_ms: float  # from the send to the reply, cloud compute included
    cloud_ms: float  # the cloud's own compute, from the reply header
    bytes_sent: int
    bytes_received: int

    @property
    def network_ms(self) -> float:
        return max(0.0, self.wait_ms - self.cloud_ms)


def to_wire(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float16).numpy()


# Errors that mean the session or its connection is gone (not that the request was wrong): a
# RemoteSpan answers them by reconnecting, opening a new session and replaying its cache.  Never
# "mismatch" nor "version": a cloud that computes something else must not get a replay.
SESSION_LOST = frozenset({"disconnected", "unknown_session", "timeout", "unreachable"})
# While reconnecting, a full server is worth another try too: it may free a slot (an old
# session of ours that it has not yet noticed is dead, say).
_RETRY_WHILE_RECONNECTING = SESSION_LOST | {"busy"}

_CLOSE_REPLY_S = 5.0  # closing is a courtesy (the server drops a closed connection's sessions anyway)
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.1, 4.0

# WebSocket close codes the server uses on purpose (RFC 6455): not a lost link, so not retried.
_CLOSE_CODES = {1009: "too_large", 1008: "policy", 1007: "bad_frame", 1002: "bad_frame"}

# A reply is never larger than its request; this caps what a hostile or broken server can make us buffer.
MAX_REPLY_BYTES = 256 << 20


class CloudConnection:
    """One persistent connection; sessions are opened on it."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        open_timeout: float = 10.0,
        reply_timeout: float = 60.0,
        close_timeout: float = 2.0,
    ):
        self.url, self.reply_timeout = url, reply_timeout
        self.open_timeout, self.close_timeout = open_timeout, close_timeout
        self._token = token  # kept for reconnecting; never logged
        self.max_frame_bytes: int | None = None  # the server's limit, once a session tells us
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._stack = ExitStack()  # websockets wants its connections used as context managers
        try:
            self.ws: ClientConnection = self._stack.enter_context(connect(
                url,
                additional_headers=headers,
                open_timeout=open_timeout,
                close_timeout=close_timeout,  # a dead peer must not hold up a reconnect
                max_size=MAX_REPLY_BYTES,
                compression=None,
                proxy=None,  # the tunnel is the route; never a proxy from the environment
            ))
        except InvalidStatus as exc:
            code = exc.response.status_code
            if code == 401:
                raise CloudError("auth", f"{url} refused the handshake (HTTP 401): missing or wrong token") from None
            if code == 503:
                raise CloudError("busy", f"{url} is at its connection limit (HTTP 503)") from None
            raise CloudError("handshake", f"{url} answered HTTP {code}") from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise CloudError("unreachable", f"cannot connect to {url}: {exc}") from None

    def reconnect(self, open_timeout: float | None = None) -> "CloudConnection":
        """A new connection to the same server with the same token and timeouts."""
        return CloudConnection(
            self.url,
            self._token,
            open_timeout=self.open_timeout if open_timeout is None else open_timeout,
            reply_timeout=self.reply_timeout,
            close_timeout=self.close_timeout,
        )

    def request(
        self, header: dict[str, Any], tensors: dict[str, np.ndarray] | None = None, *, timeout: float | None = None
    ) -> tuple[protocol.Frame, WireTiming]:
        timeout = self.reply_timeout if timeout is None else timeout
        t0 = time.perf_counter()
        data = protocol.encode(header, tensors)
        if self.max_frame_bytes is not None and len(data) > self.max_frame_bytes:
            # The server would close the connection on it (WebSocket 1009); say why instead.
            raise CloudError("too_large", f"a {len(data)}-byte frame exceeds the server's {self.max_frame_bytes}")
        t1 = time.perf_counter()
        try:
            self.ws.send(data)
            raw = self.ws.recv(timeout=timeout)
        except TimeoutError:
            raise CloudError("timeout", f"no reply from {self.url} within {timeout:g} s") from None
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            if code in _CLOSE_CODES:
                raise CloudError(_CLOSE_CODES[code], f"{self.url} closed the connection: {exc}") from None
            if exc.sent is not None and exc.sent.code == 1009:
                raise CloudError("bad_reply", f"{self.url} sent a reply over {MAX_REPLY_BYTES} bytes") from None
            raise CloudError("disconnected", f"connection to {self.url} lost: {exc}") from None
        except OSError as exc:
            raise CloudError("disconnected", f"connection to {self.url} lost: {exc}") from None
        t2 = time.perf_counter()
        try:
            frame = protocol.decode(raw, max_frame_bytes=1 << 40, replies=True)
        except ProtocolError as exc:
            if exc.code == "version":  # an older or newer cloud: say so, not "bad reply"
                raise CloudError("version", f"{self.url}: {exc.message}") from None
            raise CloudError("bad_reply", exc.message) from None
        t3 = time.perf_counter()
        if frame.op == "error":
            raise CloudError(str(frame.header.get("code", "error")), str(frame.header.get("message", "")))
        if frame.step != header.get("step", 0) or (header.get("session") and frame.session != header["session"]):
            raise CloudError("bad_reply", f"a reply for step {frame.step!r} of another session or step")
        timing = WireTiming(
            serialize_ms=((t1 - t0) + (t3 - t2)) * 1000.0,
            wait_ms=(t2 - t1) * 1000.0,
            cloud_ms=float(frame.header.get("cloud_ms", 0.0)),
            bytes_sent=len(data),
            bytes_received=len(raw),
        )
        return frame, timing

    def open_raw(self, *, expected: Identity | None) -> tuple[str, dict[str, Any]]:
        """Open a session; returns its id and the server's limits.

        `expected` is what the cloud must compute (LocalSide.identity): any difference in what
        `opened` states raises CloudError "mismatch" before a single activation is sent.  Only a
        test or tool speaking raw protocol, with no model of its own, passes None.
        """
        frame, _ = self.request({"op": "open", "session": None, "step": 0})
        if expected is not None:
            check_identity(self.url, frame.header.get("identity"), expected)
        limits = frame.header.get("limits") or {}
        if isinstance(limits.get("max_frame_bytes"), int):
            self.max_frame_bytes = limits["max_frame_bytes"]
        return frame.session, limits

    def open_session(
        self, *, expected: Identity | None, reconnect_timeout: float | None = RECONNECT_TIMEOUT_S
    ) -> "RemoteSpan":
        session, limits = self.open_raw(expected=expected)
        return RemoteSpan(self, session, limits, expected=expected, reconnect_timeout=reconnect_timeout)

    def close(self) -> None:
        self._stack.close()


def check_identity(url: str, stated: Any, expected: Identity) -> None:
    """Refuse a cloud whose stated identity differs from `expected`: CloudError "mismatch" names each difference."""
    if stated is None:
        raise CloudError("mismatch", f"{url} does not state which layers and weights it holds")
    try:
        found = Identity.from_json(stated)
    except ValueError as exc:
        raise CloudError("bad_reply", f"{url} stated a malformed identity: {exc}") from None
    differences = found.differences(expected)
    if differences:
        raise CloudError("mismatch", f"{url} computes something else: {'; '.join(differences)}")


class _Record:
    """The float16 rows (hidden, cos, sin) behind every entry of the cloud's cache, in cache order.

    It is edited exactly like the cloud's cache, so after an edit it holds what the cloud holds
    once that edit is applied: replaying it as a plain chain into a new session rebuilds the cache.
    """

    def __init__(self) -> None:
        self.length = 0
        self._rows: dict[str, np.ndarray] = {}

    def append(self, tensors: dict[str, np.ndarray]) -> None:
        q = tensors["hidden"].shape[1]
        if not self._rows:
            self._rows = {k: np.empty((64, tensors[k].shape[2]), np.float16) for k in ("hidden", "cos", "sin")}
        need = self.length + q
        capacity = len(self._rows["hidden"])
        if need > capacity:
            capacity = max(need, 2 * capacity)  # amortised growth: no copy of the whole record per step
            for k, old in self._rows.items():
                grown = np.empty((capacity, old.shape[1]), np.float16)
                grown[: self.length] = old[: self.length]
                self._rows[k] = grown
        for k, rows in self._rows.items():
            rows[self.length : need] = tensors[k][0]
        self.length = need

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a record of {self.length} rows to {length}")
        self.length = length

    def keep(self, start: int, indices: list[int]) -> None:
        if not 0 <= start <= self.length or any(not start <= i < self.length for i in indices):
            raise ValueError(f"relocate {start}, {indices} outside a record of {self.length} rows")
        for rows in self._rows.values():
            rows[start : start + len(indices)] = rows[indices]  # fancy indexing copies before writing
        self.length = start + len(indices)

    def chunk(self, begin: int, end: int) -> dict[str, np.ndarray]:
        return {k: rows[None, begin:end] for k, rows in self._rows.items()}

    @property
    def nbytes(self) -> int:
        return sum(rows[: self.length].nbytes for rows in self._rows.values())


class RemoteSpan:
    """The cloud's layers for one session, surviving the loss of that session.

    Besides forwarding, it records the float16 rows it sent for every entry of the
    cloud's cache (about 1.4 KB per token for the default model) and applies the same
    crop/keep edits to that record.  When the session or its connection is lost
    (SESSION_LOST codes: the server restarted, the session expired, the link dropped),
    it reconnects with exponential backoff, opens a new session, replays the record
    as chain forwards and re-sends the request, so the caller sees nothing but a
    slower step.  The committed context is always a plain chain with consecutive
    positions (accepted tree paths were relocated, and a path node's depth is its
    final offset, so its rotary rows are already the right ones): a chain mask
    rebuilds exactly the cache that the original steps built.  If the cloud stays
    unreachable for `reconnect_timeout` seconds the request fails with CloudError
    code "unreachable"; None (or 0) turns recovery off.  A new session whose cloud
    states another identity than `expected` (restarted with other layers or weights)
    fails with "mismatch" instead: nothing is replayed into it.
    """

    def __init__(
        self,
        conn: CloudConnection,
        session: str,
        limits: dict[str, int],
        *,
        expected: Identity | None,
        reconnect_timeout: float | None = RECONNECT_TIMEOUT_S,
    ):
        self.conn, self.session, self.limits = conn, session, limits
        self.expected = expected  # checked again on every session a reconnect opens
        self.max_step_tokens = int(limits.get("max_step_tokens", 512))
        self.reconnect_timeout = reconnect_timeout
        self._step = 0
        self._edits: list[dict[str, Any]] = []
        self._record = _Record()
        self._owns_conn = False  # a connection this span opened itself when it reconnected
        self.last: WireTiming | None = None
        self.recoveries = 0  # sessions rebuilt so far
        self.replayed_tokens = 0  # cache entries re-sent while rebuilding

    @property
    def cache_length(self) -> int:
        """Entries the cloud's cache holds once the queued edits are applied."""
        return self._record.length

    def crop(self, length: int) -> None:
        self._record.crop(length)
        self._edits.append({"op": "crop", "length": length})

    def keep(self, start: int, indices: list[int]) -> None:
        indices = list(indices)
        self._record.keep(start, indices)
        self._edits.append({"op": "relocate", "start": start, "indices": indices})

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block: torch.Tensor | None) -> torch.Tensor:
        """hidden [1, q, H], cos/sin [1, q, D], block [q, q] bool or None (plain chain) -> hidden [1, q, H]."""
        t0 = time.perf_counter()
        tensors = {"hidden": to_wire(hidden), "cos": to_wire(cos), "sin": to_wire(sin)}
        if block is not None:
            tensors["mask"] = block.cpu().numpy()
        pre_ms = (time.perf_counter() - t0) * 1000.0
        header = {"op": "forward", "session": self.session, "step": self._next_step()}
        if self._edits:
            header["edits"] = self._edits
        try:
            frame, timing = self.conn.request(header, tensors)
        except CloudError as exc:
            if exc.code not in SESSION_LOST or not self.reconnect_timeout:
                raise
            frame, timing = self._recover(exc, tensors)
        reply = frame.tensors.get("hidden")
        if reply is None or reply.shape != tensors["hidden"].shape:
            raise CloudError("bad_reply", f"expected hidden {list(tensors['hidden'].shape)} in the reply")
        self._edits = []  # applied by the cloud before it ran this forward (or replayed into a new session)
        self._record.append(tensors)
        t1 = time.perf_counter()
        out = torch.from_numpy(reply.copy()).to(hidden.device, hidden.dtype)
        timing.serialize_ms += pre_ms + (time.perf_counter() - t1) * 1000.0
        self.last = timing
        return out

    def _next_step(self) -> int:
        self._step += 1
        return self._step

    # -- recovery ----------------------------------------------------------------------

    def _recover(self, lost: CloudError, tensors: dict[str, np.ndarray]) -> tuple[protocol.Frame, WireTiming]:
        """Reconnect, rebuild the cache in a new session and re-send `tensors`; bounded by reconnect_timeout."""
        assert self.reconnect_timeout
        t_start = time.monotonic()
        deadline = t_start + self.reconnect_timeout
        log.warning("cloud session lost (%s); reconnecting to %s", lost, self.conn.url)
        delay, attempts, last = _BACKOFF_FIRST_S, 0, lost
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CloudError(
                    "unreachable",
                    f"gave up on {self.conn.url} after {self.reconnect_timeout:g} s and {attempts} reconnect "
                    f"attempt(s); last error: {last}",
                )
            attempts += 1
            try:
                self._rebuild(open_timeout=min(self.conn.open_timeout, remaining))
                header = {"op": "forward", "session": self.session, "step": self._next_step()}
                frame, timing = self.conn.request(header, tensors)
            except CloudError as exc:
                if exc.code not in _RETRY_WHILE_RECONNECTING:
                    raise
                last = exc
                log.info("reconnect attempt %d failed: %s", attempts, exc)
                time.sleep(max(0.0, min(delay * random.uniform(0.8, 1.2), deadline - time.monotonic())))
                delay = min(2 * delay, _BACKOFF_MAX_S)
                continue
            self.recoveries += 1
            log.warning(
                "cloud session rebuilt after %d attempt(s) in %.2f s: %d cache entries replayed",
                attempts, time.monotonic() - t_start, self._record.length,
            )
            return frame, timing

    def _rebuild(self, open_timeout: float) -> None:
        """New connection, new session, the record replayed into it as chain forwards."""
        old = self.conn
        old_limit = old.max_frame_bytes
        self._drop_connection()
        conn = old.reconnect(open_timeout)
        self.conn, self._owns_conn = conn, True
        try:
            self.session, self.limits = conn.open_raw(expected=self.expected)
        except CloudError as exc:
            if exc.code == "limit":  # full, perhaps still holding our lost session: worth another try
                raise CloudError("busy", f"no session slot free ({exc.message})") from None
            if exc.code == "mismatch":  # the cloud came back as something else: a replay would diverge silently
                raise CloudError("mismatch", f"after reconnecting, {exc.message}") from None
            raise
        if conn.max_frame_bytes is None:
            conn.max_frame_bytes = old_limit
        chunk = min(self.max_step_tokens, int(self.limits.get("max_step_tokens", self.max_step_tokens)))
        for begin in range(0, self._record.length, chunk):
            end = min(begin + chunk, self._record.length)
            header = {"op": "forward", "session": self.session, "step": self._next_step()}
            conn.request(header, self._record.chunk(begin, end))  # no mask: the committed context is a chain
            self.replayed_tokens += end - begin

    def _drop_connection(self) -> None:
        try:
            self.conn.close()
        except Exception as exc:  # a broken connection may fail to close; it is being replaced anyway
            log.debug("closing a lost connection: %s", exc)

    def close(self) -> None:
        try:
            header = {"op": "close", "session": self.session, "step": self._next_step()}
            self.conn.request(header, timeout=min(self.conn.reply_timeout, _CLOSE_REPLY_S))
        except CloudError as exc:
            log.debug("closing session: %s", exc)
        if self._owns_conn:
            self._drop_connection()


@contextmanager
def cloud_session(
    url: str,
    token: str | None = None,
    *,
    expected: Identity | None,
    reconnect_timeout: float | None = RECONNECT_TIMEOUT_S,
) -> Iterator[RemoteSpan]:
    """A connection and one session on it, both closed on exit (Petals' `inference_session` shape).

    The session survives a lost connection or session (see RemoteSpan); the first
    connection, though, must succeed, so a wrong address or token fails at once.
    `expected` (LocalSide.identity) is checked on the first session and on every
    session a reconnect opens (see CloudConnection.open_raw).
    """
    conn = CloudConnection(url, token)
    try:
        span = conn.open_session(expected=expected, reconnect_timeout=reconnect_timeout)
        try:
            yield span
        finally:
            span.close()
    finally:
        conn.close()
