"""Drafting at run time: a `Drafter` shared by generations, a `DraftSession` per generation.

Alignment (EAGLE): committed tokens x_0..x_{n-1} have base features f_0..f_{n-1}, where f_i is what
predicted x_{i+1}.  The head's cache holds one entry per complete pair (f_i, e(x_{i+1})), at rotary
position i: n-1 entries once n tokens are committed.

Proposing from the root x_n (the next token, known right) feeds (f_{n-1}, e(x_n)) at position n-1; the
head's output f^_n scores the root's children (softmax of f^_n W_draft^T).  A child c is fed in turn as
(f^ of its parent, e(c)) one position deeper, attending to the committed entries and to its own ancestors
(a tree mask).  EAGLE-2 expansion: each level feeds the `top_k` nodes of the previous level with the
highest cumulative probability, in one forward, and scores their children in one matmul.  Afterwards the
cache is cropped back to the committed pairs.

The embedding and the LM head are the base model's own modules (LocalHead's and LocalTail's), shared,
never part of the drafter's file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import hf, masks
from ..decoding.tree import Draft
from ..parts import LocalHead, LocalTail
from .head import DraftHead


class Drafter:
    """A draft head with the base model's embedding and the draft rows of its LM head."""

    def __init__(self, head: DraftHead, embed: nn.Module, lm_head_weight: torch.Tensor):
        self.head, self.embed = head, embed
        self.d2t = head.d2t  # [draft_vocab] draft index -> token id
        # [draft_vocab, H]: the LM head's own matrix when the draft vocabulary is all of it, else its rows d2t
        self.weight = lm_head_weight if _is_identity(self.d2t, len(lm_head_weight)) else lm_head_weight[self.d2t]
        self.dtype = head.fc.weight.dtype
        self.device = head.fc.weight.device

    @classmethod
    def of(cls, head: DraftHead, local_head: LocalHead, local_tail: LocalTail) -> "Drafter":
        """The drafter over a local side's own embedding and LM head."""
        return cls(head, local_head.embed, local_tail.lm_head.weight)

    def session(self) -> "DraftSession":
        return DraftSession(self)

    def feed(
        self,
        features: torch.Tensor,  # [m, H] the feature before each token
        tokens: Sequence[int],  # [m]
        positions: torch.Tensor,  # [1, m]
        mask: torch.Tensor,  # [1, 1, m, past + m] additive, against the head's cache
        cache: hf.Cache,
    ) -> torch.Tensor:  # [m, H] the predicted next features
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        embeds = self.embed(ids).to(self.dtype)  # [1, m, H]
        x = features.to(device=self.device, dtype=self.dtype)[None]
        return self.head(x, embeds, positions.to(self.device), mask.to(self.device), cache)[0]

    def children(self, predicted: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
        """The k most probable next tokens after each predicted feature [m, H]: (probabilities, token ids),
        each [m][k], best first."""
        logits = F.linear(predicted.to(self.weight.dtype), self.weight)  # [m, draft_vocab]
        probs, index = torch.softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)  # [m, k]
        return probs.tolist(), self.d2t[index].tolist()


class DraftSession:
    """One generation's drafting state: the head's cache of committed pairs and the last committed feature."""

    def __init__(self, drafter: Drafter):
        self.drafter = drafter
        self.cache = hf.new_cache()
        self.length = 0  # committed pairs in the cache: one less than the committed tokens
        self.last: torch.Tensor | None = None  # [H] f_{n-1}: its pair waits for the next token

    @torch.inference_mode()
    def observe(self, tokens: Sequence[int], features: torch.Tensor) -> None:
        """Newly committed tokens [m] with each one's base feature [m, H]: feeds the pairs they complete."""
        if not tokens:
            return
        if self.last is None:  # the context's first token completes no pair
            before, fed = features[:-1], list(tokens[1:])
        else:
            before, fed = torch.cat([self.last[None].to(features.device), features[:-1]]), list(tokens)
        self.last = features[-1]
        if not fed:
            return
        m = len(fed)
        mask = masks.additive(masks.full_mask(self.length, masks.causal(m)), self.drafter.dtype)
        positions = torch.arange(self.length, self.length + m)[None]  # pair (f_i, x_{i+1}) sits at i
        self.drafter.feed(before, fed, positions, mask, self.cache)
        self.length += m

    @torch.inference_mode()
    def propose(
        self, root: int, depth: int, top_k: int, clock: Callable[[], float] = time.perf_counter
    ) -> Draft:
        """Up to `depth` levels of continuations of `root` (the next token, known right); nothing before
        the first observed token."""
        draft = Draft()
        if depth < 1 or top_k < 1 or self.last is None:
            return draft
        try:
            self._expand(draft, root, depth, top_k, clock)
        finally:
            hf.crop(self.cache, self.length)  # only committed pairs stay
        return draft

    def _expand(self, draft: Draft, root: int, depth: int, top_k: int, clock: Callable[[], float]) -> None:
        past = self.length
        # Entries fed beyond the committed pairs, in order: the root's, then each expanded node's.
        # seen[i, j]: entry i attends to entry j (itself and its ancestors).
        seen = torch.zeros(1 + (depth - 1) * top_k, 1 + (depth - 1) * top_k, dtype=torch.bool)
        seen[0, 0] = True
        count = 1  # entries so far
        expand = [-1]  # the draft node each of this level's entries stands for (-1: the root)
        features = self.last[None]  # [m, H] the feature before each of this level's tokens
        tokens = [root]
        for level in range(1, depth + 1):
            t0 = clock()
            m = len(tokens)
            # The rows of this level's entries against the cache: every committed pair, then their ancestors.
            mask = masks.additive(masks.full_mask(past, seen[count - m : count, :count]), self.drafter.dtype)
            positions = torch.full((1, m), past + level - 1)  # entries of one level share a depth
            predicted = self.drafter.feed(features, tokens, positions, mask, self.cache)  # [m, H]
            probs, children = self.drafter.children(predicted, top_k)
            born = [
                (draft.add(parent, token, p), row)
                for row, parent in enumerate(expand)
                for p, token in zip(probs[row], children[row])
            ]
            if level < depth:
                chosen = sorted(born, key=lambda node_row: -draft.scores[node_row[0]])[:top_k]
                rows = [row for _, row in chosen]
                new = torch.arange(count, count + len(chosen))
                seen[new] = seen[torch.tensor(rows) + count - m]  # a child sees what its parent saw...
                seen[new, new] = True  # ...and itself
                count += len(chosen)
                expand = [node for node, _ in chosen]
                features = predicted[rows]
                tokens = [draft.tokens[node] for node in expand]
            draft.level_ms.append((clock() - t0) * 1000.0)


def _is_identity(d2t: torch.Tensor, rows: int) -> bool:
    return len(d2t) == rows and torch.equal(d2t.cpu(), torch.arange(rows))
