"""One token per round trip: the baseline every other strategy must match token for token."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from . import TreeLM, argmax, clip


def sequential(lm: TreeLM, prompt: Sequence[int], max_new: int, eos: frozenset[int]) -> Iterator[list[int]]:
    if max_new < 1:
        return
    token = argmax(lm.prefill(prompt))
    out, done = clip([token], 0, max_new, eos)
    yield out
    produced = 1
    while not done:
        logits = lm.forward([token])  # [1, vocab]
        lm.commit()
        token = argmax(logits[-1])
        out, done = clip([token], produced, max_new, eos)
        produced += 1
        yield out
