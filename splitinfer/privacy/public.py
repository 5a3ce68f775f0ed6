"""The attacker's public knowledge: the published model, run the way the attacks need it.

The attacker has every weight as published and computes in float32 on the CPU, like
the victim.  `Public` runs the model layer by layer with a tiny prefix cache
(`PrefixKV`) so that many candidate next tokens can be pushed through the first k
layers in one batch on top of an already recovered prefix.  The tolerances say how
far an observed state may lie from a candidate's and still be the same token.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from .. import hf, masks
from ..remote import to_wire

DTYPE = torch.float32  # both sides compute in float32 on the CPU (the project's CPU default)


# ---------------------------------------------------------------------------- a cache the attacker can fork


class PrefixKV:
    """A duck-typed transformers cache: `update(k, v, layer_idx)` returns prefix + new keys/values.

    It is not a transformers `Cache`: it relies on the decoder layer's attention calling
    `cache.update(key, value, layer_idx, ...)` once per layer with the block's keys and values
    [batch, kv_heads, q, head_dim] and attending to what it returns (see `hf.call_layer`; checked by
    tests/test_hf_contract.py), and on nothing else of the cache being touched.

    With `append=True` the new entries are kept (the recovered prefix grows).
    `fork()` gives a read-only view whose prefix is broadcast over a batch of
    candidates, so B candidates are scored against one prefix without copying
    it B times; the view remembers the candidates' own entries, and `adopt`
    appends one candidate's entries to the prefix once it has been chosen.
    """

    def __init__(self, append: bool = True):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.append = append
        self.new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self.append:
            self.new[layer_idx] = (key, value)
        if layer_idx in self.keys:
            pk, pv = self.keys[layer_idx], self.values[layer_idx]
            if pk.shape[0] != key.shape[0]:
                pk = pk.expand(key.shape[0], -1, -1, -1)
                pv = pv.expand(key.shape[0], -1, -1, -1)
            key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
        if self.append:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value

    def fork(self) -> "PrefixKV":
        view = PrefixKV(append=False)
        view.keys, view.values = self.keys, self.values
        return view

    def adopt(self, view: "PrefixKV", row: int) -> None:
        """Append candidate `row` of a forked batch to this prefix (its entries in every layer the batch ran)."""
        for layer, (k, v) in view.new.items():
            k, v = k[row : row + 1], v[row : row + 1]
            if layer in self.keys:
                k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
            self.keys[layer], self.values[layer] = k, v

    def length(self, layer: int = 0) -> int:
        return self.keys[layer].shape[2] if layer in self.keys else 0

    def __len__(self) -> int:
        return self.length(0)


# ---------------------------------------------------------------------------- the public model


class Public:
    """The published model in full, as an attacker downloads it."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        hf.check_version()
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=DTYPE, attn_implementation="sdpa")
        self.model = model.eval().requires_grad_(False)
        parts = hf.decoder_parts(model)
        self.embed, self.layers, self.rotary, self.norm = parts.embed, parts.layers, parts.rotary, parts.norm
        self.lm_head = parts.lm_head
        self.vocab_size, self.hidden_size = self.embed.weight.shape
        self.num_layers = len(self.layers)

    def rope(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, q, head_dim] for the given positions, in DTYPE."""
        return hf.rope(self.rotary, torch.tensor([list(positions)], dtype=torch.long), DTYPE)

    def run(self, hidden, start: int, stop: int, cos, sin, mask, cache: PrefixKV | None) -> torch.Tensor:
        """Layers [start, stop) over hidden [B, q, H] (mask None only for q = 1; cache None: no cache)."""
        for layer in self.layers[start:stop]:
            hidden = hf.call_layer(layer, hidden, mask, cos, sin, cache)
        return hidden

    @torch.inference_mode()
    def states(self, ids: Sequence[int], depths: Sequence[int]) -> dict[int, np.ndarray]:
        """Float16 hidden states [T, H] after the first k layers, for each k in depths (one pass)."""
        T = len(ids)
        cos, sin = self.rope(range(T))
        mask = masks.additive(masks.full_mask(0, masks.causal(T)), DTYPE)
        h = self.embed(torch.tensor([list(ids)]))
        out, done = {}, 0
        for k in sorted(set(depths)):
            h = self.run(h, done, k, cos, sin, mask, None)
            done = k
            out[k] = to_wire(h[0])
        return out

    @torch.inference_mode()
    def vocab_table(self, depths: Sequence[int], batch: int = 2048, progress=None) -> dict[int, np.ndarray]:
        """Every vocabulary token alone at position 0, after k layers: [V, H] float16 per depth."""
        cos, sin = self.rope([0])
        out = {k: np.empty((self.vocab_size, self.hidden_size), np.float16) for k in depths}
        for lo in range(0, self.vocab_size, batch):
            ids = torch.arange(lo, min(self.vocab_size, lo + batch))[:, None]
            h, done = self.embed(ids), 0
            for k in sorted(set(depths)):
                h = self.run(h, done, k, cos, sin, None, None)
                done = k
                out[k][lo : lo + len(ids)] = to_wire(h[:, 0])
            if progress:
                progress(len(ids))
        return out

    @torch.inference_mode()
    def continue_block(self, hidden: torch.Tensor, cache: PrefixKV, start: int) -> torch.Tensor:
        """Hidden states [P, H] at layer `start` for the next P positions of the cached prefix (in layers >= start),
        through the remaining layers with the cache (appended) -> logits [P, V]."""
        past, P = cache.length(start), hidden.shape[0]
        cos, sin = self.rope(range(past, past + P))
        mask = masks.additive(masks.full_mask(past, masks.causal(P)), DTYPE)
        h = self.run(hidden[None], start, self.num_layers, cos, sin, mask, cache)
        return self.lm_head(self.norm(h))[0]

    @torch.inference_mode()
    def candidate_states(self, candidates: torch.Tensor, cache: PrefixKV, depth: int) -> tuple[torch.Tensor, PrefixKV]:
        """Each candidate token [B] placed after the cached prefix, through layers [0, depth): [B, H] float32,
        and the forked cache view holding the candidates' own keys and values (for `PrefixKV.adopt`)."""
        cos, sin = self.rope([len(cache)])
        view = cache.fork()
        h = self.run(self.embed(candidates[:, None]), 0, depth, cos, sin, None, view)
        return h[:, 0], view


# ---------------------------------------------------------------------------- how close is "the same token"


def fp16_tolerance() -> float:
    """Relative L2 distance a float32 state can have from its own float16 rounding: at most 2^-11; doubled."""
    return 2.0 * 2.0**-11 + 1e-5


def noise_tolerance(sigma: float, hidden_size: int) -> float:
    """Relative distance of an observed noisy state from its clean state, with 4 standard deviations of slack."""
    if sigma <= 0:
        return 0.0
    return sigma / math.sqrt(1.0 + sigma * sigma) * (1.0 + 4.0 / math.sqrt(2.0 * hidden_size))
