"""Faults between the local side and the cloud: the generation survives them, token for token.

A `RemoteSpan` records the float16 rows behind every cloud cache entry and, when
its session or connection is lost, reconnects, replays them into a new session
and re-sends the request (remote/recovery.py).  Here:

* in process, against a `CloudCore`, with faults injected at random requests
  (connection dropped before or after the cloud ran the frame, session expired,
  reply timed out, reconnects refused): the rebuilt cache equals the original;
* over real sockets: the cloud process killed with SIGKILL and restarted on the
  same ports, the link cut in the WAN emulator, the session expired by the
  server's idle timeout; each generation equals an uninterrupted one;
* a cloud that stays down gives a CloudError within the reconnect timeout.
"""

from __future__ import annotations

import copy
import itertools
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from splitinfer import hf, protocol, remote
from splitinfer.cloud.sessions import CloudCore
from splitinfer.config import Limits, Split
from splitinfer.decoding.drive import drive
from splitinfer.decoding.lookahead import Memory
from splitinfer.decoding.strategies import STRATEGIES
from splitinfer.engine import SplitModel
from splitinfer.models import load_config
from splitinfer.parts import load_cloud, load_local
from splitinfer.procs import free_port, wait_healthy
from splitinfer.remote import CloudError, RemoteSpan, WireTiming, cloud_session, recovery
from splitinfer.wan import Forward, Link, WanEmulator

from conftest import cloud_identity
from test_cloud_core import entries

TINY_PROMPT = [5, 6, 7, 8, 9] * 4 + [10, 11]  # repetitive, so lookahead finds guesses and relocates paths
MODES = ["sequential", "lookahead", "jacobi"]


class TinySide:
    """The local layers of a tiny model (no tokenizer needed): token ids in, greedy token ids out."""

    def __init__(self, model_dir: Path):
        split = Split(load_config(model_dir).num_hidden_layers)  # cloud 2..L-3, as the server's default
        self.head, self.tail, _, _ = load_local(model_dir, split, "cpu", torch.float32)
        self.identity = cloud_identity(model_dir, split.cloud_layers)

    def generate(self, span, prompt: list[int], n: int, mode: str = "sequential", on_tokens=None, **options) -> list[int]:
        lm = SplitModel(self.head, self.tail, span, torch.float32)
        strategy = STRATEGIES[mode](Memory(), **options)
        out: list[int] = []
        for step in drive(strategy(lm, prompt, n, frozenset()), lm):
            out += step.tokens
            if on_tokens is not None:
                on_tokens(out)
        return out


class CountingRelocations:
    """Wraps span.relocate to count relocations (the engine relocates only for non-prefix paths)."""

    def __init__(self, span: RemoteSpan):
        self.count, self._relocate = 0, span.relocate
        span.relocate = self

    def __call__(self, start, indices):
        self.count += 1
        self._relocate(start, indices)


# ------------------------------------------------------------------------------ in process, exact


class CoreLink:
    """Stands in for CloudConnection: frames go through the wire format to an in-process CloudCore.

    `fault()` is asked before every request and may answer "drop_before" (the request never
    arrives), "drop_after" (the cloud ran it, the reply is lost), "expire" (the session is
    gone) or "timeout" (the reply comes too late); `refuse()` is asked on every reconnect.
    """

    ids = itertools.count(1)

    def __init__(self, core: CloudCore, fault, refuse):
        self.core, self.fault, self.refuse = core, fault, refuse
        self.conn = next(CoreLink.ids)
        self.url, self.open_timeout, self.reply_timeout = "core://test", 1.0, 1.0
        self.max_frame_bytes = None
        self.closed = False

    def request(self, header, tensors=None, *, timeout=None):
        if self.closed:
            raise CloudError("disconnected", "closed")
        fault = self.fault() if header["op"] == "forward" else None
        if fault == "drop_before":
            self.close()
            raise CloudError("disconnected", "request lost")
        if fault == "expire":
            self.core.sessions.pop(header["session"], None)
        reply = self.core.handle(self.conn, protocol.decode(protocol.encode(header, tensors)))
        if fault == "drop_after":
            self.close()
            raise CloudError("disconnected", "reply lost")
        if fault == "timeout":
            raise CloudError("timeout", "no reply in time")
        frame = protocol.decode(reply, replies=True)
        if frame.op == "error":
            raise CloudError(frame.header["code"], frame.header["message"])
        return frame, WireTiming(0.0, 0.0, 0.0, 0, 0)

    def open_raw(self, *, expected):
        frame, _ = self.request({"op": "open", "session": None, "step": 0})
        if expected is not None:
            remote.check_identity(self.url, frame.header.get("identity"), expected)
        return frame.session, frame.header["limits"]

    def reconnect(self, open_timeout=None):
        if self.refuse():
            raise CloudError("unreachable", "connection refused")
        return CoreLink(self.core, self.fault, self.refuse)

    def close(self):
        self.closed = True
        self.core.drop_connection(self.conn)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The machine is shared and small: one thread here, one in each cloud process (--threads 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_core(tiny_llama):
    span, config, _ = load_cloud(tiny_llama, Split(6), "cpu", torch.float32)
    # A small step limit makes the prefill and every replay several chunks.
    limits = Limits(max_step_tokens=16, max_context=512)
    return CloudCore(span, config, "cpu", torch.float32, limits, cloud_identity(tiny_llama))


@pytest.fixture(scope="module")
def tiny_side(tiny_llama):
    return TinySide(tiny_llama)


def settled(core: CloudCore, span: RemoteSpan):
    """The span's cloud cache with the edits it has queued (they ride on its next forward) applied."""
    cache = copy.deepcopy(core.sessions[span.session].cache)
    for edit in span._edits:
        if edit["op"] == "crop":
            cache.crop(edit["length"])
        else:
            cache.relocate(edit["start"], edit["indices"])
    return cache


def span_on(core, fault=lambda: None, refuse=lambda: False) -> RemoteSpan:
    link = CoreLink(core, fault, refuse)
    session, limits = link.open_raw(expected=core.identity)
    return RemoteSpan(link, session, limits, expected=core.identity, reconnect_timeout=30.0)


@pytest.mark.parametrize("mode", MODES)
def test_rebuilt_cache_equals_the_original_under_random_faults(tiny_core, tiny_side, mode, monkeypatch):
    monkeypatch.setattr(recovery, "_BACKOFF_FIRST_S", 0.001)  # the backoff itself is not under test here
    monkeypatch.setattr(recovery, "_BACKOFF_MAX_S", 0.01)
    # A pinned tree size keeps lookahead's trees independent of step times (the recoveries are slow).
    options = {"max_verify": 12} if mode == "lookahead" else {}
    clean = span_on(tiny_core)
    want = tiny_side.generate(clean, TINY_PROMPT, 120, mode, **options)

    rng = random.Random(f"faults-{mode}")
    kinds = ["drop_before", "drop_after", "expire", "timeout"]
    faulty = span_on(
        tiny_core,
        fault=lambda: rng.choice(kinds) if rng.random() < 0.15 else None,
        refuse=lambda: rng.random() < 0.3,
    )
    relocations = CountingRelocations(faulty)
    got = tiny_side.generate(faulty, TINY_PROMPT, 120, mode, **options)

    assert got == want
    assert faulty.recoveries >= 5 and faulty.replayed_tokens > 0
    if mode == "lookahead":
        assert relocations.count > 0  # relocated paths were part of what got replayed
    # Each record mirrors its cloud cache, and the rebuilt cache is the original's, entry for entry
    # (up to the float rounding of computing in other chunks).
    a, b = settled(tiny_core, clean), settled(tiny_core, faulty)
    assert a.length == b.length == clean._record.length == faulty._record.length
    assert a.length >= len(TINY_PROMPT) + 119
    for (ka, va), (kb, vb) in zip(entries(a), entries(b)):
        torch.testing.assert_close(ka, kb, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(va, vb, atol=1e-4, rtol=1e-4)
    for span in (clean, faulty):
        span.close()
    assert not tiny_core.sessions


def test_errors_that_are_not_a_lost_session_are_not_retried(tiny_core, tiny_side):
    span = span_on(tiny_core)
    span.max_step_tokens = 64  # claim more than the cloud's 16: the cloud refuses the prefill
    with pytest.raises(CloudError) as e:
        tiny_side.generate(span, TINY_PROMPT * 2, 4)
    assert e.value.code == "limit" and span.recoveries == 0
    span.close()


def test_recovery_off_surfaces_the_loss(tiny_core, tiny_side):
    span = span_on(tiny_core, fault=lambda: "drop_before")
    span.reconnect_timeout = None
    with pytest.raises(CloudError) as e:
        tiny_side.generate(span, TINY_PROMPT, 4)
    assert e.value.code == "disconnected"


# ------------------------------------------------------------------------------ real processes


class Cloud:
    """A cloud_server_kv.py process on fixed ports that a test can kill -9 and start again."""

    def __init__(self, model: Path, extra: list[str] | None = None, log_file: Path | None = None):
        self.port = free_port(pair=True)
        self.url, self.ws = f"http://127.0.0.1:{self.port}", f"ws://127.0.0.1:{self.port + 1}"
        self.cmd = [
            sys.executable, "-m", "splitinfer", "cloud", "--model", str(model), "--threads", "1",
            "--port", str(self.port), "--ws-port", str(self.port + 1), *(extra or []),
        ]
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "Cloud":
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        if wait:
            wait_healthy(self.url, self.proc)
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def sessions_open(self) -> int:
        return requests.get(f"{self.url}/health", timeout=5).json()["sessions_open"]


@pytest.fixture(scope="module")
def tiny_cloud(tiny_llama, tmp_path_factory):
    cloud = Cloud(tiny_llama, log_file=tmp_path_factory.mktemp("tiny-cloud") / "cloud.log").start()
    yield cloud
    cloud.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "lookahead"])
def test_wan_link_cut_mid_generation(tiny_cloud, tiny_side, mode):
    with WanEmulator(Link(), [Forward(0, "127.0.0.1", tiny_cloud.port + 1)]).running() as wan:
        url = f"ws://127.0.0.1:{wan.addresses[0][1]}"
        with cloud_session(url, expected=tiny_side.identity) as span:
            want = tiny_side.generate(span, TINY_PROMPT, 100, mode)
        cuts = {20, 50, 80}

        def cut(out):
            if cuts and len(out) >= min(cuts):
                cuts.discard(min(cuts))
                wan.cut()

        with cloud_session(url, expected=tiny_side.identity) as span:
            got = tiny_side.generate(span, TINY_PROMPT, 100, mode, on_tokens=cut)
        assert got == want
        assert span.recoveries == 3
    assert tiny_cloud.sessions_open() == 0  # the cut connections took their sessions with them


@pytest.mark.slow
def test_session_expiry_mid_generation(tiny_llama, tiny_side, tmp_path):
    cloud = Cloud(tiny_llama, ["--idle-timeout", "1"], tmp_path / "cloud.log").start()
    try:
        with cloud_session(cloud.ws, expected=tiny_side.identity) as span:
            want = tiny_side.generate(span, TINY_PROMPT, 60, "lookahead")
        paused = []

        def pause(out):
            if len(out) >= 30 and not paused:
                paused.append(True)
                time.sleep(2.5)  # idle past the timeout: the server drops the session and frees its cache
                assert cloud.sessions_open() == 0

        with cloud_session(cloud.ws, expected=tiny_side.identity) as span:
            got = tiny_side.generate(span, TINY_PROMPT, 60, "lookahead", on_tokens=pause)
        assert got == want and span.recoveries >= 1
        assert "expired 1 idle session" in (tmp_path / "cloud.log").read_text()
    finally:
        cloud.stop()


@pytest.mark.slow
def test_a_cloud_that_stays_down_fails_within_the_reconnect_timeout(tiny_llama, tiny_side, tmp_path):
    cloud = Cloud(tiny_llama, log_file=tmp_path / "cloud.log").start()
    killed = []

    def kill(out):
        if len(out) >= 10 and not killed:
            cloud.kill()
            killed.append(time.monotonic())

    reconnect_timeout = 2.0
    try:
        with cloud_session(cloud.ws, expected=tiny_side.identity, reconnect_timeout=reconnect_timeout) as span:
            with pytest.raises(CloudError) as e:
                tiny_side.generate(span, TINY_PROMPT, 100, on_tokens=kill)
        elapsed = time.monotonic() - killed[0]
        assert e.value.code == "unreachable" and "gave up" in str(e.value)
        # Not before the timeout; after it, only the loss's detection (attempts are cut to the time left): < 3x.
        assert reconnect_timeout <= elapsed < 3 * reconnect_timeout, elapsed
        with pytest.raises(CloudError) as e:  # and a new session fails at once
            with cloud_session(cloud.ws, expected=tiny_side.identity):
                pass
        assert e.value.code == "unreachable"
    finally:
        cloud.stop()


@pytest.fixture(scope="module")
def default_side(default_model):
    from splitinfer.local import LocalSide

    return LocalSide(default_model)


@pytest.fixture(scope="module")
def default_cloud(default_model, tmp_path_factory):
    cloud = Cloud(default_model, log_file=tmp_path_factory.mktemp("cloud") / "cloud.log").start()
    yield cloud
    cloud.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "lookahead"])
def test_cloud_killed_and_restarted_mid_generation(default_cloud, default_side, mode):
    """kill -9 the cloud mid-generation and start it again on the same ports: the same tokens come out."""
    ids = default_side.encode("Count from 1 to 20, separated by commas.")

    def options() -> dict:
        # A pinned tree and fresh memory: the cost-chosen tree size follows this machine's timings,
        # so without them whether (and when) a relocation happens would depend on the CPU.
        return {"max_verify": 16, "memory": Memory()} if mode == "lookahead" else {}

    with cloud_session(default_cloud.ws, expected=default_side.identity) as span:
        relocations = CountingRelocations(span)
        want = default_side.generate(span, ids, 40, mode, **options()).token_ids
    assert mode == "sequential" or relocations.count >= 2, "the prompt no longer relocates the cache: pick another"
    produced, restarted = [0], []

    with cloud_session(default_cloud.ws, expected=default_side.identity, reconnect_timeout=180.0) as span:
        relocations = CountingRelocations(span)

        def kill_and_restart(chunk):
            produced[0] += len(chunk)
            ready = produced[0] >= 12 and (mode == "sequential" or relocations.count >= 1)
            if ready and not restarted:
                default_cloud.kill()
                default_cloud.start(wait=False)  # the span reconnects while the new process loads its layers
                restarted.append(True)

        got = default_side.generate(span, ids, 40, mode, on_tokens=kill_and_restart, **options()).token_ids
    assert restarted and span.recoveries == 1 and span.replayed_tokens >= len(ids) + 11
    assert got == want
    wait_healthy(default_cloud.url, default_cloud.proc)
    assert default_cloud.sessions_open() == 0
