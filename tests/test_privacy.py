"""Structural privacy guarantees, checked on the bytes of the real socket and on the running cloud process.

A zero-delay WAN proxy with a wire tap on it sits between the local side and a real
`cloud_server_kv.py` process; real generations go through it.  Every check below
reads what the tap saw cross the sockets (unmasked WebSocket payloads) or the cloud
process itself (/health, /proc/PID/maps, /proc/PID/mem), never what the code claims
to send.  A check that cannot be made here (no right to read the cloud's memory)
fails with the reason: an unverified privacy claim must not pass as skipped.

What these tests do NOT show: that the activations cannot be inverted.  They can
(see docs/privacy.md and inversion_experiment.py); the guarantee here is only
that no token id, no text, and no vocabulary matrix crosses to or lives on the cloud.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import requests
import torch
from safetensors import safe_open

from splitinfer import protocol
from splitinfer.config import Split
from splitinfer.local import LocalSide
from splitinfer.privacy import wiretap
from splitinfer.privacy.victim import wire_states
from splitinfer.procs import cloud_process
from splitinfer.remote import cloud_session, ws_url

pytestmark = pytest.mark.slow

# Prompts carrying (made-up) personal data: what must never cross in the clear.
PROMPTS = [
    "My name is Agnieszka Wolanski and my e-mail is agnieszka.wolanski@example.org. "
    "Please draft a two-line note asking my landlord to fix the heating.",
    "Call me back on +44 7700 900123 about the appointment for Bartholomew Quist.",
    "Summarise: the patient Ingrid Oyelaran, born 1987-03-14, reports chest pain.",
]
MAX_NEW = 24

# The header keys a request may carry, and what each may hold.
HEADER_KEYS = {"v", "op", "session", "step", "tensors", "edits"}


@pytest.fixture(scope="module")
def local(default_model) -> LocalSide:
    return LocalSide(default_model)


@pytest.fixture(scope="module")
def recorded(default_model, local):
    """Run the prompts through the tapped proxy -> real cloud process; return everything needed afterwards."""
    with cloud_process(default_model, threads=1) as (url, proc):
        health = requests.get(f"{url}/health", timeout=5).json()
        upstream = int(ws_url(url).rsplit(":", 1)[1])
        runs = []
        with wiretap.tapped(upstream) as (tap, port):
            for prompt in PROMPTS:
                ids = local.encode(prompt)
                with cloud_session(f"ws://127.0.0.1:{port}", expected=local.identity) as span:
                    gen = local.generate(span, ids, MAX_NEW, mode="sequential")
                runs.append({"prompt": prompt, "ids": ids, "generated": gen.token_ids, "text": gen.text})
            captures = tap.snapshot()
        maps = wiretap.mapped_files(proc.pid)
        needles = _weight_needles(default_model) + _vocab_needles(local)
        try:
            in_memory = wiretap.memory_contains(proc.pid, [n for _, n in needles])
            memory = {name: hit for (name, _), hit in zip(needles, in_memory)}
        except OSError as exc:  # e.g. no right to read another process's memory (ptrace_scope)
            memory = exc  # kept, so that only the memory checks fail, each with this reason
        yield {"health": health, "runs": runs, "captures": captures, "maps": maps, "memory": memory,
               "vocab_needles": _vocab_needles(local)}


def _weight_needles(model_dir) -> list[tuple[str, bytes]]:
    """256-byte slices of weight rows, as they sit in memory (float32 on CPU, like the cloud loads them)."""
    path = next(model_dir.glob("*.safetensors"))
    out = []
    with safe_open(path, "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight").to(torch.float32)
        for row in (1, 1000, 30000):  # token rows: these must not be in the cloud's memory
            out.append((f"embed_tokens[{row}]", emb[row, 64:128].contiguous().numpy().tobytes()))
        layer = f.get_tensor("model.layers.5.mlp.down_proj.weight").to(torch.float32)  # positive control
        out.append(("layers.5.down_proj[7]", layer[7, 64:128].contiguous().numpy().tobytes()))
    return out


def _vocab_needles(local, n: int = 6) -> list[tuple[str, bytes]]:
    """Long vocabulary entries as a loaded tokenizer holds them (UTF-8, with the byte-level 'Ġ' marker):
    strings that only a tokenizer's vocabulary puts into a process's memory."""
    vocab = sorted((t for t in local.tokenizer.get_vocab() if t.startswith("\u0120") and t[1:].isascii() and t[1:].isalpha()),
                   key=lambda t: (-len(t), t))
    return [(f"vocab:{t}", t.encode("utf-8")) for t in vocab[:n]]


def _cloud_memory(recorded) -> dict[str, bool]:
    """Which needles the scan found in the cloud's memory; fails (never skips) if it could not scan."""
    memory = recorded["memory"]
    if isinstance(memory, Exception):
        pytest.fail(f"cannot read the cloud process's memory, so this privacy claim is unchecked: {memory!r}")
    return memory


def _all_client_bytes(recorded) -> tuple[bytes, list[bytes]]:
    payloads: list[bytes] = []
    raw = b""
    for cap in recorded["captures"]:
        raw += bytes(cap.to_server)
        _, msgs = wiretap.client_messages(cap)
        for opcode, payload in msgs:
            if opcode in (wiretap.OP_BINARY, wiretap.OP_TEXT):
                payloads.append(payload)
    return raw, payloads


def test_the_tap_saw_every_request(recorded):
    """One connection per generation; open + prefill + one forward per new token + close."""
    assert len(recorded["captures"]) == len(PROMPTS)
    for cap, run in zip(recorded["captures"], recorded["runs"]):
        handshake, msgs = wiretap.client_messages(cap)
        assert handshake.startswith(b"GET ") and b"Upgrade: websocket" in handshake
        frames = [protocol.decode(p) for op, p in msgs if op == wiretap.OP_BINARY]
        ops = [f.op for f in frames]
        assert ops[0] == "open" and ops[-1] == "close"
        forwards = [f for f in frames if f.op == "forward"]
        assert sum(f.tensors["hidden"].shape[1] for f in forwards) == len(run["ids"]) + len(run["generated"]) - 1
        _, replies = wiretap.server_messages(cap)
        assert len([p for op, p in replies if op == wiretap.OP_BINARY]) == len(frames)


def test_headers_carry_no_token_ids_or_text(recorded):
    """Every request header matches the protocol's schema: no field where ids or text could ride."""
    _, payloads = _all_client_bytes(recorded)
    assert payloads
    for payload in payloads:
        frame = protocol.decode(payload)
        header = frame.header
        assert set(header) <= HEADER_KEYS, sorted(set(header) - HEADER_KEYS)
        assert header["op"] in protocol.REQUESTS
        assert header.get("session") is None or protocol.SESSION_RE.match(header["session"])
        assert isinstance(header.get("step"), int)
        for entry in header["tensors"]:
            assert entry["name"] in protocol.TENSOR_NAMES and entry["dtype"] in protocol.DTYPES
        for edit in header.get("edits", []):
            assert edit["op"] in ("crop", "relocate")
        assert set(frame.tensors) <= {"hidden", "cos", "sin", "mask"}
        # The JSON itself holds no prompt text and no run of prompt ids.
        raw_header = payload[4 : 4 + protocol.header_length(payload)]
        for run in recorded["runs"]:
            assert not wiretap.find_text(raw_header, run["prompt"]), run["prompt"]
            numbers = json.dumps(header)
            for i in range(len(run["ids"]) - 2):
                assert ",".join(map(str, run["ids"][i : i + 3])) not in numbers.replace(" ", "")


def test_no_prompt_text_or_token_ids_in_the_bytes_sent(recorded):
    """Neither the prompt's UTF-8 (any 8-byte run) nor any 3 consecutive ids (prompt or generated), in
    any integer encoding, occur in the raw TCP bytes or the unmasked WebSocket payloads."""
    raw, payloads = _all_client_bytes(recorded)
    haystacks = {"raw tcp": raw, "unmasked payloads": b"".join(payloads)}
    for run in recorded["runs"]:
        sequence = run["ids"] + run["generated"]
        for where, data in haystacks.items():
            assert not wiretap.find_text(data, run["prompt"]), (where, run["prompt"])
            assert not wiretap.find_text(data, run["text"]), (where, run["text"])  # the generated answer
            assert not wiretap.find_id_runs(data, sequence), (where, wiretap.find_id_runs(data, sequence)[:5])


def test_the_search_would_find_a_leak():
    """The byte searches are not vacuous: the same functions find ids and text planted in a payload."""
    ids = [1, 9690, 198, 2683, 359, 253]
    planted = b"\x00" * 17 + np.asarray(ids[2:5], dtype=">i4").tobytes() + b"noise" + "Wolanski".encode()
    assert ("<i4", 2) not in wiretap.find_id_runs(planted, ids) and (">i4", 2) in wiretap.find_id_runs(planted, ids)
    assert wiretap.find_text(planted, "Agnieszka Wolanski")


def test_hidden_states_are_not_embeddings(recorded, local):
    """No row of any sent hidden tensor equals (in float16) the embedding of any vocabulary token."""
    _, payloads = _all_client_bytes(recorded)
    emb = local.head.embed.weight.detach().to(torch.float16).numpy()
    emb_rows = {row.tobytes() for row in emb}
    n = 0
    for payload in payloads:
        frame = protocol.decode(payload)
        if frame.op == "forward":
            for row in frame.tensors["hidden"][0]:
                assert row.tobytes() not in emb_rows
                n += 1
    assert n > 0


def test_sent_states_are_the_experiments_states(recorded, local):
    """The prefill's hidden tensor on the wire is, bit for bit, what inversion_experiment.py attacks
    (splitinfer.privacy.victim.wire_states at depth 2, the default split)."""
    cap = recorded["captures"][0]
    run = recorded["runs"][0]
    _, msgs = wiretap.client_messages(cap)
    forwards = [protocol.decode(p) for op, p in msgs if op == wiretap.OP_BINARY]
    prefill = next(f for f in forwards if f.op == "forward").tensors["hidden"][0]
    ours = wire_states(local.head, run["ids"])
    assert prefill.shape == ours.shape
    assert np.array_equal(prefill, ours)


def test_health_lists_only_middle_layers(recorded, default_model):
    names = recorded["health"]["held"]["names"]
    assert names and all(n.startswith("model.layers.") for n in names), names
    assert not any(k in n for n in names for k in ("embed", "lm_head", "model.norm"))
    layers = {int(n.split(".")[2]) for n in names}
    n_layers = json.loads((default_model / "config.json").read_text())["num_hidden_layers"]
    assert layers == set(recorded["health"]["layers"]) == set(Split(n_layers).cloud_layers)


def test_cloud_process_holds_no_tokenizer(recorded):
    """No tokenizer vocabulary in the cloud's memory and no tokenizer file mapped, while this (local)
    process, which holds a tokenizer, does have those vocabulary strings in memory (the positive control)."""
    memory = _cloud_memory(recorded)
    cloud_vocab = {name: hit for name, hit in memory.items() if name.startswith("vocab:")}
    assert cloud_vocab and not any(cloud_vocab.values()), cloud_vocab
    needles = recorded["vocab_needles"]
    assert all(wiretap.memory_contains(os.getpid(), [b for _, b in needles])), "the scan cannot see a tokenizer"
    assert not [p for p in recorded["maps"] if p.endswith(("tokenizer.json", "tokenizer_config.json"))]


@pytest.mark.xfail(strict=True, reason=(
    "transformers 5.24/5.25 maps the tokenizers native library into any process that loads a LlamaConfig "
    "(configuration_llama -> utils.type_validators -> tokenization_utils_base -> tokenizers); the cloud "
    "imports the library's code, though it never builds a tokenizer (test_cloud_process_holds_no_tokenizer). "
    "Strict: this starts passing, and must be un-marked, once the cloud stops importing it."))
def test_cloud_process_never_imported_the_tokenizers_library(recorded):
    cloud = recorded["maps"]
    assert any("torch" in p for p in cloud)  # the check reads a live python+torch process
    assert "tokenizers" in sys.modules  # the local side's AutoTokenizer: the library this check looks for
    assert [p for p in wiretap.mapped_files(os.getpid()) if "tokenizers" in p.lower()]
    assert not [p for p in cloud if "/tokenizers/" in p.lower()], [p for p in cloud if "tokenizers" in p.lower()]


def test_cloud_memory_holds_no_embedding_rows(recorded):
    """Slices of embedding rows (the tied embedding = LM head) are nowhere in the cloud's memory, while a
    slice of one of its own layers is (the positive control showing the scan can see weights)."""
    memory = _cloud_memory(recorded)
    assert memory["layers.5.down_proj[7]"], "the scan did not find the cloud's own weights: it is blind"
    leaked = [name for name, hit in memory.items() if name.startswith("embed") and hit]
    assert len([n for n in memory if n.startswith("embed")]) == 3
    assert not leaked, leaked
