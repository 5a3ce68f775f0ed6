"""How many tree nodes to verify per step: the K that maximises expected tokens per second.

A step of K tokens costs about a + b*K milliseconds: `a` is the round trip plus
the fixed per-step overhead of both sides, `b` the marginal compute per token.
Both are fitted online from measured steps (and the prefill, which supplies a
large-K point), so the same code picks a small tree on a 2-core CPU over
loopback and a large one on a GPU behind an 80 ms link.

With a draft head, `DraftBudget` picks how deep to draft by the same measure,
the drafting time counted as part of the step's cost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


class CostModel:
    def __init__(self, window: int = 64, prior_ms_per_token: float = 1.0, prior_weight: float = 4.0):
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.prior_b, self.prior_weight = prior_ms_per_token, prior_weight
        self.anchor: tuple[int, float] | None = None  # the prefill: kept out of the sliding window

    def observe(self, tokens: int, ms: float, anchor: bool = False) -> None:
        if anchor:
            self.anchor = (tokens, ms)
        else:
            self.samples.append((tokens, ms))

    def fit(self) -> tuple[float, float]:
        """(a, b) by least squares with a ridge pull of b towards the prior (so one K alone still fits)."""
        pts = list(self.samples) + ([self.anchor] if self.anchor else [])
        if not pts:
            return 0.0, self.prior_b
        n = len(pts)
        mx = sum(k for k, _ in pts) / n
        my = sum(t for _, t in pts) / n
        sxx = sum((k - mx) ** 2 for k, _ in pts)
        sxy = sum((k - mx) * (t - my) for k, t in pts)
        # Ridge: prior_weight pseudo-points' worth of spread (in K^2 units) at slope prior_b.
        reg = self.prior_weight * 16.0
        b = max(0.0, (sxy + reg * self.prior_b) / (sxx + reg))
        a = max(0.0, my - b * mx)
        return a, b

    def best_size(self, scores: Sequence[float], max_nodes: int, overhead_ms: float = 0.0) -> int:
        """K in 1..len(scores) maximising (1 + sum(scores[1:K])) / (overhead + a + b*K); `overhead_ms` is the
        step's time besides the forward (drafting), part of what the step's tokens cost."""
        a, b = self.fit()
        best_k, best_rate, expected = 1, 0.0, 1.0
        for k in range(1, min(len(scores), max_nodes) + 1):
            if k > 1:
                expected += scores[k - 1]
            cost = overhead_ms + a + b * k
            rate = expected / cost if cost > 0 else expected
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k


class DraftBudget:
    """How many levels the draft head drafts: the depth d that maximises expected tokens per millisecond,

        (base + gain[1] + ... + gain[d]) / (step + fixed + ms[1] + ... + ms[d])

    base     expected tokens of a step from the rest of the tree (the root and the model-free guesses)
    gain[l]  expected tokens the drafted nodes at depth l add (the calibrated scores of those in the tree)
    step     the verifying forward (round trip included)
    fixed    keeping the head's cache in step with the context (paid whatever the depth)
    ms[l]    drafting depth level l

    Each is an exponential moving average of measured steps, so a slow CPU at RTT ~0 (drafting costs as
    much as a step) drafts little and an 80 ms link drafts deep.  A level not drafted keeps its last
    estimate (a level never drafted: the priors, and the last measured level's time); every `explore`
    steps one level more than the best is drafted, so an estimate gone stale can recover.
    """

    def __init__(self, alpha: float = 0.2, prior_gain: float = 0.5, prior_decay: float = 0.6, explore: int = 16):
        self.alpha, self.explore = alpha, explore
        self.prior_gain, self.prior_decay = prior_gain, prior_decay
        self.gain: list[float] = []  # per level (index 0: depth 1)
        self.ms: list[float | None] = []  # per level; None until drafted once
        self.base = 1.0
        self.step: float | None = None  # None: nothing measured yet
        self.fixed: float | None = None
        self.chosen = 0  # depth choices made (for the exploration cadence)

    def _grow(self, levels: int) -> None:
        while len(self.gain) < levels:
            self.gain.append(self.prior_gain * self.prior_decay ** len(self.gain))
            self.ms.append(None)

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.alpha * (new - old)

    def level_ms(self, level: int) -> float:
        """Estimated ms of drafting depth `level` (1-based): measured, else the deepest measured level's."""
        for ms in reversed(self.ms[:level]):
            if ms is not None:
                return ms
        return 0.0

    def depth(self, max_depth: int) -> int:
        """The depth to draft this step, 0..max_depth."""
        self._grow(max_depth)
        if self.step is None:  # nothing measured: draft every level once, to measure them
            return max_depth
        tokens, ms = self.base, self.step + (self.fixed or 0.0)
        best, best_rate = 0, tokens / max(ms, 1e-9)
        for d in range(1, max_depth + 1):
            tokens += self.gain[d - 1]
            ms += self.level_ms(d)
            if (rate := tokens / max(ms, 1e-9)) > best_rate:
                best, best_rate = d, rate
        self.chosen += 1
        if self.explore and self.chosen % self.explore == 0:
            best = min(best + 1, max_depth)
        return best

    def observe(
        self, step_ms: float, fixed_ms: float, level_ms: Sequence[float], base: float, gains: Sequence[float]
    ) -> None:
        """One step: its forward's and the cache upkeep's ms, each drafted level's ms, the tree's expected
        tokens apart from the draft, and the drafted levels' expected tokens (gains[l]: depth l + 1)."""
        self._grow(len(level_ms))
        self.step = self._ema(self.step, step_ms)
        self.fixed = self._ema(self.fixed, fixed_ms)
        self.base = self._ema(self.base, base)
        for level, (ms, gain) in enumerate(zip(level_ms, gains)):
            self.ms[level] = self._ema(self.ms[level], ms)
            self.gain[level] = self._ema(self.gain[level], gain)
