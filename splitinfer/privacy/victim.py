"""The victim: the project's real local side, computing exactly what the cloud receives.

`load_victim` loads the project's own `LocalHead` / `LocalTail` (and, when asked, the
cloud's span) with the project's loaders; `wire_states` is `SplitModel.forward`'s
prefill path cast to float16 by `remote.to_wire`, optionally with the noise defence;
`TapSpan` records what crosses in both directions during real generations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import hf, masks
from ..config import Split
from ..models import load_config
from ..parts import LocalHead, load_cloud, load_local
from ..remote import InProcessSpan, WireTiming, to_wire
from .defences import add_noise
from .public import DTYPE


def victim_split(num_layers: int, depth: int) -> Split:
    """k local layers before the wire; the last two layers local as in the default (or fewer for tiny models)."""
    return Split(num_layers, cloud_start=depth, cloud_end=max(num_layers - 3, depth))


def load_victim(model_dir: Path, depth: int, with_cloud: bool = False):
    """(LocalHead, LocalTail, split[, CloudSpan]) loaded by the project's own loaders, float32 on the CPU."""
    model_dir = Path(model_dir)
    split = victim_split(load_config(model_dir).num_hidden_layers, depth)
    head, tail, _, _ = load_local(model_dir, split, "cpu", DTYPE)
    if not with_cloud:
        return head, tail, split
    span, _, _ = load_cloud(model_dir, split, "cpu", DTYPE)
    return head, tail, split, span


@torch.inference_mode()
def wire_states(head: LocalHead, ids: Sequence[int], sigma: float = 0.0, generator: torch.Generator | None = None) -> np.ndarray:
    """What the cloud receives for a prompt: `SplitModel.forward`'s prefill path, then `to_wire` (float16)."""
    parents = masks.chain(len(ids))
    block = masks.block_mask(parents)
    mask = masks.additive(masks.full_mask(0, block), DTYPE)
    cos, sin = head.rope(masks.positions(0, parents), DTYPE)
    hidden = head(torch.tensor([list(ids)], dtype=torch.long), cos, sin, mask, hf.new_cache())
    return to_wire(add_noise(hidden, sigma, generator)[0])



class TapSpan:
    """Wraps the cloud's span (in-process, float16 wire rounding included): adds the noise defence to what
    is sent, and records what the cloud receives and returns, position by position."""

    def __init__(self, inner: InProcessSpan, sigma: float = 0.0, seed: int = 0):
        self.inner, self.sigma = inner, sigma
        self.generator = torch.Generator().manual_seed(seed)
        self.max_step_tokens = inner.max_step_tokens
        self.sent: list[np.ndarray] = []  # [q, H] float16 per forward
        self.returned: list[np.ndarray] = []

    def forward(self, hidden, cos, sin, block) -> tuple[torch.Tensor, WireTiming]:
        hidden = add_noise(hidden, self.sigma, self.generator)
        self.sent.append(to_wire(hidden[0]))
        out, timing = self.inner.forward(hidden, cos, sin, block)
        self.returned.append(to_wire(out[0]))
        return out, timing

    def crop(self, length: int) -> None:
        self.inner.crop(length)

    def relocate(self, start: int, indices: list[int]) -> None:
        self.inner.relocate(start, indices)

    def close(self) -> None:
        self.inner.close()
