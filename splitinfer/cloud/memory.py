"""What the cloud's sessions and connections cost in memory, and the default limits derived from it.

A cloud server's defaults must fit the machine it runs on, so `derive_limits`
sizes them from the memory available when it starts (after its layers are
loaded):

    usable           = MEMORY_SHARE x available  -  one pass's working memory
    max_cache_tokens = SESSION_SHARE x usable / (SESSION_GROWTH x cache(1 entry))
    max_sessions     = max_cache_tokens / SMALL_SESSION                   (at most 256)
    per frame        = the largest legal forward frame (header + hidden + cos + sin + full mask)
    per conn.        = FRAMES_PER_CONNECTION x per frame
    max_conns        = min((1 - SESSION_SHARE) x usable / per conn., 4 x max_sessions)

A session reserves its `max_length` entries (by default max_context) out of
max_cache_tokens when it opens, and is refused `busy` when they are taken
(sessions.py): memory, not a count, decides who gets in.

`benchmarks/memory.py` measures the two constants on a real cloud process, and
tests/test_memory.py checks that the measurements stay under them.  Nothing here
touches sockets or tokens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import Limits
from ..protocol import MAX_HEADER_BYTES

log = logging.getLogger(__name__)

# A session's cache grows in place (cache.py) but is copied when it outgrows its buffers, at least doubling:
# the last growth to max_length briefly holds half of it twice (benchmarks/memory.py measures the ratio on a
# real cloud process; docs/security.md renders it).
SESSION_GROWTH = 1.5
SMALL_SESSION = 1024  # entries: the session count stops where the pool is full of sessions this short
# Frames one connection can make the server hold: the assembler's queue (the server's max_queue, 2), the
# frame being read off the socket, the frame in work, and its reply (measured ~4.7 before the queue was
# bounded this way; tests/test_memory.py measures it).
FRAMES_PER_CONNECTION = 5
MEMORY_SHARE = 0.75  # of the memory available at start; the rest is left to the OS, the allocator and others
SESSION_SHARE = 0.8  # of the usable memory for session caches; the rest for connections' buffered frames
MAX_DERIVED_SESSIONS = 256
MAX_SESSIONS_PER_CONNECTION = 4  # the local side opens one per connection; a few leave room for tools


@dataclass(frozen=True)
class Geometry:
    """The shapes that decide memory: the cloud span's layers and the model's attention."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    dtype_bytes: int

    @classmethod
    def of(cls, config, layers: int, dtype: torch.dtype) -> "Geometry":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            layers=layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            intermediate_size=getattr(config, "intermediate_size", 4 * config.hidden_size),
            dtype_bytes=torch.empty((), dtype=dtype).element_size(),
        )


def cache_bytes(g: Geometry, tokens: int) -> int:
    """Keys and values of `tokens` entries in every cloud layer."""
    return tokens * g.layers * 2 * g.kv_heads * g.head_dim * g.dtype_bytes


def step_bytes(g: Geometry, max_context: int, max_step_tokens: int, max_batch_tokens: int | None = None) -> int:
    """Working memory of the largest pass (one at a time), its attention computed one session at a time.

    Attention scores and their softmax for every head over the whole context, in float32, for the largest
    forward; the masks of every row in the pass; the MLP's activations for every row in the pass.
    """
    q, rows = max_step_tokens, max(max_step_tokens, max_batch_tokens or 0)
    attention = 2 * g.heads * q * max_context * 4
    masks = rows * max_context * (1 + 1 + 4)  # the frame's bool mask, its copy, the additive float32 mask
    mlp = 3 * rows * g.intermediate_size * g.dtype_bytes
    return attention + masks + mlp


def session_bytes(g: Geometry, max_context: int) -> int:
    return int(SESSION_GROWTH * cache_bytes(g, max_context))


def frame_bytes(g: Geometry, max_context: int, max_step_tokens: int) -> int:
    """The largest legal forward frame: length prefix, header, float16 hidden/cos/sin, a full bool mask."""
    q = max_step_tokens
    return 4 + MAX_HEADER_BYTES + q * (g.hidden_size + 2 * g.head_dim) * 2 + q * max_context


def connection_bytes(max_frame_bytes: int) -> int:
    return FRAMES_PER_CONNECTION * max_frame_bytes


def available_bytes() -> int:
    """Memory this process may still use: MemAvailable, or the cgroup's remaining limit if that is smaller."""
    available = _meminfo_available()
    for limit_file, usage_file in (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes")):
        root = Path("/sys/fs/cgroup")
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            available = min(available, max(0, int(limit) - usage))
        break
    return available


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Budget:
    """The limits in force and how they were reached, for the start-up log and /health."""

    limits: Limits
    max_connections: int
    available: int
    per_session: int
    per_step: int
    per_frame: int
    per_connection: int

    def describe(self) -> str:
        gib, mib = 2.0**30, 2.0**20
        lim = self.limits
        pool = "unbounded" if lim.max_cache_tokens is None else f"{lim.max_cache_tokens}"
        return (
            f"memory: {self.available / gib:.1f} GiB available at start; cache entries all sessions may reserve: "
            f"{pool} (a session at {lim.max_context} tokens <= {self.per_session / mib:.0f} MiB, {SESSION_GROWTH:g} x "
            f"cache), one pass's working memory <= {self.per_step / mib:.0f} MiB, per connection <= "
            f"{self.per_connection / mib:.0f} MiB ({FRAMES_PER_CONNECTION} frames x {self.per_frame / mib:.1f} MiB); "
            f"limits: {lim.max_sessions} sessions ({lim.max_sessions_per_connection} per connection), "
            f"{self.max_connections} connections, frames up to {lim.max_frame_bytes / mib:.1f} MiB "
            f"(docs/security.md, 'Memory')"
        )


def derive_limits(
    g: Geometry,
    requested: Limits,
    *,
    max_sessions: int | None = None,
    max_cache_tokens: int | None = None,
    max_connections: int | None = None,
    max_frame_bytes: int | None = None,
    available: int | None = None,
    max_batch_tokens: int | None = None,
) -> Budget:
    """Fill the limits left as None from the memory available (see the module docstring for the formula)."""
    available = available_bytes() if available is None else available
    ctx, q = requested.max_context, requested.max_step_tokens
    per_session, per_step = session_bytes(g, ctx), step_bytes(g, ctx, q, max_batch_tokens)
    per_frame = max_frame_bytes or frame_bytes(g, ctx, q)
    per_connection = connection_bytes(per_frame)
    usable = max(0, MEMORY_SHARE * available - per_step)
    if max_cache_tokens is None:  # at least one session of max_context: a tiny machine still serves one
        max_cache_tokens = max(ctx, math.floor(SESSION_SHARE * usable / (SESSION_GROWTH * cache_bytes(g, 1))))
    if max_sessions is None:
        max_sessions = max(1, min(MAX_DERIVED_SESSIONS, max_cache_tokens // SMALL_SESSION))
    if max_connections is None:
        by_memory = math.floor((1 - SESSION_SHARE) * usable / per_connection)
        max_connections = max(2, min(by_memory, 4 * max_sessions))
    limits = replace(requested, max_sessions=max_sessions, max_cache_tokens=max_cache_tokens, max_frame_bytes=per_frame)
    return Budget(limits, max_connections, available, per_session, per_step, per_frame, per_connection)


def _load_malloc_trim():
    """glibc's malloc_trim, or None on other C libraries (musl, macOS), where there is nothing to call."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def return_freed_memory() -> bool:
    """Hand the heap's free pages back to the OS after caches were dropped.

    glibc keeps freed memory in its arenas: after two 8192-token sessions closed, the cloud held ~1.1 GB
    it no longer used.  malloc_trim(0) returns it.  True when there was an allocator to ask.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
