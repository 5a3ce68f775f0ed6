"""The cloud states what it computes; a local side refuses a cloud that computes something else.

Unit: the weights digest (the same from the cloud's and the local side's code, changed by one
sampled byte or another layer range, read without loading a tensor), `differences` wording,
the identity's JSON.  Real processes: a cloud with other layers (interactive.py exits non-zero,
the OpenAI API answers 502), a cloud restarted mid-generation with other layers (a mismatch,
not a replay), a cloud with other weights, and a version-1 client refused in version 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from websockets.sync.client import connect

from splitinfer import protocol, remote
from splitinfer.cloud.server import build
from splitinfer.config import Limits, Split
from splitinfer.identity import Identity, of_model, sample_offsets, weights_digest, _read_header
from splitinfer.models import load_config
from splitinfer.procs import cloud_process
from splitinfer.remote import CloudError, check_identity, cloud_session, ws_url

from conftest import cloud_identity, write_tiny
from test_reliability import TINY_PROMPT, Cloud, TinySide

# A stated identity for the wording and JSON tests: any values do (these are the default model's shapes).
DEFAULT = Identity(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_layers=30,
                   first_layer=2, last_layer=27, weights="a" * 64)


def with_changes(identity: Identity, **changes) -> Identity:
    return Identity(**{**identity.__dict__, **changes})


# ------------------------------------------------------------------------------ the digest


@pytest.fixture(scope="module")
def tiny_server(tiny_llama):
    return build(str(tiny_llama), None, None, "cpu", "float32", Limits(), ws_port=0)


def test_the_cloud_states_what_the_local_side_expects(tiny_server, tiny_llama):
    """build() (the cloud's code path) and the local side's computation agree, layer range included."""
    server = tiny_server
    assert server.core.identity == cloud_identity(tiny_llama)
    assert server.core.identity.layers == "2..3" and server.core.identity.num_layers == 6
    frame = protocol.decode(server.core.handle(1, protocol.decode(protocol.encode(
        {"op": "open", "session": None, "step": 0}))), replies=True)
    assert Identity.from_json(frame.header["identity"]) == cloud_identity(tiny_llama)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_one_sampled_byte_changes_the_digest(tiny_llama, tmp_path):
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    cloud = range(2, 4)
    before = weights_digest(model, cloud)
    path = next(model.glob("*.safetensors"))
    entry = _read_header(path)["model.layers.3.mlp.down_proj.weight"]
    assert entry.nbytes > 16 * 64  # sampled in windows, not taken whole

    flip(path, entry.start + sample_offsets(entry.nbytes)[7] + 5)
    assert weights_digest(model, cloud) != before

    # The digest covers the cloud's span only: a local layer's bytes do not enter it.
    flip(path, entry.start + sample_offsets(entry.nbytes)[7] + 5)
    assert weights_digest(model, cloud) == before
    flip(path, _read_header(path)["model.layers.0.mlp.down_proj.weight"].start)
    assert weights_digest(model, cloud) == before


def test_the_layer_range_changes_the_digest(tiny_llama):
    digests = {weights_digest(tiny_llama, layers) for layers in (range(2, 4), range(3, 4), range(2, 3), range(1, 4))}
    assert len(digests) == 4


def test_other_weights_change_the_digest_and_nothing_else(tiny_llama, tmp_path):
    other = write_tiny("llama", tmp_path / "seed1", seed=1)
    assert cloud_identity(other).differences(cloud_identity(tiny_llama)) == [
        f"weights digest {cloud_identity(other).weights[:12]}, expected {cloud_identity(tiny_llama).weights[:12]} "
        "(other weights)"
    ]


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io to count bytes read")
def test_the_digest_reads_samples_not_tensors(default_model):
    """The default model's cloud span is ~370 MB of float32; the digest reads a few hundred KB of it."""
    cloud_layers = Split(load_config(default_model).num_hidden_layers).cloud_layers
    weights_digest(default_model, cloud_layers)  # warm the page cache: the bound below is about time, not disk
    before = read_bytes()
    digest = weights_digest(default_model, cloud_layers)
    read = read_bytes() - before
    assert read < 1 << 20, read
    assert digest == weights_digest(default_model, cloud_layers)


def test_the_identity_is_the_split_of_the_local_side(default_model):
    """What LocalSide-like code expects for a non-default split is that split's cloud layers."""
    config = load_config(default_model)
    split = Split(config.num_hidden_layers, cloud_start=4, cloud_end=-5)
    ident = of_model(default_model, config, split.cloud_layers)
    layers = config.num_hidden_layers
    assert (ident.first_layer, ident.last_layer, ident.num_layers) == (4, layers - 5, layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert (ident.hidden_size, ident.num_attention_heads, ident.num_key_value_heads, ident.head_dim) == (
        config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim)


# ------------------------------------------------------------------------------ wording and JSON


def test_differences_say_what_differs():
    assert DEFAULT.differences(DEFAULT) == []
    assert with_changes(DEFAULT, first_layer=3).differences(DEFAULT) == ["layers 3..27, expected 2..27"]
    assert with_changes(DEFAULT, last_layer=26, weights="b" * 64).differences(DEFAULT) == [
        "layers 2..26, expected 2..27"  # another range always has another digest: not worth a second phrase
    ]
    assert with_changes(DEFAULT, weights="b" * 64).differences(DEFAULT) == [
        "weights digest bbbbbbbbbbbb, expected aaaaaaaaaaaa (other weights)"
    ]
    other = with_changes(DEFAULT, hidden_size=64, num_key_value_heads=2, head_dim=16, num_layers=6, last_layer=3)
    assert other.differences(DEFAULT) == [
        "hidden size 64, expected 576", "kv heads 2, expected 3", "head dim 16, expected 64",
        "model layers 6, expected 30", "layers 2..3, expected 2..27",
    ]


def test_identity_json_round_trip_and_rejections():
    body = DEFAULT.to_json()
    assert body["layers"] == [2, 27] and Identity.from_json(json.loads(json.dumps(body))) == DEFAULT
    for bad in (
        None, [], {**body, "extra": 1}, {k: v for k, v in body.items() if k != "weights"},
        {**body, "layers": [27, 2]}, {**body, "layers": [2, 30]}, {**body, "layers": [2]},
        {**body, "hidden_size": True}, {**body, "hidden_size": 0}, {**body, "weights": "A" * 64},
        {**body, "weights": "a" * 64 + "\n"}, {**body, "weights": "a" * 63},
    ):
        with pytest.raises(ValueError):
            Identity.from_json(bad)


def test_check_identity_errors():
    check_identity("ws://c", DEFAULT.to_json(), DEFAULT)
    for stated, code, words in (
        (with_changes(DEFAULT, first_layer=3).to_json(), "mismatch", "layers 3..27, expected 2..27"),
        (None, "mismatch", "does not state"),
        ({"layers": "all"}, "bad_reply", "malformed identity"),
    ):
        with pytest.raises(CloudError) as e:
            check_identity("ws://c", stated, DEFAULT)
        assert e.value.code == code and words in str(e.value)


def test_a_mismatch_is_never_retried():
    for code in ("mismatch", "version"):
        assert code not in remote.SESSION_LOST and code not in remote.RETRY_WHILE_RECONNECTING


# ------------------------------------------------------------------------------ real processes


@pytest.fixture(scope="module")
def shifted_cloud(default_model, tmp_path_factory):
    """The default model's cloud started with --cloud-start 3: layers 3..27 where the local side expects 2..27."""
    log = tmp_path_factory.mktemp("shifted") / "cloud.log"
    with cloud_process(default_model, threads=1, extra=["--cloud-start", "3"], log_file=log) as (url, _):
        yield url


@pytest.mark.slow
def test_interactive_refuses_a_cloud_with_other_layers(shifted_cloud, default_model):
    done = subprocess.run(
        [sys.executable, "-m", "splitinfer", "chat", "--cloud", shifted_cloud, "--model", str(default_model),
         "--prompt", "Say hello.", "--max-new-tokens", "4", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "mismatch" in errors[0] and "layers 3..27, expected 2..27" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout.strip() == ""


@pytest.mark.slow
def test_the_openai_api_answers_502_for_a_cloud_with_other_layers(shifted_cloud, default_model):
    from splitinfer.local import LocalSide
    from splitinfer.serve import create_app

    app = create_app(LocalSide(default_model), ws_url(shifted_cloud), cloud_http_url=shifted_cloud)
    client = app.test_client()
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 4})
    assert r.status_code == 502
    error = r.get_json()["error"]
    assert error["code"] == "cloud_mismatch" and "layers 3..27, expected 2..27" in error["message"]
    health = client.get("/health")  # the local server's health says the same, from the cloud's /health
    assert health.status_code == 503
    assert any("layers 3..27, expected 2..27" in p for p in health.get_json()["problems"])


@pytest.fixture(scope="module")
def tiny_side(tiny_llama):
    return TinySide(tiny_llama)


@pytest.mark.slow
def test_a_cloud_restarted_with_other_layers_is_a_mismatch_not_a_replay(tiny_llama, tiny_side, tmp_path):
    cloud = Cloud(tiny_llama, log_file=tmp_path / "cloud.log").start()
    restarted = []

    def restart_with_one_layer_less(out):
        if len(out) >= 5 and not restarted:
            cloud.kill()
            cloud.cmd += ["--cloud-end", "2"]  # the same ports, layers 2..2 instead of 2..3
            cloud.start(wait=False)  # the span reconnects while the new process loads
            restarted.append(True)

    try:
        with cloud_session(cloud.ws, expected=tiny_side.identity, reconnect_timeout=120.0) as span:
            with pytest.raises(CloudError) as e:
                tiny_side.generate(span, TINY_PROMPT, 20, on_tokens=restart_with_one_layer_less)
        assert restarted and e.value.code == "mismatch"
        assert "after reconnecting" in e.value.message and "layers 2..2, expected 2..3" in e.value.message
        assert span.replayed_tokens == 0 and span.recoveries == 0  # nothing was replayed into the other layers
        health = requests.get(f"{cloud.url}/health", timeout=5).json()
        assert health["identity"]["layers"] == [2, 2]
    finally:
        cloud.stop()


@pytest.mark.slow
def test_a_cloud_with_other_weights_is_a_mismatch(tiny_llama, tmp_path):
    other = write_tiny("llama", tmp_path / "seed1", seed=1)
    with cloud_process(other, threads=1, log_file=tmp_path / "cloud.log") as (url, _):
        assert requests.get(f"{url}/health", timeout=5).json()["identity"] == cloud_identity(other).to_json()
        with pytest.raises(CloudError) as e:
            with cloud_session(ws_url(url), expected=cloud_identity(tiny_llama)):
                pass
        assert e.value.code == "mismatch" and "weights digest" in e.value.message and "layers" not in e.value.message
        with cloud_session(ws_url(url), expected=cloud_identity(other)) as span:  # its own local side is served
            assert span.session


# A version-1 `open`, byte for byte as a version-1 client sends it.
V1_OPEN = b'{"v":1,"op":"open","session":null,"step":0,"tensors":[]}'


def test_the_server_answers_a_version_1_frame_in_version_1(tiny_server):
    held = len(tiny_server.core.sessions)
    reply = tiny_server._reply(1, len(V1_OPEN).to_bytes(4, "big") + V1_OPEN).result(timeout=30)
    frame = protocol.decode(reply, replies=True, version=1)
    assert frame.op == "error" and frame.header["code"] == "version"
    assert len(tiny_server.core.sessions) == held  # refused: no session opened


@pytest.mark.slow
def test_a_version_1_client_reads_a_typed_version_error(tiny_llama, tmp_path):
    with cloud_process(tiny_llama, threads=1, log_file=tmp_path / "cloud.log") as (url, _):
        with connect(ws_url(url), proxy=None, compression=None, open_timeout=15) as ws:
            ws.send(len(V1_OPEN).to_bytes(4, "big") + V1_OPEN)
            reply = ws.recv(timeout=30)
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(reply, replies=True)  # not version 2 ...
    frame = protocol.decode(reply, replies=True, version=1)  # ... but exactly what a version-1 decoder reads
    assert frame.op == "error" and frame.header["code"] == "version"
    assert "version 1" in frame.header["message"] and "version 2" in frame.header["message"]
