"""The contract with transformers (and torch's private oneDNN ops) that splitinfer/hf.py relies on.

Every function of hf.py is exercised here on a tiny random Llama; on a
transformers or torch upgrade, this is the file that should fail first.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from splitinfer import hf, masks
from splitinfer.models import build_skeleton


@pytest.fixture(scope="module")
def model(tiny_llama) -> nn.Module:
    """A private full model: tests here switch its attention, which the shared reference model must not see."""
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def chain_inputs(past: int, q: int, dtype=torch.float32):
    """Rotary positions, and the additive mask of a plain block of q tokens after `past` cached ones."""
    positions = masks.positions(past, masks.chain(q))  # [1, q]
    mask = masks.additive(masks.full_mask(past, masks.causal(q)), dtype)  # [1, 1, q, past + q]
    return positions, mask


def run_layers(model: nn.Module, ids: list[int], cache, past: int = 0) -> torch.Tensor:
    """The whole model through hf.call_layer, one layer at a time: logits [q, vocab]."""
    parts = hf.decoder_parts(model)
    positions, mask = chain_inputs(past, len(ids))
    cos, sin = hf.rope(parts.rotary, positions, torch.float32)
    hidden = parts.embed(torch.tensor([ids]))  # [1, q, H]
    for layer in parts.layers:
        hidden = hf.call_layer(layer, hidden, mask, cos, sin, cache)
    return parts.lm_head(parts.norm(hidden))[0]


# -- version and layout ------------------------------------------------------------------


def test_installed_transformers_is_supported():
    assert Version(transformers.__version__) in SpecifierSet(hf.SUPPORTED)
    hf.check_version()


def test_an_unsupported_transformers_is_refused_by_name():
    with pytest.raises(RuntimeError, match=r"transformers 4\.57\.1 is installed.*>=5\.0,<6"):
        hf.check_version("4.57.1")


def test_decoder_parts_are_the_models_own_modules(model):
    parts = hf.decoder_parts(model)
    assert parts.embed is model.get_input_embeddings() and parts.lm_head is model.get_output_embeddings()
    assert len(parts.layers) == model.config.num_hidden_layers
    with pytest.raises(hf.NotADecoder, match="Llama-family"):
        hf.decoder_parts(nn.Sequential(nn.Linear(2, 2)))


# -- layers, rotary, attention -----------------------------------------------------------


def test_call_layer_returns_the_block_and_grows_the_cache(model):
    parts = hf.decoder_parts(model)
    cache = hf.new_cache()
    for past, q in ((0, 5), (5, 1), (6, 3)):
        positions, mask = chain_inputs(past, q)
        cos, sin = hf.rope(parts.rotary, positions, torch.float32)
        hidden = torch.randn(1, q, model.config.hidden_size)
        out = hf.call_layer(parts.layers[0], hidden, mask, cos, sin, cache)
        assert out.shape == (1, q, model.config.hidden_size)
        assert hf.cache_length(cache) == past + q


class RecordingCache:
    """A duck-typed cache like privacy/public.py's PrefixKV: only `update`, which returns a fixed prefix
    (broadcast over the batch) followed by the block's own keys and values, and records every call."""

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.prefix, self.calls = prefix, []

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.calls.append((layer_idx, tuple(key.shape), tuple(value.shape)))
        if self.prefix is not None:
            pk, pv = (t.expand(key.shape[0], -1, -1, -1) for t in self.prefix)
            key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        return key, value


def test_call_layer_with_a_duck_typed_cache_calls_update_and_attends_to_what_it_returns(model):
    """What PrefixKV relies on: the attention calls `cache.update(key, value, layer_idx, ...)` once per layer
    with the block's keys and values [batch, kv_heads, q, head_dim], and attends to the pair it returns."""
    parts, config = hf.decoder_parts(model), model.config
    layer = parts.layers[1]
    torch.manual_seed(0)
    prompt = torch.randn(1, 4, config.hidden_size)
    candidates = torch.randn(3, 1, config.hidden_size)  # three candidates for position 4, one row each

    def prefilled() -> hf.Cache:  # the prompt through a real DynamicCache
        cache = hf.new_cache()
        positions, mask = chain_inputs(0, 4)
        hf.call_layer(layer, prompt, mask, *hf.rope(parts.rotary, positions, torch.float32), cache)
        return cache

    with torch.inference_mode():
        reference = prefilled()
        prefix = (reference.layers[1].keys, reference.layers[1].values)  # [1, kv_heads, 4, head_dim]
        recording = RecordingCache(prefix)
        positions, mask = chain_inputs(4, 1)
        cos, sin = hf.rope(parts.rotary, positions, torch.float32)
        out = hf.call_layer(layer, candidates, None, cos, sin, recording)
        block = (3, config.num_key_value_heads, 1, config.head_dim)
        assert recording.calls == [(1, block, block)]
        assert out.shape == (3, 1, config.hidden_size)

        for row in range(3):  # each candidate as a real cached step after the prompt
            expected = hf.call_layer(layer, candidates[row : row + 1], mask, cos, sin, prefilled())
            torch.testing.assert_close(out[row : row + 1], expected, rtol=1e-5, atol=1e-5)

        alone = RecordingCache()  # no prefix: the update's return is all there is to attend to
        hf.call_layer(parts.layers[0], candidates, None, cos, sin, alone)
        assert [c[0] for c in alone.calls] == [0]


def test_layer_by_layer_equals_the_full_model(model):
    """Explicit masks, rotary tables and the cache give the model's own logits, prefill and a cached step."""
    ids = [3, 17, 4, 9, 60, 2]
    with torch.inference_mode():
        full = model(torch.tensor([ids])).logits[0]  # [6, vocab]
        cache = hf.new_cache()
        prefill = run_layers(model, ids[:4], cache)
        step = run_layers(model, ids[4:], cache, past=4)
    torch.testing.assert_close(torch.cat([prefill, step]), full, rtol=1e-4, atol=1e-4)


def test_rotary_from_a_skeleton_matches_the_models_own(tiny_llama, model):
    sk = build_skeleton(tiny_llama)
    assert next(sk.parts.rotary.buffers()).is_meta
    rotary = hf.rotary(sk.parts.rotary, sk.config, "cpu")
    positions = torch.tensor([[0, 1, 2, 7, 7, 300]])
    for dtype in (torch.float32, torch.float16):
        ours = hf.rope(rotary, positions, dtype)
        theirs = model.model.rotary_emb(torch.empty(0, dtype=dtype), positions)
        assert ours[0].shape == (1, 6, model.config.head_dim) and ours[0].dtype == dtype
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)


def test_a_registered_attention_is_used_and_the_switch_is_read_on_each_call(model):
    calls = []

    def probe(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        calls.append(tuple(query.shape))
        return hf.sdpa_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    hf.register_attention("splitinfer_contract_probe", probe)
    hf.register_attention("splitinfer_contract_probe", probe)  # idempotent
    layers = model.config.num_hidden_layers
    try:
        hf.set_attention(model.config, "splitinfer_contract_probe")
        assert hf.attention_name(model.config) == "splitinfer_contract_probe"
        with torch.inference_mode():
            run_layers(model, [1, 2, 3], hf.new_cache())
        assert calls == [(1, model.config.num_attention_heads, 3, model.config.head_dim)] * layers
    finally:
        hf.set_attention(model.config, "sdpa")
    with torch.inference_mode():
        run_layers(model, [1, 2, 3], hf.new_cache())
    assert len(calls) == layers  # switched back: the same modules no longer call it


def test_the_attention_function_gets_the_caches_return_and_the_mask_untouched(model):
    """What the cloud's batched passes rely on (cloud/batch.py): whatever `cache.update` returns and whatever
    object is passed as the mask reach the registered attention function as they are, and its output
    [batch, q, heads, head_dim] goes on through the output projection."""
    seen = []
    key_token, value_token, mask_token = object(), object(), object()

    class Passing:
        def update(self, key, value, layer_idx, *args, **kwargs):
            self.block = (key, value)
            return key_token, value_token

    cache = Passing()

    def probe(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        seen.append((key, value, attention_mask))
        k, v = cache.block
        return hf.sdpa_attention(module, query, k, v, None, dropout, scaling, **kwargs)

    hf.register_attention("splitinfer_contract_passing", probe)
    parts = hf.decoder_parts(model)
    positions, mask = chain_inputs(0, 1)
    cos, sin = hf.rope(parts.rotary, positions, torch.float32)
    hidden = torch.randn(1, 1, model.config.hidden_size)
    try:
        hf.set_attention(model.config, "splitinfer_contract_passing")
        with torch.inference_mode():
            out = hf.call_layer(parts.layers[0], hidden, mask_token, cos, sin, cache)
    finally:
        hf.set_attention(model.config, "sdpa")
    assert len(seen) == 1 and all(a is b for a, b in zip(seen[0], (key_token, value_token, mask_token)))
    with torch.inference_mode():
        expected = hf.call_layer(parts.layers[0], hidden, mask, cos, sin, hf.new_cache())
    torch.testing.assert_close(out, expected)


# -- the cache ---------------------------------------------------------------------------


def filled_cache(n: int, layers=(0, 3)):
    """A cache whose entry j holds the value j in every slot (values: j + 100), in the given layer slots only."""
    cache = hf.new_cache()
    values = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 4).contiguous()
    for layer in layers:
        cache.update(values.clone(), values.clone() + 100, layer)
    return cache


def entries(cache, layer=3) -> list[int]:
    return cache.layers[layer].keys[0, 0, :, 0].long().tolist()


def test_new_cache_is_empty_and_other_processes_layers_stay_uninitialised():
    assert hf.cache_length(hf.new_cache()) == 0
    cache = filled_cache(5)
    assert hf.cache_length(cache) == 5
    assert not cache.layers[1].is_initialized and cache.layers[1].get_seq_length() == 0


def test_crop():
    cache = filled_cache(6)
    hf.crop(cache, 6)
    assert hf.cache_length(cache) == 6
    hf.crop(cache, 4)
    assert hf.cache_length(cache) == 4 and entries(cache) == [0, 1, 2, 3] and entries(cache, 0) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        hf.crop(cache, 5)


def test_relocate_a_non_contiguous_path():
    cache = filled_cache(8)  # 4 committed + a 4-node tree verified at 4..7
    hf.relocate(cache, 4, [4, 6, 7])  # accepted path: root, then nodes 2 and 3 of the block
    assert entries(cache) == [0, 1, 2, 3, 4, 6, 7]
    assert entries(cache, 0) == [0, 1, 2, 3, 4, 6, 7]
    assert cache.layers[3].values[0, 1, :, 0].long().tolist() == [100, 101, 102, 103, 104, 106, 107]
    assert not cache.layers[1].is_initialized  # slots another process holds stay untouched


@pytest.mark.parametrize("start, indices", [(9, []), (4, [3]), (4, [8]), (4, [5, 5])])
def test_relocate_rejects_bad_edits(start, indices):
    with pytest.raises(ValueError):
        hf.check_relocate(8, start, indices)
    cache = filled_cache(8)
    with pytest.raises(ValueError):
        hf.relocate(cache, start, indices)
    assert entries(cache) == list(range(8))


# -- saving a GGUF-loaded model ----------------------------------------------------------


class FakeTokenizer:
    def save_pretrained(self, out: Path) -> None:
        (Path(out) / "tokenizer.json").write_text("{}")


def test_a_dequantised_model_saves_as_plain_safetensors(tiny_llama, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    # What loading a GGUF leaves behind: a quantiser save_pretrained refuses, and its config entry.
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    model.config.quantization_config = {"quant_method": "gguf"}
    hf.save_dequantised(model, FakeTokenizer(), tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert (tmp_path / "tokenizer.json").is_file()
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.mlp.up_proj.weight"), model.model.layers[0].mlp.up_proj.weight)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert getattr(reloaded, "hf_quantizer", None) is None


# -- oneDNN ------------------------------------------------------------------------------


def onednn_or_skip() -> None:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    try:
        hf.onednn_pack(torch.ones(4, 8), 16)
    except RuntimeError as exc:
        pytest.skip(f"this torch build's oneDNN lacks the weight reorder op: {exc}")


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_equals_f_linear(rows, bias):
    onednn_or_skip()
    torch.manual_seed(0)
    weight, b = torch.randn(80, 48), (torch.randn(80) if bias else None)
    x = torch.randn(1, rows, 48)
    with torch.inference_mode():
        out = hf.onednn_linear(x, hf.onednn_pack(weight, 16), b)
    assert out.shape == (1, rows, 80)
    torch.testing.assert_close(out, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_linear_names_are_every_linear_map_of_a_llama_layer():
    """defences.perturb_layers and lora_finetune pick the layers' linear maps by these names."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    layer = LlamaForCausalLM(config).model.layers[0]
    names = {name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == set(hf.LINEAR_NAMES)
