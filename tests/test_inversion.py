"""The inversion attackers on a tiny random model: real attacks, tiny sizes, seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from splitinfer.privacy import metrics, report
from splitinfer.privacy.attackers import MLPClassifier, OutputReader, RidgeNN, TableNN, WhiteBox, WhiteBoxConfig
from splitinfer.privacy.experiment import Settings, run
from splitinfer.privacy.defences import LINEAR_NAMES, lora_finetune, perturb_layers
from splitinfer.privacy.public import DTYPE, PrefixKV, Public
from splitinfer.privacy.victim import TapSpan, load_victim, wire_states
from splitinfer.privacy.wiretap import OP_BINARY, Capture, client_messages, find_id_runs, parse_frames, server_messages, tapped

from conftest import split_model


@pytest.fixture(scope="module")
def public(tiny_llama) -> Public:
    torch.set_num_threads(1)
    return Public(tiny_llama)


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_wire_states_are_what_the_split_model_sends(tiny_llama):
    """The states the experiment attacks equal, bit for bit, what SplitModel hands to its span (float16)."""
    ids = random_ids(12, 96, 1)
    head, _, _ = load_victim(tiny_llama, 2)
    ours = wire_states(head, ids)
    lm = split_model(tiny_llama, cloud_start=2)
    sent = []
    inner = lm.span.forward
    lm.span.forward = lambda hidden, cos, sin, block: (sent.append(hidden[0].to(torch.float16).numpy()), inner(hidden, cos, sin, block))[1]
    lm.forward(ids)
    assert np.array_equal(sent[0], ours)


def test_public_states_equal_the_victims_without_a_defence(tiny_llama, public):
    ids = random_ids(10, 96, 2)
    for k in (1, 2, 4):
        head, _, _ = load_victim(tiny_llama, k)
        assert np.array_equal(public.states(ids, [k])[k], wire_states(head, ids))


def test_whitebox_recovers_random_tokens_from_layer_2(tiny_llama, public):
    """Exact matching with the public weights recovers a random-token sequence from depth-2 float16 states,
    with no ranker and no language model to help: the whole vocabulary is the fallback."""
    ids = random_ids(16, public.vocab_size, 3)
    head, _, _ = load_victim(tiny_llama, 2)
    observed = wire_states(head, ids)
    recovered, info = WhiteBox(public, 2, config=WhiteBoxConfig(use_lm=False)).attack(observed)
    assert recovered == ids
    assert info["verdicts"] == {"match": len(ids)}
    assert info["median_distance"] < 2.0**-11 * 2


def test_whitebox_with_rankers_and_lm_at_depth_4(tiny_llama, public):
    ids = random_ids(12, public.vocab_size, 4)
    head, _, _ = load_victim(tiny_llama, 4)
    observed = wire_states(head, ids)
    table = TableNN(public.vocab_table([4])[4])
    recovered, info = WhiteBox(public, 4, [table.scores]).attack(observed)
    assert recovered == ids


def test_whitebox_is_not_fooled_into_matching_perturbed_weights(tiny_llama, public):
    """Against perturbed local layers nothing matches within the float16 floor: every verdict is a fallback."""
    ids = random_ids(8, public.vocab_size, 5)
    head, _, _ = load_victim(tiny_llama, 2)
    perturb_layers(list(head.span.layers), 0.3, 4, 0)
    observed = wire_states(head, ids)
    recovered, info = WhiteBox(public, 2, config=WhiteBoxConfig(use_lm=False, ratio=0.5)).attack(observed)
    assert "match" not in info["verdicts"]
    assert len(recovered) == len(ids)


def _finetuned(tiny_llama, steps: int, seed: int = 0):
    head, tail, _, cloud = load_victim(tiny_llama, 2, with_cloud=True)
    seqs = [random_ids(32, 96, 200 + i) for i in range(8)]
    info = lora_finetune(head, cloud, tail, seqs, steps, rank=4, lr=1e-2, batch=4, seq_len=16, seed=seed)
    return head, info


def _head_weights(head) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in head.span.named_parameters() if n.split(".")[-2] in LINEAR_NAMES}


def test_lora_finetune_changes_the_head_and_keeps_the_loss(tiny_llama, public):
    """The trained defence moves every adapted weight, the sent states leave the public head's, and the
    whole-model loss it trains does not blow up; the public weights themselves are untouched."""
    torch.set_num_threads(1)
    head, info = _finetuned(tiny_llama, 15)
    fresh, _, _ = load_victim(tiny_llama, 2)
    tuned, public_w = _head_weights(head), _head_weights(fresh)
    assert tuned and all(not torch.equal(tuned[n], public_w[n]) for n in tuned)
    assert info["matrices"] == len(tuned) and info["relative_weight_change_mean"] > 0
    assert info["state_distance_before"] == 0.0 and info["state_distance_after"] > 0.01
    assert info["ce_after"] <= info["ce_before"] * 1.05
    ids = random_ids(10, 96, 9)
    assert not np.array_equal(public.states(ids, [2])[2], wire_states(head, ids))


def test_lora_finetune_without_the_push_lowers_the_loss(tiny_llama):
    head, tail, _, cloud = load_victim(tiny_llama, 2, with_cloud=True)
    seqs = [random_ids(32, 96, 300 + i) for i in range(8)]
    info = lora_finetune(head, cloud, tail, seqs, 20, rank=4, lr=1e-2, away_weight=0.0, batch=4, seq_len=16)
    assert info["ce_after"] < info["ce_before"]


def test_lora_finetune_is_deterministic(tiny_llama):
    a, info_a = _finetuned(tiny_llama, 4, seed=3)
    b, info_b = _finetuned(tiny_llama, 4, seed=3)
    c, _ = _finetuned(tiny_llama, 4, seed=4)
    wa, wb, wc = _head_weights(a), _head_weights(b), _head_weights(c)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    assert any(not torch.equal(wa[n], wc[n]) for n in wa)
    assert info_a["ce_after"] == info_b["ce_after"]


def test_prefix_cache_adopt_matches_a_fresh_forward(public):
    """Adopting a candidate's keys/values from a batch gives the same cache as running the token alone."""
    ids = random_ids(5, public.vocab_size, 6)
    a = PrefixKV()
    for t in ids:
        states, view = public.candidate_states(torch.tensor([t, (t + 1) % public.vocab_size]), a, 2)
        a.adopt(view, 0)
    full = public.states(ids, [2])[2]
    assert np.allclose(states[0].numpy(), full[-1].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_mlp_and_ridge_train_and_score(tiny_llama, public):
    """The learned attackers fit on (state -> token) pairs and score far above chance on their training data."""
    seqs = [random_ids(24, public.vocab_size, 100 + i) for i in range(40)]
    X = np.concatenate([public.states(s, [1])[1] for s in seqs])
    Y = [t for s in seqs for t in s]
    mlp = MLPClassifier(hidden=64, epochs=30, lr=1e-2, batch=64).fit(X, Y)
    assert mlp.info["classes"] <= public.vocab_size and mlp.info["train_accuracy"] > 0.5
    test = random_ids(24, public.vocab_size, 7)
    obs = public.states(test, [1])[1]
    pred = mlp.predict(obs)
    correct, n, _ = metrics.score(test, pred)
    assert len(pred) == n and correct / n > 3 / public.vocab_size  # chance is 1/96
    ridge = RidgeNN(public.embed.weight).fit(X, Y)
    correct_r, _, _ = metrics.score(test, ridge.predict(obs))
    assert correct_r / n > 3 / public.vocab_size


def test_output_reader_reads_generated_tokens(tiny_llama, public):
    """The cloud, applying the public tail + LM head to what it returns, reads the greedy tokens exactly."""
    from splitinfer.decoding import run as drain
    from splitinfer.decoding.sequential import sequential
    from splitinfer.engine import SplitModel
    from splitinfer.testing import InProcessSpan

    head, tail, split, cloud = load_victim(tiny_llama, 2, with_cloud=True)
    tap = TapSpan(InProcessSpan(cloud, DTYPE))
    prompt = random_ids(6, public.vocab_size, 8)
    gen = drain(sequential(SplitModel(head, tail, tap, DTYPE), prompt, 10, frozenset())).tokens
    returned = np.concatenate(tap.returned)
    read = OutputReader(public, split.tail_layers.start).read(returned)[len(prompt) - 1 : len(prompt) - 1 + len(gen)]
    assert read == gen


def test_bootstrap_summary():
    recs = [{"correct": c, "n": 10, "exact": c == 10, "seconds": 0.1} for c in (10, 10, 5, 0)]
    s = metrics.summarise(recs, n_boot=200)
    assert s["token_accuracy"]["mean"] == pytest.approx(25 / 40)
    lo, hi = s["token_accuracy"]["ci95"]
    assert 0 <= lo <= 25 / 40 <= hi <= 1
    assert s["exact_sequence_rate"]["mean"] == 0.5


def test_websocket_frame_parser_unmasks():
    payload = b"\x00\x01hello frames"
    key = b"\x11\x22\x33\x44"
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    frame = bytes([0x82, 0x80 | len(payload)]) + key + masked
    cap = Capture(to_server=bytearray(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n" + frame))
    _, msgs = client_messages(cap)
    assert msgs == [(2, payload)]
    assert find_id_runs(np.asarray([5, 6, 7], "<i8").tobytes(), [4, 5, 6, 7]) == [("<i8", 1)]
    assert parse_frames(bytes([0x82, 0x03]) + b"abc") [0].payload == b"abc"


def test_the_tap_records_what_crosses_the_wan_proxy():
    """The wire tap on the WAN proxy keeps each connection's real bytes: a WebSocket session through it
    parses back into the binary messages sent (unmasked) and the replies."""
    import threading

    from websockets.sync.client import connect
    from websockets.sync.server import serve

    def echo(ws) -> None:
        for message in ws:
            ws.send(message)

    with serve(echo, "127.0.0.1", 0, compression=None) as server:  # as the cloud: no permessage-deflate
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with tapped(server.socket.getsockname()[1]) as (tap, port):
            for payload in (b"\x00\x01first", b"second" * 100):
                with connect(f"ws://127.0.0.1:{port}", proxy=None, compression=None) as ws:
                    ws.send(payload)
                    assert ws.recv() == payload
            captures = tap.snapshot()
        server.shutdown()
    assert len(captures) == 2
    for cap, payload in zip(captures, (b"\x00\x01first", b"second" * 100)):
        handshake, sent = client_messages(cap)
        assert handshake.startswith(b"GET ") and (OP_BINARY, payload) in sent
        assert payload not in bytes(cap.to_server)  # masked on the wire: the parser did the unmasking
        assert (OP_BINARY, payload) in server_messages(cap)[1]

def test_quick_experiment_end_to_end(tiny_llama, tmp_path):
    """The whole sweep on the tiny model (random text only: it has no tokenizer): JSON, tables, figure."""
    settings = Settings.quick(threads=1, n_per_kind=2, random_tokens=8, train_tokens=600, ranker_random_tokens=300,
                              defence_n_per_kind=1, output_n_per_kind=1, output_new_tokens=6, n_boot=50)
    data = run(tiny_llama, settings, progress=False)
    wb = [r for r in data["summary"] if r["attacker"] == "whitebox" and r["defence"] == "none" and r["kind"] == "all"]
    assert wb and all(r["token_accuracy"]["mean"] == 1.0 for r in wb)
    assert any(r["direction"] == "output" for r in data["records"])
    steps = settings.finetune_steps[0]
    ft = [r for r in data["summary"] if r["defence"] == f"finetune:{steps}" and r["kind"] == "all"]
    assert {r["attacker"] for r in ft} == set(settings.attackers) | {"output"}
    assert any(q["defence"] == f"finetune:{steps}" for q in data["quality"])
    assert data["finetune"][str(steps)]["relative_weight_change_mean"] > 0
    assert f"attack_finetune_{steps}" in data["seconds"]
    data["command"] = "test"
    json.dumps(data)  # JSON-ready
    text = report.render({**data, "settings": data["settings"]})
    assert "white-box" in text and "k=2" in text and "LoRA-fine-tuned local layers" in text
    assert report.plot(data, tmp_path / "inv.png").stat().st_size > 1000
