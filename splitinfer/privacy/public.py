"""Both sides of the attack, built from the real code paths.

Victim: the project's own `LocalHead` (from `parts.load_local`) computing what the
cloud receives, exactly as `SplitModel.forward` does for a prefill and cast to
float16 by `remote.to_wire`, optionally with a defence (Gaussian noise on the
sent activations, or local layers perturbed away from the public weights).

Attacker: the *public* model (every weight, as published), run layer by layer
with a tiny prefix cache so that many candidate next tokens can be pushed
through the first k layers in one batch on top of an already recovered prefix.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from .. import kv, masks
from ..config import Split
from ..engine import InProcessSpan
from ..models import load_config
from ..parts import LocalHead, load_cloud, load_local
from ..remote import WireTiming, to_wire

DTYPE = torch.float32  # both sides compute in float32 on the CPU (the project's CPU default)


# ---------------------------------------------------------------------------- a cache the attacker can fork


class PrefixKV:
    """A duck-typed transformers cache: `update(k, v, layer_idx)` returns prefix + new keys/values.

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
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=DTYPE, attn_implementation="sdpa")
        self.model = model.eval().requires_grad_(False)
        dec = model.model
        self.embed, self.layers, self.rotary, self.norm = dec.embed_tokens, dec.layers, dec.rotary_emb, dec.norm
        self.lm_head = model.lm_head
        self.vocab_size, self.hidden_size = self.embed.weight.shape
        self.num_layers = len(self.layers)

    def rope(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.empty(0, dtype=DTYPE)
        return self.rotary(probe, torch.tensor([list(positions)], dtype=torch.long))

    def run(self, hidden, start: int, stop: int, cos, sin, mask, cache) -> torch.Tensor:
        for layer in self.layers[start:stop]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), cache=cache, use_cache=True)
            if hidden.dim() == 2:
                hidden = hidden.unsqueeze(0)
        return hidden

    @torch.inference_mode()
    def states(self, ids: Sequence[int], depths: Sequence[int]) -> dict[int, np.ndarray]:
        """Float16 hidden states [T, H] after the first k layers, for each k in depths (one pass)."""
        T = len(ids)
        cos, sin = self.rope(range(T))
        mask = masks.additive(masks.full_mask(0, masks.block_mask(masks.chain(T))), DTYPE)
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
        mask = masks.additive(masks.full_mask(past, masks.block_mask(masks.chain(P))), DTYPE)
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


# ---------------------------------------------------------------------------- the victim (the real local side)


def victim_split(num_layers: int, depth: int) -> Split:
    """k local layers before the wire; the last two layers local as in the default (or fewer for tiny models)."""
    return Split(num_layers, split_after=depth - 1, resume_at=max(num_layers - 2, depth + 1))


def load_victim(model_dir: Path, depth: int, with_cloud: bool = False):
    """(LocalHead, LocalTail, split[, CloudSpan]) loaded by the project's own loaders, float32 on the CPU."""
    model_dir = Path(model_dir)
    split = victim_split(load_config(model_dir).num_hidden_layers, depth)
    head, tail, _, _ = load_local(model_dir, split, "cpu", DTYPE)
    if not with_cloud:
        return head, tail, split
    span, _, _ = load_cloud(model_dir, split, "cpu", DTYPE)
    return head, tail, split, span


def add_noise(hidden: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """hidden + sigma * rms(row) * N(0, 1): noise scaled to each position's own RMS (sigma is relative)."""
    if sigma <= 0:
        return hidden
    rms = hidden.float().pow(2).mean(-1, keepdim=True).sqrt()
    z = torch.randn(hidden.shape, generator=generator, dtype=torch.float32)
    return (hidden.float() + sigma * rms * z).to(hidden.dtype)


@torch.inference_mode()
def wire_states(head: LocalHead, ids: Sequence[int], sigma: float = 0.0, generator: torch.Generator | None = None) -> np.ndarray:
    """What the cloud receives for a prompt: `SplitModel.forward`'s prefill path, then `to_wire` (float16)."""
    parents = masks.chain(len(ids))
    block = masks.block_mask(parents)
    mask = masks.additive(masks.full_mask(0, block), DTYPE)
    cos, sin = head.rope(masks.positions(0, parents), DTYPE)
    hidden = head(torch.tensor([list(ids)], dtype=torch.long), cos, sin, mask, kv.new_cache())
    return to_wire(add_noise(hidden, sigma, generator)[0])


# ---------------------------------------------------------------------------- defences


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def perturb_layers(layers: Sequence[nn.Module], eps: float, rank: int, seed: int) -> dict:
    """W <- W + eps * ||W||_F * U V^T / ||U V^T||_F for every linear map of every layer (U, V Gaussian, rank r).

    A documented stand-in for a private fine-tune (e.g. LoRA of rank r): the
    local layers no longer equal the published ones, by a relative Frobenius
    distance of exactly eps per matrix.  Returns what was changed.
    """
    g = torch.Generator().manual_seed(seed)
    changed = 0
    for layer in layers:
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and name.split(".")[-1] in LINEAR_NAMES:
                w = module.weight
                u = torch.randn(w.shape[0], rank, generator=g)
                v = torch.randn(rank, w.shape[1], generator=g)
                delta = u @ v
                w += (eps * w.norm() / delta.norm()) * delta.to(w.dtype)
                changed += 1
    return {"eps": eps, "rank": rank, "seed": seed, "matrices": changed}


def _linear_maps(layers: Sequence[nn.Module]) -> list[nn.Linear]:
    """Every linear map named in LINEAR_NAMES, layer by layer, in a fixed order."""
    return [m for layer in layers for name, m in layer.named_modules()
            if isinstance(m, nn.Linear) and name.split(".")[-1] in LINEAR_NAMES]


def _packed_windows(sequences: Sequence[Sequence[int]], seq_len: int) -> torch.Tensor:
    """The sequences concatenated and cut into full windows [N, seq_len], as LM fine-tunes usually pack text,
    so that every batch is full length with no padding."""
    stream = [t for seq in sequences for t in seq]
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"need at least {seq_len} training tokens, got {len(stream)}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _causal_inputs(head: LocalHead, T: int):
    """cos, sin [1, T, head_dim] and the additive causal mask [1, 1, T, T] of a prefill; both broadcast over a batch."""
    cos, sin = head.rope(torch.arange(T)[None], DTYPE)
    return cos, sin, masks.additive(masks.full_mask(0, masks.block_mask(masks.chain(T))), DTYPE)


def _full_forward(head: LocalHead, cloud: nn.Module, tail: nn.Module, ids: torch.Tensor):
    """The whole split model in-process, batched, no cache: ids [B, T] -> (head states [B, T, H], logits [B, T, V])."""
    cos, sin, mask = _causal_inputs(head, ids.shape[1])
    sent = head(ids, cos, sin, mask, None)
    h = tail.span(cloud(sent, cos, sin, mask, None), cos, sin, mask, None)
    return sent, tail.lm_head(tail.norm(h))


class _LoRA:
    """Rank-r adapters on linear maps as forward hooks: y = x W^T + scale * (x A^T) B^T; `merge` folds them into W."""

    def __init__(self, maps: Sequence[nn.Linear], rank: int, alpha: float, generator: torch.Generator):
        self.maps, self.scale, self.enabled = list(maps), alpha / rank, True
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        self.hooks = []
        for m in self.maps:
            a = nn.Parameter(torch.randn(rank, m.in_features, generator=generator, dtype=DTYPE) / math.sqrt(m.in_features))
            b = nn.Parameter(torch.zeros(m.out_features, rank, dtype=DTYPE))  # zero: training starts at the public W
            self.pairs.append((a, b))
            self.hooks.append(m.register_forward_hook(self._hook(a, b)))

    def _hook(self, a: nn.Parameter, b: nn.Parameter):
        def hook(module, inputs, output):
            return output + self.scale * (inputs[0] @ a.T) @ b.T if self.enabled else output

        return hook

    def parameters(self) -> list[nn.Parameter]:
        return [p for pair in self.pairs for p in pair]

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scale * B A, then drop the hooks: plain linear maps with the fine-tuned weights."""
        for h in self.hooks:
            h.remove()
        for m, (a, b) in zip(self.maps, self.pairs):
            m.weight += (self.scale * b @ a).to(m.weight.dtype)


def _objective(head, cloud, tail, lora: _LoRA, ids: torch.Tensor, away_cap: float):
    """(next-token cross-entropy, per-position relative distance [B, T] of the head's output from the public head's)."""
    with torch.no_grad():
        lora.enabled = False
        cos, sin, mask = _causal_inputs(head, ids.shape[1])
        public = head(ids, cos, sin, mask, None)
        lora.enabled = True
    sent, logits = _full_forward(head, cloud, tail, ids)
    ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    rel = (sent - public).norm(dim=-1) / public.norm(dim=-1).clamp_min(1e-6)
    return ce, rel


def lora_finetune(
    head: LocalHead,
    cloud: nn.Module,
    tail: nn.Module,
    sequences: Sequence[Sequence[int]],
    steps: int,
    rank: int = 8,
    lr: float = 1e-3,
    alpha: float = 16.0,
    away_weight: float = 1.0,
    away_cap: float = 0.5,
    batch: int = 4,
    seq_len: int = 64,
    seed: int = 0,
) -> dict:
    """LoRA-adapt the head's linear maps in place and merge them: a trained private fine-tune of the local layers.

    Loss = next-token cross-entropy of the whole model (this head, the public cloud layers and the public
    tail, float32) on `sequences`, minus away_weight * the head's per-position relative distance from the
    public head's output, capped at away_cap per position (the push stops there, so quality is not traded
    without end).  Adam; adapter init and batches drawn from `seed`.  Only the head's weights change; the
    cloud and tail are only differentiated through.  Before/after losses are on a fixed evaluation batch.
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    for module in (head, cloud, tail):
        module.requires_grad_(False)
    maps = _linear_maps(list(head.span.layers))
    before = [m.weight.detach().clone() for m in maps]
    windows = _packed_windows(sequences, seq_len)  # [N, T]
    fixed = windows[: min(len(windows), 2 * batch)]  # evaluation batch, the same before and after
    lora = _LoRA(maps, rank, alpha, g)
    opt = torch.optim.Adam(lora.parameters(), lr=lr)

    def evaluate() -> tuple[float, float]:
        with torch.no_grad():
            ce, rel = _objective(head, cloud, tail, lora, fixed, away_cap)
        return float(ce), float(rel.mean())

    ce0, dist0 = evaluate()
    try:
        for _ in range(steps):
            ids = windows[torch.randint(0, len(windows), (min(batch, len(windows)),), generator=g)]
            ce, rel = _objective(head, cloud, tail, lora, ids, away_cap)
            loss = ce - away_weight * rel.clamp(max=away_cap).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        ce1, dist1 = evaluate()
    finally:
        lora.merge()
    change = [float((m.weight - w0).norm() / w0.norm()) for m, w0 in zip(maps, before)]
    return {
        "steps": steps, "rank": rank, "lr": lr, "alpha": alpha, "away_weight": away_weight, "away_cap": away_cap,
        "batch": batch, "seq_len": seq_len, "seed": seed, "windows": len(windows), "matrices": len(maps),
        "ce_before": ce0, "ce_after": ce1, "state_distance_before": dist0, "state_distance_after": dist1,
        "relative_weight_change_mean": float(np.mean(change)) if change else 0.0,
        "relative_weight_change_max": float(np.max(change)) if change else 0.0,
        "seconds": round(time.perf_counter() - t0, 2),
    }


class TapSpan:
    """Wraps the cloud's span (in-process, float16 wire rounding included): adds the noise defence to what
    is sent, and records what the cloud receives and returns, position by position."""

    def __init__(self, inner: InProcessSpan, sigma: float = 0.0, seed: int = 0):
        self.inner, self.sigma = inner, sigma
        self.generator = torch.Generator().manual_seed(seed)
        self.max_step_tokens = inner.max_step_tokens
        self.sent: list[np.ndarray] = []  # [q, H] float16 per forward
        self.returned: list[np.ndarray] = []
        self.last: WireTiming | None = None

    def forward(self, hidden, cos, sin, block):
        hidden = add_noise(hidden, self.sigma, self.generator)
        self.sent.append(to_wire(hidden[0]))
        out = self.inner.forward(hidden, cos, sin, block)
        self.returned.append(to_wire(out[0]))
        self.last = self.inner.last
        return out

    def crop(self, length: int) -> None:
        self.inner.crop(length)

    def keep(self, start: int, indices: list[int]) -> None:
        self.inner.keep(start, indices)

    def close(self) -> None:
        self.inner.close()


def rms_relative(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def fp16_tolerance() -> float:
    """Relative L2 distance a float32 state can have from its own float16 rounding: at most 2^-11; doubled."""
    return 2.0 * 2.0**-11 + 1e-5


def noise_tolerance(sigma: float, hidden_size: int) -> float:
    """Relative distance of an observed noisy state from its clean state, with 4 standard deviations of slack."""
    if sigma <= 0:
        return 0.0
    return sigma / math.sqrt(1.0 + sigma * sigma) * (1.0 + 4.0 / math.sqrt(2.0 * hidden_size))
