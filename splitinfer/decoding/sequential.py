"""One token per round trip: the baseline every other strategy must match token for token."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from . import TreeLM, argmax, clip


def sequential(lm: TreeLM, prompt: Sequence[int], max_new: int, eos: frozenset[int]) -> Iterator[list[int]]:
    """Greedy: the argmax, one token per model call."""
    return one_by_one(lm, prompt, max_new, eos, argmax)


def one_by_one(
    lm: TreeLM, prompt: Sequence[int], max_new: int, eos: frozenset[int], pick: Callable[[torch.Tensor], int]
) -> Iterator[list[int]]:
    """One token per model call, chosen from its logits [vocab] by `pick` (greedy or sampling)."""
    if max_new < 1:
        return
    token = pick(lm.prefill(prompt))
    out, done = clip([token], 0, max_new, eos)
    yield out
    produced = 1
    while not done:
        logits = lm.forward([token])  # [1, vocab]
        lm.commit()
        token = pick(logits[-1])
        out, done = clip([token], produced, max_new, eos)
        produced += 1
        yield out
