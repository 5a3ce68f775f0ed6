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


@pytest.mark.parametrize("split_after, resume_at", [(0, 5), (2, 4), (1, 3)])
def test_any_split_point(tiny_llama, split_after, resume_at):
    prompt = PROMPTS[0]
    want = hf_greedy(tiny_llama, prompt, 16)
    lm = split_model(tiny_llama, split_after, resume_at)
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
    held = materialise(tiny_llama, {f"model.layers.{i}": sk.model.model.layers[i] for i in split.cloud_layers}, "cpu", torch.float32)
    assert all(name.startswith(("model.layers.2.", "model.layers.3.")) for name in held)
    assert sk.model.model.embed_tokens.weight.is_meta and sk.model.model.layers[0].mlp.up_proj.weight.is_meta
    assert not sk.model.model.layers[2].mlp.up_proj.weight.is_meta
