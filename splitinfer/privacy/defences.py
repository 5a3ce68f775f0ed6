"""Defences of the local side: what the owner can do so that the sent states are harder to invert.

    add_noise        Gaussian noise on the sent activations, scaled to each position's RMS
    perturb_layers   the local layers moved away from the published weights by a random low-rank delta
    lora_finetune    the local layers LoRA-fine-tuned (a trained private fine-tune), merged in place
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .. import masks
from ..hf import LINEAR_NAMES
from ..parts import LocalHead
from .public import DTYPE


def add_noise(hidden: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """hidden + sigma * rms(row) * N(0, 1): noise scaled to each position's own RMS (sigma is relative)."""
    if sigma <= 0:
        return hidden
    rms = hidden.float().pow(2).mean(-1, keepdim=True).sqrt()
    z = torch.randn(hidden.shape, generator=generator, dtype=torch.float32)
    return (hidden.float() + sigma * rms * z).to(hidden.dtype)


# ---------------------------------------------------------------------------- perturbed local layers


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


# ---------------------------------------------------------------------------- LoRA-fine-tuned local layers


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
    return cos, sin, masks.additive(masks.full_mask(0, masks.causal(T)), DTYPE)


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


def _objective(head, cloud, tail, lora: _LoRA, ids: torch.Tensor):
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
            ce, rel = _objective(head, cloud, tail, lora, fixed)
        return float(ce), float(rel.mean())

    ce0, dist0 = evaluate()
    try:
        for _ in range(steps):
            ids = windows[torch.randint(0, len(windows), (min(batch, len(windows)),), generator=g)]
            ce, rel = _objective(head, cloud, tail, lora, ids)
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
