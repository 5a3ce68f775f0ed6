"""Lookahead over the split: a token tree of model-free guesses verified in one round trip per step.

Each step:
  1. the root is the next token (the previous step's bonus, known to be right);
  2. candidates for what follows it come from the suffix index, the n-gram pool
     and the recycling table, and (with a drafter) from a draft head's token
     tree, merged into a tree best-first (tree.py);
  3. the tree is cut to the size that maximises expected tokens per second (budget.py);
  4. one forward verifies every node; the longest argmax-consistent path is
     accepted plus the bonus token after it; the other nodes leave both caches.
With no candidate the tree is the root alone: a plain sequential step.

A drafter reads the base model's final-norm features, so with one every forward
asks the model for them, and the drafter's session is told each committed
token with its feature (the prompt after the prefill, the accepted path after
each step).  Whatever it drafts, only argmax-consistent nodes are accepted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .. import masks
from . import TreeDrafter, TreeLM, argmax, clip
from .budget import CostModel, DraftBudget
from .sources import NgramPool, RecyclingTable, SuffixIndex
from .tree import Calibration, Draft, Tree, Trie, build, verify


SOURCES = frozenset({"suffix", "ngram", "recycle", "draft"})  # "draft": the drafter's tree, when one is given


@dataclass
class Memory:
    """What speculation learns that outlives one generation (Token Recycling keeps its table across
    requests): the recycling table, the acceptance calibration and the step-cost model.  Local only."""

    recycle: RecyclingTable = field(default_factory=RecyclingTable)
    calibration: Calibration = field(default_factory=Calibration)
    cost: CostModel = field(default_factory=CostModel)
    draft: DraftBudget = field(default_factory=DraftBudget)  # how deep a drafter drafts


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
    drafter: TreeDrafter | None = None,
    draft_depth: int = 6,
    draft_top_k: int = 8,
) -> Iterator[list[int]]:
    """max_verify pins the tree size (for experiments); otherwise it is chosen by cost up to max_nodes.
    `sources` picks candidate sources, for ablations.  A `drafter` drafts up to `draft_depth` levels, expanding
    the `draft_top_k` best nodes of each by their `draft_top_k` best children; the depth is chosen by cost
    (budget.DraftBudget), or is `draft_depth` when max_verify pins the tree."""
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
    session = drafter.session() if drafter is not None and "draft" in sources else None
    drafting = session is not None

    # Prefill chunk by chunk, so that every prompt position seeds the recycling table for free.
    step = lm.max_step_tokens
    for i in range(0, len(prompt), step):
        t0 = clock()
        logits, features = forward(lm, prompt[i : i + step], None, drafting)
        lm.commit()
        cost.observe(len(logits), (clock() - t0) * 1000.0, anchor=True)
        recycle.update([prompt[max(0, j + 1 - order) : j + 1] for j in range(i, i + len(logits))], logits)
        if session is not None:
            session.observe(prompt[i : i + len(logits)], features)
    token = argmax(logits[-1])
    out, done = clip([token], 0, max_new, eos)
    produced = len(out)
    yield out

    upkeep_ms = 0.0  # the last step's cache upkeep of the drafter
    while not done:
        trie = Trie()
        if "suffix" in sources:
            found, matched = index.continuations([*index.tokens[-index.max_key :], token], depth)
            for cont in found:
                trie.insert(cont, "suffix", matched)
        if "ngram" in sources:
            for cont in pool.lookup(token):
                trie.insert(cont, "ngram")
        draft = Draft()
        if session is not None:
            levels = draft_depth if max_verify is not None else memory.draft.depth(draft_depth)
            draft = session.propose(token, levels, draft_top_k, clock)
            insert_draft(trie, draft, limit - 1)
        next_tokens = recycle.get if "recycle" in sources else (lambda context: ([], 0))
        tree = build(token, trie, next_tokens, last(index.tokens, order - 1), calibration, limit)
        if max_verify is None:  # the drafting is part of what this step's tokens cost
            tree = tree.truncate(cost.best_size(tree.scores, limit, sum(draft.level_ms) + upkeep_ms))

        t0 = clock()
        logits, features = forward(lm, tree.tokens, tree.parents, drafting)  # [q, vocab], [q, H] or None
        predictions = logits.argmax(-1).tolist()
        path, bonus = verify(tree, predictions)
        lm.commit(path)
        step_ms = (clock() - t0) * 1000.0
        cost.observe(len(tree), step_ms)

        calibration.observe(tree, path)
        before = last(index.tokens, max(ngram, order - 1))
        contexts = [before + tree.path_tokens(node) for node in range(len(tree))]
        recycle.update([last(c, order) for c in contexts], logits)
        for context, prediction in zip(contexts, predictions):  # trajectory n-grams: the model after each guess
            pool.add(context[-(ngram - 1) :] + [prediction])
        accepted = [tree.tokens[n] for n in path]  # root first
        index.extend(accepted)
        pool.add_sequence(index.tokens[-(len(accepted) + ngram) :])
        if session is not None:
            t0 = clock()
            session.observe(accepted, features[path])
            upkeep_ms = (clock() - t0) * 1000.0
            memory.draft.observe(step_ms, upkeep_ms, draft.level_ms, *expected_by_level(tree, len(draft.level_ms)))

        new = [tree.tokens[n] for n in path[1:]] + [bonus]
        out, done = clip(new, produced, max_new, eos)
        produced += len(out)
        token = bonus
        yield out


def forward(
    lm: TreeLM, tokens: Sequence[int], parents: Sequence[int] | None, features: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits [q, vocab], features [q, H]); the features only when asked for, so that a model is asked for
    them only when a drafter reads them."""
    if features:
        return lm.forward(tokens, parents, features=True)
    return lm.forward(tokens, parents), None


def insert_draft(trie: Trie, draft: Draft, nodes: int) -> None:
    """The draft's `nodes` most probable nodes (a subtree: the tree has room for no more) into the trie, each
    with its own kind, after the model-free candidates (which keep an edge both propose)."""
    for node in draft.best(nodes):
        tokens, kinds = draft.path(node)
        trie.insert(tokens, "draft", kinds=kinds)


def expected_by_level(tree: Tree, levels: int) -> tuple[float, list[float]]:
    """The tree's expected tokens apart from its drafted nodes (the root's 1 included), and the expected
    tokens of its drafted nodes at each depth 1..levels."""
    base, gains = 1.0, [0.0] * levels
    depths = masks.depths(tree.parents)  # the root is at depth 0
    for node in range(1, len(tree)):
        if tree.kinds[node][0] == "draft":
            gains[depths[node] - 1] += tree.scores[node]
        else:
            base += tree.scores[node]
    return base, gains


def last(tokens: Sequence[int], n: int) -> list[int]:
    """The last n tokens (all of them when fewer; none for n = 0)."""
    return list(tokens[max(0, len(tokens) - n) :])
