"""Many sessions per cloud: one pass over every waiting session's rows equals each session computed alone.

Frames go through the wire format into a `CloudCore`; `core.busy()` holds the
compute so that the frames submitted meanwhile share the next pass.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from splitinfer import hf, masks, protocol
from splitinfer.cloud.cache import SessionCache
from splitinfer.cloud.sessions import CloudCore
from splitinfer.config import Batching, Limits, Split
from splitinfer.kernels import use_kernels
from splitinfer.parts import load_cloud
from splitinfer.remote import CloudError
from splitinfer.remote.recovery import open_when_free

from conftest import cloud_identity
from test_reliability import CoreLink, TinySide, one_torch_thread, span_on  # noqa: F401 (an autouse fixture)

H, D = 64, 16  # the tiny model's hidden size and head dim


def make_core(model, kernels="torch", limits=None, batching=Batching()) -> CloudCore:
    span, config, _ = load_cloud(model, Split(6), "cpu", torch.float32)
    use_kernels([span], config, kernels, "cpu", torch.float32)
    limits = limits or Limits(max_sessions=16, max_context=128, max_step_tokens=64)
    return CloudCore(span, config, "cpu", torch.float32, limits, cloud_identity(model), batching)


@pytest.fixture
def core(tiny_llama):
    c = make_core(tiny_llama)
    yield c
    c.close()


def frame(header, tensors=None):
    return protocol.decode(protocol.encode(header, tensors))


def opened(core, conn=1, **extra):
    reply = protocol.decode(core.handle(conn, frame({"op": "open", "session": None, "step": 0, **extra})), replies=True)
    assert reply.op == "opened", reply.header
    return reply.session


def rows(q, seed, scale=1.0):
    g = np.random.default_rng(seed)
    pos = np.arange(seed, seed + q)[None, :, None] * np.linspace(0.01, 1.0, D)[None, None]
    hidden = g.standard_normal((1, q, H))
    if scale != 1.0:  # every entry at +-scale: near float16's limit, yet finite
        hidden = scale * np.sign(hidden)
    return {"hidden": hidden.astype(np.float16),
            "cos": np.cos(pos).astype(np.float16), "sin": np.sin(pos).astype(np.float16)}


TREE = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]  # root, two children, a grandchild

# One session's life: a prompt, a tree, a path kept (a relocate riding on the next forward), a crop riding.
SCRIPT = [
    (7, None, None),
    (4, TREE, None),
    (1, None, [{"op": "relocate", "start": 7, "indices": [7, 9, 10]}]),
    (3, None, [{"op": "crop", "length": 9}]),
]


def request(sid, step, q, mask, edits, seed, scale=1.0):
    tensors = rows(q, seed, scale)
    if mask is not None:
        tensors["mask"] = np.asarray(mask, bool)
    header = {"op": "forward", "session": sid, "step": step}
    if edits is not None:
        header["edits"] = edits
    return frame(header, tensors)


def reply_of(future):
    return protocol.decode(future.result(timeout=60), replies=True)


class Reference:
    """The unbatched span: the model's layers over a DynamicCache, as before batching existed."""

    def __init__(self, model, kernels="torch"):
        self.span, config, _ = load_cloud(model, Split(6), "cpu", torch.float32)
        use_kernels([self.span], config, kernels, "cpu", torch.float32)
        self.cache = hf.new_cache()

    def forward(self, f) -> np.ndarray:
        for edit in f.header.get("edits") or []:
            if edit["op"] == "crop":
                hf.crop(self.cache, edit["length"])
            else:
                hf.relocate(self.cache, edit["start"], edit["indices"])
        t = f.tensors
        q, past = t["hidden"].shape[1], hf.cache_length(self.cache)
        block = masks.causal(q) if "mask" not in t else torch.from_numpy(t["mask"].copy())
        mask = masks.additive(masks.full_mask(past, block), torch.float32)
        as32 = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
        with torch.inference_mode():
            out = self.span(as32(t["hidden"]), as32(t["cos"]), as32(t["sin"]), mask, self.cache)
        return out.to(torch.float16).numpy()


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_a_batch_of_one_is_bitwise_the_unbatched_span(tiny_llama, kernels):
    core, ref = make_core(tiny_llama, kernels), Reference(tiny_llama, kernels)
    try:
        sid = opened(core)
        for step, (q, mask, edits) in enumerate(SCRIPT, 1):
            f = request(sid, step, q, mask, edits, seed=step)
            got = protocol.decode(core.handle(1, f), replies=True)
            assert got.op == "result", got.header
            assert np.array_equal(got.tensors["hidden"], ref.forward(f))
            assert got.header["cache_len"] == hf.cache_length(ref.cache)
    finally:
        core.close()


def test_sessions_in_one_pass_reply_what_each_gets_alone(tiny_llama, core):
    """Chains, trees and edits of four sessions share passes; each reply equals its solo reply."""
    refs = [Reference(tiny_llama) for _ in range(4)]
    sids = [opened(core, conn=c) for c in range(4)]
    for step, (q, mask, edits) in enumerate(SCRIPT, 1):
        frames = [request(sid, step, q + c % 2 if mask is None and edits is None else q, mask, edits,
                          seed=10 * c + step) for c, sid in enumerate(sids)]
        with core.busy():  # every frame waits, so the next pass takes all four
            futures = [core.submit(c, f) for c, f in enumerate(frames)]
        replies = [reply_of(fut) for fut in futures]
        assert sorted(n for _, n in core.passes[-1]) == sorted(f.tensors["hidden"].shape[1] for f in frames)
        for f, r, ref in zip(frames, replies, refs):
            assert r.op == "result" and r.header["batched"] == 4
            want = ref.forward(f)
            np.testing.assert_allclose(r.tensors["hidden"].astype(np.float32), want.astype(np.float32),
                                       rtol=2e-3, atol=2e-3)
            assert r.header["cache_len"] == hf.cache_length(ref.cache)


@pytest.mark.parametrize("mode", ["sequential", "jacobi", "lookahead"])
def test_concurrent_generations_are_token_identical_to_solo(tiny_llama, mode):
    """Three local sides decode at once through one core (passes batch them); each equals its solo run."""
    core, side = make_core(tiny_llama, "auto"), TinySide(tiny_llama)
    prompts = [[5, 9, 2, 7, 3], [11, 4, 4, 8], [1, 2, 3, 1, 2, 3, 1]]
    try:
        solo = [side.generate(span_on(core), p, 24, mode) for p in prompts]
        core.passes.clear()
        results: dict[int, list[int]] = {}

        def run(i):
            results[i] = side.generate(span_on(core), prompts[i], 24, mode)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert [results[i] for i in range(3)] == solo
        assert max(len(p) for p in core.passes) > 1  # the test really batched sessions
    finally:
        core.close()


def test_a_session_dropped_or_expired_mid_batch_leaves_the_others_intact(tiny_llama, core):
    ref = Reference(tiny_llama)
    gone, kept, idle = opened(core, conn=1), opened(core, conn=2), opened(core, conn=3)
    with core.busy():
        lost = core.submit(1, request(gone, 1, 5, None, None, seed=1))
        f = request(kept, 1, 5, None, None, seed=2)
        ok = core.submit(2, f)
        assert core.drop_connection(1) == 1  # the connection went while its forward waited
        # Sessions with a forward in work are not expired; the idle one is.
        assert core.expire(now=time.monotonic() + core.limits.idle_seconds + 1) == 1 and idle not in core.sessions
    assert reply_of(lost).header["code"] == "unknown_session"
    r = reply_of(ok)
    assert r.op == "result" and np.array_equal(r.tensors["hidden"], ref.forward(f))


def test_a_bad_frame_from_one_session_never_touches_the_others_in_its_pass(tiny_llama, core):
    ref = Reference(tiny_llama)
    bad, good = opened(core, conn=1), opened(core, conn=2)
    assert reply_of(core.submit(1, request(bad, 1, 3, None, None, seed=3))).op == "result"
    f = request(good, 1, 4, None, None, seed=4)
    with core.busy():
        ok = core.submit(2, f)
        wrong = rows(2, 5)
        wrong["hidden"] = wrong["hidden"][:, :, :32]  # the wrong hidden size
        refused = core.submit(1, frame({"op": "forward", "session": bad, "step": 2}, wrong))
        assert refused.done()  # refused at once, before any pass
        stale = core.submit(1, request(bad, 1, 2, None, None, seed=6))  # a step already taken
    assert reply_of(refused).header["code"] == "bad_shape" and reply_of(stale).header["code"] == "bad_step"
    assert core.sessions[bad].length == 3
    r = reply_of(ok)
    assert r.header["batched"] == 1 and np.array_equal(r.tensors["hidden"], ref.forward(f))


def test_an_overflow_in_one_session_is_undone_there_alone(tiny_llama, core):
    """Huge activations overflow float16 in one session's rows; the pass's other session is unaffected."""
    down = core.span.layers[-1].mlp.down_proj.weight
    with torch.no_grad():
        down.mul_(1e3)  # large MLP outputs: a residual near float16's limit goes over it
    ref = Reference(tiny_llama)
    with torch.no_grad():
        ref.span.layers[-1].mlp.down_proj.weight.mul_(1e3)
    hot, cool = opened(core, conn=1), opened(core, conn=2)
    assert reply_of(core.submit(1, request(hot, 1, 2, None, None, seed=7))).op == "result"
    f = request(cool, 1, 3, None, None, seed=8)
    with core.busy():
        over = core.submit(1, request(hot, 2, 3, None, [{"op": "crop", "length": 1}], seed=9, scale=65000.0))
        ok = core.submit(2, f)
    assert reply_of(over).header["code"] == "overflow"
    assert core.sessions[hot].length == 2  # the crop that rode on it is undone too
    r = reply_of(ok)
    assert r.op == "result" and np.array_equal(r.tensors["hidden"], ref.forward(f))
    assert len(core.passes[-1]) == 2


def test_a_long_prompt_goes_in_chunks_between_other_sessions_steps(tiny_llama):
    core = make_core(tiny_llama, batching=Batching(prefill_chunk=4, max_batch_tokens=64))
    ref_long, ref_step = Reference(tiny_llama), Reference(tiny_llama)
    try:
        long, short = opened(core, conn=1), opened(core, conn=2)
        prompt, step = request(long, 1, 13, None, None, seed=11), request(short, 1, 1, None, None, seed=12)
        with core.busy():
            futures = [core.submit(1, prompt), core.submit(2, step)]
        done_step, done_prompt = reply_of(futures[1]), reply_of(futures[0])
        assert [dict(p) for p in core.passes[-4:]] == [{long: 4, short: 1}, {long: 4}, {long: 4}, {long: 1}]
        np.testing.assert_allclose(done_prompt.tensors["hidden"].astype(np.float32),
                                   ref_long.forward(prompt).astype(np.float32), rtol=2e-3, atol=2e-3)
        assert done_prompt.header["cache_len"] == 13
        assert np.array_equal(done_step.tensors["hidden"], ref_step.forward(step))
        # A block whose rows see later rows cannot be split: it goes whole.
        sees_ahead = np.ones((6, 6), bool)
        whole = request(long, 2, 6, sees_ahead, None, seed=13)
        assert reply_of(core.submit(1, whole)).op == "result" and dict(core.passes[-1]) == {long: 6}
    finally:
        core.close()


def test_admission_by_reserved_memory_and_the_retry(tiny_llama):
    core = make_core(tiny_llama, limits=Limits(max_sessions=8, max_context=32, max_cache_tokens=64))
    try:
        first, second = opened(core, conn=1), opened(core, conn=2)  # each reserves max_context: 64 taken
        refused = protocol.decode(core.handle(3, frame({"op": "open", "session": None, "step": 0})), replies=True)
        assert refused.header["code"] == "busy" and refused.header["retry_after"] > 0
        assert "reserved" in refused.header["message"]
        bad = protocol.decode(core.handle(3, frame({"op": "open", "session": None, "step": 0, "max_length": 99})),
                              replies=True)
        assert bad.header["code"] == "bad_header"
        core.handle(1, frame({"op": "close", "session": first, "step": 1}))
        small = opened(core, conn=3, max_length=8)  # a short session leaves room for another
        assert opened(core, conn=4, max_length=24)
        too_long = core.handle(3, request(small, 1, 9, None, None, seed=1))
        assert protocol.decode(too_long, replies=True).header["code"] == "limit"

        # The local side asks again within its window, and gets in once a session goes.
        link = CoreLink(core, fault=lambda: None, refuse=lambda: False)
        threading.Timer(0.3, core.drop_connection, args=(2,)).start()
        t0 = time.monotonic()
        sid, limits = open_when_free(link, core.identity, timeout=10.0)
        assert sid in core.sessions and limits["max_context"] == 32 and time.monotonic() - t0 >= 0.3
        with pytest.raises(CloudError) as full:  # a window too short to wait for room
            open_when_free(CoreLink(core, lambda: None, lambda: False), core.identity, timeout=0.0)
        assert full.value.code == "busy"
    finally:
        core.close()


def test_the_session_cache_edits_like_a_dynamic_cache():
    """Writes past a growth, relocations and crops, and a failed step undone: entry for entry as hf.py's."""
    torch.manual_seed(0)
    mine, ref = SessionCache([3, 4], max_length=2000), hf.new_cache()
    layers = {3: object(), 4: object()}

    def write(n):
        for layer in layers:
            k, v = torch.randn(1, 2, n, 8), torch.randn(1, 2, n, 8)
            mine.write(layer, mine.length, k, v)
            ref.update(k, v, layer)
        mine.advance(mine.length + n)

    def same():
        assert mine.length == hf.cache_length(ref)
        for slot, layer in enumerate(layers):
            assert torch.equal(mine.keys[slot][:, :, : mine.length], ref.layers[layer].keys)
            assert torch.equal(mine.values[slot][:, :, : mine.length], ref.layers[layer].values)

    write(200)
    write(100)  # past the first chunk: the buffers grow, the entries stay
    same()
    assert mine.capacity == 512
    saved = mine.save_tail(290)
    mine.relocate(290, [295, 299, 291])
    mine.restore_tail(290, saved)
    same()
    mine.relocate(290, [295, 299, 291])
    hf.relocate(ref, 290, [295, 299, 291])
    same()
    mine.crop(100)
    hf.crop(ref, 100)
    write(3)
    same()
    write(900)  # 1003 entries: doubling would reach half of max_length, so the buffers go straight to it
    same()
    assert mine.capacity == 2000
    with pytest.raises(ValueError):
        mine.ensure(2001, mine.keys[0])


def test_a_failed_first_step_leaves_an_empty_session_cache():
    cache = SessionCache([0, 1], max_length=64)
    saved = cache.save_tail(0)
    for layer in (0, 1):
        cache.write(layer, 0, torch.ones(1, 2, 5, 8), torch.ones(1, 2, 5, 8))
    cache.advance(5)
    cache.restore_tail(0, saved)
    assert cache.length == 0


@pytest.mark.slow
def test_a_real_cloud_process_batches_concurrent_connections(tiny_llama):
    """Four connections replay one session's frames at once through `cloud`; each reply equals the solo one."""
    from websockets.sync.client import connect

    from splitinfer.procs import cloud_process
    from splitinfer.remote import ws_url

    steps = SCRIPT + [(1, None, None)] * 40  # then single-token steps: many chances to share a pass
    frames = [(q, mask, edits, step) for step, (q, mask, edits) in enumerate(steps, 1)]

    def run(url: str) -> tuple[list[np.ndarray], list[int]]:
        with connect(url, proxy=None, max_size=None, compression=None) as ws:
            ws.send(protocol.encode({"op": "open", "session": None, "step": 0}))
            sid = protocol.decode(ws.recv(timeout=30), replies=True).session
            outs, batched = [], []
            for q, mask, edits, step in frames:
                f = request(sid, step, q, mask, edits, seed=step)
                ws.send(protocol.encode(f.header, f.tensors))
                r = protocol.decode(ws.recv(timeout=60), replies=True)
                assert r.op == "result", r.header
                outs.append(r.tensors["hidden"])
                batched.append(r.header["batched"])
            return outs, batched

    with cloud_process(tiny_llama, threads=1) as (url, _):
        ws = ws_url(url)
        solo, _ = run(ws)
        results: dict[int, tuple] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(ws))) for i in range(4)]
        for _ in range(3):  # a few rounds: the tiny model is quick, so passes must overlap by chance
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            if any(b > 1 for outs, batched in results.values() for b in batched):
                break
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(ws))) for i in range(4)]
    assert len(results) == 4
    for outs, _ in results.values():
        for got, want in zip(outs, solo):
            np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert any(b > 1 for _, batched in results.values() for b in batched)


def test_a_closed_sessions_cache_is_freed_at_once_and_a_lone_session_never_waits(tiny_llama):
    """Nothing keeps a closed session's buffers after its last pass; a lone session's passes start at once,
    however long the gather window (it waits only for other sessions of the last two passes)."""
    import gc
    import weakref

    core = make_core(tiny_llama, batching=Batching(gather_ms=5000.0))
    try:
        sid = opened(core)
        t0 = time.monotonic()
        for step in range(1, 6):
            assert reply_of(core.submit(1, request(sid, step, 2, None, None, seed=step))).op == "result"
        assert time.monotonic() - t0 < 4.0  # five passes, none of them waited out the 5 s window
        buffer = weakref.ref(core.sessions[sid].cache.keys[0])
        core.handle(1, frame({"op": "close", "session": sid, "step": 6}))
        gc.collect()
        assert buffer() is None
    finally:
        core.close()


def test_sessions_that_fell_out_of_step_share_the_next_pass(tiny_llama):
    """Two sessions that alternate (a, b, a, b) are gathered into one pass once each has sent its step."""
    core = make_core(tiny_llama, batching=Batching(gather_ms=5000.0))
    try:
        a, b = opened(core, conn=1), opened(core, conn=2)
        assert reply_of(core.submit(1, request(a, 1, 1, None, None, seed=1))).op == "result"
        assert reply_of(core.submit(2, request(b, 1, 1, None, None, seed=2))).op == "result"
        first = core.submit(1, request(a, 2, 1, None, None, seed=3))  # waits for b (seen in the last two passes)
        time.sleep(0.2)
        assert not first.done()
        second = core.submit(2, request(b, 2, 1, None, None, seed=4))
        assert reply_of(first).header["batched"] == reply_of(second).header["batched"] == 2
    finally:
        core.close()


def test_the_pass_cost_benchmark_runs_and_records(tiny_llama, tmp_path):
    """benchmarks/pass_cost.py (the paper's per-pass and per-thread figures) on a tiny model: it measures every
    point it is asked for and says what it ran with."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "pass_cost.py"
    out = tmp_path / "pass_cost.json"
    r = subprocess.run([sys.executable, str(script), "--model", str(tiny_llama), "--threads", "1", "--sessions", "1",
                        "3", "--repeats", "2", "--context", "8", "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert [p["sessions"] for p in d["by_sessions"]] == [1, 3] and all(p["pass_ms_p50"] > 0 for p in d["by_sessions"])
    assert d["by_thread"]["one_thread_ms_p50"] > 0 and d["by_thread"]["two_threads_in_turn_ms_p50"] > 0
    assert d["settings"]["threads"] == 1 and d["commit"]
