"""Requests to prompt ids: tokenizing on pooled tokenizer copies, and the context-length bound.

A prompt whose characters alone prove it too long is refused before it is tokenized
(`check_length`), so a huge prompt costs no tokenizer time.
"""

from __future__ import annotations

import copy
import queue
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .api import APIError, Refused, Request


@dataclass
class Job:
    """A checked request with its prompt tokenized and its budget settled."""

    request: Request
    prompt_ids: list[int]
    max_tokens: int


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


class Tokenization:
    """One server's tokenizer, lent out as copies, and the bounds a prompt must meet."""

    def __init__(
        self, tokenizer: Any, vocab_size: int, context_limit: int | None, default_max_tokens: int, copies: int = 1
    ):
        self.shared, self.vocab_size = tokenizer, vocab_size
        self.context_limit, self.default_max_tokens = context_limit, default_max_tokens
        # A fast tokenizer must not be used by two threads at once, and a global lock around it let one
        # huge prompt stall every request, so each request borrows its own copy.  The copies are made
        # here, one per worker thread: a copy holds the GIL (~0.1 s), and made on a request's first use
        # it stalled every other request, /health included, for that long.
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for _ in range(copies):
            self._pool.put(copy.deepcopy(tokenizer))
        self.max_token_chars = longest_token(tokenizer)

    @contextmanager
    def borrow(self) -> Iterator[Any]:
        """A tokenizer copy no other thread uses until this block ends (a new one if all are lent)."""
        try:
            tok = self._pool.get_nowait()
        except queue.Empty:  # more requests at once than copies made: one more copy, kept afterwards
            tok = copy.deepcopy(self.shared)
        try:
            yield tok
        finally:
            self._pool.put(tok)

    def decode(self, ids: list[int]) -> str:
        with self.borrow() as tok:
            return tok.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, req: Request) -> list[int]:
        with self.borrow() as tok:
            return self._prompt_ids(tok, req)

    def _prompt_ids(self, tok: Any, req: Request) -> list[int]:
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
        with self.borrow() as tok:
            normalize = normalizer(tok)
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
