"""A cloud session that survives the loss of its session or connection: record, reconnect, replay.

`RemoteSpan` behaves like the cloud's layers called in-process: `forward` takes
hidden states and returns hidden states (and the round trip's timing).  Cache
edits (`crop`, `relocate` a path) are queued and ride in the header of the next
`forward`, so a decoding step is exactly one request and one reply.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from .. import protocol
from ..config import RECONNECT_TIMEOUT_S
from ..identity import Identity
from .transport import CloudConnection, CloudError, WireTiming, to_wire

log = logging.getLogger(__name__)

# Errors that mean the session or its connection is gone (not that the request was wrong): a
# RemoteSpan answers them by reconnecting, opening a new session and replaying its cache.  Never
# "mismatch" nor "version": a cloud that computes something else must not get a replay.
SESSION_LOST = frozenset({"disconnected", "unknown_session", "timeout", "unreachable"})
# While reconnecting, a full server is worth another try too: it may free a slot (an old
# session of ours that it has not yet noticed is dead, say).
RETRY_WHILE_RECONNECTING = SESSION_LOST | {"busy"}

_CLOSE_REPLY_S = 5.0  # closing is a courtesy (the server drops a closed connection's sessions anyway)
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.1, 4.0


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

    def relocate(self, start: int, indices: list[int]) -> None:
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
    crop/relocate edits to that record.  When the session or its connection is lost
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
        self.recoveries = 0  # sessions rebuilt so far
        self.replayed_tokens = 0  # cache entries re-sent while rebuilding

    def crop(self, length: int) -> None:
        self._record.crop(length)
        self._edits.append({"op": "crop", "length": length})

    def relocate(self, start: int, indices: list[int]) -> None:
        indices = list(indices)
        self._record.relocate(start, indices)
        self._edits.append({"op": "relocate", "start": start, "indices": indices})

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block: torch.Tensor | None
    ) -> tuple[torch.Tensor, WireTiming]:
        """hidden [1, q, H], cos/sin [1, q, D], block [q, q] bool or None (plain chain) -> (hidden [1, q, H], timing)."""
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
        return out, timing

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
                if exc.code not in RETRY_WHILE_RECONNECTING:
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


def open_when_free(conn, expected: Identity | None, timeout: float | None) -> tuple[str, dict[str, Any]]:
    """`conn.open_raw`, asked again while the cloud answers `busy`, until `timeout` seconds have passed."""
    deadline = time.monotonic() + (timeout or 0.0)
    delay = _BACKOFF_FIRST_S
    while True:
        try:
            return conn.open_raw(expected=expected)
        except CloudError as exc:
            wait = max(delay, exc.retry_after or 0.0) * random.uniform(0.8, 1.2)
            if exc.code != "busy" or time.monotonic() + wait > deadline:
                raise
            log.info("the cloud is full (%s); asking again in %.1f s", exc.message, wait)
            time.sleep(wait)
            delay = min(2 * delay, _BACKOFF_MAX_S)


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
    A cloud that answers `busy` (its cache memory is reserved) is asked again
    within `reconnect_timeout`.  `expected` (LocalSide.identity) is checked on the
    first session and on every session a reconnect opens (see CloudConnection.open_raw).
    """
    conn = CloudConnection(url, token)
    try:
        session, limits = open_when_free(conn, expected, reconnect_timeout)
        span = RemoteSpan(conn, session, limits, expected=expected, reconnect_timeout=reconnect_timeout)
        try:
            yield span
        finally:
            span.close()
    finally:
        conn.close()
