"""The RTT decomposition model on synthetic step records whose true costs are known."""

from __future__ import annotations

import random

import pytest

from splitinfer.experiments import rtt

RTTS = [0.0, 20.0, 40.0, 80.0, 120.0]


def step(rtt_ms: float, k: int, cloud: float, local: float) -> dict:
    return {"tokens": k, "local_before_ms": local * 0.6, "local_after_ms": local * 0.4, "serialize_ms": 0.5,
            "wait_ms": rtt_ms + 1.0 + cloud, "cloud_ms": cloud, "network_ms": rtt_ms + 1.0}


def record(mode: str, rtt_ms: float, ks: list[int], per_step: list[int], noise: random.Random | None = None,
           slow: float = 1.0) -> dict:
    """A generation whose steps cost cloud = 60 + 4K (sequential: 50) and local = 20 + K ms, times `slow`."""
    jitter = (lambda: noise.uniform(-1, 1)) if noise else (lambda: 0.0)
    timings = [step(rtt_ms, k, ((50.0 if mode == "sequential" else 60.0 + 4 * k) + jitter()) * slow, 20.0 + k)
               for k in ks]
    step_ms = sum(t["local_before_ms"] + t["local_after_ms"] + t["serialize_ms"] + t["wait_ms"] for t in timings)
    other = 2.0
    seconds = (step_ms + other * len(ks)) / 1000.0
    return {"rtt_ms": rtt_ms, "mode": mode, "steps": len(ks), "decoded_tokens": sum(per_step),
            "decode_seconds": seconds, "tokens_per_second": sum(per_step) / seconds, "other_ms_per_step": other,
            "timings": timings}


def records(noise: random.Random | None = None, slow_at: float | None = None) -> list[dict]:
    out = []
    for r in RTTS:
        out.append(record("sequential", r, [1] * 30, [1] * 30, noise, 1.5 if r == slow_at else 1.0))
        # The budget grows with the RTT: K from 4 at 0 ms to 16 at 120 ms; tokens per step with it.
        k = 4 + int(r // 10)
        out.append(record("lookahead", r, [k] * 20, [2] * k + [1] * (20 - k), noise))
    return out


def test_noise_free_records_are_predicted_exactly():
    data = records()
    measured = rtt.aggregate(data)
    model = rtt.Decomposition(data)
    # sequential: RTT + network extra 1 + local 21 + cloud 50 + serialisation 0.5 + other 2
    assert model.step_ms("sequential", 80.0) == pytest.approx(80 + 1 + 21 + 50 + 0.5 + 2)
    assert model.tokens_per_second("sequential", 80.0) == pytest.approx(measured["sequential"]["80"]["tokens_per_second"])
    terms = model.as_dict()["lookahead"]["terms_ms"]
    assert terms["cloud"]["intercept"] == pytest.approx(60.0) and terms["cloud"]["per_token"] == pytest.approx(4.0)
    assert terms["local"]["per_token"] == pytest.approx(1.0)


def test_sequential_is_not_fitted_on_lookahead_block_sizes():
    """A single token has its own cost: a line through the tree steps must not predict it."""
    model = rtt.Decomposition(records())
    assert model.as_dict()["sequential"]["terms_ms"]["cloud"]["intercept"] == pytest.approx(50.0)


def test_cross_validation_error_is_small_on_noisy_linear_data_and_large_on_drift():
    noisy = records(random.Random(0))
    cv = rtt.cross_validate(noisy, rtt.aggregate(noisy))
    assert len(cv["folds"]) == 2 * len(RTTS)
    assert cv["max_abs_error"] < 0.05
    # Machine drift tied to one RTT (the cloud 50% slower there) is what the model cannot know.
    drifted = records(slow_at=0.0)
    cv = rtt.cross_validate(drifted, rtt.aggregate(drifted))
    assert cv["max_abs_error"] > 0.05


def test_rtt_keys():
    assert [rtt.key(x) for x in (0, 20.0, 12.5)] == ["0", "20", "12.5"]


def test_schedule_moves_every_rtt_through_every_place():
    modes = ["sequential", "lookahead"]
    orders = [rtt.schedule(i, RTTS, modes) for i in range(len(RTTS))]
    for order in orders:  # each prompt still runs every RTT once, every mode at each
        assert sorted(r for r, _ in order) == RTTS
        assert all(sorted(m) == sorted(modes) for _, m in order)
    for place in range(len(RTTS)):
        assert sorted(order[place][0] for order in orders) == RTTS
    assert orders[0][0][1] == modes and orders[1][0][1] == modes[::-1]
