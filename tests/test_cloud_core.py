"""The cloud's session logic, frame in -> frame out, without sockets."""

import contextlib

import numpy as np
import pytest
import torch

from splitinfer import protocol
from splitinfer.cloud.sessions import CloudCore
from splitinfer.config import Limits, Split
from splitinfer.parts import load_cloud


@pytest.fixture
def core(tiny_llama):
    split = Split(6)
    span, config, _ = load_cloud(tiny_llama, split, "cpu", torch.float32)
    c = CloudCore(span, config, "cpu", torch.float32, Limits(max_sessions=2, max_context=32, max_step_tokens=8))
    yield c
    c.close()


@contextlib.contextmanager
def overflowing(core):
    """The cloud layers' output no longer fits in float16 (the last MLP's output scaled up) while inside."""
    weight = core.span.layers[-1].mlp.down_proj.weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1e6)
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(kept)


def entries(cache):
    """Every layer's (keys, values) of the cache's entries, copied."""
    return [(k[:, :, : cache.length].clone(), v[:, :, : cache.length].clone()) for k, v in zip(cache.keys, cache.values)]


def ask(core, conn, header, tensors=None):
    frame = protocol.decode(protocol.encode(header, tensors))
    return protocol.decode(core.handle(conn, frame), replies=True)


def open_session(core, conn=1):
    reply = ask(core, conn, {"op": "open", "session": None, "step": 0})
    assert reply.op == "opened"
    return reply.session


def fwd(core, sid, step, q, conn=1, mask=None, edits=None, seed=0):
    g = np.random.default_rng(seed)
    tensors = {
        "hidden": g.standard_normal((1, q, 64)).astype(np.float16),
        "cos": np.ones((1, q, 16), np.float16),
        "sin": np.zeros((1, q, 16), np.float16),
    }
    if mask is not None:
        tensors["mask"] = np.asarray(mask, bool)
    header = {"op": "forward", "session": sid, "step": step}
    if edits is not None:
        header["edits"] = edits
    return ask(core, conn, header, tensors)


def test_forward_grows_the_cache_and_reports_time(core):
    sid = open_session(core)
    r = fwd(core, sid, 1, 3)
    assert r.op == "result" and r.header["cache_len"] == 3 and r.header["cloud_ms"] >= 0
    assert r.tensors["hidden"].shape == (1, 3, 64) and r.tensors["hidden"].dtype == np.float16
    assert fwd(core, sid, 2, 2).header["cache_len"] == 5


def test_edits_ride_on_forward(core):
    sid = open_session(core)
    fwd(core, sid, 1, 4)
    fwd(core, sid, 2, 3, mask=[[1, 0, 0], [1, 1, 0], [1, 0, 1]])  # a small tree at 4..6
    r = fwd(core, sid, 3, 1, edits=[{"op": "relocate", "start": 4, "indices": [4, 6]}])
    assert r.header["cache_len"] == 4 + 2 + 1
    r = fwd(core, sid, 4, 1, edits=[{"op": "crop", "length": 2}])
    assert r.header["cache_len"] == 3


def test_relocated_cache_equals_recomputed_path(core):
    """Keeping a tree path gives the same next output as computing that path as a chain."""
    a = open_session(core)
    b = open_session(core)
    g = np.random.default_rng(1)
    x = g.standard_normal((1, 3, 64)).astype(np.float16)
    rope = {"cos": np.ones((1, 3, 16), np.float16), "sin": np.zeros((1, 3, 16), np.float16)}
    # a: tree root(0) -> {1, 2}; keep root and node 2.  b: chain of root and node 2 directly.
    ask(core, 1, {"op": "forward", "session": a, "step": 1}, {"hidden": x, **rope, "mask": np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)})
    ask(core, 1, {"op": "forward", "session": b, "step": 1}, {"hidden": x[:, [0, 2]], "cos": rope["cos"][:, :2], "sin": rope["sin"][:, :2]})
    y = g.standard_normal((1, 1, 64)).astype(np.float16)
    one = {"cos": rope["cos"][:, :1], "sin": rope["sin"][:, :1]}
    ra = ask(core, 1, {"op": "forward", "session": a, "step": 2, "edits": [{"op": "relocate", "start": 0, "indices": [0, 2]}]}, {"hidden": y, **one})
    rb = ask(core, 1, {"op": "forward", "session": b, "step": 2}, {"hidden": y, **one})
    assert np.array_equal(ra.tensors["hidden"], rb.tensors["hidden"])


@pytest.mark.parametrize(
    "header, code",
    [
        ({"op": "crop", "length": 99}, "bad_edit"),
        ({"op": "relocate", "start": 1, "indices": [0]}, "bad_edit"),
        ({"op": "relocate", "start": 0, "indices": [7]}, "bad_edit"),
    ],
)
def test_bad_edits_leave_the_session_intact(core, header, code):
    sid = open_session(core)
    fwd(core, sid, 1, 4)
    r = ask(core, 1, {"session": sid, "step": 2, **header})
    assert r.op == "error" and r.header["code"] == code
    assert fwd(core, sid, 3, 1).header["cache_len"] == 5


def test_bad_edit_riding_on_forward_changes_nothing(core):
    sid = open_session(core)
    fwd(core, sid, 1, 4)
    r = fwd(core, sid, 2, 1, edits=[{"op": "crop", "length": 2}, {"op": "relocate", "start": 0, "indices": [3]}])
    assert r.header["code"] == "bad_edit"
    assert fwd(core, sid, 3, 1).header["cache_len"] == 5


def test_steps_must_increase(core):
    sid = open_session(core)
    fwd(core, sid, 5, 1)
    for step in (5, 4):
        r = fwd(core, sid, step, 1)
        assert r.op == "error" and r.header["code"] == "bad_step"


def test_sessions_belong_to_their_connection(core):
    sid = open_session(core, conn=1)
    for header in ({"op": "forward"}, {"op": "crop", "length": 0}, {"op": "close"}):
        if header["op"] == "forward":
            r = fwd(core, sid, 1, 1, conn=2)
        else:
            r = ask(core, 2, {**header, "session": sid, "step": 1})
        assert r.op == "error" and r.header["code"] == "unknown_session"
    assert fwd(core, sid, 1, 1, conn=1).op == "result"


def test_limits(core):
    a = open_session(core)
    open_session(core)
    r = ask(core, 1, {"op": "open", "session": None, "step": 0})
    assert r.op == "error" and r.header["code"] == "busy" and r.header["retry_after"] > 0  # max_sessions=2
    assert fwd(core, a, 1, 9).header["code"] == "limit"  # max_step_tokens=8
    for step in range(1, 5):
        fwd(core, a, step, 8)
    assert fwd(core, a, 5, 1).header["code"] == "limit"  # max_context=32


def test_close_expire_and_drop(core):
    a = open_session(core)
    assert ask(core, 1, {"op": "close", "session": a, "step": 1}).op == "ok"
    assert a not in core.sessions
    b = open_session(core, conn=3)
    assert core.expire(now=1e18) == 1 and b not in core.sessions
    open_session(core, conn=4)
    assert core.drop_connection(4) == 1 and not core.sessions


def test_unknown_session(core):
    r = fwd(core, "f" * 32, 1, 1)
    assert r.op == "error" and r.header["code"] == "unknown_session"


def test_a_refused_overflow_undoes_the_edits_that_rode_on_it(core):
    """A forward refused for float16 overflow leaves the session exactly as it was, edits included."""
    sid = open_session(core)
    fwd(core, sid, 1, 4)
    fwd(core, sid, 2, 3, mask=[[1, 0, 0], [1, 1, 0], [1, 0, 1]])  # a small tree at 4..6
    session = core.sessions[sid]
    before = entries(session.cache)
    edits = [{"op": "relocate", "start": 4, "indices": [4, 6]}]

    with overflowing(core):
        refused = fwd(core, sid, 3, 2, edits=edits, seed=1)
    assert refused.op == "error" and refused.header["code"] == "overflow"
    after = entries(session.cache)
    assert session.length == 7 and len(after) == len(before)
    for (k0, v0), (k1, v1) in zip(before, after):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)

    # The same frame again now succeeds, exactly as on a session that never saw the refused one.
    retried = fwd(core, sid, 4, 2, edits=edits, seed=1)
    twin = open_session(core, conn=2)
    fwd(core, twin, 1, 4, conn=2)
    fwd(core, twin, 2, 3, conn=2, mask=[[1, 0, 0], [1, 1, 0], [1, 0, 1]])
    reference = fwd(core, twin, 3, 2, conn=2, edits=edits, seed=1)
    assert retried.header["cache_len"] == reference.header["cache_len"] == 8
    assert np.array_equal(retried.tensors["hidden"], reference.tensors["hidden"])


def test_a_refused_first_forward_leaves_an_empty_cache(core):
    sid = open_session(core)
    with overflowing(core):
        assert fwd(core, sid, 1, 3).header["code"] == "overflow"
    assert core.sessions[sid].length == 0
    assert fwd(core, sid, 2, 3).header["cache_len"] == 3


def test_standalone_relocate_and_crop_equal_the_same_edits_riding_on_forward(core):
    """The protocol's own crop / relocate frames leave the cache as the edits inside a forward do."""
    tree = [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    a, b = open_session(core, conn=1), open_session(core, conn=2)
    for sid, conn in ((a, 1), (b, 2)):
        fwd(core, sid, 1, 4, conn=conn)
        fwd(core, sid, 2, 3, conn=conn, mask=tree)  # a small tree at 4..6
    relocated = ask(core, 1, {"op": "relocate", "session": a, "step": 3, "start": 4, "indices": [4, 6]})
    assert relocated.op == "ok" and relocated.header["cache_len"] == 6
    cropped = ask(core, 1, {"op": "crop", "session": a, "step": 4, "length": 5})
    assert cropped.op == "ok" and cropped.header["cache_len"] == 5
    edits = [{"op": "relocate", "start": 4, "indices": [4, 6]}, {"op": "crop", "length": 5}]
    ra, rb = fwd(core, a, 5, 2, conn=1, seed=3), fwd(core, b, 3, 2, conn=2, edits=edits, seed=3)
    assert ra.header["cache_len"] == rb.header["cache_len"] == 7
    assert np.array_equal(ra.tensors["hidden"], rb.tensors["hidden"])


def test_a_full_width_mask_equals_the_block_mask(core):
    """A mask over past + q keys (the whole cache) gives what the [q, q] block gives; another width is refused."""
    tree = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)
    a, b = open_session(core, conn=1), open_session(core, conn=2)
    fwd(core, a, 1, 4, conn=1)
    fwd(core, b, 1, 4, conn=2)
    full = np.concatenate([np.ones((3, 4), bool), tree], axis=1)  # [3, 4 + 3]
    ra, rb = fwd(core, a, 2, 3, conn=1, mask=tree, seed=2), fwd(core, b, 2, 3, conn=2, mask=full, seed=2)
    assert np.array_equal(ra.tensors["hidden"], rb.tensors["hidden"])
    refused = fwd(core, a, 3, 3, conn=1, mask=np.ones((3, 5), bool))
    assert refused.op == "error" and refused.header["code"] == "bad_shape"
    assert core.sessions[a].length == 7
