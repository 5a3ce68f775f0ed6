"""Real processes on loopback: cloud_server_kv.py serving the default model through the real socket."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import requests
from websockets.sync.client import connect

from splitinfer import protocol
from splitinfer.config import Split
from splitinfer.local import LocalSide
from splitinfer.procs import cloud_process
from splitinfer.remote import cloud_session, ws_url

from conftest import hf_greedy

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Tell me a short story about a dragon.",
    "List three fruits and their colors.",
    "Explain how photosynthesis works.",
    "Translate 'good morning' into Spanish and German.",
    "Give me a JSON object describing a cat with name and age.",
    "What's your favourite colour and why?",
]


@pytest.fixture(scope="module")
def cloud(default_model):
    with cloud_process(default_model, threads=1) as (url, proc):
        yield url


@pytest.fixture(scope="module")
def local(default_model):
    return LocalSide(default_model)


def _config(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def test_health_reports_only_cloud_layers(cloud, default_model):
    middle = Split(_config(default_model)["num_hidden_layers"]).cloud_layers  # 2..L-3
    health = requests.get(f"{cloud}/health", timeout=5).json()
    assert health["status"] == "ok" and health["protocol_version"] == protocol.VERSION
    assert health["layers"] == list(middle)
    names = health["held"]["names"]
    assert names and all(n.startswith("model.layers.") for n in names)
    assert {int(n.split(".")[2]) for n in names} == set(middle)
    assert health["sessions_open"] == 0


def test_local_side_holds_no_cloud_layer(local):
    layers = {int(n.split(".")[2]) for n in local.held["names"] if n.startswith("model.layers.")}
    assert layers == {0, 1, 28, 29}
    assert "model.embed_tokens.weight" in local.held["names"]


def test_default_model_matches_hf_generate(cloud, local, default_model):
    """8 prompts x 64 tokens through the real cloud process equal the unsplit model's greedy generate."""
    for prompt in PROMPTS:
        ids = local.encode(prompt)
        want = hf_greedy(default_model, ids, 64, eos=2)
        with cloud_session(ws_url(cloud), expected=local.identity) as span:
            got = local.generate(span, ids, 64).token_ids
        assert got == want, prompt


def raw_request(ws, data: bytes) -> protocol.Frame:
    ws.send(data)
    return protocol.decode(ws.recv(timeout=30), replies=True)


def test_hostile_frames_get_typed_errors_and_the_server_keeps_serving(cloud, local):
    ids = local.encode(PROMPTS[0])
    with cloud_session(ws_url(cloud), expected=local.identity) as span:
        before = local.generate(span, ids, 16).token_ids
    with connect(ws_url(cloud), proxy=None, compression=None, max_size=None) as ws:
        nan = np.zeros((1, 1, _config(local.model_dir)["hidden_size"]), np.float16)
        nan[0, 0, 3] = np.nan
        bad = [
            b"",
            b"\x00\x00",
            b"\xff\xff\xff\xff{}",
            b"\x00\x00\x00\x04{]]]",
            protocol.encode({"op": "launch", "session": None, "step": 1}),
            protocol.encode({"op": "forward", "session": "a" * 32, "step": 1}),
            protocol.encode({"op": "forward", "session": "a" * 32, "step": 1}, {"hidden": nan}),
        ]
        for data in bad:
            reply = raw_request(ws, data)
            assert reply.op == "error" and reply.header["code"] and reply.header["message"]
            assert "Traceback" not in reply.header["message"]
        ws.send("text frame")
        assert protocol.decode(ws.recv(timeout=30), replies=True).header["code"] == "bad_frame"
        opened = raw_request(ws, protocol.encode({"op": "open", "session": None, "step": 0}))
        sid = opened.session
        wrong_shape = {"hidden": np.zeros((1, 2, 575), np.float16), "cos": np.zeros((1, 2, 64), np.float16), "sin": np.zeros((1, 2, 64), np.float16)}
        r = raw_request(ws, protocol.encode({"op": "forward", "session": sid, "step": 1}, wrong_shape))
        assert r.header["code"] == "bad_shape"
    with cloud_session(ws_url(cloud), expected=local.identity) as span:
        assert local.generate(span, ids, 16).token_ids == before


def test_interactive_one_shot_json(cloud, default_model):
    out = subprocess.run(
        [sys.executable, "-m", "splitinfer", "chat", "--cloud", cloud, "--model", str(default_model),
         "--prompt", "Say hello.", "--max-new-tokens", "8", "--json", "--threads", "1", "--mode", "sequential"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(out.stdout)
    assert result["new_tokens"] == len(result["token_ids"]) <= 8
    assert result["steps"] == result["new_tokens"] - 1  # sequential: one token per round trip after the prefill
    assert result["text"] and result["tokens_per_second"] > 0
    step = result["timings"][0]
    assert {"local_before_ms", "local_after_ms", "cloud_ms", "network_ms", "serialize_ms", "wait_ms"} <= set(step)


@pytest.mark.parametrize("mode", ["jacobi", "lookahead"])
def test_speculative_modes_equal_sequential_on_the_default_model(cloud, local, mode):
    for prompt in PROMPTS[:2]:
        ids = local.encode(prompt)
        with cloud_session(ws_url(cloud), expected=local.identity) as span:
            want = local.generate(span, ids, 48).token_ids
        with cloud_session(ws_url(cloud), expected=local.identity) as span:
            got = local.generate(span, ids, 48, mode)
        assert got.token_ids == want, prompt
        assert got.steps == len(got.per_step) and sum(got.per_step) == len(want) - 1


def test_one_request_and_one_reply_per_lookahead_step(cloud, local):
    """Count the WebSocket messages on the real socket: open + prefill + one per step + close, each answered."""
    ids = local.encode("List the numbers from one to twenty, separated by commas.")
    with cloud_session(ws_url(cloud), expected=local.identity) as span:
        counts = {"sent": 0, "received": 0}
        ws = span.conn.ws
        send, recv = ws.send, ws.recv

        def counting_send(data, *a, **k):
            counts["sent"] += 1
            return send(data, *a, **k)

        def counting_recv(*a, **k):
            counts["received"] += 1
            return recv(*a, **k)

        ws.send, ws.recv = counting_send, counting_recv
        g = local.generate(span, ids, 40, "lookahead", max_verify=16)  # pinned: not this CPU's step costs
        during = dict(counts)
    assert max(g.per_step) > 1  # speculation did commit several tokens in some step
    prefill = -(-len(ids) // span.max_step_tokens)
    assert during == {"sent": prefill + g.steps, "received": prefill + g.steps}
