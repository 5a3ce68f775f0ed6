"""What the cloud's sessions and connections cost, the limits derived from it, and memory handed back.

The bounds in splitinfer/cloud/memory.py are what docs/security.md documents; the slow test
measures a real cloud process (benchmarks/memory.py on a model large enough to measure) and
checks each measurement against them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from splitinfer import protocol
from splitinfer.cloud import memory
from splitinfer.config import Limits, Split
from splitinfer.models import load_config
from splitinfer.procs import cloud_process

from test_cloud_core import ask, core, fwd, open_session  # noqa: F401  (core is a fixture)

ROOT = Path(__file__).resolve().parent.parent  # the checkout: benchmarks/ is not part of the package
GIB = 2**30


@pytest.fixture(scope="module")
def default_geometry(default_model) -> memory.Geometry:
    """The default model's cloud span in float32, from its config."""
    config = load_config(default_model)
    return memory.Geometry.of(config, len(Split(config.num_hidden_layers).cloud_layers), torch.float32)


def test_cache_bytes_of_the_default_model(default_geometry):
    g = default_geometry  # tokens x layers x (keys + values) x kv heads x head dim x bytes
    assert memory.cache_bytes(g, 8192) == 8192 * g.layers * 2 * g.kv_heads * g.head_dim * g.dtype_bytes


def test_the_largest_legal_frame_fits_the_derived_frame_limit(default_geometry):
    g, ctx, q = default_geometry, 1024, 64
    limit = memory.frame_bytes(g, ctx, q)
    tensors = {
        "hidden": np.zeros((1, q, g.hidden_size), np.float16),
        "cos": np.zeros((1, q, g.head_dim), np.float16),
        "sin": np.zeros((1, q, g.head_dim), np.float16),
        "mask": np.ones((q, ctx), bool),
    }
    edits = [{"op": "relocate", "start": 0, "indices": list(range(4096))} for _ in range(8)]  # the largest header
    data = protocol.encode({"op": "forward", "session": "0" * 32, "step": 1, "edits": edits}, tensors)
    assert len(data) <= limit
    assert protocol.decode(data, max_frame_bytes=limit).tensors["mask"].shape == (q, ctx)
    assert limit - len(data) < protocol.MAX_HEADER_BYTES  # the bound is not far above what can be sent


def test_limits_follow_the_memory_available(default_geometry):
    small = memory.derive_limits(default_geometry, Limits(), available=4 * GIB)
    large = memory.derive_limits(default_geometry, Limits(), available=24 * GIB)
    assert 1 <= small.limits.max_sessions < large.limits.max_sessions <= memory.MAX_DERIVED_SESSIONS
    for b in (small, large):
        usable = memory.MEMORY_SHARE * b.available - b.per_step
        # every reservable cache entry (with its growth) and the connections stay inside the usable share
        pool = b.limits.max_cache_tokens * memory.SESSION_GROWTH * memory.cache_bytes(default_geometry, 1)
        assert pool + b.max_connections * b.per_connection <= usable
        assert b.limits.max_cache_tokens >= b.limits.max_context  # at least one full session
        assert b.limits.max_sessions == min(memory.MAX_DERIVED_SESSIONS,
                                            b.limits.max_cache_tokens // memory.SMALL_SESSION)
        assert b.max_connections <= 4 * b.limits.max_sessions
        assert b.limits.max_frame_bytes == memory.frame_bytes(default_geometry, 8192, 512)
    assert "sessions" in large.describe() and "GiB available" in large.describe()


def test_explicit_limits_are_kept(default_geometry):
    b = memory.derive_limits(default_geometry, Limits(), max_sessions=3, max_connections=7, max_frame_bytes=1 << 20,
                             available=24 * GIB)
    assert (b.limits.max_sessions, b.max_connections, b.limits.max_frame_bytes) == (3, 7, 1 << 20)


def test_a_tiny_machine_still_gets_one_session(default_geometry):
    b = memory.derive_limits(default_geometry, Limits(), available=64 << 20)
    # room for one session at max_context (or several that reserve less), and connections to reach it
    assert b.limits.max_cache_tokens == b.limits.max_context and b.limits.max_sessions >= 1 and b.max_connections >= 2


def test_one_connection_cannot_take_every_session_slot(tiny_llama):
    from splitinfer.cloud.sessions import CloudCore
    from splitinfer.config import Split
    from splitinfer.parts import load_cloud

    span, config, _ = load_cloud(tiny_llama, Split(6), "cpu", torch.float32)
    c = CloudCore(span, config, "cpu", torch.float32, Limits(max_sessions=8, max_sessions_per_connection=2))
    for _ in range(2):
        open_session(c, conn=1)
    refused = ask(c, 1, {"op": "open", "session": None, "step": 0})
    assert refused.op == "error" and refused.header["code"] == "limit" and "connection" in refused.header["message"]
    assert open_session(c, conn=2)  # other connections still get theirs


def test_only_a_forward_keeps_a_session_alive(core):  # noqa: F811
    sid = open_session(core)
    fwd(core, sid, 1, 2)
    worked = core.sessions[sid].last_used
    for step in range(2, 6):  # no-op crops: no work, so no reprieve
        assert ask(core, 1, {"op": "crop", "session": sid, "step": step, "length": 2}).op == "ok"
    assert core.sessions[sid].last_used == worked
    assert core.expire(now=worked + core.limits.idle_seconds + 1) == 1
    assert sid not in core.sessions


def test_freed_memory_can_be_handed_back():
    assert memory.return_freed_memory() is (memory._MALLOC_TRIM is not None)


@pytest.fixture(scope="module")
def measurable_model(tmp_path_factory) -> Path:
    """Big enough that a session's cache shows in RSS, small enough to fill 8192 tokens in seconds."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=96, max_position_embeddings=16384, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("measurable")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.mark.slow
def test_measured_memory_stays_under_the_documented_bounds(measurable_model, tmp_path):
    """benchmarks/memory.py on a real cloud process: sessions, memory after closing, frames per connection."""
    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--model", str(measurable_model),
           "--contexts", "8192", "--long-sessions", "2", "--flood-connections", "4", "--flood-frames", "8",
           "--cloud-threads", "1", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    d = json.loads(out.read_text())
    for s in d["sessions"]:
        assert s["peak_growth_mb"] <= s["bound_mb"], s
        assert s["held_mb"] >= 0.9 * s["cache_mb"], s  # the session really was filled
    long = d["long_sessions"]
    assert abs(long["change"]) <= 0.10, long  # memory goes back once the long sessions are closed
    assert long["rss_peak_mb"] - long["rss_start_mb"] >= 2 * memory.cache_bytes(
        memory.Geometry(**d["geometry"]), 8192) / 2**20 * 0.9  # two sessions were really held at once
    conn = d["connections"]
    assert 1.0 <= conn["frames_held_per_connection"] <= memory.FRAMES_PER_CONNECTION, conn


@pytest.mark.slow
def test_the_cloud_logs_its_derived_limits(tiny_llama, tmp_path):
    log = tmp_path / "cloud.log"
    with cloud_process(tiny_llama, threads=1, log_file=log):
        pass
    text = log.read_text()
    assert "GiB available at start" in text and "sessions" in text and "connections" in text


@pytest.mark.slow
def test_a_silent_connection_is_closed_after_the_idle_timeout(tiny_llama):
    """Idle peers cannot keep connection slots forever; a connection in use is not closed."""
    import time

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from splitinfer.remote import ws_url

    idle_timeout = 1
    with cloud_process(tiny_llama, threads=1, extra=["--idle-timeout", str(idle_timeout)]) as (url, _):
        with connect(ws_url(url), proxy=None) as silent:
            t0 = time.monotonic()
            with pytest.raises(ConnectionClosed) as closed:
                silent.recv(timeout=10)
            # Closed after twice the session idle timeout: not (5% for timer slack) before it, nor 3x that late.
            assert 1.9 * idle_timeout <= time.monotonic() - t0 < 6 * idle_timeout
            assert closed.value.rcvd is not None and closed.value.rcvd.reason == "idle"
        with connect(ws_url(url), proxy=None) as busy:
            for step in range(6):  # frames more often than the timeout keep it open
                busy.send(protocol.encode({"op": "open" if step == 0 else "close", "session": None, "step": step}))
                busy.recv(timeout=5)
                time.sleep(0.5)
