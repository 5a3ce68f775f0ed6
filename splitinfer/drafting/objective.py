"""The draft head's training objective: batches of the model's answers, EAGLE-1's loss, the metrics.

From the pair (f_j, x_{j+1}) the head predicts f_{j+1}: SmoothL1 against the true feature, plus ce_weight x
cross-entropy of its draft logits (the base LM head's rows d2t) against the base model's argmax at j+1,
on answer positions only.  Unrolled (unroll 2), each position also feeds its own prediction one step
further, attending to the true features before it, as the head drafts its second token at run time.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import hf
from .answers import Sequence
from .head import DraftConfig, DraftHead

IGNORE = -100  # cross_entropy's ignore_index: a target outside the draft vocabulary
LATER_STEP_WEIGHT = 0.5  # the unrolled step's share of the loss (the first step is what every draft starts with)


@dataclass(frozen=True)
class TrainSettings:
    """What decides the training; a rerun must match them to resume the checkpoint (else --retrain)."""

    draft_vocab: int
    epochs: int
    lr: float
    batch_tokens: int
    warmup: float  # fraction of the steps
    weight_decay: float
    clip: float
    ce_weight: float
    noise: float  # uniform input-feature noise, +-noise x the features' RMS
    unroll: int  # 1: teacher-forced only; 2: also one step on the head's own prediction
    init: str  # "random" (as EAGLE) or "last-layer": a copy of the base model's last decoder layer
    seed: int


@dataclass
class Batch:
    """Sequences padded on the right to one length L (causal attention never reads the padding)."""

    features: torch.Tensor  # [B, L, H] float32 f_0 .. f_{L-1}
    tokens: torch.Tensor  # [B, L] int64 x_0 .. x_{L-1}
    targets: torch.Tensor  # [B, L] int64 a_j (-1: none)
    pairs: torch.Tensor  # [B, L] bool: pair j = (f_j, x_{j+1}) -> f_{j+1} is trained on (an answer position)


def collate(seqs: list[Sequence], device: torch.device) -> Batch:
    length = max(len(s.tokens) for s in seqs)
    hidden = seqs[0].features.shape[1]
    features = torch.zeros(len(seqs), length, hidden, dtype=torch.float16)
    tokens = torch.zeros(len(seqs), length, dtype=torch.long)
    targets = torch.full((len(seqs), length), -1, dtype=torch.long)
    pairs = torch.zeros(len(seqs), length, dtype=torch.bool)
    for row, s in enumerate(seqs):
        n = len(s.tokens)
        features[row, :n] = s.features
        tokens[row, :n] = s.tokens
        targets[row, :n] = s.targets
        # from the pair that drafts the first token after the prompt's last (f_{P-1}, x_P) to the last with a target
        pairs[row, s.prompt_len - 1:n - 1] = True
    return Batch(features.to(device).float(), tokens.to(device), targets.to(device), pairs.to(device))


def unroll_mask(q: int, device: torch.device) -> torch.Tensor:  # [1, 1, q, (q + 1) + q] additive
    """Step 2's attention: query j (the head's own f^_{j+1} with x_{j+2}, at position j+1) reads step 1's keys
    at positions <= j (true features, in the cache) and its own key: what the run time's cache holds when the
    head drafts its second token."""
    past = torch.arange(q + 1, device=device)[None, :] <= torch.arange(q, device=device)[:, None]  # [q, q+1]
    own = torch.eye(q, dtype=torch.bool, device=device)
    allowed = torch.cat([past, own], dim=1)
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@dataclass
class Frozen:
    """The base model's tensors the head uses but never trains (shared with it at run time)."""

    embed: torch.Tensor  # [V, H]
    draft_weight: torch.Tensor  # [N, H]: LM head rows d2t
    d2t: torch.Tensor  # [N]
    t2d: torch.Tensor  # [V]: draft index of a token, IGNORE outside the draft vocabulary


@dataclass
class Tally:
    """Sums over positions, per unrolled step; means on demand."""

    positions: list[int] = field(default_factory=lambda: [0, 0])
    correct: list[int] = field(default_factory=lambda: [0, 0])
    reg: list[float] = field(default_factory=lambda: [0.0, 0.0])
    ce: list[float] = field(default_factory=lambda: [0.0, 0.0])

    chain: list[int] = field(default_factory=lambda: [0, 0])  # [both steps right, first step right]

    def add(self, step: int, n: int, correct: int, reg: float, ce: float) -> None:
        self.positions[step] += n
        self.correct[step] += correct
        self.reg[step] += reg * n
        self.ce[step] += ce * n

    def summary(self) -> dict:
        out: dict = {}
        for s, name in enumerate(("", "_step2")):
            n = self.positions[s]
            if n:
                out |= {f"top1{name}": round(self.correct[s] / n, 5), f"reg{name}": round(self.reg[s] / n, 5),
                        f"ce{name}": round(self.ce[s] / n, 5), f"positions{name}": n}
        if self.chain[1]:
            # a drafted chain's second token is accepted this often once its first one was
            out["top1_step2_given_step1"] = round(self.chain[0] / self.chain[1], 5)
        return out


def frozen_tensors(parts: hf.DecoderParts, d2t: torch.Tensor, vocab_size: int) -> Frozen:
    """The base model's embedding and LM-head rows d2t, in float32 on its device (never trained)."""
    device = parts.embed.weight.device
    t2d = torch.full((vocab_size,), IGNORE, dtype=torch.long)
    t2d[d2t] = torch.arange(len(d2t))
    lm = parts.lm_head.weight.detach().float()
    return Frozen(parts.embed.weight.detach().float(), lm[d2t.to(device)].contiguous(), d2t.to(device), t2d.to(device))


def new_head(config: DraftConfig, d2t: torch.Tensor, init: str, parts: hf.DecoderParts) -> DraftHead:
    head = DraftHead(config)
    head.d2t.copy_(d2t)
    if init == "last-layer":
        # A warm start: the base model's own last layer, fc passing the feature through (the embedding half
        # keeps fc's random initialisation).  Measured worse than random (docs/drafter.md).
        head.layer.load_state_dict(parts.layers[-1].state_dict())
        with torch.no_grad():
            head.fc.weight[:, config.hidden_size:] = torch.eye(config.hidden_size)
            head.fc.bias.zero_()
    return head


class Trainer:
    """The head, its optimizer and the frozen base tensors it reads, on the base model's device."""

    def __init__(self, model: nn.Module, digest: str, d2t: torch.Tensor, settings: TrainSettings,
                 noise_scale: float):
        parts = hf.decoder_parts(model)
        base = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        device = parts.embed.weight.device
        self.settings = settings
        self.noise_scale = noise_scale
        self.frozen = frozen_tensors(parts, d2t, base.vocab_size)
        config = DraftConfig.from_base(base, draft_vocab_size=len(d2t), base_digest=digest)
        self.head = new_head(config, d2t, settings.init, parts).to(device).train()
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=settings.lr, betas=(0.9, 0.95),
                                           weight_decay=settings.weight_decay)
        self.noise = torch.Generator(device=device)
        self.noise.manual_seed(settings.seed)

    def losses(self, batch: Batch, noise: bool, tally: Tally | None, unroll: int | None = None) -> torch.Tensor:
        """The weighted loss of one batch over `unroll` steps (the settings' by default); `tally` collects
        the metrics."""
        unroll = self.settings.unroll if unroll is None else unroll
        f = batch.features
        length = f.shape[1]
        inputs = f[:, :-1]
        if noise and self.settings.noise > 0:
            u = torch.rand(inputs.shape, generator=self.noise, device=f.device)
            inputs = inputs + (2 * u - 1) * (self.settings.noise * self.noise_scale)
        embeds = F.embedding(batch.tokens[:, 1:], self.frozen.embed)  # [B, L-1, H] e_{j+1}
        cache = hf.new_cache() if unroll > 1 else None
        positions = torch.arange(length - 1, device=f.device)[None]
        pred = self.head(inputs, embeds, positions, None, cache)  # [B, L-1, H] f^_{j+1}
        total, hits = self.score(0, pred, f[:, 1:], batch.targets[:, 1:], batch.pairs[:, :-1], tally)
        if unroll > 1 and length > 2:
            q = length - 2
            pred2 = self.head(pred[:, :-1], embeds[:, 1:], positions[:, 1:], unroll_mask(q, f.device), cache)
            valid = batch.pairs[:, :-2] & batch.pairs[:, 1:-1]  # both steps draft answer tokens
            loss2, hits2 = self.score(1, pred2, f[:, 2:], batch.targets[:, 2:], valid, tally)
            total = total + LATER_STEP_WEIGHT * loss2
            if tally is not None:
                first = hits[:, :-1] & valid
                tally.chain[0] += int((first & hits2).sum())
                tally.chain[1] += int(first.sum())
        return total

    def score(self, step: int, pred: torch.Tensor, true: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
              tally: Tally | None) -> tuple[torch.Tensor, torch.Tensor]:
        """SmoothL1 on the features + ce_weight x cross-entropy of the draft logits against the base's argmax;
        and where the draft's top-1 is that argmax ([B, q] bool, False off the mask)."""
        hits = torch.zeros_like(mask)
        p = pred[mask]  # [m, H]
        if not len(p):
            return pred.sum() * 0.0, hits
        reg = F.smooth_l1_loss(p, true[mask])
        logits = p @ self.frozen.draft_weight.T  # [m, N]
        tokens = targets[mask]
        draft_targets = self.frozen.t2d[tokens.clamp(min=0)]
        ce = F.cross_entropy(logits, draft_targets, ignore_index=IGNORE) if (draft_targets != IGNORE).any() \
            else logits.sum() * 0.0
        if tally is not None:
            right = self.frozen.d2t[logits.detach().argmax(-1)] == tokens
            hits[mask] = right
            tally.add(step, len(p), int(right.sum()), float(reg.detach()), float(ce.detach()))
        return reg + self.settings.ce_weight * ce, hits

    def train_step(self, batch: Batch, lr: float, tally: Tally | None = None) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.losses(batch, noise=True, tally=tally)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.settings.clip)
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, sequences: list[Sequence], batch_tokens: int) -> dict:
        """Teacher-forced top-1 and top-1 after the head's own feature (whatever --unroll trained), no noise."""
        self.head.eval()
        tally = Tally()
        device = self.frozen.embed.device
        for group in length_batches(sequences, batch_tokens):
            self.losses(collate([sequences[i] for i in group], device), noise=False, tally=tally, unroll=2)
        self.head.train()
        return tally.summary()


def length_batches(sequences: list[Sequence], batch_tokens: int, order: list[int] | None = None) -> list[list[int]]:
    """Indices cut into batches of at most `batch_tokens` padded tokens, each of similar lengths (in `order`'s
    chunks of 256, sorted by length within a chunk)."""
    order = list(range(len(sequences))) if order is None else order
    out: list[list[int]] = []
    for c in range(0, len(order), 256):
        current: list[int] = []
        for i in sorted(order[c:c + 256], key=lambda i: len(sequences[i].tokens)):
            if current and (len(current) + 1) * len(sequences[i].tokens) > batch_tokens:
                out.append(current)
                current = []
            current.append(i)
        if current:
            out.append(current)
    return out


def schedule(sequences: list[Sequence], settings: TrainSettings) -> list[list[int]]:
    """Every training batch of every epoch, in order: a seeded shuffle per epoch, so a resumed run replays
    the same batches from where it stopped."""
    out: list[list[int]] = []
    for epoch in range(settings.epochs):
        rng = random.Random(f"{settings.seed}:epoch:{epoch}")
        order = list(range(len(sequences)))
        rng.shuffle(order)
        batches = length_batches(sequences, settings.batch_tokens, order)
        rng.shuffle(batches)
        out += batches
    return out


def learning_rate(step: int, total: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine down to a tenth."""
    warm = max(1, round(settings.warmup * total))
    if step < warm:
        return settings.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return settings.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def feature_rms(sequences: list[Sequence]) -> float:
    """The features' root mean square (over a sample): the unit of the input noise."""
    sample = torch.cat([s.features[: 64].float() for s in sequences[:: max(1, len(sequences) // 200)]])
    return float(sample.pow(2).mean().sqrt())
