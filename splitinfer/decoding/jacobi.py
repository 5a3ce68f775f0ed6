"""Jacobi decoding: guess a block, refine it by fixed-point iteration, one round trip per iteration.

Each iteration runs [next, g1, ..., g_{n-1}] through the model.  The model's
argmax after each position is the next iterate; the guesses that already
equal it form the converged prefix, which is committed with the token the
model predicts after it (so at least one token per iteration).  The rest of
the iterate becomes the next guess.  Exact, and slow over a WAN: guesses
rarely converge more than a token or two ahead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from . import TreeLM, argmax, clip


def jacobi(lm: TreeLM, prompt: Sequence[int], max_new: int, eos: frozenset[int], *, block: int = 8) -> Iterator[list[int]]:
    if max_new < 1:
        return
    block = max(1, min(block, lm.max_step_tokens))
    token = argmax(lm.prefill(prompt))
    out, done = clip([token], 0, max_new, eos)
    produced = len(out)
    yield out
    guesses = [token] * (block - 1)  # the usual initial guess: any tokens will do, they only cost acceptance
    while not done:
        logits = lm.forward([token, *guesses])  # [block, vocab]
        predictions = logits.argmax(-1).tolist()
        k = 0
        while k < len(guesses) and guesses[k] == predictions[k]:
            k += 1
        lm.commit(range(k + 1))  # the root and the converged guesses
        new = guesses[:k] + [predictions[k]]
        out, done = clip(new, produced, max_new, eos)
        produced += len(out)
        token = predictions[k]
        rest = predictions[k + 1 :]
        guesses = (rest + [token] * block)[: block - 1]
        yield out
