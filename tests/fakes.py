"""A fake language model for testing decoding strategies without a network or weights.

Its greedy next token is a fixed function of the last two context tokens, so
the text it writes repeats (speculation has something to find) and any wrong
cache bookkeeping changes the output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from splitinfer import masks


def default_rule(vocab: int) -> Callable[[list[int]], int]:
    def rule(context: list[int]) -> int:
        a = context[-1] if context else 0
        b = context[-2] if len(context) > 1 else 0
        return (3 * a + b + 1) % vocab if (a + b) % 5 else (a + 7) % vocab

    return rule


class FakeLM:
    def __init__(self, vocab: int = 50, rule: Callable[[list[int]], int] | None = None, max_step_tokens: int = 512):
        self.vocab, self.max_step_tokens = vocab, max_step_tokens
        self.rule = rule or default_rule(vocab)
        self.context: list[int] = []
        self.pending: tuple[list[int], list[int]] | None = None
        self.calls: list[int] = []  # block size of every forward

    def _logits(self, context: list[int]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash(tuple(context[-3:])) % (2**31))
        row = torch.rand(self.vocab, generator=g)  # a stable order below the winner, for top-k tables
        row[self.rule(context)] = 2.0
        return row

    def forward(self, tokens: Sequence[int], parents: Sequence[int] | None = None) -> torch.Tensor:
        assert self.pending is None, "forward before commit"
        tokens = list(tokens)
        parents = masks.chain(len(tokens)) if parents is None else list(parents)
        masks.check_parents(parents)
        assert 1 <= len(tokens) <= self.max_step_tokens
        self.calls.append(len(tokens))
        rows = []
        for i in range(len(tokens)):
            path, node = [], i
            while node >= 0:
                path.append(tokens[node])
                node = parents[node]
            rows.append(self._logits(self.context + path[::-1]))
        self.pending = (tokens, parents)
        return torch.stack(rows)

    def commit(self, keep: Sequence[int] | None = None) -> None:
        tokens, parents = self.pending
        self.pending = None
        keep = list(range(len(tokens))) if keep is None else list(keep)
        for i, node in enumerate(keep):  # must be a root-to-node path of the block
            assert parents[node] == (keep[i - 1] if i else -1), f"keep {keep} is not a path"
        self.context += [tokens[n] for n in keep]

    def prefill(self, tokens: Sequence[int]) -> torch.Tensor:
        logits = self.forward(tokens)
        self.commit()
        return logits[-1]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        context = list(prompt)
        for _ in range(n):
            context.append(self.rule(context))
        return context[len(prompt):]
