"""The local server for clients: sampling and stop-sequence logic (no model), then real processes.

The slow part starts a real cloud_server_kv.py and a real jacobi_server.py on loopback
(default model, one torch thread each) and drives them with the official `openai` package
and with plain HTTP.
"""

from __future__ import annotations

import functools
import json
import random
import string
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch

from splitinfer.decoding import run
from splitinfer.decoding.lookahead import Memory
from splitinfer.decoding.sampling import make_generator, probabilities, sample_token, sampling
from splitinfer.decoding.sequential import sequential
from splitinfer.identity import Identity
from splitinfer.procs import cloud_process, free_port, wait_healthy
from splitinfer.serve import api
from splitinfer.serve.api import APIError
from splitinfer.serve.process import local_server_process
from splitinfer.serve.text import TextStream
from splitinfer.testing import FakeLM

# -- a fake model ---------------------------------------------------------------------------------------

VOCAB = 12


def noisy_lm(sharpness: float = 3.0) -> FakeLM:
    """Logits that depend on the whole context (a hash), so strategies see a real next-token function."""
    return FakeLM(VOCAB, sharpness=sharpness, max_step_tokens=64)


def drain(stream) -> list[list[int]]:
    return list(stream)


# -- sampling ---------------------------------------------------------------------------------------------


def test_probabilities_follow_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for t in (0.5, 1.0, 1.7):
        assert torch.allclose(probabilities(logits, t), torch.softmax(logits.double() / t, -1))


def test_top_p_keeps_the_smallest_nucleus_and_renormalises():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = p.log()
    assert torch.allclose(probabilities(logits, 1.0, 0.6), torch.tensor([0.5, 0.3, 0, 0], dtype=torch.float64) / 0.8)
    assert torch.allclose(probabilities(logits, 1.0, 0.9), torch.tensor([0.5, 0.3, 0.15, 0], dtype=torch.float64) / 0.95)
    assert torch.allclose(probabilities(logits, 1.0, 0.1), torch.tensor([1.0, 0, 0, 0], dtype=torch.float64))
    assert torch.allclose(probabilities(logits, 1.0, 1.0), p)
    shuffled = torch.tensor([0.15, 0.5, 0.05, 0.3], dtype=torch.float64).log()  # order must not matter
    assert torch.allclose(probabilities(shuffled, 1.0, 0.6), torch.tensor([0, 0.5, 0, 0.3], dtype=torch.float64) / 0.8)


def test_draws_follow_the_distribution():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    g = make_generator(1234)
    n = 8000
    counts = torch.bincount(torch.tensor([sample_token(p.log(), 1.0, 1.0, g) for _ in range(n)]), minlength=4)
    assert torch.allclose(counts / n, p, atol=0.02), counts
    counts = torch.bincount(torch.tensor([sample_token(p.log(), 1.0, 0.7, g) for _ in range(2000)]), minlength=4)
    assert counts[2] == counts[3] == 0 and abs(counts[0] / 2000 - 0.5 / 0.8) < 0.04


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)])
def test_sampling_rejects_bad_parameters(bad):
    with pytest.raises(ValueError):
        next(sampling(noisy_lm(), [1, 2], 4, frozenset(), **{"temperature": 1.0, **bad}))


def test_sampling_is_one_token_per_round_trip_and_obeys_budget_and_eos():
    lm = noisy_lm()
    chunks = drain(sampling(lm, [1, 2, 3], 10, frozenset(), temperature=1.0, generator=make_generator(0)))
    assert [len(c) for c in chunks] == [1] * 10
    assert lm.calls == [3] + [1] * 9  # the prefill, then one token per forward
    tokens = [t for c in chunks for t in c]
    eos = frozenset({tokens[4]})
    first = tokens.index(tokens[4])
    again = [t for c in sampling(noisy_lm(), [1, 2, 3], 10, eos, temperature=1.0, generator=make_generator(0)) for t in c]
    assert again == tokens[: first + 1]  # EOS kept, and it ends the run
    assert drain(sampling(noisy_lm(), [1], 0, frozenset(), temperature=1.0)) == []


def test_sampling_seed_reproduces_and_seeds_differ():
    def tokens(seed: int) -> list[int]:
        return run(sampling(noisy_lm(0.5), [5], 24, frozenset(), temperature=1.0, generator=make_generator(seed))).tokens

    assert tokens(7) == tokens(7)
    assert tokens(7) != tokens(8)


def test_sampling_near_zero_temperature_or_tiny_top_p_is_greedy():
    greedy = run(sequential(noisy_lm(), [4, 2], 16, frozenset())).tokens
    cold = run(sampling(noisy_lm(), [4, 2], 16, frozenset(), temperature=1e-4, generator=make_generator(3))).tokens
    narrow = run(sampling(noisy_lm(), [4, 2], 16, frozenset(), temperature=1.5, top_p=1e-9, generator=make_generator(3))).tokens
    assert cold == greedy == narrow


# -- incremental text and stop sequences ------------------------------------------------------------------------


def byte_decoder(pieces: dict[int, bytes]):
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


PIECES = {0: b"Hel", 1: b"lo", 2: b" wor", 3: b"ld", 4: "é".encode()[:1], 5: "é".encode()[1:], 6: b"!", 7: b"?"}


def test_split_multibyte_character_is_held_until_complete():
    ts = TextStream(byte_decoder(PIECES))
    assert ts.push([0]) == "Hel"
    assert ts.push([4]) == ""  # half of "é": the replacement character waits
    assert ts.push([5]) == "é"
    assert ts.push([6]) == "!"
    assert ts.finish() == "" and ts.text == "Helé!" and not ts.stopped


def test_stop_sequence_across_tokens_is_cut_with_what_follows():
    ts = TextStream(byte_decoder(PIECES), ["lo w"])
    out = [ts.push([0]), ts.push([1]), ts.push([2]), ts.push([3])]
    assert out == ["He", "l", "", ""]  # "l", then "lo" could start the stop: held back
    assert ts.stopped and ts.text == "Hel" and "".join(out) == "Hel"


def test_held_prefix_is_released_when_ruled_out_or_at_the_end():
    ts = TextStream(byte_decoder(PIECES), ["!?!"])
    assert ts.push([6]) == ""
    assert ts.push([7]) == ""
    assert ts.push([0]) == "!?Hel"  # "!?H" is no stop
    assert ts.push([6, 7]) == ""
    assert ts.finish() == "!?" and ts.text == "!?Hel!?" and not ts.stopped


def test_earliest_of_several_stops_wins():
    ts = TextStream(byte_decoder(PIECES), ["world", "o w", "Hello"])
    assert ts.push([0, 1, 2, 3]) == "" and ts.stopped and ts.text == ""
    ts = TextStream(byte_decoder(PIECES), ["ld", "o w"])
    assert ts.push([0, 1, 2, 3]) == "Hell" and ts.text == "Hell"


def test_stream_equals_the_whole_text_cut_at_the_first_stop():
    """Random texts cut into random byte tokens, random stops: the pieces always add up to the reference.

    The reference: the text decoded after each push, cut at the earliest stop in it as soon as one appears.
    """
    rng = random.Random(0)
    alphabet = "ab \n" + "é日🙂"
    for _ in range(1000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        data = text.encode()
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 12)))) if len(data) > 1 else []
        bounds = [0, *cuts, len(data)]
        pieces = {i: data[a:b] for i, (a, b) in enumerate(zip(bounds, bounds[1:]))}
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 3))]
        ids, pushes = list(pieces), []
        while ids:
            k = rng.randint(1, 3)
            pushes.append(ids[:k])
            ids = ids[k:]
        decode = byte_decoder(pieces)
        expected, stopped, seen = text, False, []
        for push in pushes:
            seen += push
            found = [i for i in (decode(seen).find(s) for s in stops) if i >= 0]
            if found:
                expected, stopped = decode(seen)[: min(found)], True
                break
        ts, out = TextStream(decode, stops), []
        for push in pushes:
            out.append(ts.push(push))
            assert "".join(out) == expected[: len("".join(out))]  # never a character that is not in the answer
            if ts.stopped:
                break
        out.append(ts.finish())
        assert "".join(out) == expected and ts.stopped == stopped, (text, stops, pieces)


# -- generation behind the API, on the fake model ------------------------------------------------------------

LETTERS = string.ascii_letters  # one character per token id


class FakeTokenizer:
    """One letter per token; `special` ids (the EOS) are left out of the text, as Hugging Face's are."""

    chat_template = None

    def __init__(self, special: frozenset[int] = frozenset()):
        self.special = special

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(LETTERS[i] for i in ids if not (skip_special_tokens and i in self.special))


def fake_local(eos: frozenset[int] = frozenset(), sharpness: float = 3.0, lm=None) -> SimpleNamespace:
    """What the server uses of a LocalSide; `models` collects the FakeLMs handed out."""
    from splitinfer.config import Split

    models: list = []

    def model(span):
        models.append(lm() if lm else noisy_lm(sharpness))
        return models[-1]

    return SimpleNamespace(
        model_dir=Path("models/fake"),
        config=SimpleNamespace(max_position_embeddings=256, vocab_size=VOCAB),
        tokenizer=FakeTokenizer(eos),
        eos=eos,
        model=model,
        models=models,
        split=Split(6),
        memory=Memory(),
        drafter=None,
        drafter_path=None,
        memory_file=None,
        remember=lambda: None,
        identity=Identity(64, 4, 2, 16, 6, 2, 3, "0" * 64),  # what a real LocalSide computes from its files
    )


def fake_service(mode: str = "sequential", eos: frozenset[int] = frozenset(), sharpness: float = 3.0):
    from splitinfer.serve.service import Service

    local = fake_local(eos, sharpness)
    return Service(local, "ws://127.0.0.1:9", mode=mode, default_max_tokens=20), local.models


def complete(service, **body):
    steps = list(service.run(service.job(api.parse_completion({"prompt": "hello", **body})), None))
    assert steps[-1].finish_reason and not any(s.finish_reason for s in steps[:-1])
    return "".join(s.text for s in steps), steps[-1]


def test_every_registered_mode_serves_the_sequential_text():
    from splitinfer.decoding.strategies import STRATEGIES

    reference, last = complete(fake_service()[0])
    assert len(reference) == 20 and last.finish_reason == "length" and last.completion_tokens == 20
    assert last.extension["tokens_per_step"] == 1.0 and last.extension["steps"] == 20
    for mode in STRATEGIES:
        service, models = fake_service(mode)
        text, last = complete(service)
        assert text == reference and last.extension["mode"] == mode, mode
        assert last.extension["steps"] == len(models[0].calls) and last.extension["round_trip_ms"] == 2.0


def chunky(lm, prompt, max_new, eos, *, oracle):
    """A speculative strategy with perfect guesses: three tokens per round trip."""
    from splitinfer.decoding import argmax, clip

    token = argmax(lm.prefill(prompt))
    out, done = clip([token], 0, max_new, eos)
    produced, context = len(out), [*prompt, token]
    yield out
    while not done:
        guesses = oracle(context, 2)
        predictions = lm.forward([token, *guesses]).argmax(-1).tolist()
        k = 0
        while k < len(guesses) and guesses[k] == predictions[k]:
            k += 1
        lm.commit(list(range(k + 1)))
        accepted = [*guesses[:k], predictions[k]]
        out, done = clip(accepted, produced, max_new, eos)
        produced += len(out)
        context += accepted
        token = accepted[-1]
        yield out


def test_a_mode_is_looked_up_by_name_and_streams_several_tokens_per_round_trip(monkeypatch):
    from splitinfer.decoding.strategies import STRATEGIES
    from splitinfer.serve.service import Service

    def oracle(context, n):
        return FakeLM(vocab=50).greedy(context, n)

    monkeypatch.setitem(STRATEGIES, "chunky", lambda memory, *, oracle: functools.partial(chunky, oracle=oracle))
    texts = {}
    for mode, options in [("sequential", None), ("chunky", {"oracle": oracle})]:
        service = Service(fake_local(lm=lambda: FakeLM(vocab=50)), "ws://127.0.0.1:9", mode=mode, strategy_options=options)
        steps = list(service.run(service.job(api.parse_completion({"prompt": [3, 4, 5], "max_tokens": 31})), None))
        texts[mode] = "".join(s.text for s in steps)
        last = steps[-1].extension
        assert steps[-1].completion_tokens == 31 and last["mode"] == mode
        if mode == "chunky":
            assert last["tokens_per_step"] == 3.0 and last["steps"] == 11  # prefill + 10 steps of three tokens
            assert [len(s.text) for s in steps[:-1]] == [1] + [3] * 10
            assert last["round_trip_ms"] == 2.0 and last["cloud_ms"] == 1.5 and last["network_ms"] == 0.5
    assert texts["chunky"] == texts["sequential"]


def test_finish_reasons_eos_stop_and_the_default_budget():
    service, _ = fake_service()
    text, last = complete(service, max_tokens=12)
    assert last.finish_reason == "length" and last.completion_tokens == 12 and len(text) == 12
    eos = LETTERS.index(text[5])  # the 6th token ends the answer (EOS is generated, counted, not shown)
    service, _ = fake_service(eos=frozenset({eos}))
    cut, last = complete(service, max_tokens=12)
    first = text.index(text[5])
    assert (cut, last.finish_reason, last.completion_tokens) == (text[:first], "stop", first + 1)
    stop = text[4:6]
    cut, last = complete(fake_service()[0], max_tokens=12, stop=[stop])
    assert cut == text[: text.find(stop)] and last.finish_reason == "stop" and last.completion_tokens < 12
    _, last = complete(fake_service()[0])
    assert last.completion_tokens == 20  # the server's --max-new-tokens when the request sets none


def test_closing_a_generation_cancels_it():
    service, models = fake_service()
    steps = service.run(service.job(api.parse_completion({"prompt": "hello", "max_tokens": 50})), None)
    next(steps), next(steps), next(steps)
    assert service.counts["active"] == 1
    steps.close()
    assert service.counts == {"active": 0, "completed": 0, "cancelled": 1, "failed": 0}
    assert len(models[0].calls) == 3  # no round trip after the close


def test_temperature_samples_one_token_per_round_trip_and_a_seed_repeats():
    service, models = fake_service(mode="sequential", sharpness=0.5)
    a, last = complete(service, temperature=1.0, seed=5)
    b, _ = complete(service, temperature=1.0, seed=5)
    c, _ = complete(service, temperature=1.0, seed=6)
    greedy, _ = complete(service)
    assert a == b and a != c and a != greedy
    assert last.extension["mode"] == "sampling" and last.extension["tokens_per_step"] == 1.0
    assert all(q == 1 for q in models[0].calls[1:])


class BrokenCloudLM(FakeLM):
    """A cloud that dies after a few round trips."""

    def __init__(self):
        super().__init__(VOCAB, sharpness=3.0, max_step_tokens=64)

    def forward(self, tokens, parents=None, *, features=False):
        from splitinfer.remote import CloudError

        if len(self.calls) >= 3:
            raise CloudError("disconnected", "connection lost")
        return super().forward(tokens, parents, features=features)


def test_app_reports_cloud_failures_in_the_openai_shape(monkeypatch):
    """The Flask app on the fake model: the cloud down (502, /health 503) and dying mid-stream (an error event)."""
    from contextlib import nullcontext

    from splitinfer.serve import create_app

    dead = free_port(pair=True)
    app = create_app(fake_local(lm=BrokenCloudLM), f"ws://127.0.0.1:{dead + 1}", cloud_http_url=f"http://127.0.0.1:{dead}")
    web = app.test_client()
    health = web.get("/health")
    assert health.status_code == 503 and health.json["status"] == "degraded"
    assert not health.json["cloud"]["reachable"] and "cloud unreachable" in health.json["problems"][0]
    for stream in (False, True):
        r = web.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5, "stream": stream})
        assert r.status_code == 502 and r.json["error"]["type"] == "server_error"
        assert r.json["error"]["code"] == "cloud_unreachable" and "cannot connect" in r.json["error"]["message"]

    service = app.extensions["splitinfer"]
    monkeypatch.setattr(service, "session", lambda: nullcontext(None))
    r = web.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 10, "stream": True})
    events = [e for e in r.get_data(as_text=True).split("\n\n") if e.startswith("data: ")]
    assert r.status_code == 200 and len(events) >= 3 and "[DONE]" not in events[-1]
    assert json.loads(events[-1][6:])["error"]["code"] == "cloud_disconnected"
    r = web.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 10})
    assert r.status_code == 502 and r.json["error"]["code"] == "cloud_disconnected"
    assert service.counts == {"active": 0, "completed": 0, "cancelled": 0, "failed": 2}
    assert web.post("/v1/chat/completions", data="[", content_type="application/json").json["error"]["code"] == "invalid_json"
    assert web.delete("/v1/models").status_code == 405


# -- request checking --------------------------------------------------------------------------------------------------

MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, param, code",
    [
        ([], None, "invalid_json"),
        ({}, "messages", "missing_required_parameter"),
        ({"messages": "hi"}, "messages", "invalid_type"),
        ({"messages": []}, "messages", "empty_array"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "unsupported_value"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "unsupported_value"),
        ({"messages": MSG, "max_tokens": "ten"}, "max_tokens", "invalid_type"),
        ({"messages": MSG, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"messages": MSG, "max_tokens": True}, "max_tokens", "invalid_type"),
        ({"messages": MSG, "temperature": 3}, "temperature", "invalid_value"),
        ({"messages": MSG, "top_p": 0}, "top_p", "invalid_value"),
        ({"messages": MSG, "stop": 5}, "stop", "invalid_type"),
        ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"messages": MSG, "n": 2}, "n", "unsupported_value"),
        ({"messages": MSG, "logprobs": True}, "logprobs", "unsupported_value"),
        ({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_value"),
        ({"messages": MSG, "presence_penalty": 0.5}, "presence_penalty", "unsupported_value"),
        ({"messages": MSG, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"messages": MSG, "stream": "yes"}, "stream", "invalid_type"),
        ({"messages": MSG, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ({"messages": MSG, "model": 3}, "model", "invalid_type"),
    ],
)
def test_chat_requests_are_checked(body, param, code):
    with pytest.raises(APIError) as err:
        api.parse_chat(body)
    e = err.value.body()["error"]
    assert (e["param"], e["code"], e["type"]) == (param, code, "invalid_request_error") and e["message"]


def test_neutral_values_of_unsupported_fields_are_accepted():
    req = api.parse_chat({
        "model": "gpt-4o", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}, *MSG],
        "n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "tools": [],
        "response_format": {"type": "text"}, "user": "me", "max_completion_tokens": 5, "max_tokens": 9, "stop": "x",
        "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.7, "top_p": 0.9, "seed": 3,
    })
    assert req.messages == [{"role": "system", "content": "be brief"}, *MSG]
    assert (req.max_tokens, req.stop, req.stream, req.include_usage) == (5, ["x"], True, True)
    assert (req.temperature, req.top_p, req.seed, req.greedy) == (0.7, 0.9, 3, False)
    assert api.parse_chat({"messages": MSG, "temperature": 0}).greedy and api.parse_chat({"messages": MSG}).greedy


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({}, "prompt", "missing_required_parameter"),
        ({"prompt": ["a", "b"]}, "prompt", "unsupported_value"),
        ({"prompt": {"text": "a"}}, "prompt", "invalid_type"),
        ({"prompt": ""}, "prompt", "invalid_value"),
        ({"prompt": "a", "echo": True}, "echo", "unsupported_value"),
        ({"prompt": "a", "best_of": 3}, "best_of", "unsupported_value"),
        ({"prompt": "a", "logprobs": 2}, "logprobs", "unsupported_value"),
        ({"prompt": "a", "messages": MSG}, "messages", "unknown_parameter"),
    ],
)
def test_completion_requests_are_checked(body, param, code):
    with pytest.raises(APIError) as err:
        api.parse_completion(body)
    assert (err.value.param, err.value.code, err.value.status) == (param, code, 400)


def test_completion_prompt_forms():
    assert api.parse_completion({"prompt": "a b"}).prompt == "a b"
    assert api.parse_completion({"prompt": ["a b"]}).prompt == "a b"
    assert api.parse_completion({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert api.parse_completion({"prompt": [[1, 2]]}).prompt == [1, 2]


# -- real processes -----------------------------------------------------------------------------------------------------

LONG = "Write a long essay about the history of the Roman Empire."


@pytest.fixture(scope="module")
def servers(default_model, tmp_path_factory):
    """A cloud process and a local server process on loopback, started side by side."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    logs = tmp_path_factory.mktemp("logs")
    cloud_port = free_port(pair=True)
    cloud_url = f"http://127.0.0.1:{cloud_port}"
    with ExitStack() as stack:
        local_url, local_proc = stack.enter_context(local_server_process(
            cloud_url, default_model, threads=1, wait=False, log_file=logs / "local.log",
            extra=["--max-new-tokens", "16", "--mode", "sequential"],
        ))
        stack.enter_context(cloud_process(default_model, port=cloud_port, threads=1, log_file=logs / "cloud.log"))
        wait_healthy(local_url, local_proc)
        yield SimpleNamespace(
            cloud=cloud_url,
            url=local_url,
            proc=local_proc,
            client=OpenAI(base_url=f"{local_url}/v1", api_key="unused", max_retries=0, timeout=120),
            tokenizer=AutoTokenizer.from_pretrained(default_model),
            model=default_model,
            logs=logs,
        )


def sessions_open(cloud: str) -> int:
    return requests.get(f"{cloud}/health", timeout=5).json()["sessions_open"]


def wait_sessions_closed(cloud: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while sessions_open(cloud) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sessions_open(cloud) == 0


def chat_ids(tokenizer, content: str) -> list[int]:
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def stream_chat(client, content: str, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": content}], stream=True, **kw
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


@pytest.mark.slow
def test_health_and_models(servers):
    h = requests.get(f"{servers.url}/health", timeout=10)
    assert h.status_code == 200
    body = h.json()
    cloud = requests.get(f"{servers.cloud}/health", timeout=5).json()
    assert body["status"] == "ok" and body["mode"] == "sequential" and "sequential" in body["modes"]
    assert body["cloud"]["reachable"] and body["cloud"]["layers"] == cloud["layers"] == body["split"]["cloud"]
    assert body["split"]["local_head"] == [0, 1] and body["split"]["local_tail"] == [28, 29]
    assert body["model"] == "smollm2-135m-instruct" and body["cloud"]["sessions_open"] == 0
    assert set(body["requests"]) == {"active", "completed", "cancelled", "failed"}
    assert body["drafter"] in (None, "smollm2-135m-instruct") and body["memory"]["kept"] is True
    models = servers.client.models.list()
    assert [m.id for m in models.data] == ["smollm2-135m-instruct"]
    assert servers.client.models.retrieve("smollm2-135m-instruct").owned_by == "splitinfer"
    r = requests.get(f"{servers.url}/v1/models/gpt-4", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.slow
def test_chat_streamed_and_not_with_openai_client(servers):
    prompt = "Tell me a short story about a dragon."
    whole = servers.client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], max_tokens=8)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "smollm2-135m-instruct"
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    n_prompt = len(chat_ids(servers.tokenizer, prompt))
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (n_prompt, 8, n_prompt + 8)
    ext = whole.model_extra["splitinfer"]
    assert ext["mode"] == "sequential" and ext["steps"] == 8 and ext["tokens_per_step"] == 1.0 and ext["tokens"] == 8
    assert ext["tokens_per_second"] > 0 and ext["round_trip_ms"] > 0 and ext["round_trip_ms"] >= ext["cloud_ms"]

    text, chunks = stream_chat(servers.client, prompt, max_tokens=8, stream_options={"include_usage": True})
    assert sessions_open(servers.cloud) == 0  # closed before [DONE] was sent
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == n_prompt
    steps = [c.model_extra["splitinfer"]["steps"] for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(steps) >= 4 and steps == sorted(steps) and steps[0] >= 1  # text arrived step by step

    # Without include_usage no chunk carries usage; the text is the same.
    text2, chunks2 = stream_chat(servers.client, prompt, max_tokens=8)
    assert text2 == text and all(c.usage is None for c in chunks2)

    # The one-shot form of jacobi_server.py gives the same tokens.
    out = subprocess.run(
        [sys.executable, "-m", "splitinfer", "serve", "--cloud", servers.cloud, "--model", str(servers.model),
         "--prompt", prompt, "--max-new-tokens", "8", "--json", "--threads", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert json.loads(out.stdout)["text"] == text


@pytest.mark.slow
def test_completions_streamed_and_not(servers):
    prompt = "The three primary colors are"
    whole = servers.client.completions.create(model="x", prompt=prompt, max_tokens=8)
    assert whole.object == "text_completion" and whole.choices[0].text and whole.choices[0].finish_reason == "length"
    n_prompt = len(servers.tokenizer(prompt)["input_ids"])
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (n_prompt, 8)
    chunks = list(servers.client.completions.create(
        model="x", prompt=prompt, max_tokens=8, stream=True, stream_options={"include_usage": True}
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.total_tokens == n_prompt + 8
    ids = servers.tokenizer(prompt)["input_ids"]
    by_ids = servers.client.completions.create(model="x", prompt=ids, max_tokens=8)
    assert by_ids.choices[0].text == whole.choices[0].text


@pytest.mark.slow
def test_two_concurrent_clients_equal_their_solo_runs(servers):
    prompts = ["List three fruits and their colors.", "Explain how photosynthesis works."]
    solo = [stream_chat(servers.client, p, max_tokens=12)[0] for p in prompts]
    assert solo[0] != solo[1]
    results: dict[int, tuple[str, float, float]] = {}
    peak = [0]
    done = threading.Event()

    def client(i: int) -> None:
        t0 = time.monotonic()
        text, _ = stream_chat(servers.client, prompts[i], max_tokens=12)
        results[i] = (text, t0, time.monotonic())

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], sessions_open(servers.cloud))
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    done.set()
    watcher.join()
    assert [results[i][0] for i in range(2)] == solo
    (_, a0, a1), (_, b0, b1) = results[0], results[1]
    assert a0 < b1 and b0 < a1  # they overlapped in time
    assert peak[0] == 2  # each on its own cloud session
    wait_sessions_closed(servers.cloud)


BAD = [
    ("chat", "{not json", None, "invalid_json"),
    ("chat", {"model": "m"}, "messages", "missing_required_parameter"),
    ("chat", {"messages": "hello"}, "messages", "invalid_type"),
    ("chat", {"messages": MSG, "n": 2}, "n", "unsupported_value"),
    ("chat", {"messages": MSG, "logprobs": True}, "logprobs", "unsupported_value"),
    ("chat", {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_value"),
    ("chat", {"messages": MSG, "max_tokens": "8"}, "max_tokens", "invalid_type"),
    ("chat", {"messages": MSG, "max_tokens": 100000}, "messages", "context_length_exceeded"),
    ("chat", {"messages": MSG, "temperature": "hot"}, "temperature", "invalid_type"),
    ("completions", {"prompt": ["a", "b"]}, "prompt", "unsupported_value"),
    ("completions", {"prompt": [10**9]}, "prompt", "invalid_value"),
]


@pytest.mark.slow
def test_bad_requests_get_openai_shaped_400s(servers):
    import openai

    for endpoint, body, param, code in BAD:
        url = f"{servers.url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
        if isinstance(body, str):
            r = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
        else:
            r = requests.post(url, json=body, timeout=10)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), body
    with pytest.raises(openai.BadRequestError) as err:
        servers.client.chat.completions.create(model="m", messages=MSG, n=2)
    assert err.value.status_code == 400 and err.value.body["param"] == "n"
    r = requests.get(f"{servers.url}/v1/nothing", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = requests.get(f"{servers.url}/v1/chat/completions", timeout=5)
    assert r.status_code == 405 and "error" in r.json()
    assert sessions_open(servers.cloud) == 0  # no request above opened a cloud session


@pytest.mark.slow
def test_client_gone_mid_stream_cancels_and_closes_the_cloud_session(servers):
    warm = servers.client.chat.completions.create(model="m", messages=[{"role": "user", "content": LONG}], max_tokens=16)
    per_token_s = 1 / warm.model_extra["splitinfer"]["tokens_per_second"]  # this machine's rate, as loaded now
    before = requests.get(f"{servers.url}/health", timeout=10).json()["requests"]
    body = {"messages": [{"role": "user", "content": LONG}], "max_tokens": 400, "stream": True}
    r = requests.post(f"{servers.url}/v1/chat/completions", json=body, stream=True, timeout=60)
    lines = r.iter_lines()
    seen = 0
    while seen < 3:  # the role chunk, then two pieces of text
        line = next(lines)
        seen += line.startswith(b"data: ")
    assert sessions_open(servers.cloud) == 1
    t0 = time.monotonic()
    r.close()
    wait_sessions_closed(servers.cloud, timeout=20)
    elapsed = time.monotonic() - t0
    after = requests.get(f"{servers.url}/health", timeout=10).json()["requests"]
    print(f"\nsession closed {elapsed:.2f} s after the client hung up ({elapsed / per_token_s:.0f} tokens' time)")
    assert after["cancelled"] == before["cancelled"] + 1 and after["active"] == 0
    # Under a quarter of what the rest of the 400 tokens would take at the rate just measured: generation stopped.
    assert elapsed < 0.25 * 400 * per_token_s, (elapsed, per_token_s)


@pytest.mark.slow
def test_stop_sequences_cut_the_text(servers):
    prompt = "Tell me a short story about a dragon."
    full = servers.client.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], max_tokens=16)
    text = full.choices[0].message.content
    k = len(text) // 2
    stop = text[k : k + 3]
    expected = text[: text.find(stop)]
    cut = servers.client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": prompt}], max_tokens=16, stop=["@@@", stop]
    )
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens <= 16
    assert cut.usage.total_tokens == cut.usage.prompt_tokens + cut.usage.completion_tokens
    streamed, chunks = stream_chat(servers.client, prompt, max_tokens=16, stop=stop, stream_options={"include_usage": True})
    assert streamed == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == cut.usage.completion_tokens
    wait_sessions_closed(servers.cloud)


@pytest.mark.slow
def test_sampling_with_a_seed_repeats(servers):
    kw = dict(model="m", messages=[{"role": "user", "content": "Name a color."}], max_tokens=8, temperature=1.0, top_p=0.95)
    a = servers.client.chat.completions.create(seed=11, **kw)
    b = servers.client.chat.completions.create(seed=11, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    ext = a.model_extra["splitinfer"]
    assert ext["mode"] == "sampling" and ext["tokens_per_step"] == 1.0 and ext["steps"] == a.usage.completion_tokens


def test_reconnect_timeout_flag_reaches_every_cloud_session(monkeypatch):
    from splitinfer.commands import chat as interactive
    from splitinfer.commands import serve as jacobi_server
    from splitinfer.remote import RECONNECT_TIMEOUT_S
    from splitinfer.serve import service as service_module

    assert jacobi_server.parse_args([]).reconnect_timeout == RECONNECT_TIMEOUT_S
    assert interactive.parse_args(["--reconnect-timeout", "0"]).reconnect_timeout == 0.0
    for bad in ("-1", "nan", "soon"):
        with pytest.raises(SystemExit):
            jacobi_server.parse_args(["--reconnect-timeout", bad])
    seen = []
    monkeypatch.setattr(service_module, "cloud_session", lambda url, token, **kw: seen.append(kw))
    from splitinfer.serve.service import Service

    local = fake_local()
    Service(local, "ws://127.0.0.1:9", reconnect_timeout=2.5).session()
    assert seen == [{"expected": local.identity, "reconnect_timeout": 2.5}]  # and the identity every session checks
