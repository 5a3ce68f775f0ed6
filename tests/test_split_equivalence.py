"""The split model is the full model: same greedy tokens as Hugging Face `generate`, float16 on the wire."""

import pytest
import torch

from splitinfer import decoding
from splitinfer.config import Split
from splitinfer.decoding.sequential import sequential
from splitinfer.models import materialise, build_skeleton

from conftest import hf_greedy, split_model

PROMPTS = [[5, 17, 42, 8, 8, 31], [1, 2, 3], list(range(40, 90, 3)), [7]]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sequential_matches_hf_generate(tiny_model, prompt):
    want = hf_greedy(tiny_model, prompt, 24)
    got = decoding.run(sequential(split_model(tiny_model), prompt, 24, frozenset())).tokens
    assert got == want


@pytest.mark.parametrize("cloud_start, cloud_end", [(1, 4), (3, 3), (2, 2)])
def test_any_split_point(tiny_llama, cloud_start, cloud_end):
    prompt = PROMPTS[0]
    want = hf_greedy(tiny_llama, prompt, 16)
    lm = split_model(tiny_llama, cloud_start, cloud_end)
    assert decoding.run(sequential(lm, prompt, 16, frozenset())).tokens == want


def test_prefill_in_chunks_matches_one_piece(tiny_llama):
    prompt = list(range(3, 60))
    whole = split_model(tiny_llama)
    chunked = split_model(tiny_llama)
    chunked.span.max_step_tokens = 8  # the cloud's per-step limit forces 8 round trips
    assert torch.allclose(whole.prefill(prompt), chunked.prefill(prompt), atol=1e-3)
    assert chunked.length == len(prompt)


def test_stops_at_eos_and_budget(tiny_llama):
    prompt = PROMPTS[0]
    free = decoding.run(sequential(split_model(tiny_llama), prompt, 12, frozenset())).tokens
    eos = free[5]
    stopped = decoding.run(sequential(split_model(tiny_llama), prompt, 12, frozenset({eos}))).tokens
    assert stopped == free[: free.index(eos) + 1]
    assert decoding.run(sequential(split_model(tiny_llama), prompt, 1, frozenset())).tokens == free[:1]


def test_selective_loading_reads_only_owned_tensors(tiny_llama):
    """Each side's modules get only its tensors; the rest of the skeleton stays on the meta device."""
    split = Split(6)
    sk = build_skeleton(tiny_llama)
    held = materialise(tiny_llama, {f"model.layers.{i}": sk.parts.layers[i] for i in split.cloud_layers}, "cpu", torch.float32)
    assert all(name.startswith(("model.layers.2.", "model.layers.3.")) for name in held)
    assert sk.parts.embed.weight.is_meta and sk.parts.layers[0].mlp.up_proj.weight.is_meta
    assert not sk.parts.layers[2].mlp.up_proj.weight.is_meta


@pytest.mark.parametrize("mode", ["jacobi", "lookahead"])
@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_speculative_modes_equal_sequential_on_a_real_tiny_model(tiny_model, mode, prompt):
    from splitinfer.decoding.lookahead import Memory
    from splitinfer.decoding.strategies import STRATEGIES

    want = decoding.run(sequential(split_model(tiny_model), prompt, 40, frozenset())).tokens
    options = {"lookahead": {"max_verify": 12}, "jacobi": {"block": 6}}[mode]
    lm = split_model(tiny_model)
    got = decoding.run(STRATEGIES[mode](Memory(), **options)(lm, prompt, 40, frozenset()))
    assert got.tokens == want
    assert got.steps == len(lm.timings) - 1  # one forward per step after the prefill


def test_relocation_of_a_non_contiguous_path_keeps_the_caches_right(tiny_llama):
    """Verify a tree, keep a path that skips nodes, then continue: same logits as computing the path directly."""
    prompt = PROMPTS[0]
    a, b = split_model(tiny_llama), split_model(tiny_llama)
    a.prefill(prompt)
    b.prefill(prompt)
    a.forward([10, 11, 12, 13, 14], [-1, 0, 0, 2, 1])  # root, two children, grandchildren
    a.commit([0, 2, 3])  # root -> node 2 -> node 3 (skips nodes 1 and 4)
    b.forward([10, 12, 13])
    b.commit()
    assert a.length == b.length == len(prompt) + 3
    la, lb = a.forward([20, 21]), b.forward([20, 21])
    # Batching differently moves float16 wire values by an ulp at most; a wrong cache moves everything.
    assert torch.allclose(la, lb, atol=1e-2)
    assert torch.equal(la.argmax(-1), lb.argmax(-1))
    wrong = split_model(tiny_llama)
    wrong.prefill(prompt)
    wrong.forward([10, 11, 12])  # the path that skips the wrong nodes would give this
    wrong.commit()
    assert not torch.allclose(la, wrong.forward([20, 21]), atol=1e-2)
