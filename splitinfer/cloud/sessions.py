"""Per-session state and the cloud's compute, independent of any socket.

`CloudCore.handle(conn_id, frame)` turns one decoded request into one reply
frame (bytes).  Sessions belong to the connection that opened them.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import hf, masks, protocol
from ..config import Limits
from ..identity import Identity
from ..parts import CloudSpan
from ..protocol import Frame, ProtocolError
from .memory import return_freed_memory

log = logging.getLogger(__name__)


@dataclass
class Session:
    id: str
    owner: int  # the connection that opened it; nobody else may touch it
    cache: hf.Cache = field(default_factory=hf.new_cache)
    last_step: int = -1
    last_used: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return hf.cache_length(self.cache)


class CloudCore:
    """The cloud's layers plus a table of sessions; one compute at a time (the GPU is one device)."""

    def __init__(
        self,
        span: CloudSpan,
        config,
        device: str,
        dtype: torch.dtype,
        limits: Limits,
        identity: Identity | None = None,
    ):
        self.span, self.device, self.dtype, self.limits = span, device, dtype, limits
        # What `opened` states this span is (build() always gives one); a local side refuses a cloud without it.
        self.identity = identity
        self.hidden_size = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.sessions: dict[str, Session] = {}
        self._lock = threading.Lock()  # guards the table and serialises compute

    # -- requests ------------------------------------------------------------------

    def handle(self, conn: int, frame: Frame) -> bytes:
        """One request -> one reply.  Errors become typed error replies; state stays consistent."""
        try:
            with self._lock:
                reply = self._dispatch(conn, frame)
            if frame.op == "close":
                return_freed_memory()  # outside the lock: other sessions' steps need not wait for it
            return reply
        except ProtocolError as exc:
            return protocol.error(exc.code, exc.message, frame.header.get("step"), frame.session)

    def _dispatch(self, conn: int, frame: Frame) -> bytes:
        if frame.op == "open":
            return self._open(conn, frame)
        session = self._session(conn, frame)
        step = frame.header.get("step")
        if step is None or step <= session.last_step:
            raise ProtocolError("bad_step", f"step {step!r} is not after the session's last step {session.last_step}")
        reply_header = {"session": session.id, "step": step}
        if frame.op == "close":
            del self.sessions[session.id]
            return protocol.encode({"op": "ok", **reply_header, "cache_len": 0})
        if frame.op == "forward":
            out, ms = self._forward(session, frame)
            session.last_step = step
            # Only work keeps a session alive: a peer sending no-op crops cannot hold its cache forever.
            session.last_used = time.monotonic()
            return protocol.encode(
                {"op": "result", **reply_header, "cloud_ms": round(ms, 3), "cache_len": session.length},
                {"hidden": out},
            )
        edit = {k: v for k, v in frame.header.items() if k in ("length", "start", "indices")}
        edits = protocol.check_edits([{"op": frame.op, **edit}])
        self._plan(session, edits, 0)
        self._apply(session, edits)
        session.last_step = step
        return protocol.encode({"op": "ok", **reply_header, "cache_len": session.length})

    def _open(self, conn: int, frame: Frame) -> bytes:
        if len(self.sessions) >= self.limits.max_sessions:
            raise ProtocolError("limit", f"the server holds its maximum of {self.limits.max_sessions} sessions")
        mine = sum(1 for s in self.sessions.values() if s.owner == conn)
        if mine >= self.limits.max_sessions_per_connection:
            raise ProtocolError(
                "limit", f"this connection holds its maximum of {self.limits.max_sessions_per_connection} sessions"
            )
        sid = secrets.token_hex(16)  # 128 random bits
        self.sessions[sid] = Session(sid, conn)
        log.info("session %s… opened (%d open)", sid[:8], len(self.sessions))
        lim = self.limits
        return protocol.encode(
            {
                "op": "opened",
                "session": sid,
                "step": frame.header.get("step"),
                "limits": {
                    "max_context": lim.max_context,
                    "max_step_tokens": lim.max_step_tokens,
                    "max_frame_bytes": lim.max_frame_bytes,
                    "idle_seconds": lim.idle_seconds,
                },
                "identity": self.identity.to_json() if self.identity is not None else None,
            }
        )

    def _session(self, conn: int, frame: Frame) -> Session:
        session = self.sessions.get(frame.session or "")
        # Another connection's session answers exactly like a missing one: ids are not probeable.
        if session is None or session.owner != conn:
            raise ProtocolError("unknown_session", "no such session on this connection")
        return session

    def _plan(self, session: Session, edits: list, new_tokens: int) -> int:
        """Check edits against the cache without touching it; returns the cache length they lead to."""
        length = session.length
        for edit in edits:
            if edit["op"] == "crop":
                if edit["length"] > length:
                    raise ProtocolError("bad_edit", f"crop to {edit['length']} beyond the cache's {length}")
                length = edit["length"]
            else:
                try:
                    hf.check_relocate(length, edit["start"], edit["indices"])
                except ValueError as exc:
                    raise ProtocolError("bad_edit", str(exc)) from None
                length = edit["start"] + len(edit["indices"])
        if length + new_tokens > self.limits.max_context:
            raise ProtocolError(
                "limit", f"context of {length + new_tokens} tokens exceeds the server's {self.limits.max_context}"
            )
        return length

    @staticmethod
    def _apply(session: Session, edits: list) -> None:
        for edit in edits:
            if edit["op"] == "crop":
                hf.crop(session.cache, edit["length"])
            else:
                hf.relocate(session.cache, edit["start"], edit["indices"])

    def _forward(self, session: Session, frame: Frame) -> tuple[np.ndarray, float]:
        q = protocol.check_forward(frame, self.hidden_size, self.head_dim, self.limits.max_step_tokens)
        edits = protocol.check_edits(frame.header.get("edits"))
        # Everything is checked before the cache changes, so a refused frame leaves the session as it was.
        past = self._plan(session, edits, q)
        t = frame.tensors
        mask = t.get("mask")
        if mask is None:
            full = masks.full_mask(past, masks.causal(q))
        elif mask.shape[1] == q:
            full = masks.full_mask(past, torch.from_numpy(mask.copy()))
        elif mask.shape[1] == past + q:
            full = torch.from_numpy(mask.copy())
        else:
            raise ProtocolError("bad_shape", f"mask covers {mask.shape[1]} keys; the cache has {past} + {q} new")
        # A frame that fails after this point (float16 overflow, an internal error) must leave the session as
        # it was, edits included: entries before `touched` are never changed by the edits or the forward, so a
        # copy of the ones after it (usually the last step's few tree nodes) is all it takes to undo both.
        touched = min([session.length, *(e["length"] if e["op"] == "crop" else e["start"] for e in edits)])
        saved = hf.save_tail(session.cache, touched)
        self._apply(session, edits)
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                hidden = self._tensor(t["hidden"])
                cos, sin = self._tensor(t["cos"]), self._tensor(t["sin"])
                out = self.span(hidden, cos, sin, masks.additive(full, self.dtype).to(self.device), session.cache)
                out16 = out.to(torch.float16)
                if not torch.isfinite(out16).all():
                    raise ProtocolError("overflow", "the cloud layers' output does not fit in float16")
                array = out16.cpu().numpy()
        except BaseException:
            hf.restore_tail(session.cache, touched, saved)
            raise
        return array, (time.perf_counter() - start) * 1000.0

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array.copy()).to(self.device, self.dtype)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Hold the compute, as a long step would (benchmarks measure what waiting peers cost)."""
        with self._lock:
            yield

    # -- housekeeping ----------------------------------------------------------------

    def drop_connection(self, conn: int) -> int:
        """A closed connection takes its sessions with it; returns how many were dropped."""
        with self._lock:
            gone = [sid for sid, s in self.sessions.items() if s.owner == conn]
            for sid in gone:
                del self.sessions[sid]
        if gone:
            return_freed_memory()
        return len(gone)

    def expire(self, now: float | None = None) -> int:
        """Drop sessions idle for longer than the limit; their caches are freed with them."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [sid for sid, s in self.sessions.items() if now - s.last_used > self.limits.idle_seconds]
            for sid in gone:
                del self.sessions[sid]
        if gone:
            return_freed_memory()
            log.info("expired %d idle session(s)", len(gone))
        return len(gone)
