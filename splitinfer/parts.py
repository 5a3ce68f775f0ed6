"""The three pieces of the split model, each a plain forward over hidden states.

    LocalHead : token ids -> embedding -> layers 0..cloud_start-1        (trusted)
    CloudSpan : hidden -> layers cloud_start..cloud_end                  (untrusted)
    LocalTail : hidden -> layers cloud_end+1..L-1 -> final norm -> LM head (trusted)

Every forward takes explicit rotary tensors, an explicit additive mask against
the whole cache and the cache itself, so the same code serves prefill, one
token, and a token tree.  The decoder layers are the model's own
transformers modules (Llama, Mistral, Qwen2 ...), called through hf.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from . import hf
from .config import Split
from .models import build_skeleton, materialise, random_weights

log = logging.getLogger(__name__)


class LayerSpan(nn.Module):
    """A contiguous run of decoder layers; each keeps its global index, which is its slot in the cache."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        self.indices = sorted(layers)
        self.layers = nn.ModuleList(layers[i] for i in self.indices)

    @property
    def devices(self) -> list[torch.device]:
        """Each layer's device, in order (several under a cloud device map, cloud/placement.py)."""
        return [next(layer.parameters()).device for layer in self.layers]

    def forward(
        self,
        hidden: torch.Tensor,  # [1, q, hidden_size]
        cos: torch.Tensor,  # [1, q, head_dim]
        sin: torch.Tensor,  # [1, q, head_dim]
        mask: torch.Tensor,  # [1, 1, q, past + q] additive
        cache: hf.Cache,
    ) -> torch.Tensor:  # [1, q, hidden_size]
        here = hidden.device
        for layer, device in zip(self.layers, self.devices):
            if device != here:  # the next device of a device map: the block's tensors follow the layers
                hidden, cos, sin, mask, here = hidden.to(device), cos.to(device), sin.to(device), mask.to(device), device
            hidden = hf.call_layer(layer, hidden, mask, cos, sin, cache)
        return hidden


class LocalHead(nn.Module):
    """Embedding, rotary tables and the first local layers."""

    def __init__(self, embed: nn.Module, rotary: nn.Module, span: LayerSpan):
        super().__init__()
        self.embed, self.rotary, self.span = embed, rotary, span

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, q, head_dim] for positions [1, q], as the model's own rotary embedding makes them."""
        return hf.rope(self.rotary, positions, dtype)

    def forward(self, tokens: torch.Tensor, cos, sin, mask, cache) -> torch.Tensor:
        return self.span(self.embed(tokens), cos, sin, mask, cache)  # tokens [1, q] -> [1, q, hidden]


class LocalTail(nn.Module):
    """The last local layers, the final norm and the LM head."""

    def __init__(self, span: LayerSpan, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.span, self.norm, self.lm_head = span, norm, lm_head

    def forward(
        self, hidden, cos, sin, mask, cache, features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [q, vocab] float32; with `features`, also the final-norm outputs the LM head reads [q, H]
        float32 (what a draft head is trained on)."""
        normed = self.norm(self.span(hidden, cos, sin, mask, cache))  # [1, q, H]
        logits = self.lm_head(normed)[0].float()  # [q, vocab]
        return (logits, normed[0].float()) if features else logits


class CloudSpan(LayerSpan):
    """The cloud's layers; the cloud has nothing else (no embedding, head, norm or tokenizer)."""


def describe(held: dict[str, int]) -> dict:
    """Parameter summary for logs and /health."""
    return {"tensors": len(held), "parameters": sum(held.values()), "names": sorted(held)}


def load_local(
    model_dir: Path, split: Split, device: str, dtype: torch.dtype, seed: int | None = None
) -> tuple[LocalHead, LocalTail, PretrainedConfig, dict[str, int]]:
    """The trusted side: tokenizer-facing parts only, never the cloud's layers (`seed`: drawn, not read)."""
    sk = build_skeleton(model_dir)
    if sk.num_layers != split.num_layers:
        raise ValueError(f"split is for {split.num_layers} layers, the model has {sk.num_layers}")
    p = sk.parts
    modules: dict[str, nn.Module] = {"model.embed_tokens": p.embed, "model.norm": p.norm}
    for i in split.local_layers:
        modules[f"model.layers.{i}"] = p.layers[i]
    tied = bool(getattr(sk.config, "tie_word_embeddings", False))
    if not tied:
        modules["lm_head"] = p.lm_head
    held = materialise(model_dir, modules, device, dtype, random_weights(seed, sk.config))
    if tied:  # one matrix serves both ends, as in the full model
        p.lm_head.weight = p.embed.weight
    rotary = hf.rotary(p.rotary, sk.config, device)
    head = LocalHead(p.embed, rotary, LayerSpan({i: p.layers[i] for i in split.head_layers}))
    tail = LocalTail(LayerSpan({i: p.layers[i] for i in split.tail_layers}), p.norm, p.lm_head)
    return head, tail, sk.config, held


def load_cloud(
    model_dir: Path, split: Split, device: str, dtype: torch.dtype, seed: int | None = None,
    device_map: str | None = None,
) -> tuple[CloudSpan, PretrainedConfig, dict[str, int]]:
    """The untrusted side: its decoder layers and nothing more (`seed`: drawn, not read; `device_map`: auto,
    balanced or a JSON file placing the layers over several devices, cloud/placement.py)."""
    sk = build_skeleton(model_dir)
    if sk.num_layers != split.num_layers:
        raise ValueError(f"split is for {split.num_layers} layers, the model has {sk.num_layers}")
    layers = {i: sk.parts.layers[i] for i in split.cloud_layers}
    modules = {f"model.layers.{i}": m for i, m in layers.items()}
    where: str | dict[str, str] = device
    if device_map is not None:
        from .cloud.placement import resolve

        where = {f"model.layers.{i}": d for i, d in resolve(device_map, layers, dtype).items()}
    held = materialise(model_dir, modules, where, dtype, random_weights(seed, sk.config))
    return CloudSpan(layers), sk.config, held


def load_whole(model_dir: Path, device: str, dtype: torch.dtype, seed: int | None = None) -> nn.Module:
    """The unsplit causal LM (transformers' own, for `generate`), from the same files or seed as the split's
    sides: the reference the split must equal."""
    sk = build_skeleton(model_dir)
    p = sk.parts
    modules: dict[str, nn.Module] = {"model.embed_tokens": p.embed, "model.norm": p.norm}
    modules.update({f"model.layers.{i}": layer for i, layer in enumerate(p.layers)})
    tied = bool(getattr(sk.config, "tie_word_embeddings", False))
    if not tied:
        modules["lm_head"] = p.lm_head
    materialise(model_dir, modules, device, dtype, random_weights(seed, sk.config))
    if tied:
        p.lm_head.weight = p.embed.weight
    hf.set_rotary(sk.model, hf.rotary(p.rotary, sk.config, device))
    return sk.model.eval()
