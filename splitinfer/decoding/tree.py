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
# A drafted node's third field is its draft probability's bin instead (draft_kind).
Kind = tuple[str, int, int]

DRAFT_BINS = 10  # draft probabilities are calibrated in bins of this width: [0, 0.1), [0.1, 0.2) ...
MAX_KIND_DEPTH = 7  # deeper nodes share the kind of this depth


def draft_kind(depth: int, probability: float) -> Kind:
    """A drafted node's kind: its depth and its draft probability's bin (calibration learns each bin's real rate)."""
    return ("draft", min(depth, MAX_KIND_DEPTH), min(int(probability * DRAFT_BINS), DRAFT_BINS - 1))


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


@dataclass
class Draft:
    """A draft head's proposal: a tree of continuations of the root, each node with its draft probability.

    Nodes come in the order drafted (parents first); parents[i] is -1 for a child of the root."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)  # P_draft(token | its path): the node's own probability
    scores: list[float] = field(default_factory=list)  # the product of probs along the path from the root
    depths: list[int] = field(default_factory=list)  # 1 for a child of the root
    level_ms: list[float] = field(default_factory=list)  # the drafting time of each depth level

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, prob: float) -> int:
        above = self.scores[parent] if parent >= 0 else 1.0
        self.tokens.append(token)
        self.parents.append(parent)
        self.probs.append(prob)
        self.scores.append(above * prob)
        self.depths.append(self.depths[parent] + 1 if parent >= 0 else 1)
        return len(self.tokens) - 1

    def best(self, n: int) -> list[int]:
        """The n nodes of highest score, parents before children (a parent never scores below its child)."""
        order = sorted(range(len(self)), key=lambda i: (-self.scores[i], self.depths[i], i))
        return sorted(order[:n], key=lambda i: (self.depths[i], i))

    def path(self, node: int) -> tuple[list[int], list[Kind]]:
        """Tokens from the root's child down to `node`, and each one's kind."""
        tokens: list[int] = []
        kinds: list[Kind] = []
        while node >= 0:
            tokens.append(self.tokens[node])
            kinds.append(draft_kind(self.depths[node], self.probs[node]))
            node = self.parents[node]
        return tokens[::-1], kinds[::-1]


class Trie:
    """Candidate continuations of the root, merged on shared prefixes; each edge remembers its source."""

    def __init__(self) -> None:
        self.next: dict[int, Trie] = {}
        self.kind: Kind = ("", 0, 0)

    def insert(self, tokens: Sequence[int], source: str, support: int = 0, kinds: Sequence[Kind] | None = None) -> None:
        """A candidate continuation; `support` is how much context matched to find it.  `kinds` gives every
        node's kind instead (a draft's nodes each carry their own probability).  An edge already there keeps
        the kind of whoever proposed it first."""
        node = self
        for depth, t in enumerate(tokens):
            if t not in node.next:
                child = Trie()
                own = (source, min(depth, MAX_KIND_DEPTH), min(support, 4))
                child.kind = kinds[depth] if kinds is not None else own
                node.next[t] = child
            node = node.next[t]


class Calibration:
    """Online estimate of P(node accepted | parent accepted) per kind of proposal."""

    # Prior means and weight: a few pseudo-observations, replaced by evidence within a few steps.
    PRIOR = {"suffix": 0.5, "ngram": 0.4, "recycle": 0.35}
    WEIGHT = 4.0
    SOURCES = frozenset({*PRIOR, "draft"})  # the kinds of proposal calibrated

    def __init__(self) -> None:
        self.tested: dict[Kind, float] = defaultdict(float)
        self.hits: dict[Kind, float] = defaultdict(float)

    def p(self, kind: Kind) -> float:
        return (self.hits[kind] + self.WEIGHT * self.prior(kind)) / (self.tested[kind] + self.WEIGHT)

    def prior(self, kind: Kind) -> float:
        source, rank, support = kind
        if source == "draft":  # the draft head's own probability: its bin's centre
            return (support + 0.5) / DRAFT_BINS
        return self.PRIOR[source] / (1 + rank) if source == "recycle" else self.PRIOR[source]

    def snapshot(self) -> dict[Kind, tuple[float, float]]:
        """{kind: (tested, hits)}: what has been learned, for keeping it (memory_file)."""
        return {kind: (tested, self.hits[kind]) for kind, tested in list(self.tested.items())}

    def restore(self, kind: Kind, tested: float, hits: float) -> None:
        self.tested[kind], self.hits[kind] = tested, hits

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
