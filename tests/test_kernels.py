"""Packed CPU linears: same numbers as nn.Linear, same tokens through the split, used only where they run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splitinfer import hf, kernels, masks
from splitinfer.config import Split
from splitinfer.decoding import run as drain
from splitinfer.decoding.lookahead import lookahead
from splitinfer.decoding.sequential import sequential
from splitinfer.engine import SplitModel
from splitinfer.models import load_config
from splitinfer.parts import load_cloud, load_local
from splitinfer.testing import InProcessSpan


needs_onednn = pytest.mark.skipif(not kernels.packing_works("cpu", torch.float32), reason="no oneDNN in this torch")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, 5, 16, 40])
def test_packed_linear_equals_linear(rows):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=rows % 2 == 0)
    x = torch.randn(1, rows, 48)
    with torch.inference_mode():
        torch.testing.assert_close(kernels.PackedLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_pack_linears_replaces_every_linear_and_shares_the_weight():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 4), nn.ReLU()))
    weight = model[1][0].weight
    assert kernels.pack_linears(model, "auto", "cpu", torch.float32) == 2
    assert isinstance(model[1][0], kernels.PackedLinear) and model[1][0].weight is weight


def test_pack_linears_leaves_the_model_alone_where_packing_does_not_apply():
    model = nn.Sequential(nn.Linear(8, 8))
    assert kernels.pack_linears(model, "torch", "cpu", torch.float32) == 0
    assert kernels.pack_linears(model, "auto", "cpu", torch.float16) == 0
    assert kernels.pack_linears(model, "auto", "meta", torch.float32) == 0
    assert type(model[0]) is nn.Linear
    with pytest.raises(ValueError, match="one of"):
        kernels.pack_linears(model, "fast", "cpu", torch.float32)


@needs_onednn
def test_packed_split_model_decodes_the_same_tokens(tiny_model):
    """Sequential (one row) and lookahead trees (blocks), all through oneDNN, agree with the unpacked model."""
    split = Split(load_config(tiny_model).num_hidden_layers)

    def build(kind: str) -> SplitModel:
        head, tail, _, _ = load_local(tiny_model, split, "cpu", torch.float32)
        span, _, _ = load_cloud(tiny_model, split, "cpu", torch.float32)
        for part in (head, tail, span):
            kernels.pack_linears(part, kind, "cpu", torch.float32)
        return SplitModel(head, tail, InProcessSpan(span, torch.float32), torch.float32)

    prompt = [3, 17, 4, 3, 17, 4, 9, 3, 17]
    plain = drain(sequential(build("torch"), prompt, 24, frozenset()))
    assert drain(sequential(build("auto"), prompt, 24, frozenset())).tokens == plain.tokens
    assert drain(lookahead(build("auto"), prompt, 24, frozenset())).tokens == plain.tokens


def test_grouped_attention_equals_transformers_sdpa_with_a_tree_mask():
    torch.manual_seed(0)

    class Attn(nn.Module):
        num_key_value_groups = 3
        is_causal = True

    q, past = 5, 7
    query, key, value = torch.randn(1, 9, q, 16), torch.randn(1, 3, past + q, 16), torch.randn(1, 3, past + q, 16)
    parents = [-1, 0, 0, 1, 2]  # a token tree: the mask is not causal within the block
    block = masks.block_mask(parents)
    mask = masks.additive(masks.full_mask(past, block), torch.float32)
    ours, _ = kernels.attention(Attn(), query, key, value, mask, scaling=0.25)
    theirs, _ = hf.sdpa_attention(Attn(), query, key, value, mask, 0.0, 0.25)
    assert ours.shape == (1, q, 9, 16)
    torch.testing.assert_close(ours, theirs)


def test_off_cpu_attention_goes_through_transformers_sdpa_without_cudnn(monkeypatch):
    """A GPU cannot be had here: meta tensors take the same branch, and the backends it allows are recorded."""
    seen = []

    sdpa = hf.sdpa_attention

    def record(module, query, key, value, mask, dropout, scaling, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(module, query, key, value, mask, dropout, scaling, **kwargs)

    monkeypatch.setattr(hf, "sdpa_attention", record)

    class Attn(nn.Module):
        num_key_value_groups = 3
        is_causal = True

    query, key = torch.randn(1, 9, 4, 64, device="meta"), torch.randn(1, 3, 10, 64, device="meta")
    out, _ = kernels.attention(Attn(), query, key, key, torch.zeros(1, 1, 4, 10, device="meta"), scaling=0.125)
    assert out.shape == (1, 4, 9, 64) and seen == [False]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored afterwards


def test_use_kernels_switches_attention_and_linears(tiny_llama):
    config = load_config(tiny_llama)
    head, tail, config, _ = load_local(tiny_llama, Split(config.num_hidden_layers), "cpu", torch.float32)
    assert hf.attention_name(config) == "sdpa"
    linears = sum(type(m) is nn.Linear for part in (head, tail) for m in part.modules())
    packed = kernels.use_kernels([head, tail], config, "auto", "cpu", torch.float32)
    assert hf.attention_name(config) == kernels.ATTENTION
    assert head.span.layers[0].self_attn.config is config  # the attention calls read this very object
    assert packed == (linears if kernels.packing_works("cpu", torch.float32) else 0)
    assert kernels.use_kernels([head], config, "torch", "cpu", torch.float32) == 0
    assert hf.attention_name(config) == "sdpa"
