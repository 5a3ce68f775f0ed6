"""Per-session state and the cloud's compute, independent of any socket.

`CloudCore.submit(conn, frame)` turns one decoded request into a future of one
reply frame (bytes); `handle` waits for it.  Sessions belong to the connection
that opened them.

Compute is scheduled per iteration, as Orca does it: every `forward` is checked
and its edits applied at once, then queued; a scheduler thread runs, whenever
the compute is free, one pass (batch.py) over every queued forward's next rows,
so a forward waits at most for the pass in progress.  A forward longer than
`Batching.prefill_chunk` whose block is causal (a prompt; a tree's nodes only see
earlier nodes too) goes in chunks, one per pass, so a long prompt cannot stall
everyone else's next token.  Whatever fails in a pass (a float16 overflow, a
bug) is undone in the sessions it touched and answered with a typed error; the
other sessions of the pass keep their results.

Admission is by memory: a session reserves `max_length` cache entries when it
opens (its `open` may ask for fewer than the server's max_context), and a server
whose reservations would exceed `Limits.max_cache_tokens` answers `busy` with a
`retry_after` hint instead of opening it.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import hf, masks, protocol
from ..config import Batching, Limits
from ..identity import Identity
from ..parts import CloudSpan
from ..protocol import Frame, ProtocolError
from . import batch
from .cache import SessionCache, Tail
from .memory import return_freed_memory

log = logging.getLogger(__name__)

BUSY_RETRY_S = 1.0  # the retry hint of a `busy` refusal: slots free as sessions close, drop or expire


@dataclass
class Session:
    id: str
    owner: int  # the connection that opened it; nobody else may touch it
    cache: SessionCache
    last_step: int = -1
    last_used: float = field(default_factory=time.monotonic)
    in_flight: bool = False  # a forward of it is queued or in a pass: expiry waits, other frames are refused

    @property
    def length(self) -> int:
        return self.cache.length


@dataclass
class _Forward:
    """A checked forward waiting for (or part way through) its passes.  It holds the frame's arrays as they
    came: every torch operation, edits included, happens in the passes' thread (see serve_passes)."""

    session: Session
    step: int
    edits: list  # applied when its first rows go into a pass
    hidden: np.ndarray  # [1, q, H] float16
    cos: np.ndarray  # [1, q, head_dim] float16
    sin: np.ndarray
    mask: np.ndarray  # [q, start + q] bool
    start: int  # cache length once the edits are applied: row i is entry start + i
    touched: int  # entries from here on may change (the edits, the rows): what `saved` restores
    chunkable: bool  # the block is causal, so it may be computed a chunk at a time
    reply: Future
    saved: Tail | None = None  # taken when the edits are applied
    queued: float = field(default_factory=time.perf_counter)
    done: int = 0  # rows computed so far
    outs: list[np.ndarray] = field(default_factory=list)

    @property
    def q(self) -> int:
        return self.hidden.shape[1]

    def next_rows(self, chunk: int) -> int:
        left = self.q - self.done
        return min(left, chunk) if self.chunkable else left


class CloudCore:
    """The cloud's layers plus a table of sessions; one pass at a time over every waiting session's rows."""

    def __init__(
        self,
        span: CloudSpan,
        config,
        device: str,
        dtype: torch.dtype,
        limits: Limits,
        identity: Identity | None = None,
        batching: Batching = Batching(),
        passes_thread: bool = True,
    ):
        self.span, self.device, self.dtype, self.limits, self.batching = span, device, dtype, limits, batching
        # What `opened` states this span is (build() always gives one); a local side refuses a cloud without it.
        self.identity = identity
        self.hidden_size = config.hidden_size
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        batch.use_batching(config)
        self.sessions: dict[str, Session] = {}
        self.passes: list[list[tuple[str, int]]] = []  # the last passes' (session, rows), for tests and benchmarks
        self._queue: list[_Forward] = []  # arrival order; a chunked forward keeps its place
        self._lock = threading.Lock()  # guards the table, the queue and the sessions' state
        self._work = threading.Condition(self._lock)
        self._compute = threading.Lock()  # held for a pass (busy() holds it too)
        self._stopped = False
        # The passes run in a thread of their own, or (passes_thread=False) in whichever thread calls serve_passes.
        self._scheduler: threading.Thread | None = None
        if passes_thread:
            self._scheduler = threading.Thread(target=self.serve_passes, name="cloud-passes", daemon=True)
            self._scheduler.start()

    @property
    def has_passes_thread(self) -> bool:
        return self._scheduler is not None

    @property
    def reserved_tokens(self) -> int:
        return sum(s.cache.max_length for s in self.sessions.values())

    # -- requests ------------------------------------------------------------------

    def handle(self, conn: int, frame: Frame) -> bytes:
        """One request -> one reply, waiting for the pass that computes it."""
        return self.submit(conn, frame).result()

    def submit(self, conn: int, frame: Frame) -> Future:
        """One request -> a future of its reply.  Errors become typed error replies; state stays consistent."""
        reply: Future = Future()
        try:
            with self._lock:
                answer = self._dispatch(conn, frame, reply)
            if answer is not None:
                reply.set_result(answer)
            if frame.op == "close":
                return_freed_memory()  # outside the lock: other sessions' steps need not wait for it
        except ProtocolError as exc:
            retry = BUSY_RETRY_S if isinstance(exc, _Busy) else None
            reply.set_result(protocol.error(exc.code, exc.message, frame.header.get("step"), frame.session,
                                            retry_after=retry))
        return reply

    def _dispatch(self, conn: int, frame: Frame, reply: Future) -> bytes | None:
        """Answer at once (bytes), or queue a forward whose pass will answer `reply` (None)."""
        if frame.op == "open":
            return self._open(conn, frame)
        session = self._session(conn, frame)
        if session.in_flight:
            raise ProtocolError("busy", "this session's previous forward is still being computed")
        step = frame.header.get("step")
        if step is None or step <= session.last_step:
            raise ProtocolError("bad_step", f"step {step!r} is not after the session's last step {session.last_step}")
        reply_header = {"session": session.id, "step": step}
        if frame.op == "close":
            del self.sessions[session.id]
            return protocol.encode({"op": "ok", **reply_header, "cache_len": 0})
        if frame.op == "forward":
            self._queue_forward(session, frame, step, reply)
            return None
        edit = {k: v for k, v in frame.header.items() if k in ("length", "start", "indices")}
        edits = protocol.check_edits([{"op": frame.op, **edit}])
        self._plan(session, edits, 0)
        self._apply(session, edits)
        session.last_step = step
        return protocol.encode({"op": "ok", **reply_header, "cache_len": session.length})

    def _open(self, conn: int, frame: Frame) -> bytes:
        lim = self.limits
        mine = sum(1 for s in self.sessions.values() if s.owner == conn)
        if mine >= lim.max_sessions_per_connection:
            raise ProtocolError("limit", f"this connection holds its maximum of {lim.max_sessions_per_connection} sessions")
        wanted = frame.header.get("max_length", lim.max_context)
        if not (isinstance(wanted, int) and not isinstance(wanted, bool) and 1 <= wanted <= lim.max_context):
            raise ProtocolError("bad_header", f"max_length must be an integer in 1..{lim.max_context}")
        if len(self.sessions) >= lim.max_sessions:
            raise _Busy(f"the server holds its maximum of {lim.max_sessions} sessions")
        if lim.max_cache_tokens is not None and self.reserved_tokens + wanted > lim.max_cache_tokens:
            free = lim.max_cache_tokens - self.reserved_tokens
            raise _Busy(f"the cache memory is reserved: {free} of {lim.max_cache_tokens} entries free, "
                        f"{wanted} asked for")
        sid = secrets.token_hex(16)  # 128 random bits
        self.sessions[sid] = Session(sid, conn, SessionCache(self.span.indices, wanted, self.span.devices))
        log.info("session %s… opened (%d open, %d entries reserved)", sid[:8], len(self.sessions), self.reserved_tokens)
        return protocol.encode(
            {
                "op": "opened",
                "session": sid,
                "step": frame.header.get("step"),
                "limits": {
                    "max_context": wanted,
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
        limit = session.cache.max_length
        if length + new_tokens > limit:
            raise ProtocolError("limit", f"context of {length + new_tokens} tokens exceeds the session's {limit}")
        return length

    @staticmethod
    def _apply(session: Session, edits: list) -> None:
        for edit in edits:
            if edit["op"] == "crop":
                session.cache.crop(edit["length"])
            else:
                session.cache.relocate(edit["start"], edit["indices"])

    def _queue_forward(self, session: Session, frame: Frame, step: int, reply: Future) -> None:
        q = protocol.check_forward(frame, self.hidden_size, self.head_dim, self.limits.max_step_tokens)
        edits = protocol.check_edits(frame.header.get("edits"))
        # Everything is checked before the cache changes, so a refused frame leaves the session as it was.
        start = self._plan(session, edits, q)
        t = frame.tensors
        mask = t.get("mask")
        if mask is None:
            full = np.concatenate([np.ones((q, start), bool), np.tri(q, dtype=bool)], axis=1)
        elif mask.shape[1] == q:
            full = np.concatenate([np.ones((q, start), bool), mask], axis=1)
        elif mask.shape[1] == start + q:
            full = mask
        else:
            raise ProtocolError("bad_shape", f"mask covers {mask.shape[1]} keys; the cache has {start} + {q} new")
        # Entries before `touched` are never changed by the edits or the rows, so a copy of the ones after it
        # (usually the last step's few tree nodes) is all it takes to undo both if the forward fails.
        touched = min([session.length, *(e["length"] if e["op"] == "crop" else e["start"] for e in edits)])
        work = _Forward(
            session, step, edits, t["hidden"], t["cos"], t["sin"], full, start, touched,
            chunkable=not np.triu(full[:, start:], 1).any(), reply=reply,
        )
        session.in_flight = True
        self._queue.append(work)
        self._work.notify()

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array.copy()).to(self.device, self.dtype)  # copy: the frame's bytes are read-only

    # -- the passes ------------------------------------------------------------------

    def serve_passes(self) -> None:
        """Run passes until close(), in the calling thread.

        All of the cloud's torch work happens in one thread: on a CPU, every thread that runs parallel torch
        operations keeps an OpenMP team of its own, and two teams on the same cores slowed a one-token step
        of the default model from about 30 ms to 53 ms (2 cores).  So the server runs this in the thread that
        loaded the layers, and frames are only decoded and checked elsewhere.
        """
        while True:
            with self._work:
                while not self._queue and not self._stopped:
                    self._work.wait()
                self._gather()
                if self._stopped:
                    return
            # The pass is chosen once the compute is free, so it takes every forward that arrived meanwhile.
            with self._compute:
                with self._lock:
                    chosen = self._choose()
                if chosen:
                    self._run(chosen)
                del chosen  # a closed session's cache must not outlive its last pass here

    def _gather(self) -> None:
        """Wait (holding nothing but the condition) up to gather_ms for the open sessions of the last two passes
        that have not sent their next forward yet.  Two passes, because sessions that fell out of step
        alternate (a, b, a, b ...) and would otherwise never share one; a lone session never waits."""
        recent = {sid for p in self.passes[-2:] for sid, _ in p if sid in self.sessions}
        deadline = time.monotonic() + self.batching.gather_ms / 1000.0
        while not self._stopped and not recent <= {w.session.id for w in self._queue}:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._work.wait(left)
            recent &= self.sessions.keys()  # one that closed meanwhile is not coming back

    def _choose(self) -> list[tuple[_Forward, int]]:
        """The next pass: queued forwards in arrival order, each its next rows, within max_batch_tokens
        (the first always goes, whatever its size)."""
        chosen, rows = [], 0
        for work in list(self._queue):
            if self.sessions.get(work.session.id) is not work.session:  # dropped or expired while it waited
                self._queue.remove(work)
                work.session.in_flight = False
                work.reply.set_result(protocol.error("unknown_session", "no such session on this connection", work.step))
                continue
            n = work.next_rows(self.batching.prefill_chunk)
            if chosen and rows + n > self.batching.max_batch_tokens:
                continue
            chosen.append((work, n))
            rows += n
        return chosen

    def _run(self, chosen: list[tuple[_Forward, int]]) -> None:
        failure: str | None = None
        with torch.inference_mode():
            try:
                rows = [self._rows(work, n) for work, n in chosen]
                outs = [out.to(torch.float16).cpu() for out in batch.run(self.span, rows)]
            except Exception:  # a bug must not take other sessions down, nor leak a traceback to the peer
                log.exception("a pass over %d session(s) failed", len(chosen))
                failure = "internal"
        with self._lock:
            self.passes = [*self.passes[-63:], [(work.session.id, n) for work, n in chosen]]
            for i, (work, n) in enumerate(chosen):
                if failure is not None:
                    self._fail(work, "internal", "the server failed on this frame")
                elif not torch.isfinite(outs[i]).all():
                    self._fail(work, "overflow", "the cloud layers' output does not fit in float16")
                else:
                    work.outs.append(outs[i][0].numpy())
                    work.done += n
                    if work.done == work.q:
                        self._finish(work, len(chosen))

    def _rows(self, work: _Forward, n: int) -> batch.Rows:
        """The forward's next n rows as a pass takes them; its edits go first, with a copy to undo them."""
        if work.saved is None:
            work.saved = work.session.cache.save_tail(work.touched)
            self._apply(work.session, work.edits)
        at, d = work.start + work.done, work.done
        mask = masks.additive(torch.from_numpy(np.ascontiguousarray(work.mask[d : d + n, : at + n])), self.dtype)
        rows = (self._tensor(a[:, d : d + n]) for a in (work.hidden, work.cos, work.sin))
        return batch.Rows(work.session.cache, at, *rows, mask.to(self.device))

    def _finish(self, work: _Forward, batched: int) -> None:
        self._queue.remove(work)
        session = work.session
        session.in_flight = False
        if self.sessions.get(session.id) is not session:  # dropped or expired meanwhile: nobody to answer
            work.reply.set_result(protocol.error("unknown_session", "no such session on this connection", work.step))
            return
        session.last_step = work.step
        # Only work keeps a session alive: a peer sending no-op crops cannot hold its cache forever.
        session.last_used = time.monotonic()
        hidden = work.outs[0] if len(work.outs) == 1 else np.concatenate(work.outs)
        header = {"op": "result", "session": session.id, "step": work.step, "cache_len": session.length,
                  "cloud_ms": round((time.perf_counter() - work.queued) * 1000.0, 3), "batched": batched}
        work.reply.set_result(protocol.encode(header, {"hidden": hidden[None]}))

    def _fail(self, work: _Forward, code: str, message: str) -> None:
        self._queue.remove(work)
        if work.saved is not None:
            work.session.cache.restore_tail(work.touched, work.saved)
        work.session.in_flight = False
        work.reply.set_result(protocol.error(code, message, work.step, work.session.id))

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Hold the compute, as a long pass would (benchmarks and tests measure what waiting peers cost)."""
        with self._compute:
            yield

    def close(self) -> None:
        """Stop the scheduler once its pass is done (queued forwards are answered `internal`)."""
        with self._work:
            self._stopped = True
            self._work.notify()
        if self._scheduler is not None:
            self._scheduler.join(timeout=60)
        with self._lock:
            for work in list(self._queue):
                self._fail(work, "internal", "the server is shutting down")

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
        """Drop sessions idle for longer than the limit (not while a forward of theirs is in work)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [sid for sid, s in self.sessions.items()
                    if now - s.last_used > self.limits.idle_seconds and not s.in_flight]
            for sid in gone:
                del self.sessions[sid]
        if gone:
            return_freed_memory()
            log.info("expired %d idle session(s)", len(gone))
        return len(gone)


class _Busy(ProtocolError):
    """The server is full for now: a typed `busy` refusal carrying a retry hint."""

    def __init__(self, message: str):
        super().__init__("busy", f"{message}; retry in {BUSY_RETRY_S:g} s")
