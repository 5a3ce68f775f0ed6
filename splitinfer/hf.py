"""The one adapter to transformers' (and torch's) internals: every behaviour the split relies on, by name.

The rest of the package calls the model's own modules only through these
functions, so a transformers upgrade that moves something fails here (and in
tests/test_hf_contract.py) rather than somewhere in the middle of a step.
Public entry points (AutoConfig, AutoModelForCausalLM.from_config /
from_pretrained, AutoTokenizer) are used directly where they are needed.

Each function's docstring says which internal behaviour it relies on; checked
against transformers 5.25 and torch 2.13.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn
from transformers import AttentionInterface, DynamicCache, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SUPPORTED = ">=5.0,<6"  # the transformers releases this adapter is written for (as pyproject.toml pins)

# The attribute names of a Llama-family decoder layer's linear maps (attention and MLP).
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -- version ---------------------------------------------------------------------------


@functools.cache
def check_version(installed: str = transformers.__version__) -> None:
    """Refuse a transformers outside SUPPORTED, naming both, before any internal below is relied on."""
    if Version(installed) not in SpecifierSet(SUPPORTED):
        raise RuntimeError(
            f"transformers {installed} is installed; splitinfer supports transformers{SUPPORTED} "
            f'(pip install "transformers{SUPPORTED}")'
        )


# -- the model's pieces ------------------------------------------------------------------


class DecoderParts(NamedTuple):
    """The pieces of a Llama-family causal LM that the split calls one by one."""

    embed: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    rotary: nn.Module
    lm_head: nn.Linear


class NotADecoder(ValueError):
    """A model without the Llama-family layout (models.build_skeleton turns it into a ModelError)."""


def decoder_parts(model: nn.Module) -> DecoderParts:
    """`model.model.{embed_tokens, layers, norm, rotary_emb}` and `model.lm_head`: the layout of transformers'
    Llama, Mistral, Qwen2 ... causal LMs (a decoder under `.model`, the LM head beside it)."""
    decoder = getattr(model, "model", None)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, attr):
            raise NotADecoder(f"{type(model).__name__} is not a Llama-family decoder (no model.{attr})")
    if not hasattr(model, "lm_head"):
        raise NotADecoder(f"{type(model).__name__} is not a Llama-family decoder (no lm_head)")
    return DecoderParts(decoder.embed_tokens, decoder.layers, decoder.norm, decoder.rotary_emb, model.lm_head)


def rotary(meta_rotary: nn.Module, config: PretrainedConfig, device: str | torch.device) -> nn.Module:
    """A working copy of the model's rotary embedding (a skeleton's is on the meta device, without tables).

    Relies on the rotary class computing its frequency buffers from `config` alone in `__init__(config=...)`.
    """
    return type(meta_rotary)(config=config).to(device)


def set_rotary(model: nn.Module, rotary: nn.Module) -> None:
    """Give a skeleton-built causal LM a working rotary embedding (decoder_parts' layout: model.model.rotary_emb,
    which the decoder's forward reads)."""
    model.model.rotary_emb = rotary


def layer_classes(config: PretrainedConfig) -> tuple[type, type]:
    """(decoder layer class, rotary class) of `config`'s model type, read off a meta-device skeleton.

    Relies on AutoModelForCausalLM mapping the config to a causal LM with the decoder_parts layout, on the
    layer class taking `(config, layer_idx)` and the rotary class `(config=...)`, as the Llama family does.
    """
    with torch.device("meta"):
        parts = decoder_parts(transformers.AutoModelForCausalLM.from_config(config))
    return type(parts.layers[0]), type(parts.rotary)


def decoder_layer(config: PretrainedConfig) -> nn.Module:
    """A fresh, randomly initialised decoder layer of the config's family, at cache index 0 (a draft head's)."""
    return layer_classes(config)[0](config, layer_idx=0)


def rotary_for(config: PretrainedConfig) -> nn.Module:
    """The rotary embedding of the config's family, with its tables (on the CPU)."""
    return layer_classes(config)[1](config=config)


def rope(rotary: nn.Module, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, q, head_dim] for positions [1, q]: the rotary module's `forward(x, position_ids)`,
    which reads only `x`'s dtype and device (an empty probe stands in for the hidden states)."""
    device = next(rotary.buffers()).device
    probe = torch.empty(0, dtype=dtype, device=device)
    return rotary(probe, positions.to(device))


@functools.cache
def _cache_keyword(layer_class: type) -> str:
    """The decoder layer's name for the cache argument: `cache` in recent 5.x releases, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(layer_class.forward).parameters else "past_key_values"


def call_layer(
    layer: nn.Module,
    hidden: torch.Tensor,  # [1, q, hidden_size]
    mask: torch.Tensor | None,  # [1, 1, q, past + q] additive, against the whole cache
    cos: torch.Tensor,  # [1, q, head_dim]
    sin: torch.Tensor,  # [1, q, head_dim]
    cache: DynamicCache | None,
) -> torch.Tensor:  # [1, q, hidden_size]
    """One decoder layer over a block, appending the block's keys and values to `cache` (at the layer's index).

    Relies on the layer taking an explicit 4-d additive mask, precomputed `position_embeddings=(cos, sin)` and
    the cache by keyword, and returning the hidden states (some classes drop the batch of a single row).
    The batch may hold more than one row (the privacy attacker's candidates, one token each, with mask None:
    a single query attends to every key; for q > 1 a None mask is left to the attention implementation).
    `cache` may be None (no cache: the block attends to itself only) or a duck-typed cache: the layer's
    attention calls `cache.update(key, value, layer_idx, ...)` once with the block's keys and values
    [batch, kv_heads, q, head_dim] and attends to the (keys, values) it returns (privacy/public.py's PrefixKV).
    Batched attention: what `update` returns and the `mask` object reach the attention implementation named in
    the config untouched, and its output [batch, q, heads, head_dim] goes on to the output projection; the
    cloud's passes (cloud/batch.py) carry one cache view and one mask per session through them.
    """
    kwargs = {_cache_keyword(type(layer)): cache}
    out = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), use_cache=True, **kwargs)
    return out.unsqueeze(0) if out.dim() == 2 else out


# -- attention ----------------------------------------------------------------------------

AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def register_attention(name: str, fn: AttentionFn) -> None:
    """Make `name` a valid attention implementation (idempotent): transformers' AttentionInterface is a
    process-wide table in which the attention modules look the implementation's name up on every call."""
    AttentionInterface.register(name, fn)


def set_attention(config: PretrainedConfig, name: str) -> None:
    """Switch every attention module built from `config` to `name` ("sdpa" or a registered one).

    Relies on the attention modules keeping a reference to this very config and reading its private
    `_attn_implementation` on each forward, so a switch takes effect on the next call.
    """
    config._attn_implementation = name


def attention_name(config: PretrainedConfig) -> str:
    """The attention implementation `config` currently names (see set_attention)."""
    return config._attn_implementation


def sdpa_attention(module: nn.Module, query, key, value, mask, dropout: float, scaling: float | None, **kwargs):
    """transformers' own sdpa attention function (the one named "sdpa"): it expands grouped key/value heads
    (`repeat_kv`) itself and returns ([batch, q, heads, head_dim], None)."""
    return sdpa_attention_forward(module, query, key, value, mask, dropout, scaling, **kwargs)


# -- the KV cache -------------------------------------------------------------------------
#
# A DynamicCache holds `layers[i].keys` / `.values` of shape [batch, kv_heads, seq, head_dim]; it grows its
# layer list lazily, and layers another process holds stay uninitialised (`is_initialized = False`).

Cache = DynamicCache  # the cache type every forward takes and these functions edit


def new_cache() -> DynamicCache:
    return DynamicCache()


def cache_length(cache: DynamicCache) -> int:
    """Entries held: the longest layer (the layers this process does not hold are empty)."""
    return max((layer.get_seq_length() for layer in cache.layers), default=0)


def crop(cache: DynamicCache, new_length: int) -> None:
    """Drop every entry at or after `new_length` (DynamicCache.crop with a negative count removes that many)."""
    current = cache_length(cache)
    if not 0 <= new_length <= current:
        raise ValueError(f"cannot crop a cache of {current} entries to {new_length}")
    if new_length < current:
        cache.crop(new_length - current)


def check_relocate(current: int, start: int, indices: Sequence[int]) -> None:
    """Raise ValueError unless `relocate(start, indices)` is valid on a cache of `current` entries."""
    if not 0 <= start <= current:
        raise ValueError(f"relocate start {start} outside a cache of {current} entries")
    if len(set(indices)) != len(indices):
        raise ValueError("relocate indices repeat an entry")
    for i in indices:
        if not start <= i < current:
            raise ValueError(f"relocate index {i} outside [{start}, {current})")


def relocate(cache: DynamicCache, start: int, indices: Sequence[int]) -> None:
    """Keep entries [0, start) as they are, then exactly `indices` (absolute, each >= start), in that order.

    After verifying a token tree, the accepted path's entries move up to sit right after the committed context.
    """
    check_relocate(cache_length(cache), start, indices)
    order = torch.tensor([*range(start), *indices], dtype=torch.long)
    for layer in cache.layers:
        if layer.is_initialized and layer.get_seq_length() > 0:
            order_d = order.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, order_d)
            layer.values = layer.values.index_select(-2, order_d)


# -- saving a GGUF-loaded model -----------------------------------------------------------


def save_dequantised(model: nn.Module, tokenizer, out: Path) -> None:
    """Save a model loaded from a GGUF file as plain safetensors, with its tokenizer.

    Loading a GGUF dequantises the weights but leaves the GGUF quantiser on the model (`hf_quantizer`, which
    save_pretrained refuses as not serialisable) and its `quantization_config` on the config; both go.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# -- oneDNN linear maps (private torch ops) -----------------------------------------------


def onednn_pack(weight: torch.Tensor, batch: int) -> torch.Tensor:
    """`weight` [out, in] reordered by oneDNN for blocks of up to `batch` rows (torch.ops.mkldnn, private:
    raises RuntimeError where the build's oneDNN lacks the op)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., rows, in] @ W^T + b on a weight from onednn_pack -> [..., rows, out] (torch.ops.mkldnn, private)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
