"""Token trees: build one best-first from candidate sources, verify it against the model's argmax.

A tree is a block for `SplitModel.forward(tokens, parents)`: node 0 is the
root (the next token, already known to be right), every other node a guess.
Each node carries a score, the estimated probability that it lies on the
accepted path; scores shrink along a path, so the first K nodes of a
best-first build are the best K-node subtree, and the expected tokens per
step of a K-node tree is 1 + the sum of its first K scores (root excluded).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Who proposed a node: (source, rank or depth, how much context backed it), for calibration.
Kind = tuple[str, int, int]


@dataclass
class Tree:
    tokens: list[int]
    parents: list[int]
    scores: list[float]
    kinds: list[Kind]
    children: dict[tuple[int, int], int] = field(default_factory=dict)  # (parent, token) -> node

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, score: float, kind: Kind) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.kinds.append(kind)
        self.children[(parent, token)] = len(self.tokens) - 1
        return len(self.tokens) - 1

    def truncate(self, k: int) -> "Tree":
        """The first k nodes: a valid tree, since parents come before children."""
        kept = Tree(self.tokens[:k], self.parents[:k], self.scores[:k], self.kinds[:k])
        kept.children = {key: v for key, v in self.children.items() if v < k}
        return kept

    def path_tokens(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(self.tokens[node])
            node = self.parents[node]
        return out[::-1]


def verify(tree: Tree, predictions: Sequence[int]) -> tuple[list[int], int]:
    """Longest root path whose every step is the model's argmax; returns (path nodes, bonus token)."""
    path = [0]
    while (child := tree.children.get((path[-1], predictions[path[-1]]))) is not None:
        path.append(child)
    return path, predictions[path[-1]]


class Trie:
    """Candidate continuations of the root, merged on shared prefixes; each edge remembers its source."""

    def __init__(self) -> None:
        self.next: dict[int, Trie] = {}
        self.kind: Kind = ("", 0, 0)

    def insert(self, tokens: Sequence[int], source: str, support: int = 0) -> None:
        """A candidate continuation; `support` is how much context matched to find it."""
        node = self
        for depth, t in enumerate(tokens):
            if t not in node.next:
                child = Trie()
                child.kind = (source, min(depth, 7), min(support, 4))
                node.next[t] = child
            node = node.next[t]


class Calibration:
    """Online estimate of P(node accepted | parent accepted) per kind of proposal."""

    # Prior means and weight: a few pseudo-observations, replaced by evidence within a few steps.
    PRIOR = {"suffix": 0.5, "ngram": 0.4, "recycle": 0.35}
    WEIGHT = 4.0

    def __init__(self) -> None:
        self.tested: dict[Kind, float] = defaultdict(float)
        self.hits: dict[Kind, float] = defaultdict(float)

    def p(self, kind: Kind) -> float:
        source, rank, _ = kind
        prior = self.PRIOR[source] / (1 + rank) if source == "recycle" else self.PRIOR[source]
        return (self.hits[kind] + self.WEIGHT * prior) / (self.tested[kind] + self.WEIGHT)

    def observe(self, tree: Tree, path: Sequence[int]) -> None:
        on_path = set(path)
        for node in range(1, len(tree)):
            if tree.parents[node] in on_path:  # the node was actually put to the test
                self.tested[tree.kinds[node]] += 1
                self.hits[tree.kinds[node]] += node in on_path


def build(
    root: int,
    trie: Trie,
    next_tokens: Callable[[list[int]], tuple[list[int], int]],
    before: Sequence[int],
    calibration: Calibration,
    max_nodes: int,
) -> Tree:
    """Best-first expansion from the root over the candidate trie and `next_tokens(context)`
    (the recycling table); `before` is the tail of the committed context, before the root."""
    tree = Tree([root], [-1], [1.0], [("root", 0, 0)])
    heap: list[tuple[float, int, int, int, Kind, Trie | None]] = []
    counter = 0  # tie-breaker: earlier proposals first

    def propose(node: int, trie_node: Trie | None) -> None:
        nonlocal counter
        options: dict[int, tuple[float, Kind, Trie | None]] = {}
        row, order = next_tokens([*before, *tree.path_tokens(node)])
        for rank, token in enumerate(row):
            kind = ("recycle", rank, order)
            options[token] = (calibration.p(kind), kind, None)
        for token, child in (trie_node.next.items() if trie_node else ()):
            p = calibration.p(child.kind)
            if token not in options or options[token][0] < p:
                options[token] = (p, child.kind, child)
            else:  # keep the better score, but remember the chain so it can continue
                options[token] = (options[token][0], options[token][1], child)
        for token, (p, kind, child) in options.items():
            counter += 1
            heapq.heappush(heap, (-tree.scores[node] * p, counter, node, token, kind, child))

    propose(0, trie)
    while heap and len(tree) < max_nodes:
        neg, _, parent, token, kind, child = heapq.heappop(heap)
        node = tree.add(parent, token, -neg, kind)
        propose(node, child)
    return tree
