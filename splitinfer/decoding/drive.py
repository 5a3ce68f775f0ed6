"""The one loop that drains a strategy: each yield becomes a `Step` with the forwards behind it.

A strategy yields the tokens each model call commits (the prefill's yield, the
first generated token, comes first).  `drive` pairs every yield with the wire
timings of the forwards that produced it, taken from the model as they are
recorded (`take_timings`), so no caller counts prefill forwards by index.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class Timed(Protocol):
    """A model that records one timing per forward and hands over the ones not yet taken."""

    def take_timings(self) -> list[Any]: ...


@dataclass
class Step:
    """What one yield of a strategy committed, and what it cost."""

    tokens: list[int]  # committed by this step (the prefill's: the first generated token)
    prefill: bool  # the first step: the prompt's forwards
    timings: list[Any] = field(default_factory=list)  # one engine.StepTiming per forward behind it
    seconds: float = 0.0  # the strategy's own time for this step, the caller's excluded


def drive(strategy: Iterator[list[int]], lm: Timed | None = None) -> Iterator[Step]:
    """The steps of a running strategy; `lm` (the model it runs on) supplies their timings.

    Closing the returned generator closes the strategy at once: no forward after it.
    """
    first = True
    try:
        while True:
            t0 = time.perf_counter()
            tokens = next(strategy, None)
            if tokens is None:
                return
            seconds = time.perf_counter() - t0
            yield Step(tokens, first, lm.take_timings() if lm is not None else [], seconds)
            first = False
    finally:
        if isinstance(strategy, Generator):
            strategy.close()
