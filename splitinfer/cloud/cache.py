"""One session's keys and values in buffers that grow in chunks, so a step writes in place instead of copying.

A `DynamicCache` concatenates every layer's keys and values on every step: a
fresh copy of the whole cache per layer per step (about 9 ms of a 120 ms
one-token CPU step, benchmarks/profile_step.py).  Here each cloud layer owns one
preallocated buffer per tensor,

    keys[layer], values[layer] : [1, kv_heads, capacity, head_dim]

of which the first `length` entries are the cache.  A step writes its q new
entries at [length, length + q) and attends to a view of [0, length + q); only
when the capacity runs out is the buffer copied into one CHUNK-rounded and at
least twice as large, so the copies cost O(length) in all.  Capacity never
exceeds the session's `max_length` (what its admission reserved).

The edits are the ones the protocol names, exact like hf.py's on a DynamicCache:
`crop` forgets the entries past a length, `relocate` gathers a path of entries
up behind the committed context; `save_tail` / `restore_tail` undo a failed step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import hf

CHUNK = 256  # capacity grows in multiples of this many entries (and at least doubles)

Tail = tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]  # (length then, each layer's entries from `start` on)


class SessionCache:
    """Keys and values of the cloud's layers for one session; layer i of the model is slot `slots[i]`."""

    def __init__(self, layers: Sequence[int], max_length: int, devices: Sequence[torch.device] | None = None):
        """`devices`: each layer's device, where its keys and values are kept (a device map's); default: the
        device of the first block written."""
        self.slots = {layer: slot for slot, layer in enumerate(layers)}
        self.devices = list(devices) if devices is not None else None
        self.max_length = max_length
        self.length = 0  # entries that are the cache; the rest of each buffer is scratch
        self.keys: list[torch.Tensor] = []  # one [1, kv_heads, capacity, head_dim] per layer, made on first write
        self.values: list[torch.Tensor] = []

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @torch.inference_mode()  # the buffers are inference tensors (made in a pass): edits must be too
    def ensure(self, needed: int, like: torch.Tensor) -> None:
        """Room for `needed` entries; `like` [1, kv_heads, q, head_dim] gives the shape, dtype and device."""
        if needed > self.max_length:
            raise ValueError(f"{needed} entries exceed this session's {self.max_length}")
        if needed <= self.capacity:
            return
        grown = max(2 * self.capacity, -(-needed // CHUNK) * CHUNK)
        if 2 * grown >= self.max_length:  # straight to the end while the old buffers are at most half of it:
            grown = self.max_length  # a growth never holds more than 1.5 x max_length (memory.SESSION_GROWTH)
        _, kv_heads, _, head_dim = like.shape
        where = self.devices or [like.device] * len(self.slots)
        new = [like.new_empty((1, kv_heads, grown, head_dim), device=d) for d in (*where, *where)]
        for old, fresh in zip((*self.keys, *self.values), new):
            fresh[:, :, : self.length] = old[:, :, : self.length]
        self.keys, self.values = new[: len(self.slots)], new[len(self.slots) :]

    @torch.inference_mode()
    def write(self, layer: int, at: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put a block's keys/values [1, kv_heads, q, head_dim] at entries [at, at + q) of `layer`; return views
        of entries [0, at + q), what the block attends to.  `length` is the caller's to move (`advance`)."""
        end = at + keys.shape[2]
        self.ensure(end, keys)
        slot = self.slots[layer]
        self.keys[slot][:, :, at:end] = keys
        self.values[slot][:, :, at:end] = values
        return self.keys[slot][:, :, :end], self.values[slot][:, :, :end]

    def advance(self, length: int) -> None:
        """Every layer now holds `length` entries (after a block was written to all of them)."""
        self.length = length

    # -- the protocol's edits ------------------------------------------------------------------

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} entries to {length}")
        self.length = length

    @torch.inference_mode()
    def relocate(self, start: int, indices: Sequence[int]) -> None:
        """Keep entries [0, start), then exactly `indices` (absolute, each in [start, length)), in that order."""
        hf.check_relocate(self.length, start, indices)
        end = start + len(indices)
        if self.keys and list(indices) != list(range(start, end)):
            order = torch.tensor(list(indices), dtype=torch.long)
            on: dict[torch.device, torch.Tensor] = {}  # the order, once per device the layers are on
            for buffer in (*self.keys, *self.values):
                here = on.setdefault(buffer.device, order.to(buffer.device))
                buffer[:, :, start:end] = buffer.index_select(2, here)  # gathered (a copy) before written
        self.length = end

    @torch.inference_mode()
    def save_tail(self, start: int) -> Tail:
        """What `restore_tail` needs to undo anything done to entries >= `start` (a failed step)."""
        return self.length, [(k[:, :, start : self.length].clone(), v[:, :, start : self.length].clone())
                             for k, v in zip(self.keys, self.values)]

    @torch.inference_mode()
    def restore_tail(self, start: int, saved: Tail) -> None:
        length, tails = saved
        for (k, v), (k_tail, v_tail) in zip(zip(self.keys, self.values), tails):
            k[:, :, start:length] = k_tail
            v[:, :, start:length] = v_tail
        self.length = length
