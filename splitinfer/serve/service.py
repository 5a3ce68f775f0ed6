"""What the HTTP layer asks of the split model: prompts to ids, one generation per cloud session, health.

Every request runs on its own thread with its own cloud session and its own
`SplitModel` (the head and tail weights are shared read-only; each SplitModel has
its own caches), so concurrent requests cannot see each other's state.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import requests

from .. import protocol
from ..decoding.sampling import make_generator, sampling
from ..decoding.strategies import STRATEGIES
from ..identity import Identity
from ..local import LocalSide
from ..remote import RECONNECT_TIMEOUT_S, CloudConnection, CloudError, RemoteSpan, cloud_session
from .api import APIError, Refused, Request
from .text import TextStream

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A checked request with its prompt tokenized and its budget settled."""

    request: Request
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class Step:
    """What one round trip produced, ready to send."""

    text: str  # new text that is safe to send (maybe empty)
    finish_reason: str | None  # set on the last step only: "stop" or "length"
    extension: dict[str, Any]  # the non-standard "splitinfer" field
    completion_tokens: int  # generated so far


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 3) if values else 0.0


def longest_token(tokenizer: Any) -> int | None:
    """The most characters any vocabulary entry (special tokens included) stands for; None if unknown.

    A byte-level entry spells each byte as one character, so its length bounds the characters it
    decodes to from above, which is the direction the prompt-length bound needs.
    """
    vocab = getattr(tokenizer, "get_vocab", None)
    if vocab is None:
        return None
    return max((len(piece) for piece in vocab()), default=None) or None


def normalizer(tokenizer: Any) -> Callable[[str], str]:
    """The text as the tokenizer's normalizer leaves it (NFC can merge characters), or as it is."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    norm = getattr(backend, "normalizer", None)
    return norm.normalize_str if norm is not None else (lambda text: text)


class Service:
    def __init__(
        self,
        local: LocalSide,
        cloud_ws_url: str,
        token: str | None = None,
        mode: str = "sequential",
        *,
        cloud_http_url: str | None = None,
        model_name: str | None = None,
        default_max_tokens: int = 128,
        strategy_options: dict[str, Any] | None = None,
        health_timeout: float = 3.0,
        reconnect_timeout: float | None = RECONNECT_TIMEOUT_S,
    ):
        if mode not in STRATEGIES:
            raise ValueError(f"unknown decoding mode {mode!r}; known: {', '.join(sorted(STRATEGIES))}")
        self.local, self.cloud_ws_url, self.token, self.mode = local, cloud_ws_url, token, mode
        self.cloud_http_url = cloud_http_url.rstrip("/") if cloud_http_url else None
        self.model_name = model_name or local.model_dir.name
        self.default_max_tokens = default_max_tokens
        self.strategy_options = dict(strategy_options or {})
        self.health_timeout = health_timeout
        self.reconnect_timeout = reconnect_timeout  # 0/None: a lost cloud session fails the request at once
        self.context_limit: int | None = getattr(local.config, "max_position_embeddings", None)
        self.vocab_size: int = local.config.vocab_size
        self.created = int(time.time())
        # A fast tokenizer must not be used by two threads at once, and a global lock around it let one
        # huge prompt stall every request: each worker thread tokenizes with its own copy instead.
        self._tokenizers = threading.local()
        self._copy_lock = threading.Lock()  # held only while a thread makes its copy (~0.1 s, once)
        self.max_token_chars = longest_token(local.tokenizer)
        self._counts_lock = threading.Lock()
        self.counts = {"active": 0, "completed": 0, "cancelled": 0, "failed": 0}
        self._http = requests.Session()
        self._http.trust_env = False  # the tunnel is the route to the cloud; never a proxy from the environment

    # -- text <-> ids -----------------------------------------------------------------------------------

    def tokenizer(self) -> Any:
        """This thread's own copy of the tokenizer (made on first use), so threads never share one."""
        tok = getattr(self._tokenizers, "tok", None)
        if tok is None:
            with self._copy_lock:
                tok = copy.deepcopy(self.local.tokenizer)
            self._tokenizers.tok = tok
        return tok

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer().decode(ids, skip_special_tokens=True)

    def prompt_ids(self, req: Request) -> list[int]:
        tok = self.tokenizer()
        if req.kind == "chat":
            assert req.messages is not None
            if tok.chat_template:
                ids = tok.apply_chat_template(
                    req.messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            else:  # a base model: the conversation as plain text
                text = "".join(f"{m['role']}: {m['content']}\n" for m in req.messages) + "assistant:"
                ids = tok(text, add_special_tokens=True)["input_ids"]
        elif isinstance(req.prompt, list):
            ids = list(req.prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise APIError(
                    f"Token id {bad[0]} in 'prompt' is outside the vocabulary (0..{self.vocab_size - 1}).",
                    "prompt",
                    "invalid_value",
                )
        else:
            ids = tok(req.prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            param = "prompt" if req.kind == "completion" else "messages"
            raise APIError("The prompt is empty once tokenized.", param, "invalid_value")
        return list(ids)

    def min_prompt_tokens(self, req: Request) -> tuple[int, int]:
        """(characters counted, a lower bound on the prompt's tokens), without tokenizing.

        Every token stands for at most `max_token_chars` characters of the text the tokenizer
        sees (after its normalizer, if any), so C characters make at least ceil(C / max_token_chars)
        tokens.  A chat counts its messages' contents only, without leading and trailing
        whitespace (which a template may trim); the template's own text only adds tokens.
        """
        if isinstance(req.prompt, list) or self.max_token_chars is None:  # token ids are counted exactly, cheaply
            return 0, 0
        normalize = normalizer(self.tokenizer())
        if req.kind == "chat":
            assert req.messages is not None
            chars = sum(len(normalize(m["content"].strip())) for m in req.messages)
        else:
            assert isinstance(req.prompt, str)
            chars = len(normalize(req.prompt))
        return chars, -(-chars // self.max_token_chars)

    def check_length(self, req: Request, max_tokens: int) -> None:
        """Refuse a prompt whose characters alone prove it cannot fit: tokenizing it would only waste time."""
        if self.context_limit is None:
            return
        chars, least = self.min_prompt_tokens(req)
        if least + max_tokens > self.context_limit:
            raise Refused(
                f"This model's maximum context length is {self.context_limit} tokens. However, you requested at "
                f"least {least + max_tokens} tokens (at least {least} in the prompt: its {chars} characters, and no "
                f"token is longer than {self.max_token_chars}; {max_tokens} for the completion). "
                "Please reduce the prompt or the completion length.",
                "context_length_exceeded",
                400,
                "context length exceeded",
                param="messages" if req.kind == "chat" else "prompt",
            )

    def job(self, req: Request) -> Job:
        max_tokens = req.max_tokens or self.default_max_tokens
        self.check_length(req, max_tokens)
        ids = self.prompt_ids(req)
        if self.context_limit is not None and len(ids) + max_tokens > self.context_limit:
            param = "messages" if req.kind == "chat" else "prompt"
            raise APIError(
                f"This model's maximum context length is {self.context_limit} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the completion). "
                "Please reduce the prompt or the completion length.",
                param,
                "context_length_exceeded",
            )
        return Job(req, ids, max_tokens)

    # -- generation -------------------------------------------------------------------------------------

    def session(self) -> AbstractContextManager[RemoteSpan]:
        """A fresh cloud session (its own WebSocket); raises CloudError when the cloud cannot be reached."""
        return cloud_session(
            self.cloud_ws_url, self.token, expected=self.local.identity, reconnect_timeout=self.reconnect_timeout
        )

    def strategy(self, req: Request) -> tuple[str, Callable[..., Iterator[list[int]]]]:
        if req.greedy:
            options = dict(self.strategy_options)
            if self.mode == "lookahead":  # the learned tables outlive one request, as in Token Recycling
                options.setdefault("memory", self.local.memory)
            return self.mode, functools.partial(STRATEGIES[self.mode], **options)
        options = {"temperature": req.temperature, "top_p": req.top_p, "generator": make_generator(req.seed)}
        return "sampling", functools.partial(sampling, **options)

    def _count(self, key: str, delta: int = 1) -> None:
        with self._counts_lock:
            self.counts[key] += delta

    def run(self, job: Job, span: RemoteSpan) -> Iterator[Step]:
        """Generate through `span`, one Step per round trip; the last Step carries the finish reason.

        Closing this generator early (a client gone) stops generation at once; the caller
        closes the session.
        """
        name, strategy_fn = self.strategy(job.request)
        lm = self.local.model(span)
        strategy = strategy_fn(lm, job.prompt_ids, job.max_tokens, self.local.eos)
        text = TextStream(self.decode, job.request.stop)
        tokens: list[int] = []
        t0 = time.perf_counter()
        t_first = t0
        prefill_steps = first = 0
        outcome = "failed"
        self._count("active")

        def extension() -> dict[str, Any]:
            now = time.perf_counter()
            steps = len(lm.timings)
            decode = lm.timings[prefill_steps:] if steps > prefill_steps else lm.timings
            decoded = len(tokens) - first
            decode_steps = steps - prefill_steps
            return {
                "mode": name,
                "tokens": len(tokens),
                "steps": steps,
                "tokens_per_step": round(decoded / decode_steps if decode_steps else len(tokens) / max(steps, 1), 3),
                "tokens_per_second": round(decoded / (now - t_first) if decoded and now > t_first else 0.0, 3),
                "round_trip_ms": _mean([t.wait_ms for t in decode]),
                "cloud_ms": _mean([t.cloud_ms for t in decode]),
                "network_ms": _mean([t.network_ms for t in decode]),
                "time_to_first_token_ms": round((t_first - t0) * 1000.0, 3) if tokens else None,
                "elapsed_ms": round((now - t0) * 1000.0, 3),
            }

        try:
            for chunk in strategy:
                if not tokens:
                    t_first, prefill_steps, first = time.perf_counter(), len(lm.timings), len(chunk)
                tokens.extend(chunk)
                delta = text.push(chunk)
                if text.stopped:
                    outcome = "completed"
                    yield Step(delta, "stop", extension(), len(tokens))
                    return
                yield Step(delta, None, extension(), len(tokens))
            delta = text.finish()
            if tokens and tokens[-1] in self.local.eos:
                finish = "stop"
            else:
                finish = "length" if len(tokens) >= job.max_tokens else "stop"
            outcome = "completed"
            yield Step(delta, finish, extension(), len(tokens))
        except GeneratorExit:  # closed early: the client went away
            if outcome != "completed":
                outcome = "cancelled"
            raise
        finally:
            strategy.close()
            self._count("active", -1)
            self._count(outcome)
            ext = extension()
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

    # -- health -----------------------------------------------------------------------------------------

    def health(self) -> tuple[dict[str, Any], int]:
        split = self.local.split
        body: dict[str, Any] = {
            "status": "ok",
            "model": self.model_name,
            "model_dir": str(self.local.model_dir),
            "mode": self.mode,
            "modes": sorted(STRATEGIES),
            "split": {
                "local_head": list(split.head_layers),
                "cloud": list(split.cloud_layers),
                "local_tail": list(split.tail_layers),
            },
            "cloud": self._cloud_health(),
            "requests": dict(self.counts),
        }
        cloud = body["cloud"]
        problems = []
        if not cloud["reachable"]:
            problems.append(f"cloud unreachable: {cloud.get('error', '')}")
        else:
            if "layers" in cloud and cloud["layers"] != body["split"]["cloud"]:
                problems.append(f"the cloud holds layers {cloud['layers']}, this split needs {body['split']['cloud']}")
            if "protocol_version" in cloud and cloud["protocol_version"] != protocol.VERSION:
                problems.append(f"the cloud speaks protocol {cloud['protocol_version']}, this side {protocol.VERSION}")
            problems += self._identity_problems(cloud.get("identity"))
        if problems:
            body["status"] = "degraded"
            body["problems"] = problems
        return body, 503 if problems else 200

    def _identity_problems(self, stated: Any) -> list[str]:
        """The identity the cloud's /health states against this side's, worded as a session's check words it."""
        if stated is None:
            return []  # an older cloud states none; the protocol version check speaks for it
        try:
            differences = Identity.from_json(stated).differences(self.local.identity)
        except ValueError as exc:
            return [f"the cloud states a malformed identity: {exc}"]
        return [f"the cloud computes something else: {'; '.join(differences)}"] if differences else []

    def _cloud_health(self) -> dict[str, Any]:
        info: dict[str, Any] = {"url": self.cloud_http_url, "ws_url": self.cloud_ws_url}
        if self.cloud_http_url is None:  # no HTTP address known: try the WebSocket handshake itself
            try:
                CloudConnection(self.cloud_ws_url, self.token, open_timeout=self.health_timeout).close()
                info["reachable"] = True
            except CloudError as exc:
                info.update(reachable=False, error=str(exc))
            return info
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            r = self._http.get(f"{self.cloud_http_url}/health", headers=headers, timeout=self.health_timeout)
            r.raise_for_status()
            remote = r.json()
        except requests.Timeout:
            error = f"{self.cloud_http_url}/health did not answer within {self.health_timeout:g} s"
            info.update(reachable=False, error=error)
            return info
        except (requests.RequestException, ValueError) as exc:
            m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
            info.update(reachable=False, error=f"{self.cloud_http_url}/health: {m.group(1).strip() if m else exc}")
            return info
        info["reachable"] = True
        keys = (
            "status", "model", "layers", "identity", "protocol_version", "device", "dtype", "sessions_open",
            "auth_required",
        )
        info.update({key: remote[key] for key in keys if key in remote})
        return info
