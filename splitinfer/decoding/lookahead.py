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

from . import TreeLM, argmax, clip
from .budget import CostModel
from .sources import NgramPool, RecyclingTable, SuffixIndex
from .tree import Calibration, Trie, build, verify


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
    clock: Callable[[], float] = time.perf_counter,
) -> Iterator[list[int]]:
    """max_verify pins the tree size (for experiments); otherwise it is chosen by cost up to max_nodes."""
    if max_new < 1:
        return
    limit = min(max_verify or max_nodes, lm.max_step_tokens)
    index, pool, recycle = SuffixIndex(), NgramPool(ngram), RecyclingTable()
    calibration, cost = Calibration(), CostModel()
    index.extend(prompt)
    pool.add_sequence(prompt)

    t0 = clock()
    token = argmax(lm.prefill(prompt))
    cost.observe(min(len(prompt), lm.max_step_tokens), (clock() - t0) * 1000.0, anchor=True)
    out, done = clip([token], 0, max_new, eos)
    produced = len(out)
    yield out

    while not done:
        trie = Trie()
        for cont in index.continuations([*index.tokens[-index.max_key :], token], depth):
            trie.insert(cont, "suffix")
        for cont in pool.lookup(token):
            trie.insert(cont, "ngram")
        tree = build(token, trie, recycle.get, calibration, limit)
        if max_verify is None:
            tree = tree.truncate(cost.best_size(tree.scores, limit))

        t0 = clock()
        logits = lm.forward(tree.tokens, tree.parents)  # [q, vocab]
        predictions = logits.argmax(-1).tolist()
        path, bonus = verify(tree, predictions)
        lm.commit(path)
        cost.observe(len(tree), (clock() - t0) * 1000.0)

        calibration.observe(tree, path)
        recycle.update(tree.tokens, logits)
        before = index.tokens[-ngram:]
        for node in range(len(tree)):  # what the model predicts after each guess: trajectory n-grams
            pool.add((before + tree.path_tokens(node))[-(ngram - 1) :] + [predictions[node]])
        accepted = [tree.tokens[n] for n in path]  # root first
        index.extend(accepted)
        pool.add_sequence(index.tokens[-(len(accepted) + ngram) :])

        new = [tree.tokens[n] for n in path[1:]] + [bonus]
        out, done = clip(new, produced, max_new, eos)
        produced += len(out)
        token = bonus
        yield out
