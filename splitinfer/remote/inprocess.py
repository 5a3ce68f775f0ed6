"""The cloud's span called in this process: a `Span` (engine.py) without a network.

`InProcessSpan` runs the cloud's layers directly, with the wire's float16 rounding
on everything that would cross it, so a `SplitModel` over it computes what the
real split computes.  Baselines and the privacy experiment use it; tests reach it
through `splitinfer.testing` too.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .. import hf, masks
from .transport import WireTiming, to_wire

if TYPE_CHECKING:
    from ..parts import CloudSpan


class InProcessSpan:
    """The cloud's layers in this process, with the same float16 rounding as the wire; for tests and baselines."""

    def __init__(self, span: CloudSpan, dtype: torch.dtype, max_step_tokens: int = 512):
        self.span, self.dtype, self.max_step_tokens = span, dtype, max_step_tokens
        self.cache = hf.new_cache()

    def crop(self, length: int) -> None:
        hf.crop(self.cache, length)

    def relocate(self, start: int, indices: list[int]) -> None:
        hf.relocate(self.cache, start, indices)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block: torch.Tensor | None
    ) -> tuple[torch.Tensor, WireTiming]:
        """hidden [1, q, H], cos/sin [1, q, D], block [q, q] bool or None (a chain) -> (hidden [1, q, H], timing)."""
        q, past = hidden.shape[1], hf.cache_length(self.cache)
        block = masks.causal(q) if block is None else block
        mask = masks.additive(masks.full_mask(past, block), self.dtype).to(hidden.device)

        def wire(t: torch.Tensor) -> torch.Tensor:  # what a float16 round trip does to a tensor
            return torch.from_numpy(to_wire(t)).to(hidden.device, self.dtype)

        t0 = time.perf_counter()
        out = self.span(wire(hidden), wire(cos), wire(sin), mask, self.cache)
        ms = (time.perf_counter() - t0) * 1000.0
        return wire(out).to(hidden.dtype), WireTiming(0.0, ms, ms, 0, 0)

    def close(self) -> None:
        self.cache = hf.new_cache()
