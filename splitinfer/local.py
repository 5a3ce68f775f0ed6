"""The trusted side: tokenizer, head and tail loaded once, a fresh `SplitModel` per generation.

    text -> tokens -> LocalHead -> (cloud) -> LocalTail -> logits -> strategy -> tokens -> text
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from .config import Split
from .decoding import Strategy
from .decoding.drive import Step, drive
from .decoding.lookahead import Memory
from .decoding.strategies import make
from .drafting import DrafterError
from .drafting import resolve as resolve_drafter
from .drafting.draft import Drafter
from .drafting.head import load as load_draft_head
from .engine import SplitModel, Span
from .identity import Identity, of_model
from .models import ModelError, default_device, dtype_name, load_config, resolve_dtype, resolve_model
from .kernels import pack_linears, use_kernels
from .memory_file import MemoryFile, path_for
from .parts import describe, load_local

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """Everything a one-shot run reports."""

    text: str
    token_ids: list[int]
    steps: int
    per_step: list[int]
    prefill_seconds: float
    decode_seconds: float
    timings: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, text: str, steps: Sequence[Step]) -> "Generation":
        """A run's report from its steps: the prefill's time and forwards apart from the decoding steps'."""
        decoding = [step for step in steps if not step.prefill]
        return cls(
            text=text,
            token_ids=[t for step in steps for t in step.tokens],
            steps=len(decoding),
            per_step=[len(step.tokens) for step in decoding],
            prefill_seconds=sum(step.seconds for step in steps if step.prefill),
            decode_seconds=sum(step.seconds for step in decoding),
            timings=[t.as_dict() for step in decoding for t in step.timings],
        )

    @property
    def tokens_per_second(self) -> float:
        # Tokens committed by decoding steps over their time: the prefill's token and time are excluded.
        decoded = len(self.token_ids) - 1
        return decoded / self.decode_seconds if self.decode_seconds > 0 and decoded > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "new_tokens": len(self.token_ids),
            "steps": self.steps,
            "accepted_per_step": self.per_step,
            "tokens_per_step": round(sum(self.per_step) / self.steps, 4) if self.steps else 0.0,
            "prefill_seconds": round(self.prefill_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "timings": self.timings,
        }


class LocalSide:
    def __init__(
        self,
        model: str | Path | None = None,
        cloud_start: int | None = None,
        cloud_end: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        kernels: str = "auto",
        drafter: str | Path | None = None,
        memory_dir: Path | None = None,
        seed: int | None = None,
    ):
        """`drafter`: a draft head directory for lookahead, "none", or None for the model's default
        (drafting.resolve).  `memory_dir`: where lookahead's memory is kept between processes (memory_file;
        the commands pass the user cache directory unless --no-memory); None: it lives and dies with this
        object (experiments start cold, reproducibly).  `seed`: the held layers are drawn from it, not read
        (--random-weights)."""
        self.model_dir = resolve_model(model, weights=seed is None)
        self.seed = seed
        self.device = device or default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        num_layers = load_config(self.model_dir).num_hidden_layers
        self.split = Split.of(num_layers, cloud_start, cloud_end)
        self.head, self.tail, self.config, held = load_local(self.model_dir, self.split, self.device, self.dtype, seed)
        self.held = describe(held)
        # What the cloud must compute for this split: every cloud session is checked against it (remote/).
        self.identity: Identity = of_model(self.model_dir, self.config, self.split.cloud_layers, seed)
        self.kernels = kernels
        self.packed = use_kernels([self.head, self.tail], self.config, kernels, self.device, self.dtype)
        self.eos = self._eos_ids()
        self.drafter_path, self.drafter = self._load_drafter(drafter)
        # Lookahead's learned tables and cost model, kept across generations as Token Recycling does, and
        # across processes in memory_dir.  Local only; shared by concurrent requests (their updates are
        # single dict/deque operations).
        self.memory_file = self.memory_file_in(memory_dir) if memory_dir is not None else None
        self.memory = self.memory_file.load() if self.memory_file else Memory()
        log.info(
            "local side: %s, layers %s + %s, %d tensors, %.1fM parameters, %s %s, %d linear maps packed, drafter %s",
            self.model_dir,
            list(self.split.head_layers),
            list(self.split.tail_layers),
            self.held["tensors"],
            self.held["parameters"] / 1e6,
            self.device,
            dtype_name(self.dtype),
            self.packed,
            self.drafter_path or "none",
        )

    def _load_drafter(self, arg: str | Path | None) -> tuple[Path | None, Drafter | None]:
        """(its directory, the drafter) that `arg` names, over this side's embedding and LM head; (None, None)
        for none.  A directory that cannot be used is a ModelError, as a bad model is."""
        try:
            path = resolve_drafter(self.model_dir, arg)
        except DrafterError as exc:
            raise ModelError(str(exc)) from None
        if path is None:
            return None, None
        try:
            head = load_draft_head(path, self.device, self.dtype)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a malformed config or weights file
            raise ModelError(f"drafter {path}: {exc}") from None
        pack_linears(head, self.kernels, self.device, self.dtype)
        return path, Drafter.of(head, self.head, self.tail)

    def memory_file_in(self, directory: Path) -> MemoryFile:
        """This side's memory file in `directory`: named for its model, its calibration tied to its drafter."""
        drafter = str(self.drafter_path.resolve()) if self.drafter_path else None
        path = path_for(self.model_dir, self.config.num_hidden_layers, directory)
        return MemoryFile(path, self.config.vocab_size, drafter)

    def remember(self) -> None:
        """Keep what this side's memory has learned, when it is kept on disk and a save is due."""
        if self.memory_file is not None:
            self.memory_file.save_if_due(self.memory)

    def close(self) -> None:
        """Save the memory now (at exit)."""
        if self.memory_file is not None:
            self.memory_file.save(self.memory)

    def cloud_args(self, device: str | None = None) -> list[str]:
        """cloud_server_kv.py arguments for a cloud started beside this side: its device kind, dtype and kernels,
        or another device (a GPU cloud for a CPU local side, as deployed), with that device's default dtype."""
        weights = [] if self.seed is None else ["--random-weights", str(self.seed)]
        if device is not None:
            return ["--device", device, "--kernels", self.kernels, *weights]
        device = "cuda" if self.device.startswith("cuda") else self.device
        return ["--device", device, "--dtype", dtype_name(self.dtype), "--kernels", self.kernels, *weights]

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        gen = self.model_dir / "generation_config.json"
        if gen.is_file():
            value = json.loads(gen.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        return frozenset(ids)

    def encode(self, prompt: str, raw: bool = False, history: list[dict] | None = None) -> list[int]:
        """Prompt text -> ids: as one user turn through the chat template (with any history), or raw."""
        if raw or not self.tokenizer.chat_template:
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        messages = [*(history or []), {"role": "user", "content": prompt}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def model(self, span: Span) -> SplitModel:
        return SplitModel(self.head, self.tail, span, self.dtype, self.device)

    def generate(
        self,
        span: Span,
        prompt_ids: list[int],
        max_new: int,
        mode: str = "lookahead",
        memory: Memory | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
        **options,
    ) -> Generation:
        """Generate with the registry's `mode` (lookahead drafts with this side's drafter, if any); `memory`
        defaults to this side's own (kept across generations)."""
        strategy = make(mode, self.memory if memory is None else memory, self.drafter, **options)
        try:
            return self.run(span, strategy, prompt_ids, max_new, on_tokens)
        finally:  # an interrupted generation's steps were learned from too
            if memory is None:
                self.remember()

    def run(
        self,
        span: Span,
        strategy: Strategy,
        prompt_ids: list[int],
        max_new: int,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> Generation:
        """One generation through `span` with a fresh SplitModel; `on_tokens` sees each step's tokens."""
        lm = self.model(span)
        steps: list[Step] = []
        for step in drive(strategy(lm, prompt_ids, max_new, self.eos), lm):
            steps.append(step)
            if on_tokens:
                on_tokens(step.tokens)
        return Generation.of(self.decode([t for step in steps for t in step.tokens]), steps)
