"""One generation behind the API: the strategy's steps as text to send, with the "splitinfer" statistics.

Every request runs on its own thread with its own cloud session and its own
`SplitModel` (the head and tail weights are shared read-only; each SplitModel has
its own caches), so concurrent requests cannot see each other's state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..decoding import Strategy
from ..decoding.drive import Step as Forwarded
from ..decoding.drive import drive
from ..engine import Span
from ..local import LocalSide
from .text import TextStream
from .tokens import Job

log = logging.getLogger(__name__)


@dataclass
class Step:
    """What one round trip produced, ready to send."""

    text: str  # new text that is safe to send (maybe empty)
    finish_reason: str | None  # set on the last step only: "stop" or "length"
    extension: dict[str, Any]  # the non-standard "splitinfer" field
    completion_tokens: int  # generated so far


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 3) if values else 0.0


@dataclass
class Stats:
    """A generation's running statistics, from its steps (the prefill's forwards kept apart)."""

    mode: str
    started: float = field(default_factory=time.perf_counter)
    first_at: float | None = None  # when the prefill's token came
    tokens: int = 0
    first_tokens: int = 0  # committed by the prefill
    prefill: list[Any] = field(default_factory=list)  # engine.StepTiming of the prefill's forwards
    decoding: list[Any] = field(default_factory=list)  # and of every decoding step's

    def add(self, step: Forwarded) -> None:
        self.tokens += len(step.tokens)
        if step.prefill:
            self.first_at, self.first_tokens = time.perf_counter(), len(step.tokens)
            self.prefill += step.timings
        else:
            self.decoding += step.timings

    def extension(self) -> dict[str, Any]:
        """The response's "splitinfer" field: round trips, speed and where a round trip's time goes."""
        now = time.perf_counter()
        first_at = self.started if self.first_at is None else self.first_at
        steps = len(self.prefill) + len(self.decoding)
        decoded = self.tokens - self.first_tokens
        timed = self.decoding or self.prefill  # a run that ended at its prefill reports the prefill's
        per_step = decoded / len(self.decoding) if self.decoding else self.tokens / max(steps, 1)
        return {
            "mode": self.mode,
            "tokens": self.tokens,
            "steps": steps,
            "tokens_per_step": round(per_step, 3),
            "tokens_per_second": round(decoded / (now - first_at) if decoded and now > first_at else 0.0, 3),
            "round_trip_ms": _mean([t.wait_ms for t in timed]),
            "cloud_ms": _mean([t.cloud_ms for t in timed]),
            "network_ms": _mean([t.network_ms for t in timed]),
            "time_to_first_token_ms": round((first_at - self.started) * 1000.0, 3) if self.tokens else None,
            "elapsed_ms": round((now - self.started) * 1000.0, 3),
        }


def finish_reason(tokens: list[int], max_tokens: int, eos: frozenset[int]) -> str:
    """Why a generation that ran to its end stopped: EOS ("stop") or the token budget ("length")."""
    if tokens and tokens[-1] in eos:
        return "stop"
    return "length" if len(tokens) >= max_tokens else "stop"


class Generations:
    """Runs the server's generations and counts them: active, completed, cancelled, failed."""

    def __init__(self, local: LocalSide, decode: Callable[[list[int]], str]):
        self.local, self.decode = local, decode
        self._counts_lock = threading.Lock()
        self.counts = {"active": 0, "completed": 0, "cancelled": 0, "failed": 0}

    def _count(self, key: str, delta: int = 1) -> None:
        with self._counts_lock:
            self.counts[key] += delta

    def run(self, job: Job, span: Span, mode: str, strategy: Strategy) -> Iterator[Step]:
        """Generate through `span`, one Step per round trip; the last Step carries the finish reason.

        Closing this generator early (a client gone) stops generation at once; the caller
        closes the session.
        """
        lm = self.local.model(span)
        steps = drive(strategy(lm, job.prompt_ids, job.max_tokens, self.local.eos), lm)
        text = TextStream(self.decode, job.request.stop)
        stats = Stats(mode)
        tokens: list[int] = []
        outcome = "failed"
        self._count("active")
        try:
            for step in steps:
                stats.add(step)
                tokens += step.tokens
                delta = text.push(step.tokens)
                if text.stopped:
                    outcome = "completed"
                    yield Step(delta, "stop", stats.extension(), len(tokens))
                    return
                yield Step(delta, None, stats.extension(), len(tokens))
            delta = text.finish()
            outcome = "completed"
            yield Step(delta, finish_reason(tokens, job.max_tokens, self.local.eos), stats.extension(), len(tokens))
        except GeneratorExit:  # closed early: the client went away
            if outcome != "completed":
                outcome = "cancelled"
            raise
        finally:
            steps.close()
            self._count("active", -1)
            self._count(outcome)
            ext = stats.extension()
            log.info(
                "%s %s: %d prompt + %d completion tokens, %d round trips, %.2f tokens/s, %.1f ms per round trip",
                job.request.kind,
                outcome,
                len(job.prompt_ids),
                len(tokens),
                ext["steps"],
                ext["tokens_per_second"],
                ext["round_trip_ms"],
            )
