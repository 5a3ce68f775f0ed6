"""One pass of the cloud's layers over every waiting session's rows: Orca's selective batching.

    rows of sessions a, b, c          [1, qa + qb + qc, H]   one matrix through norms, QKV, output and MLP maps
      -> per layer: keys/values split back per session, written into each session's own cache (cache.py)
      -> attention per session, against its own cache with its own additive mask (tree masks included)
      -> rows cat'ed again for the output projection and the MLP
    -> split back: [1, qa, H], [1, qb, H], [1, qc, H]

The decoder layers are the model's own transformers modules (hf.call_layer); two
stand-ins carry the batch through them: `BatchCache` is the duck-typed cache
whose `update` writes each session's keys and values and returns one view per
session, and `BatchMasks` rides in the mask argument.  The attention function
registered here receives both unchanged (hf.py, "batched attention") and runs
the wrapped attention once per session.  A pass of one session makes exactly the
calls the unbatched span makes, on the same rows: the replies are bitwise equal
(tests/test_batching.py); with several sessions only the maps' row blocking
differs, so replies agree up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import hf
from ..kernels import ATTENTION, attention
from ..parts import CloudSpan
from .cache import SessionCache

BATCHED = {"auto": "splitinfer_batched", "torch": "splitinfer_batched_sdpa"}  # by the kernels setting it wraps


@dataclass
class Rows:
    """One session's share of a pass."""

    cache: SessionCache
    at: int  # cache entries before these rows: they are written at [at, at + q)
    hidden: torch.Tensor  # [1, q, H]
    cos: torch.Tensor  # [1, q, head_dim]
    sin: torch.Tensor  # [1, q, head_dim]
    mask: torch.Tensor  # [1, 1, q, at + q] additive

    @property
    def q(self) -> int:
        return self.hidden.shape[1]


class BatchMasks(list):
    """Each session's additive mask [1, 1, q, at + q], in pass order (travels where the layer expects a mask)."""


class BatchCache:
    """The cache a layer sees during a pass: `update` splits the block's keys/values by session."""

    def __init__(self, rows: Sequence[Rows]):
        self.rows = rows
        self.sizes = [r.q for r in rows]

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        # keys, values: [1, kv_heads, sum(q), head_dim] -> one view per session [1, kv_heads, at + q, head_dim]
        out_k, out_v = [], []
        for r, k, v in zip(self.rows, keys.split(self.sizes, dim=2), values.split(self.sizes, dim=2)):
            k_all, v_all = r.cache.write(layer_idx, r.at, k, v)
            out_k.append(k_all)
            out_v.append(v_all)
        return out_k, out_v


def _per_session(inner):
    """An attention function that runs `inner` once per session when handed a batch, else passes through."""

    def batched(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        if not isinstance(attention_mask, BatchMasks):  # an unbatched call (the in-process span, a test)
            return inner(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        sizes = [m.shape[2] for m in attention_mask]
        outs = [
            inner(module, q, k, v, m, dropout, scaling, **kwargs)[0]  # [1, q, heads, head_dim]
            for q, k, v, m in zip(query.split(sizes, dim=2), key, value, attention_mask)
        ]
        return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None

    return batched


def use_batching(config) -> None:
    """Make the cloud's layers (built from `config`) take batches, wrapping the attention kernels.py chose."""
    if hf.attention_name(config) in BATCHED.values():
        return
    inner = attention if hf.attention_name(config) == ATTENTION else hf.sdpa_attention
    name = BATCHED["auto" if inner is attention else "torch"]
    hf.register_attention(name, _per_session(inner))
    hf.set_attention(config, name)


def run(span: CloudSpan, rows: Sequence[Rows]) -> list[torch.Tensor]:
    """Every session's rows through the span in one pass; returns each one's output [1, q, H] (caches advanced)."""
    one = len(rows) == 1  # no cat or split: exactly the unbatched calls
    hidden = rows[0].hidden if one else torch.cat([r.hidden for r in rows], dim=1)  # [1, sum(q), H]
    cos = rows[0].cos if one else torch.cat([r.cos for r in rows], dim=1)
    sin = rows[0].sin if one else torch.cat([r.sin for r in rows], dim=1)
    cache, masks = BatchCache(rows), BatchMasks(r.mask for r in rows)
    here = hidden.device
    for layer, device in zip(span.layers, span.devices):
        if device != here:  # the next device of a device map (placement.py): the pass's tensors follow
            hidden, cos, sin, here = hidden.to(device), cos.to(device), sin.to(device), device
            masks = BatchMasks(m.to(device) for m in masks)
        hidden = hf.call_layer(layer, hidden, masks, cos, sin, cache)
    for r in rows:
        r.cache.advance(r.at + r.q)
    return [hidden] if one else list(hidden.split([r.q for r in rows], dim=1))
