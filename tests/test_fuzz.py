"""Hostile input against the real cloud server process: typed errors, no crash, other sessions untouched.

The server (cloud_server_kv.py on a tiny random model, --threads 1) gets:

* every kind of malformed frame named in docs/security.md, each with its expected error code;
* a mutation fuzzer: thousands of frames (structured-but-wrong requests, byte-level
  mutations of valid frames, hand-made headers, raw garbage, text frames, the odd
  over-sized frame) from two connections at once, bounded in frames and time;
* a property-based (hypothesis) sweep over arbitrary JSON headers and tensor tables;
* raw TCP garbage that is not WebSocket at all.

Throughout, an honest client generates on its own session with recovery turned
off (so a disturbance could not be hidden by a reconnect), and its tokens must
equal its run before the fuzzing.  Every reply must decode as a reply frame; an
error reply has a code and a message and never a traceback nor "internal".
"""

from __future__ import annotations

import json
import random
import re
import socket
import struct
import threading
import time
from contextlib import ExitStack
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from splitinfer import decoding, protocol
from splitinfer.config import Split
from splitinfer.decoding.lookahead import Memory
from splitinfer.decoding.strategies import STRATEGIES
from splitinfer.engine import SplitModel
from splitinfer.models import load_config
from splitinfer.parts import load_local
from splitinfer.procs import cloud_process
from splitinfer.remote import cloud_session, ws_url

from conftest import cloud_identity, write_tiny

pytestmark = pytest.mark.slow

H, D = 64, 16  # the tiny llama: hidden size 64, 4 heads of 16
MAX_STEP, MAX_CONTEXT, MAX_FRAME = 16, 128, 64 << 10
FUZZ_FRAMES = 4000  # over two connections, and at most:
FUZZ_SECONDS = 60.0
PROMPT = [5, 6, 7, 8, 9] * 4 + [10, 11]
TOKEN = "fuzz-token-0123456789"
REPLY_OPS = {"error", "ok", "result", "opened"}


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    model = write_tiny("llama", d / "model", seed=3)
    token_file = d / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    log = d / "cloud.log"
    extra = [
        "--auth-token-file", str(token_file), "--max-step-tokens", str(MAX_STEP), "--max-context", str(MAX_CONTEXT),
        "--max-frame-mb", str(MAX_FRAME / 2**20), "--max-sessions", "48",
    ]
    with cloud_process(model, threads=1, extra=extra, log_file=log) as (url, proc):
        yield SimpleNamespace(url=url, ws=ws_url(url), proc=proc, log=log, model=model)


class Honest:
    """A well-behaved local side on the tiny model, without reconnects."""

    def __init__(self, cloud):
        split = Split(load_config(cloud.model).num_hidden_layers)
        self.head, self.tail, _, _ = load_local(cloud.model, split, "cpu", torch.float32)
        self.identity = cloud_identity(cloud.model)
        self.ws = cloud.ws

    def generate(self, mode: str) -> list[int]:
        with cloud_session(self.ws, TOKEN, expected=self.identity, reconnect_timeout=None) as span:
            lm = SplitModel(self.head, self.tail, span, torch.float32)
            return decoding.run(STRATEGIES[mode](Memory())(lm, PROMPT, 60, frozenset())).tokens


@pytest.fixture(scope="module")
def honest(cloud):
    return Honest(cloud)


@pytest.fixture(scope="module")
def baseline(honest):
    return {mode: honest.generate(mode) for mode in ("sequential", "lookahead")}


def open_ws(cloud):
    return connect(
        cloud.ws, additional_headers={"Authorization": f"Bearer {TOKEN}"}, max_size=None, proxy=None,
        compression=None, open_timeout=15,
    )


def check_reply(raw) -> protocol.Frame:
    """A reply must be a well-formed reply frame; an error must be typed and say nothing internal."""
    assert isinstance(raw, bytes), f"a text reply: {raw!r}"
    try:
        frame = protocol.decode(raw, replies=True, max_frame_bytes=1 << 30)
    except protocol.ProtocolError as exc:  # a frame of protocol version 1 is refused in version 1
        assert exc.code == "version" and exc.peer_version == 1, exc
        frame = protocol.decode(raw, replies=True, max_frame_bytes=1 << 30, version=1)
        assert frame.op == "error" and frame.header["code"] == "version", frame.header
    assert frame.op in REPLY_OPS
    if frame.op == "error":
        code, message = frame.header.get("code"), frame.header.get("message")
        assert isinstance(code, str) and re.fullmatch(r"[a-z_]+", code), frame.header
        assert isinstance(message, str) and message, frame.header
        assert code != "internal" and "Traceback" not in message and 'File "' not in message, frame.header
    elif frame.op == "result":
        hidden = frame.tensors["hidden"]
        assert hidden.dtype == np.float16 and hidden.shape[0] == 1 and hidden.shape[2] == H
        assert np.isfinite(hidden).all()
    return frame


def ask(ws, data) -> protocol.Frame:
    ws.send(data)
    return check_reply(ws.recv(timeout=30))


def rope(q: int) -> dict[str, np.ndarray]:
    angles = np.arange(q)[None, :, None] * np.linspace(0.01, 1.0, D)[None, None, :]
    return {"cos": np.cos(angles).astype(np.float16), "sin": np.sin(angles).astype(np.float16)}


def forward_tensors(q: int, seed: int = 0) -> dict[str, np.ndarray]:
    hidden = np.random.default_rng(seed).standard_normal((1, q, H)).astype(np.float16)
    return {"hidden": hidden, **rope(q)}


def with_header(header, payload: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack(">I", len(raw)) + raw + payload


# ------------------------------------------------------------------------------ each kind, by name


def test_each_kind_of_hostile_frame_gets_its_typed_error(cloud):
    with open_ws(cloud) as ws:
        sid = ask(ws, protocol.encode({"op": "open", "session": None, "step": 0})).session
        assert ask(ws, protocol.encode({"op": "forward", "session": sid, "step": 1}, forward_tensors(6))).op == "result"
        good = protocol.encode({"op": "forward", "session": sid, "step": 2}, forward_tensors(1))
        base = {"v": protocol.VERSION, "op": "forward", "session": sid, "step": 50}

        def fwd(step=50, tensors=None, **header):
            return protocol.encode({"op": "forward", "session": sid, "step": step, **header},
                                   forward_tensors(2) if tensors is None else tensors)

        nan, inf = forward_tensors(2), forward_tensors(2)
        nan["hidden"][0, 1, 5] = np.nan
        inf["cos"][0, 0, 0] = np.inf
        wide = forward_tensors(2)
        wide["hidden"] = np.zeros((1, 2, H - 1), np.float16)
        cases = [
            (b"", "truncated"),
            (b"\x00\x00", "truncated"),
            (b"\x00\x00\x00\x10{}", "truncated"),  # header longer than the frame
            (good[:-7], "truncated"),  # payload cut short
            (b"\xff\xff\xff\xff{}", "too_large"),  # 4 GiB header (or -1 read as a signed length)
            (b"\x80\x00\x00\x00{}", "too_large"),  # -2^31 read as signed
            (b"\x00\x00\x00\x04{]]]", "bad_header"),
            (with_header(b"\xff\xfe\xfd"), "bad_header"),  # not UTF-8
            (with_header(b"[" * 20000 + b"]" * 20000), "bad_header"),  # nested past the JSON parser's recursion limit
            (with_header(b'{"v":NaN}'), "bad_header"),
            (with_header(b'{"v":2,"op":"open","step":' + b"9" * 5000 + b',"tensors":[]}'), "bad_header"),  # int too long
            (with_header([1, 2]), "bad_header"),
            (with_header({**base, "v": protocol.VERSION + 1, "tensors": []}), "version"),
            (with_header({**base, "op": "launch", "tensors": []}), "unknown_op"),
            (with_header({**base, "op": "result", "tensors": []}), "unknown_op"),  # a reply op as a request
            (with_header({**base, "session": "../../etc/passwd", "tensors": []}), "bad_header"),
            (with_header({**base, "step": -1, "tensors": []}), "bad_header"),
            (with_header({**base, "step": 2**63, "tensors": []}), "bad_header"),
            (with_header({**base, "tensors": [{"name": "hidden", "dtype": "float64", "shape": [1, 1, H], "offset": 0,
                                               "nbytes": 8 * H}]}, b"\x00" * 8 * H), "bad_dtype"),
            (fwd(tensors={**forward_tensors(2), "hidden": np.ones((1, 2, H), bool)}), "bad_dtype"),
            (with_header({**base, "tensors": [{"name": "hidden", "dtype": "float16", "shape": [1, 1, H], "offset": 0,
                                               "nbytes": 2 * H - 2}]}, b"\x00" * (2 * H - 2)), "bad_length"),
            (good + b"\x00\x00", "bad_length"),  # bytes that no tensor declares
            (with_header({**base, "tensors": [{"name": "hidden", "dtype": "float16", "shape": [1, -1, H], "offset": 0,
                                               "nbytes": 0}]}), "bad_shape"),
            (with_header({**base, "tensors": [{"name": "hidden", "dtype": "float16", "shape": [2**24, 2**24, 2**24],
                                               "offset": 0, "nbytes": 1}]}), "bad_length"),
            (fwd(tensors=wide), "bad_shape"),
            (fwd(tensors={**forward_tensors(2), **rope(3)}), "bad_shape"),
            (fwd(tensors={"hidden": forward_tensors(2)["hidden"]}), "bad_tensor"),
            (fwd(tensors=nan), "not_finite"),
            (fwd(tensors=inf), "not_finite"),
            (fwd(tensors={**forward_tensors(2), "mask": np.array([[1, 0], [1, 0]], bool)}), "bad_mask"),
            (fwd(tensors={**forward_tensors(2), "mask": np.ones((2, 5), bool)}), "bad_shape"),
            (fwd(tensors=forward_tensors(MAX_STEP + 1)), "limit"),
            (fwd(tensors=forward_tensors(1), edits=[{"op": "crop", "length": 7}]), "bad_edit"),  # past the cache
            (fwd(edits=[{"op": "crop", "length": -1}]), "bad_edit"),
            (fwd(edits=[{"op": "relocate", "start": 0, "indices": [6]}]), "bad_edit"),
            (fwd(edits=[{"op": "relocate", "start": 7, "indices": []}]), "bad_edit"),
            (fwd(edits=[{"op": "relocate", "start": 2, "indices": [1]}]), "bad_edit"),
            (fwd(edits=[{"op": "relocate", "start": 2, "indices": [3, 3]}]), "bad_edit"),
            (fwd(edits=[{"op": "shred"}]), "bad_edit"),
            (protocol.encode({"op": "crop", "session": sid, "step": 50, "length": 99}), "bad_edit"),
            (protocol.encode({"op": "relocate", "session": sid, "step": 50, "start": 0, "indices": [-1]}), "bad_edit"),
            (fwd(step=1), "bad_step"),  # replayed
            (fwd(step=0), "bad_step"),  # out of order
            (protocol.encode({"op": "forward", "session": sid}, forward_tensors(1)), "bad_step"),
            (fwd(session="f" * 32), "unknown_session"),
            (fwd(session=None), "unknown_session"),
        ]
        for data, code in cases:
            reply = ask(ws, data)
            assert reply.op == "error" and reply.header["code"] == code, (data[:80], reply.header)
        ws.send("a text frame")
        assert check_reply(ws.recv(timeout=30)).header["code"] == "bad_frame"
        # A context past the server's limit is refused; a step ahead is fine once the frame is good.
        for step in range(3, 3 + (MAX_CONTEXT - 6) // MAX_STEP):
            assert ask(ws, protocol.encode({"op": "forward", "session": sid, "step": step},
                                           forward_tensors(MAX_STEP))).op == "result"
        big = ask(ws, protocol.encode({"op": "forward", "session": sid, "step": 100}, forward_tensors(MAX_STEP)))
        assert big.header["code"] == "limit"
        # None of it touched the session: the same good frame answers as before.
        reply = ask(ws, protocol.encode({"op": "crop", "session": sid, "step": 101, "length": 6}))
        assert reply.op == "ok" and reply.header["cache_len"] == 6

    # A frame over the size limit closes that connection with 1009 (before its payload is read), no more.
    with open_ws(cloud) as ws:
        ws.send(b"\x00" * (MAX_FRAME + 1))
        with pytest.raises(ConnectionClosed) as e:
            ws.recv(timeout=30)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1009
    with open_ws(cloud) as ws:
        assert ask(ws, protocol.encode({"op": "open", "session": None, "step": 0})).op == "opened"
    assert cloud.proc.poll() is None


# ------------------------------------------------------------------------------ the mutation fuzzer


def tree_mask(rng: random.Random, q: int) -> np.ndarray:
    """A random token tree's block mask: each token sees itself and its ancestors."""
    parents = [-1] + [rng.randint(-1, i - 1) for i in range(1, q)]
    m = np.zeros((q, q), bool)
    for i, p in enumerate(parents):
        m[i, i] = True
        if p >= 0:
            m[i] |= m[p]
    return m


class Fuzzer:
    """One connection's worth of hostile traffic, with just enough state to reach deep code paths."""

    def __init__(self, cloud, seed: int, shared_sessions: list[str], deadline: float, budget: int):
        self.cloud, self.rng = cloud, random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.shared, self.deadline, self.budget = shared_sessions, deadline, budget
        self.sessions: dict[str, dict] = {}  # id -> {"step": last accepted step, "len": cache length}
        self.sent = self.closes = self.reconnects = 0
        self.codes: dict[str, int] = {}
        self.failures: list[str] = []
        self.ws = None
        self._stack = ExitStack()

    # -- driving ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # surfaced by the test; a thread must not die silently
            self.failures.append(f"{type(exc).__name__}: {exc}")
        finally:
            self._stack.close()

    def _run(self) -> None:
        self.reconnect()
        generators = [
            (30, self.structured),
            (12, self.valid_forward),
            (4, self.valid_open),
            (15, self.mutated),
            (10, self.raw_header),
            (5, self.garbage),
            (2, self.text),
            (0.3, self.oversize),
        ]
        weights = [w for w, _ in generators]
        while self.sent < self.budget and time.monotonic() < self.deadline:
            if self.rng.random() < 1 / 150:
                self.reconnect()  # a closed connection takes its sessions with it
            make = self.rng.choices([g for _, g in generators], weights)[0]
            data, expect_close = make()
            self.exchange(data, expect_close, make.__name__)

    def reconnect(self) -> None:
        self._stack.close()
        for sid in self.sessions:
            try:
                self.shared.remove(sid)
            except ValueError:
                pass
        self.sessions.clear()
        self.ws = self._stack.enter_context(open_ws(self.cloud))
        self.reconnects += 1

    def exchange(self, data, expect_close: bool, kind: str) -> None:
        self.sent += 1
        try:
            self.ws.send(data)
            raw = self.ws.recv(timeout=60)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            if not (expect_close and code == 1009):
                self.failures.append(f"{kind}: connection closed unexpectedly ({exc}) on {bytes(data[:60])!r}")
            self.closes += 1
            self.sessions.clear()
            self.reconnect()
            return
        if expect_close:
            self.failures.append(f"{kind}: an over-sized frame got a reply")
            return
        try:
            frame = check_reply(raw)
        except (AssertionError, protocol.ProtocolError) as exc:
            self.failures.append(f"{kind}: bad reply {exc} to {bytes(data[:60])!r}")
            return
        code = frame.header.get("code", frame.op)
        self.codes[code] = self.codes.get(code, 0) + 1
        self.track(frame)

    def track(self, frame: protocol.Frame) -> None:
        sid = frame.session
        if frame.op == "opened":
            self.sessions[sid] = {"step": -1, "len": 0}
            self.shared.append(sid)
        elif frame.op in ("result", "ok") and self.state(sid):
            if frame.header.get("cache_len") == 0 and frame.op == "ok" and self._last_op == "close":
                del self.sessions[sid]
                return
            self.sessions[sid].update(step=frame.step, len=frame.header["cache_len"])

    # -- frames ----------------------------------------------------------------------

    _last_op = None

    def pick_session(self):
        r = self.rng.random()
        own = list(self.sessions)
        if own and r < 0.6:
            return self.rng.choice(own)
        shared = list(self.shared)  # the other fuzzer edits it concurrently
        if shared and r < 0.75:
            return self.rng.choice(shared)  # quite possibly another connection's
        return self.rng.choice([
            "%032x" % self.rng.getrandbits(128), None, "", "F" * 32, "0" * 31, "../" * 11, 7, [], {"a": 1},
        ])

    def state(self, sid) -> dict | None:
        return self.sessions.get(sid) if isinstance(sid, str) else None

    def pick_step(self, sid):
        state = self.state(sid)
        last = state["step"] if state else 0
        return self.rng.choice([
            last + 1, last + 1, last + 1, last + self.rng.randint(2, 50), last, max(0, last - 3), 0, -1, 2**62,
            2**63, 1.5, "1", True, None,
        ])

    def pick_length(self, sid):
        n = self.state(sid)["len"] if self.state(sid) else 4
        return self.rng.choice([0, n, max(0, n - 1), max(0, n - self.rng.randint(1, 8)), n + 1, -1, 2**40, "3", None])

    def pick_edits(self, sid):
        n = self.state(sid)["len"] if self.state(sid) else 4
        edits = []
        for _ in range(self.rng.choice([0, 1, 1, 2, 3, 9])):
            if self.rng.random() < 0.5:
                edits.append({"op": "crop", "length": self.pick_length(sid)})
            else:
                start = self.rng.choice([0, n, max(0, n - 4), max(0, n - 1), n + 1, -2])
                k = self.rng.randint(0, 5)
                indices = [self.rng.choice([start + i, start + self.rng.randint(0, 6), n, -1, start - 1])
                           for i in range(k)]
                edits.append({"op": "relocate", "start": start, "indices": indices})
            if self.rng.random() < 0.1:
                edits[-1][self.rng.choice(["junk", "length", "indices"])] = self.rng.choice([1, "x", None, [2]])
        return self.rng.choice([edits, edits, edits, None, {"op": "crop"}, "crop", 3])

    def tensors(self, q: int) -> dict[str, np.ndarray]:
        scale = self.rng.choice([1.0, 1.0, 1.0, 30.0, 1000.0, 60000.0])
        hidden = (self.np.standard_normal((1, q, H)) * scale).clip(-65504, 65504).astype(np.float16)
        t = {"hidden": hidden, **rope(q)}
        r = self.rng.random()
        if r < 0.05:
            t["hidden"].flat[self.rng.randrange(t["hidden"].size)] = self.rng.choice([np.nan, np.inf, -np.inf])
        elif r < 0.10:
            t[self.rng.choice(["cos", "sin"])] *= np.float16(self.rng.choice([1000.0, 60000.0]))
        elif r < 0.20:
            shape = list(t["hidden"].shape)
            shape[self.rng.randrange(3)] += self.rng.choice([-1, 1])
            t["hidden"] = np.zeros([max(0, s) for s in shape], np.float16)
        elif r < 0.25:
            t[self.rng.choice(["cos", "sin"])] = np.zeros((1, q + 1, D), np.float16)
        elif r < 0.30:
            del t[self.rng.choice(["hidden", "cos", "sin"])]
        elif r < 0.33:
            t["hidden"] = t["hidden"] > 0  # bool where float16 belongs
        if self.rng.random() < 0.35:
            t["mask"] = self.mask(q)
        return t

    def mask(self, q: int) -> np.ndarray:
        r = self.rng.random()
        if r < 0.5:
            return tree_mask(self.rng, q)
        if r < 0.7:
            return self.np.random((q, q)) < 0.5  # arbitrary, often without the diagonal
        if r < 0.85:
            return np.ones((q, self.rng.randint(1, 3 * q + 4)), bool)
        return np.ones((self.rng.randint(1, q + 2), q), bool)

    def structured(self):
        op = self.rng.choice(["forward"] * 4 + ["crop", "relocate", "close", "open", "launch", "", "FORWARD", "ok"])
        sid = self.pick_session()
        header = {"op": op, "session": sid}
        if self.rng.random() < 0.95:
            header["step"] = self.pick_step(sid)
        tensors = None
        if op == "forward" or self.rng.random() < 0.1:
            tensors = self.tensors(self.rng.choice([1, 1, 2, 3, 5, MAX_STEP, MAX_STEP + 1]))
            if self.rng.random() < 0.5:
                header["edits"] = self.pick_edits(sid)
        if op == "crop":
            header["length"] = self.pick_length(sid)
        if op == "relocate":
            edit = (self.pick_edits(sid) or [{"op": "relocate", "start": 0, "indices": []}])
            edit = edit[0] if isinstance(edit, list) and edit else {"start": 0, "indices": [1]}
            header.update({k: v for k, v in edit.items() if k != "op"})
        if self.rng.random() < 0.1:
            header[self.rng.choice(["extra", "tensors", "v", "code", "cloud_ms"])] = self.rng.choice(
                [None, 2, "x", [], {}, 1e308])
        self._last_op = op
        return self.encode(header, tensors), False

    def encode(self, header, tensors):
        v = header.pop("v", protocol.VERSION)
        tensors = tensors or {}
        table, chunks, offset = [], [], 0
        for name, a in tensors.items():
            dtype = "bool" if a.dtype == np.bool_ else "float16"
            data = np.ascontiguousarray(a, protocol.DTYPES[dtype]).tobytes()
            table.append({"name": name, "dtype": dtype, "shape": list(a.shape), "offset": offset, "nbytes": len(data)})
            chunks.append(data)
            offset += len(data)
        full = {"v": v, **header}
        full.setdefault("tensors", table)
        raw = json.dumps(full, allow_nan=True).encode()
        return struct.pack(">I", len(raw)) + raw + b"".join(chunks)

    def valid_forward(self):
        """A well-formed forward (maybe a tree, maybe with sound edits) on one of our sessions."""
        if not self.sessions:
            return self.valid_open()
        sid = self.rng.choice(list(self.sessions))
        state = self.sessions[sid]
        n = state["len"]
        header = {"op": "forward", "session": sid, "step": state["step"] + 1}
        if n > MAX_CONTEXT - MAX_STEP or self.rng.random() < 0.3:
            k = self.rng.randint(0, n)
            if self.rng.random() < 0.5 or n == k:
                header["edits"] = [{"op": "crop", "length": k}]
            else:
                chosen = sorted(self.rng.sample(range(k, n), self.rng.randint(0, min(4, n - k))))
                header["edits"] = [{"op": "relocate", "start": k, "indices": chosen}]
        q = self.rng.randint(1, MAX_STEP)
        t = {"hidden": self.np.standard_normal((1, q, H)).astype(np.float16), **rope(q)}
        if self.rng.random() < 0.5:
            t["mask"] = tree_mask(self.rng, q)
        self._last_op = "forward"
        return protocol.encode(header, t), False

    def valid_open(self):
        self._last_op = "open"
        return protocol.encode({"op": "open", "session": None, "step": 0}), False

    def mutated(self):
        data, _ = (self.valid_forward if self.rng.random() < 0.7 else self.structured)()
        data = bytearray(data)
        r = self.rng.random()
        if r < 0.35:
            for _ in range(self.rng.randint(1, 8)):
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        elif r < 0.55:
            data = data[: self.rng.randrange(len(data))]
        elif r < 0.65:
            data += self.np.bytes(self.rng.randint(1, 64))
        elif r < 0.85:
            n = struct.unpack(">I", data[:4])[0]
            data[:4] = struct.pack(">I", self.rng.choice(
                [0, 1, n - 1, n + 1, len(data), 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, protocol.MAX_HEADER_BYTES + 1]) & 0xFFFFFFFF)
        else:  # splice a piece of one frame into another
            other, _ = self.structured()
            at = self.rng.randrange(len(data))
            data[at:at] = other[: self.rng.randrange(1, len(other))]
        self._last_op = None
        return bytes(data), False

    def raw_header(self):
        def value(depth=0):
            pick = self.rng.random()
            if depth > 2 or pick < 0.5:
                return self.rng.choice([0, -1, 1, 2**31, 2**64, 1.5, -0.0, "", "float16", "hidden", None, True])
            if pick < 0.75:
                return [value(depth + 1) for _ in range(self.rng.randint(0, 4))]
            return {self.rng.choice(["name", "dtype", "shape", "offset", "nbytes", "op", "x"]): value(depth + 1)
                    for _ in range(self.rng.randint(0, 5))}

        entry = {"name": self.rng.choice(["hidden", "cos", "sin", "mask", "ids", value()]),
                 "dtype": self.rng.choice(["float16", "bool", "float32", "int64", "<f2", value()]),
                 "shape": self.rng.choice([[1, 1, H], [1, 2, D], [0], [], [1, -1], [2**24] * 4, [1.5], value()]),
                 "offset": self.rng.choice([0, 1, -1, 2**40, value()]),
                 "nbytes": self.rng.choice([0, 2 * H, 2 * D, -2, 2**40, value()])}
        if self.rng.random() < 0.2:
            del entry[self.rng.choice(list(entry))]
        header = {"v": self.rng.choice([2, 2, 2, 1, 0, "2", None]), "op": self.rng.choice(["forward", "open", "crop", "close"]),
                  "session": self.pick_session(), "step": self.pick_step(None),
                  "tensors": self.rng.choice([[entry], [entry, entry], [], value(), [value()]])}
        self._last_op = header["op"]
        payload = self.np.bytes(self.rng.choice([0, 2, 2 * H, 2 * D, 7, 300]))
        return with_header(json.dumps(header).encode(), payload), False

    def garbage(self):
        n = self.rng.choice([0, 1, 3, 4, 5, 16, 100, 3000])
        data = self.np.bytes(n)
        if self.rng.random() < 0.3 and n >= 4:
            data = struct.pack(">I", self.rng.randint(0, n)) + data[4:]
        self._last_op = None
        return data, False

    def text(self):
        self._last_op = None
        return self.rng.choice(["", "hello", '{"v":2,"op":"open","tensors":[]}', "\u00e9" * 50]), False

    def oversize(self):
        self._last_op = None
        return b"\x00\x00\x00\x02{}" + b"\x00" * (MAX_FRAME + self.rng.randint(1, 4096)), True


def test_fuzzing_never_crashes_the_server_nor_disturbs_an_honest_session(cloud, honest, baseline):
    deadline = time.monotonic() + FUZZ_SECONDS
    shared: list[str] = []
    fuzzers = [Fuzzer(cloud, seed, shared, deadline, FUZZ_FRAMES // 2) for seed in (1, 2)]
    threads = [threading.Thread(target=f.run, name=f"fuzz-{i}") for i, f in enumerate(fuzzers)]
    for t in threads:
        t.start()
    honest_runs = []
    modes = iter(["sequential", "lookahead"] * 100)
    while any(t.is_alive() for t in threads) or not honest_runs:
        mode = next(modes)
        honest_runs.append((mode, honest.generate(mode)))  # concurrently with the fuzzing
    for t in threads:
        t.join()

    sent = sum(f.sent for f in fuzzers)
    codes: dict[str, int] = {}
    for f in fuzzers:
        for code, n in f.codes.items():
            codes[code] = codes.get(code, 0) + n
    print(f"\nfuzz: {sent} frames, {sum(f.closes for f in fuzzers)} closes (1009), "
          f"{sum(f.reconnects for f in fuzzers)} connections, {len(honest_runs)} honest generations; replies {codes}")
    failures = [msg for f in fuzzers for msg in f.failures]
    assert not failures, failures[:10]
    assert sent >= min(FUZZ_FRAMES, 1000)  # enough of them, even on a busy machine
    assert codes.get("result", 0) > 50 and codes.get("opened", 0) > 10  # deep paths were reached too
    assert len(codes) > 12  # and many different refusals
    assert cloud.proc.poll() is None
    for mode, tokens in honest_runs:
        assert tokens == baseline[mode], mode
    for mode in baseline:  # and after it all
        assert honest.generate(mode) == baseline[mode]
    log = cloud.log.read_text()
    assert "Traceback" not in log and "internal error" not in log and "handler failed" not in log
    assert sessions_drain_to_zero(cloud)


def sessions_drain_to_zero(cloud, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(f"{cloud.url}/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).json()
        if body["sessions_open"] == 0:
            return True
        time.sleep(0.2)
    return False


# ------------------------------------------------------------------------------ property-based


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6), inner, max_size=4), max_leaves=12)
tensor_entries = st.fixed_dictionaries({
    "name": st.sampled_from(["hidden", "cos", "sin", "mask"]) | json_values,
    "dtype": st.sampled_from(["float16", "bool"]) | json_values,
    "shape": st.lists(st.integers(min_value=-2, max_value=70), min_size=0, max_size=5) | json_values,
    "offset": st.integers(min_value=-2, max_value=300) | json_values,
    "nbytes": st.integers(min_value=-2, max_value=300) | json_values,
})
headers = st.fixed_dictionaries(
    {
        "v": st.just(protocol.VERSION) | json_values,
        "op": st.sampled_from(sorted(protocol.REQUESTS)) | json_values,
        "tensors": st.lists(tensor_entries, max_size=3) | json_values,
    },
    optional={
        "session": st.none() | st.text(alphabet="0123456789abcdef", min_size=32, max_size=32) | json_values,
        "step": st.integers(min_value=-3, max_value=2**64) | json_values,
        "edits": st.lists(json_values, max_size=3) | json_values,
        "length": json_values, "start": json_values, "indices": json_values,
    },
)


def test_any_header_and_table_get_a_typed_reply(cloud):
    stack = ExitStack()
    state = {"ws": stack.enter_context(open_ws(cloud)), "replies": 0}

    @settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(header=headers, payload=st.binary(max_size=400))
    def one(header, payload):
        data = with_header(json.dumps(header).encode(), payload)
        ask(state["ws"], data)
        state["replies"] += 1

    with stack:
        one()
    assert state["replies"] >= 400 and cloud.proc.poll() is None


def test_tcp_garbage_that_is_not_websocket(cloud):
    port = int(cloud.ws.rsplit(":", 1)[1])
    rng = random.Random(7)
    junk = [b"", b"\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"A" * 70000]
    junk += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2000))) for _ in range(14)]
    for data in junk:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(65536):  # the server answers (an HTTP error) or just closes; it never hangs
                    pass
            except ConnectionResetError:
                pass
    with open_ws(cloud) as ws:
        assert ask(ws, protocol.encode({"op": "open", "session": None, "step": 0})).op == "opened"
    assert cloud.proc.poll() is None
