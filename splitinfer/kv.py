"""Edits of a transformers `DynamicCache`: roll back, and keep an accepted speculation path.

Checked against transformers 5.24: a `DynamicCache` holds `layers[i].keys` /
`.values` of shape [batch, kv_heads, seq, head_dim]; `crop` takes a negative
count of tokens to remove; uninitialised layers (those another process holds)
have `is_initialized = False`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    return DynamicCache()


def length(cache: DynamicCache) -> int:
    return max((layer.get_seq_length() for layer in cache.layers), default=0)


def crop(cache: DynamicCache, new_length: int) -> None:
    """Drop every entry at or after `new_length`."""
    current = length(cache)
    if not 0 <= new_length <= current:
        raise ValueError(f"cannot crop a cache of {current} entries to {new_length}")
    if new_length < current:
        cache.crop(new_length - current)  # negative: the number of entries to remove


def keep(cache: DynamicCache, start: int, indices: Sequence[int]) -> None:
    """Keep entries [0, start) as they are, then exactly `indices` (absolute, each >= start), in that order.

    This is the spec's `relocate`: after verifying a token tree, the accepted
    path's entries move up to sit right after the committed context.
    """
    current = length(cache)
    check_keep(current, start, indices)
    order = torch.tensor([*range(start), *indices], dtype=torch.long)
    for layer in cache.layers:
        if layer.is_initialized and layer.get_seq_length() > 0:
            order_d = order.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, order_d)
            layer.values = layer.values.index_select(-2, order_d)


def check_keep(current: int, start: int, indices: Sequence[int]) -> None:
    if not 0 <= start <= current:
        raise ValueError(f"relocate start {start} outside a cache of {current} entries")
    if len(set(indices)) != len(indices):
        raise ValueError("relocate indices repeat an entry")
    for i in indices:
        if not start <= i < current:
            raise ValueError(f"relocate index {i} outside [{start}, {current})")


def save_tail(cache: DynamicCache, start: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Copies of every layer's entries from `start` on: what `restore_tail` puts back after a failed step."""
    saved: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for layer in cache.layers:
        if layer.is_initialized and layer.get_seq_length() > 0:
            saved.append((layer.keys[..., start:, :].clone(), layer.values[..., start:, :].clone()))
        else:
            saved.append(None)
    return saved


def restore_tail(cache: DynamicCache, start: int, saved: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
    """Undo whatever happened to entries >= `start` since `save_tail(cache, start)`; entries before it are untouched.

    Layers the failed step created (a DynamicCache grows its layer list lazily) are emptied back to `start`.
    """
    for i, layer in enumerate(cache.layers):
        if not layer.is_initialized:
            continue
        keys, values = layer.keys[..., :start, :], layer.values[..., :start, :]
        tail = saved[i] if i < len(saved) else None
        if tail is not None:
            keys, values = torch.cat([keys, tail[0]], dim=-2), torch.cat([values, tail[1]], dim=-2)
        layer.keys, layer.values = keys, values
