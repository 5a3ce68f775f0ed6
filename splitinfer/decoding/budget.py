"""How many tree nodes to verify per step: the K that maximises expected tokens per second.

A step of K tokens costs about a + b*K milliseconds: `a` is the round trip plus
the fixed per-step overhead of both sides, `b` the marginal compute per token.
Both are fitted online from measured steps (and the prefill, which supplies a
large-K point), so the same code picks a small tree on a 2-core CPU over
loopback and a large one on a GPU behind an 80 ms link.
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

    def best_size(self, scores: Sequence[float], max_nodes: int) -> int:
        """K in 1..len(scores) maximising (1 + sum(scores[1:K])) / (a + b*K)."""
        a, b = self.fit()
        best_k, best_rate, expected = 1, 0.0, 1.0
        for k in range(1, min(len(scores), max_nodes) + 1):
            if k > 1:
                expected += scores[k - 1]
            cost = a + b * k
            rate = expected / cost if cost > 0 else expected
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k
