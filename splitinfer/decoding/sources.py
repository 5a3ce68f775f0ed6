"""Where speculative candidates come from; all model-free, all cheap.

- `SuffixIndex`: the longest suffix of prompt + output that occurred before,
  and what followed it (prompt lookup / REST / SAM style).
- `NgramPool`: the spec's pool: for a token, the n-1 tokens that followed it,
  filled from the prompt, the output and the model's own predictions at every
  verified node (the trajectories that Jacobi iterations would produce).
- `RecyclingTable`: Token Recycling's adjacency table: for each token (and
  token pair), the top-k next tokens the model predicted after it the last
  time it was verified.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Sequence

import torch


class SuffixIndex:
    """Positions of every k-gram (k <= max_key) of a growing token sequence."""

    def __init__(self, max_key: int = 8):
        self.max_key = max_key
        self.tokens: list[int] = []
        self._where: dict[tuple[int, ...], list[int]] = defaultdict(list)  # k-gram -> end positions

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.tokens.append(t)
            end = len(self.tokens)
            for k in range(1, min(self.max_key, end) + 1):
                self._where[tuple(self.tokens[end - k : end])].append(end)

    def continuations(self, tail: Sequence[int], depth: int, limit: int = 4) -> tuple[list[list[int]], int]:
        """Up to `limit` continuations (most recent first) of the longest suffix of `tail` seen before,
        and that suffix's length."""
        for k in range(min(self.max_key, len(tail)), 0, -1):
            ends = self._where.get(tuple(tail[-k:]))
            if not ends:
                continue
            out, seen = [], set()
            for end in reversed(ends):
                cont = tuple(self.tokens[end : end + depth])
                if cont and cont not in seen:
                    seen.add(cont)
                    out.append(list(cont))
                    if len(out) == limit:
                        break
            if out:
                return out, k
        return [], 0


class NgramPool:
    """token -> recent continuations of n-1 tokens (the spec's n-gram pool)."""

    def __init__(self, n: int = 4, per_key: int = 8):
        if n < 2:
            raise ValueError("an n-gram pool needs n >= 2")
        self.n, self.per_key = n, per_key
        self._pool: dict[int, OrderedDict[tuple[int, ...], None]] = defaultdict(OrderedDict)

    def add(self, gram: Sequence[int]) -> None:
        if len(gram) < self.n:
            return
        key, value = gram[0], tuple(gram[1 : self.n])
        slot = self._pool[key]
        slot.pop(value, None)
        slot[value] = None  # most recent last
        if len(slot) > self.per_key:
            slot.popitem(last=False)

    def add_sequence(self, tokens: Sequence[int]) -> None:
        for i in range(len(tokens) - self.n + 1):
            self.add(tokens[i : i + self.n])

    def lookup(self, token: int, limit: int = 4) -> list[list[int]]:
        return [list(v) for v in reversed(self._pool.get(token, {}))][:limit]


class RecyclingTable:
    """Context -> the model's top-k next tokens there, refreshed at every verified node.

    Token Recycling keys its table by one token; keying by the last two and
    three tokens as well, and preferring the longest key seen, follows the
    context more closely at no cost in model calls.
    """

    def __init__(self, k: int = 8, order: int = 3, max_entries: int = 1 << 18):
        """`max_entries` bounds a long-lived table (a server's, a persisted one): the least recently
        refreshed entries go first.  2^18 entries are ~50 MB in memory, ~10 MB on disk."""
        self.k, self.order, self.max_entries = k, order, max_entries
        self._table: dict[tuple[int, ...], list[int]] = {}  # insertion order: least recently refreshed first

    def __len__(self) -> int:
        return len(self._table)

    def update(self, contexts: Sequence[Sequence[int]], logits: torch.Tensor) -> None:
        """logits [q, vocab]; contexts[i] ends with the token whose logits row i is."""
        top = torch.topk(logits, self.k, dim=-1).indices.tolist()
        table = self._table
        for context, row in zip(contexts, top):
            for n in range(1, min(self.order, len(context)) + 1):
                key = tuple(context[-n:])
                table.pop(key, None)  # re-inserted: now the most recent
                table[key] = row
        while len(table) > self.max_entries:
            del table[next(iter(table))]

    def snapshot(self) -> dict[tuple[int, ...], list[int]]:
        """A copy, oldest entry first (dict.copy runs without releasing the GIL, so a concurrent update
        cannot interleave)."""
        return self._table.copy()

    def restore(self, entries: dict[tuple[int, ...], list[int]]) -> None:
        """Replace the table with `entries` (a snapshot's order: oldest first), keeping the newest max_entries."""
        items = list(entries.items())[-self.max_entries :]
        self._table = {key: list(row[: self.k]) for key, row in items}

    def get(self, context: Sequence[int]) -> tuple[list[int], int]:
        """(top-k next tokens, how many context tokens the entry matched); ([], 0) if none."""
        for n in range(min(self.order, len(context)), 0, -1):
            row = self._table.get(tuple(context[-n:]))
            if row:
                return row, n
        return [], 0
