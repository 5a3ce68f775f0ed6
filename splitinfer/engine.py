"""`SplitModel`: token ids in, logits out, composing LocalHead -> cloud span -> LocalTail.

The decoding strategies see only two calls:

    logits = model.forward(tokens, parents)   # new block on top of the committed context
    model.commit(keep)                        # which block entries become context

`parents` describes a token tree (see masks.py); None is a plain chain.  After
every forward the caller commits: all of the block (None), a prefix, or any
root-to-node path of a tree.  The local caches are edited at once; the cloud's
edit rides along with the next forward.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from . import hf, masks
from .parts import LocalHead, LocalTail
from .remote import WireTiming


def _settle(t: torch.Tensor) -> None:
    """Wait for a GPU's queued kernels, so each timing holds its own compute (a CPU computes eagerly)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


class Span(Protocol):
    """The middle layers, wherever they run; `forward` returns what its round trip cost."""

    max_step_tokens: int

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block: torch.Tensor | None
    ) -> tuple[torch.Tensor, WireTiming]: ...
    def crop(self, length: int) -> None: ...
    def relocate(self, start: int, indices: list[int]) -> None: ...
    def close(self) -> None: ...


@dataclass
class StepTiming:
    """Where one forward's time went, in milliseconds."""

    tokens: int  # block size q (tokens verified)
    local_before_ms: float  # embedding + head layers + masks and rotary
    local_after_ms: float  # tail layers + norm + LM head
    serialize_ms: float  # framing on the local side
    wait_ms: float  # send -> reply
    cloud_ms: float  # the cloud's compute, as it reported
    network_ms: float  # wait - cloud

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


class SplitModel:
    def __init__(self, head: LocalHead, tail: LocalTail, span: Span, dtype: torch.dtype, device: str = "cpu"):
        self.head, self.tail, self.span = head, tail, span
        self.dtype, self.device = dtype, device
        self.cache = hf.new_cache()  # the local layers' caches (head and tail share one DynamicCache)
        self.length = 0  # committed context entries, equal on both sides
        self.pending: int | None = None  # block size of a forward not yet committed
        self.timings: list[StepTiming] = []  # every forward so far
        self._taken = 0  # timings already handed out by take_timings()

    @property
    def max_step_tokens(self) -> int:
        return self.span.max_step_tokens

    @torch.inference_mode()
    def forward(
        self, tokens: Sequence[int], parents: Sequence[int] | None = None, *, features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [q, vocab] (float32) for a block of q new tokens; commit() must follow.

        With `features`: (logits, features [q, H] float32), the final-norm outputs the LM head read."""
        if self.pending is not None:
            raise RuntimeError("commit() the previous block before the next forward")
        q = len(tokens)
        if not 1 <= q <= self.max_step_tokens:
            raise ValueError(f"a block holds 1..{self.max_step_tokens} tokens, got {q}")
        chain = parents is None
        parents = masks.chain(q) if chain else list(parents)
        if len(parents) != q:
            raise ValueError("one parent per token")
        t0 = time.perf_counter()
        block = masks.block_mask(parents)
        mask = masks.additive(masks.full_mask(self.length, block), self.dtype).to(self.device)
        cos, sin = self.head.rope(masks.positions(self.length, parents), self.dtype)
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        hidden = self.head(ids, cos, sin, mask, self.cache)  # [1, q, H]
        _settle(hidden)
        t1 = time.perf_counter()
        hidden, wire = self.span.forward(hidden, cos, sin, None if chain else block)
        t2 = time.perf_counter()
        out = self.tail(hidden, cos, sin, mask, self.cache, features=features)  # [q, vocab] (, [q, H])
        _settle(out[0] if features else out)
        t3 = time.perf_counter()
        self.pending = q
        self.timings.append(
            StepTiming(
                tokens=q,
                local_before_ms=(t1 - t0) * 1000.0,
                local_after_ms=(t3 - t2) * 1000.0,
                serialize_ms=wire.serialize_ms,
                wait_ms=wire.wait_ms,
                cloud_ms=wire.cloud_ms,
                network_ms=wire.network_ms,
            )
        )
        return out

    def take_timings(self) -> list[StepTiming]:
        """The timings of the forwards since the last call (decoding.drive pairs them with their step)."""
        fresh = self.timings[self._taken :]
        self._taken = len(self.timings)
        return fresh

    def commit(self, keep: Sequence[int] | None = None) -> None:
        """Make block entries context: all (None), or `keep`, block indices in order (a root-to-node path)."""
        q = self.pending
        if q is None:
            raise RuntimeError("nothing to commit")
        self.pending = None
        keep = list(range(q)) if keep is None else list(keep)
        if keep == list(range(len(keep))):  # a prefix: a crop is enough
            new_length = self.length + len(keep)
            if len(keep) < q:
                hf.crop(self.cache, new_length)
                self.span.crop(new_length)
        else:
            absolute = [self.length + i for i in keep]
            hf.relocate(self.cache, self.length, absolute)
            self.span.relocate(self.length, absolute)
            new_length = self.length + len(keep)
        self.length = new_length

    def prefill(self, tokens: Sequence[int]) -> torch.Tensor:
        """Run a prompt in chunks the cloud accepts and commit it; logits [vocab] after its last token."""
        if not tokens:
            raise ValueError("empty prompt")
        step = self.max_step_tokens
        for i in range(0, len(tokens), step):
            logits = self.forward(tokens[i : i + step])
            self.commit()
        return logits[-1]

    def close(self) -> None:
        self.span.close()
