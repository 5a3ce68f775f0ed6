"""Lookahead's memory on disk: the recycling table and the acceptance calibration, one file per model.

A fresh process that starts cold commits far fewer tokens per round trip than
one that has answered a few questions, because the recycling table and the
calibration are learned while decoding.  `MemoryFile` keeps them in the user's
cache directory between runs:

    ~/.cache/splitinfer/memory/<model directory name>-<weights digest>.safetensors

The table maps n-grams of the user's own prompts and answers to the model's next
tokens, so it is private: the file is created with mode 0600 (its directory
0700), written next to its target and renamed (a crash never leaves half a file),
and never sent anywhere.  `--no-memory` turns this off.

The format is safetensors (no pickle): int32 tensors `recycle_keys` [n, order]
(each key's tokens, left-padded with -1) and `recycle_rows` [n, k] (its top-k
next tokens), and the calibration as JSON in the metadata.  The step-cost model
is not kept: it describes today's network and machine, and refits in a few steps.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .decoding.lookahead import Memory
from .decoding.sources import RecyclingTable
from .decoding.tree import Calibration
from .identity import weights_digest

log = logging.getLogger(__name__)

FORMAT = "splitinfer-lookahead-memory-1"
SAVE_INTERVAL_S = 30.0  # at most this much learning is lost to a kill -9; saving a full table takes ~0.2 s


def path_for(model_dir: Path, num_layers: int, directory: Path) -> Path:
    """This model's memory file: named by the directory and a digest of its layers' weights, so that two models
    (or a model re-prepared with other weights) never share a table."""
    digest = weights_digest(model_dir, range(num_layers))[:16]
    return directory / f"{model_dir.name}-{digest}.safetensors"


def encode(memory: Memory, drafter: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) for `memory`; `drafter` names the draft head whose acceptance the calibration holds."""
    table = memory.recycle.snapshot()  # a copy: serving threads may update the table meanwhile
    order, k = memory.recycle.order, memory.recycle.k
    keys = torch.tensor([[-1] * (order - len(key)) + list(key) for key in table], dtype=torch.int32)  # [n, order]
    rows = torch.tensor([row + [-1] * (k - len(row)) for row in table.values()], dtype=torch.int32)  # [n, k]
    keys, rows = keys.reshape(-1, order), rows.reshape(-1, k)  # an empty table too
    calibration = memory.calibration.snapshot()
    meta = {
        "format": FORMAT,
        "calibration": json.dumps([[*kind, tested, hits] for kind, (tested, hits) in calibration.items()]),
        "drafter": drafter or "",
    }
    return {"recycle_keys": keys, "recycle_rows": rows}, meta


def decode(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], vocab_size: int, drafter: str | None
) -> tuple[RecyclingTable, Calibration]:
    """The inverse of `encode`; ValueError on anything malformed.  Calibration of another drafter's
    proposals is dropped (this one's probabilities mean something else)."""
    if meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file (format {meta.get('format')!r})")
    keys, rows = tensors["recycle_keys"], tensors["recycle_rows"]
    if keys.dim() != 2 or rows.dim() != 2 or len(keys) != len(rows) or keys.shape[1] < 1 or rows.shape[1] < 1:
        raise ValueError(f"recycling table of shapes {tuple(keys.shape)} and {tuple(rows.shape)}")
    if keys.numel() and (int(keys.max()) >= vocab_size or int(rows.max()) >= vocab_size):
        raise ValueError(f"token ids beyond this model's vocabulary of {vocab_size}")
    table = RecyclingTable(k=rows.shape[1], order=keys.shape[1])
    entries = {}
    for key, row in zip(keys.tolist(), rows.tolist()):
        key, row = [t for t in key if t >= 0], [t for t in row if t >= 0]
        if key and row:
            entries[tuple(key)] = row
    table.restore(entries)
    calibration = Calibration()
    same_drafter = meta.get("drafter", "") == (drafter or "")
    for source, depth, support, tested, hits in json.loads(meta.get("calibration", "[]")):
        if source not in Calibration.SOURCES or not 0 <= hits <= tested:
            raise ValueError(f"calibration entry {[source, depth, support, tested, hits]}")
        if source != "draft" or same_drafter:
            calibration.restore((str(source), int(depth), int(support)), float(tested), float(hits))
    return table, calibration


class MemoryFile:
    """Loads a model's memory once and saves it back at most every `interval_s` seconds, and at close."""

    def __init__(self, path: Path, vocab_size: int, drafter: str | None = None, interval_s: float = SAVE_INTERVAL_S):
        self.path, self.vocab_size, self.drafter, self.interval_s = path, vocab_size, drafter, interval_s
        self.saved_at = time.monotonic()

    def load(self) -> Memory:
        """The memory kept in the file; an empty one when there is none yet, or (with a warning) when the file
        cannot be read; the next save replaces it."""
        memory = Memory()
        if not self.path.is_file():
            return memory
        try:
            with safe_open(self.path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            memory.recycle, memory.calibration = decode(tensors, meta, self.vocab_size, self.drafter)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            log.warning("lookahead memory %s not used (%s); starting cold, it will be rewritten", self.path, exc)
            return Memory()
        log.info("lookahead memory: %d recycling entries from %s", len(memory.recycle), self.path)
        return memory

    def save(self, memory: Memory) -> None:
        """Write `memory` atomically with mode 0600.  A failure is logged, never raised: losing the memory
        costs speed, not an answer."""
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tensors, meta = encode(memory, self.drafter)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)  # mode 0600
            os.close(fd)
            try:
                save_file(tensors, tmp, metadata=meta)
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:
            log.warning("lookahead memory not saved to %s: %s", self.path, exc)
        self.saved_at = time.monotonic()

    def save_if_due(self, memory: Memory) -> None:
        if time.monotonic() - self.saved_at >= self.interval_s:
            self.save(memory)
