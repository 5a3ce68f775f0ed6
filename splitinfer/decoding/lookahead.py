"""Lookahead over the split: a token tree of model-free guesses verified in one round trip per step.

Each step:
  1. the root is the next token (the previous step's bonus, known to be right);
  2. candidates for what follows it come from the suffix index, the n-gram pool
     and the recycling table, merged into a tree best-first (tree.py);
  3. the tree is cut to the size that maximises expected tokens per second (budget.py);
  4. one forward verifies every node; the longest argmax-consistent path is
     accepted plus the bonus token after it; the other nodes leave both caches.
With no candidate the tree is the root alone: a plain sequential step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from . import TreeLM, argmax, clip
from .budget import CostModel
from .sources import NgramPool, RecyclingTable, SuffixIndex
from .tree import Calibration, Trie, build, verify


SOURCES = frozenset({"suffix", "ngram", "recycle"})


@dataclass
class Memory:
    """What speculation learns that outlives one generation (Token Recycling keeps its table across
    requests): the recycling table, the acceptance calibration and the step-cost model.  Local only."""

    recycle: RecyclingTable = field(default_factory=RecyclingTable)
    calibration: Calibration = field(default_factory=Calibration)
    cost: CostModel = field(default_factory=CostModel)


def lookahead(
    lm: TreeLM,
    prompt: Sequence[int],
    max_new: int,
    eos: frozenset[int],
    *,
    ngram: int = 4,
    max_verify: int | None = None,
    max_nodes: int = 64,
    depth: int = 8,
    memory: Memory | None = None,
    sources: frozenset[str] = SOURCES,
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[list[int]]:
    """max_verify pins the tree size (for experiments); otherwise it is chosen by cost up to max_nodes.
    `sources` picks candidate sources, for ablations."""
    if max_new < 1:
        return
    if not sources <= SOURCES:
        raise ValueError(f"unknown candidate sources {sorted(sources - SOURCES)}; known: {sorted(SOURCES)}")
    memory = memory or Memory()
    recycle, calibration, cost = memory.recycle, memory.calibration, memory.cost
    order = recycle.order  # context tokens a recycling entry is keyed by (the token itself included)
    limit = min(max_verify or max_nodes, lm.max_step_tokens)
    index, pool = SuffixIndex(), NgramPool(ngram)
    index.extend(prompt)
    pool.add_sequence(prompt)

    # Prefill chunk by chunk, so that every prompt position seeds the recycling table for free.
    step = lm.max_step_tokens
    for i in range(0, len(prompt), step):
        t0 = clock()
        logits = lm.forward(prompt[i : i + step])
        lm.commit()
        cost.observe(len(logits), (clock() - t0) * 1000.0, anchor=True)
        recycle.update([prompt[max(0, j + 1 - order) : j + 1] for j in range(i, i + len(logits))], logits)
    token = argmax(logits[-1])
    out, done = clip([token], 0, max_new, eos)
    produced = len(out)
    yield out

    while not done:
        trie = Trie()
        if "suffix" in sources:
            found, matched = index.continuations([*index.tokens[-index.max_key :], token], depth)
            for cont in found:
                trie.insert(cont, "suffix", matched)
        if "ngram" in sources:
            for cont in pool.lookup(token):
                trie.insert(cont, "ngram")
        next_tokens = recycle.get if "recycle" in sources else (lambda context: ([], 0))
        tree = build(token, trie, next_tokens, last(index.tokens, order - 1), calibration, limit)
        if max_verify is None:
            tree = tree.truncate(cost.best_size(tree.scores, limit))

        t0 = clock()
        logits = lm.forward(tree.tokens, tree.parents)  # [q, vocab]
        predictions = logits.argmax(-1).tolist()
        path, bonus = verify(tree, predictions)
        lm.commit(path)
        cost.observe(len(tree), (clock() - t0) * 1000.0)

        calibration.observe(tree, path)
        before = last(index.tokens, max(ngram, order - 1))
        contexts = [before + tree.path_tokens(node) for node in range(len(tree))]
        recycle.update([last(c, order) for c in contexts], logits)
        for context, prediction in zip(contexts, predictions):  # trajectory n-grams: the model after each guess
            pool.add(context[-(ngram - 1) :] + [prediction])
        accepted = [tree.tokens[n] for n in path]  # root first
        index.extend(accepted)
        pool.add_sequence(index.tokens[-(len(accepted) + ngram) :])

        new = [tree.tokens[n] for n in path[1:]] + [bonus]
        out, done = clip(new, produced, max_new, eos)
        produced += len(out)
        token = bonus
        yield out


def last(tokens: Sequence[int], n: int) -> list[int]:
    """The last n tokens (all of them when fewer; none for n = 0)."""
    return list(tokens[max(0, len(tokens) - n) :])
