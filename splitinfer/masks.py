"""Attention masks and positions for a block of new tokens on top of a KV cache.

Masks here are boolean, True = may attend.  A block of `q` new tokens is
described by `parents`: parents[i] is the index (within the block) of token
i's predecessor, or -1 when it follows the committed context directly.  A
plain chain is parents = [-1, 0, 1, ..., q-2]; a token tree shares prefixes.

The past (the `past` committed cache entries) is always fully visible, so the
only part that varies is the [q, q] block among the new tokens; that block is
what travels on the wire.  The explicit absolute mask is built on each side
against its own cache, never via `is_causal`, which is relative to the block
and wrong once a cache exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def chain(q: int) -> list[int]:
    """Parents of a plain left-to-right block of q tokens."""
    return list(range(-1, q - 1))


def check_parents(parents: Sequence[int]) -> None:
    """Parents must point backwards: the block is topologically ordered."""
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"parents[{i}] = {p}: a parent must come earlier in the block (or be -1)")


def depths(parents: Sequence[int]) -> list[int]:
    """Distance of each block token from the committed context (the first layer of the tree is 0)."""
    check_parents(parents)
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def positions(past: int, parents: Sequence[int]) -> torch.Tensor:
    """Rotary positions of the block: past + depth.  Shape [1, q]."""
    return torch.tensor([[past + d for d in depths(parents)]], dtype=torch.long)


def causal(q: int) -> torch.Tensor:
    """[q, q] bool lower triangle: a plain chain's block (block_mask(chain(q)) without the walk)."""
    return torch.ones(q, q, dtype=torch.bool).tril()


def block_mask(parents: Sequence[int]) -> torch.Tensor:
    """[q, q] bool: token i sees token j iff j is i itself or one of its ancestors."""
    check_parents(parents)
    q = len(parents)
    mask = torch.zeros(q, q, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
    return mask


def full_mask(past: int, block: torch.Tensor) -> torch.Tensor:
    """[q, past + q] bool: the whole past visible, then the block's own pattern."""
    q = block.shape[0]
    return torch.cat([torch.ones(q, past, dtype=torch.bool), block.to(torch.bool)], dim=1)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool [q, k] -> additive [1, 1, q, k] for sdpa: 0 where visible, the dtype's minimum elsewhere."""
    out = torch.zeros(mask.shape, dtype=dtype)
    out.masked_fill_(~mask, torch.finfo(dtype).min)
    return out[None, None]
