"""Stand-ins for tests: a fake language model, and the cloud's span in this process re-exported.

`FakeLM` speaks the decoding strategies' model interface (`forward`, `commit`,
`prefill`, `take_timings`) without weights or a network.  `InProcessSpan` (the
cloud's layers called directly, with the wire's float16 rounding) lives in
`splitinfer/remote/inprocess.py`; production code imports it from there, never from here.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import torch

from . import masks
from .engine import StepTiming
from .remote import WireTiming
from .remote.inprocess import InProcessSpan  # re-exported for tests

Rule = Callable[[list[int]], int]  # context -> the greedy next token

# What every fake round trip reports: a fixed split of 2 ms into 1.5 of cloud compute and 0.5 of network.
FAKE_WIRE = WireTiming(serialize_ms=0.0, wait_ms=2.0, cloud_ms=1.5, bytes_sent=0, bytes_received=0)


def default_rule(vocab: int) -> Rule:
    """A next token from the last two tokens: text that repeats, so speculation has something to find."""

    def rule(context: list[int]) -> int:
        a = context[-1] if context else 0
        b = context[-2] if len(context) > 1 else 0
        return (3 * a + b + 1) % vocab if (a + b) % 5 else (a + 7) % vocab

    return rule


class FakeLM:
    """A language model with no weights, for testing strategies and the server around them.

    Two kinds of logits:
    * by `rule` (the default: `default_rule`): the greedy next token is `rule(context)`, and the rows below it
      are a stable function of the last three tokens (a steady order for the recycling table's top-k);
    * with `sharpness`: every row is Gaussian noise seeded by the whole context and scaled by `sharpness`
      (lower is flatter), so sampling has a real distribution to draw from; `rule` is then not used.
    Any wrong cache bookkeeping in a strategy changes what it writes.

    Its features (`forward(..., features=True)`) are the last `hidden` context tokens up to and including each
    position, as floats (-1 before the start), so a test can read back which position a feature belongs to.
    """

    def __init__(
        self,
        vocab: int = 50,
        rule: Rule | None = None,
        *,
        sharpness: float | None = None,
        max_step_tokens: int = 512,
        hidden: int = 8,
    ):
        self.vocab, self.max_step_tokens, self.sharpness, self.hidden = vocab, max_step_tokens, sharpness, hidden
        self.rule = rule or default_rule(vocab)
        self.context: list[int] = []
        self.pending: tuple[list[int], list[int]] | None = None  # (tokens, parents) of an uncommitted forward
        self.calls: list[int] = []  # block size of every forward (prefill included)
        self.timings: list[StepTiming] = []
        self._taken = 0

    def _logits(self, context: list[int]) -> torch.Tensor:
        """[vocab] after `context`."""
        if self.sharpness is not None:
            g = torch.Generator().manual_seed(zlib.crc32(repr(context).encode()))
            return torch.randn(self.vocab, generator=g) * self.sharpness
        g = torch.Generator().manual_seed(hash(tuple(context[-3:])) % (2**31))
        row = torch.rand(self.vocab, generator=g)  # in [0, 1): below the winner
        row[self.rule(context)] = 2.0
        return row

    def feature(self, context: list[int]) -> torch.Tensor:
        """[hidden] at the last position of `context`: its last `hidden` tokens, left-padded with -1."""
        tail = context[-self.hidden :]
        return torch.tensor([-1.0] * (self.hidden - len(tail)) + [float(t) for t in tail])

    def forward(
        self, tokens: Sequence[int], parents: Sequence[int] | None = None, *, features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [q, vocab] for a chain or a token tree (parents[i]: the block index before token i, -1: context);
        with `features`, also [q, hidden] (see the class)."""
        assert self.pending is None, "forward before commit"
        tokens = list(tokens)
        parents = masks.chain(len(tokens)) if parents is None else list(parents)
        masks.check_parents(parents)
        assert 1 <= len(tokens) <= self.max_step_tokens
        self.calls.append(len(tokens))
        self.timings.append(StepTiming(len(tokens), 0.0, 0.0, 0.0, FAKE_WIRE.wait_ms, FAKE_WIRE.cloud_ms, FAKE_WIRE.network_ms))
        contexts = []
        for i in range(len(tokens)):
            path, node = [], i
            while node >= 0:
                path.append(tokens[node])
                node = parents[node]
            contexts.append(self.context + path[::-1])
        self.pending = (tokens, parents)
        logits = torch.stack([self._logits(c) for c in contexts])
        return (logits, torch.stack([self.feature(c) for c in contexts])) if features else logits

    def commit(self, keep: Sequence[int] | None = None) -> None:
        assert self.pending is not None, "nothing to commit"
        tokens, parents = self.pending
        self.pending = None
        keep = list(range(len(tokens))) if keep is None else list(keep)
        for i, node in enumerate(keep):  # must be a root-to-node path of the block
            assert parents[node] == (keep[i - 1] if i else -1), f"keep {keep} is not a path"
        self.context += [tokens[n] for n in keep]

    def prefill(self, tokens: Sequence[int]) -> torch.Tensor:
        """As SplitModel.prefill: the prompt in chunks of max_step_tokens; logits [vocab] after its last token."""
        for i in range(0, len(tokens), self.max_step_tokens):
            logits = self.forward(tokens[i : i + self.max_step_tokens])
            self.commit()
        return logits[-1]

    def take_timings(self) -> list[StepTiming]:
        fresh = self.timings[self._taken :]
        self._taken = len(self.timings)
        return fresh

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """The n tokens greedy decoding writes after `prompt` (by the rule)."""
        context = list(prompt)
        for _ in range(n):
            context.append(self.rule(context))
        return context[len(prompt) :]
