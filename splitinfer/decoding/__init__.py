"""Decoding strategies: pure logic over a model that exposes `forward(tokens, parents)` and `commit(keep)`.

Each strategy is a generator: it yields the tokens committed by each model
call (the prefill's yield is the first generated token), so callers can
stream, count round trips and stop early; `drive.drive` is the one loop that
drains one.  The greedy strategies (`strategies.STRATEGIES`) all produce
exactly the tokens of plain greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .drive import Step, drive
from .tree import Draft


class TreeLM(Protocol):
    max_step_tokens: int

    def forward(
        self, tokens: Sequence[int], parents: Sequence[int] | None = None, *, features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [q, vocab]; with `features`, (logits, the final-norm features [q, H] the LM head read)."""
        ...

    def commit(self, keep: Sequence[int] | None = None) -> None: ...
    def prefill(self, tokens: Sequence[int]) -> torch.Tensor: ...


class TreeDraftSession(Protocol):
    """One generation's drafting state, kept in step with the committed context (drafting/draft.py)."""

    def observe(self, tokens: Sequence[int], features: torch.Tensor) -> None:
        """Newly committed tokens [m] with the base model's features at each [m, H]."""
        ...

    def propose(self, root: int, depth: int, top_k: int, clock: Callable[[], float]) -> Draft:
        """Continuations of `root` (the next token, known right), `depth` levels deep, timed by `clock`."""
        ...


class TreeDrafter(Protocol):
    """A draft model shared by generations; each generation drafts through its own session."""

    def session(self) -> TreeDraftSession: ...


# What a registry factory returns: (lm, prompt, max_new, eos) -> the tokens each model call commits.
Strategy = Callable[[TreeLM, Sequence[int], int, frozenset[int]], Iterator[list[int]]]


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)  # generated ids, EOS included when reached
    per_step: list[int] = field(default_factory=list)  # tokens committed by each decoding step (after prefill)

    def add(self, step: Step) -> None:
        self.tokens.extend(step.tokens)
        if not step.prefill:
            self.per_step.append(len(step.tokens))

    @property
    def steps(self) -> int:
        return len(self.per_step)

    @property
    def tokens_per_step(self) -> float:
        return sum(self.per_step) / self.steps if self.steps else 0.0


def run(strategy: Iterator[list[int]]) -> Result:
    """Drain a running strategy into its tokens and per-step counts (no timings: for tests and experiments)."""
    result = Result()
    for step in drive(strategy):
        result.add(step)
    return result


def clip(tokens: list[int], produced: int, max_new: int, eos: frozenset[int]) -> tuple[list[int], bool]:
    """Cut an accepted run at EOS (kept) or at the token budget; True when generation is over."""
    for i, t in enumerate(tokens):
        if produced + i + 1 >= max_new or t in eos:
            return tokens[: i + 1], True
    return tokens, False


def argmax(logits: torch.Tensor) -> int:
    return int(torch.argmax(logits))
