"""What the HTTP layer asks of the split model, as one facade over its three jobs:

* tokens.py: requests to prompt ids, within the context bound (`job`);
* generation.py: one generation per cloud session, as text to send with statistics (`run`);
* health.py: this server and the cloud behind it (`health`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

from ..config import DEFAULT_MODE
from ..decoding import Strategy
from ..decoding.sampling import make_generator, sampler
from ..decoding.strategies import STRATEGIES, make
from ..local import LocalSide
from ..remote import RECONNECT_TIMEOUT_S, RemoteSpan, cloud_session
from .api import Request
from .generation import Generations, Step
from .health import Health
from .tokens import Job, Tokenization

__all__ = ["Job", "Service", "Step"]


class Service:
    def __init__(
        self,
        local: LocalSide,
        cloud_ws_url: str,
        token: str | None = None,
        mode: str = DEFAULT_MODE,
        *,
        cloud_http_url: str | None = None,
        model_name: str | None = None,
        default_max_tokens: int = 128,
        strategy_options: dict[str, Any] | None = None,
        health_timeout: float = 3.0,
        reconnect_timeout: float | None = RECONNECT_TIMEOUT_S,
        tokenizer_copies: int = 1,
    ):
        if mode not in STRATEGIES:
            raise ValueError(f"unknown decoding mode {mode!r}; known: {', '.join(sorted(STRATEGIES))}")
        self.local, self.cloud_ws_url, self.token, self.mode = local, cloud_ws_url, token, mode
        self.model_name = model_name or local.model_dir.name
        self.strategy_options = dict(strategy_options or {})
        self.reconnect_timeout = reconnect_timeout  # 0/None: a lost cloud session fails the request at once
        self.created = int(time.time())
        context_limit: int | None = getattr(local.config, "max_position_embeddings", None)
        self.tokens = Tokenization(
            local.tokenizer, local.config.vocab_size, context_limit, default_max_tokens, tokenizer_copies
        )
        self.generations = Generations(local, self.tokens.decode)
        http_url = cloud_http_url.rstrip("/") if cloud_http_url else None
        self._health = Health(local, self.model_name, cloud_ws_url, http_url, token, health_timeout)

    # -- text <-> ids: tokens.py ----------------------------------------------------------------------

    @property
    def context_limit(self) -> int | None:
        return self.tokens.context_limit

    @property
    def max_token_chars(self) -> int | None:
        return self.tokens.max_token_chars

    def job(self, req: Request) -> Job:
        return self.tokens.job(req)

    # -- generation: generation.py --------------------------------------------------------------------

    @property
    def counts(self) -> dict[str, int]:
        return self.generations.counts

    def session(self) -> AbstractContextManager[RemoteSpan]:
        """A fresh cloud session (its own WebSocket); raises CloudError when the cloud cannot be reached."""
        return cloud_session(
            self.cloud_ws_url, self.token, expected=self.local.identity, reconnect_timeout=self.reconnect_timeout
        )

    def strategy(self, req: Request) -> tuple[str, Strategy]:
        """The request's strategy and the name it reports: the server's greedy mode, or sampling."""
        if req.greedy:
            return self.mode, make(self.mode, self.local.memory, self.local.drafter, **self.strategy_options)
        options = {"temperature": req.temperature, "top_p": req.top_p, "generator": make_generator(req.seed)}
        return "sampling", sampler(self.local.memory, **options)

    def run(self, job: Job, span: RemoteSpan) -> Iterator[Step]:
        """Generate through `span`, one Step per round trip (see Generations.run)."""
        name, strategy = self.strategy(job.request)  # first on the first next(), as the generation's work
        try:
            yield from self.generations.run(job, span, name, strategy)
        finally:
            self.local.remember()

    # -- health: health.py ----------------------------------------------------------------------------

    def health(self) -> tuple[dict[str, Any], int]:
        return self._health.report(self.mode, sorted(STRATEGIES), self.counts)
