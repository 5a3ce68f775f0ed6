"""Attackers on what the cloud sees: float16 hidden states [T, H] in, token ids out.

Input direction (the states the local side sends after its k layers):
  MLPClassifier  the spec's attacker: an MLP trained on (activation -> token) pairs; it can only name
                 tokens it saw in training.
  TableNN        nearest neighbour (cosine) against every vocabulary token's own state, computed with the
                 public weights for the token alone at position 0.
  RidgeNN        a linear (ridge) map from the state to the token's input embedding, then the nearest
                 embedding (cosine) over the whole vocabulary.
  WhiteBox       exact matching with the public weights (as in SipIt, Nikolaou et al. 2025): position by
                 position, push candidate tokens through the public first k layers on top of the prefix
                 recovered so far (batched, with the prefix's KV cache) and keep the one whose state lies
                 within the float16 noise floor of the observed one.

Output direction (the states the cloud sends back):
  OutputReader   the cloud runs the public last layers, final norm and LM head on its own output.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import masks
from .public import DTYPE, PrefixKV, Public, fp16_tolerance, noise_tolerance


def features(states: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float16 states -> float32, each row scaled to unit RMS (position 0's massive activations otherwise dominate)."""
    x = torch.as_tensor(np.asarray(states)).float()
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------- cheap baselines


class TableNN:
    """Cosine nearest neighbour against each vocabulary token's own state (alone, at position 0)."""

    name = "nn"

    def __init__(self, table: np.ndarray):
        self.table = unit(features(table))  # [V, H]

    def scores(self, states: np.ndarray) -> torch.Tensor:
        return unit(features(states)) @ self.table.T  # [T, V]

    def predict(self, states: np.ndarray) -> list[int]:
        return self.scores(states).argmax(-1).tolist()


class RidgeNN:
    """Ridge regression state -> input embedding, then the cosine-nearest embedding over the vocabulary."""

    name = "ridge"

    def __init__(self, embedding: torch.Tensor, lam: float = 1e-2):
        self.embedding = unit(embedding.detach().float())  # [V, H]
        self.target = embedding.detach().float()
        self.lam = lam
        self.w: torch.Tensor | None = None
        self.mu: torch.Tensor | None = None
        self.fit_seconds = 0.0

    def _design(self, states) -> torch.Tensor:
        f = features(states) - self.mu
        return torch.cat([f, torch.ones(len(f), 1)], dim=1)

    def fit(self, states: np.ndarray, tokens: Sequence[int]) -> "RidgeNN":
        t0 = time.perf_counter()
        f = features(states)
        self.mu = f.mean(0)
        a = self._design(states).double()
        gram = a.T @ a
        reg = self.lam * torch.trace(gram) / gram.shape[0]
        y = self.target[torch.as_tensor(list(tokens))].double()
        self.w = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), a.T @ y).float()
        self.fit_seconds = time.perf_counter() - t0
        return self

    def scores(self, states: np.ndarray) -> torch.Tensor:
        return unit(self._design(states) @ self.w) @ self.embedding.T  # [T, V]

    def predict(self, states: np.ndarray) -> list[int]:
        return self.scores(states).argmax(-1).tolist()


class MLPClassifier:
    """The spec's attacker: states -> MLP -> softmax over the tokens seen in training (at most max_classes)."""

    name = "mlp"

    def __init__(self, hidden: int = 512, max_classes: int = 8192, epochs: int = 4, lr: float = 2e-3,
                 batch: int = 256, seed: int = 0):
        self.hidden, self.max_classes, self.epochs, self.lr, self.batch, self.seed = hidden, max_classes, epochs, lr, batch, seed
        self.net: nn.Module | None = None
        self.classes: torch.Tensor | None = None
        self.info: dict = {}

    def fit(self, states: np.ndarray, tokens: Sequence[int], progress: Callable[[], None] | None = None) -> "MLPClassifier":
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        counts = Counter(int(t) for t in tokens)
        classes = [t for t, _ in counts.most_common(self.max_classes)]
        self.classes = torch.tensor(classes)
        index = {t: i for i, t in enumerate(classes)}
        keep = [i for i, t in enumerate(tokens) if int(t) in index]
        x = features(states)[keep]
        y = torch.tensor([index[int(tokens[i])] for i in keep])
        self.mu, self.sd = x.mean(0), x.std(0).clamp_min(1e-4)
        x = (x - self.mu) / self.sd
        h = x.shape[1]
        self.net = nn.Sequential(nn.Linear(h, self.hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(self.hidden, len(classes)))
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-4)
        steps = self.epochs * ((len(x) + self.batch - 1) // self.batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=max(1, steps))
        g = torch.Generator().manual_seed(self.seed)
        self.net.train()
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(self.epochs):
                order = torch.randperm(len(x), generator=g)
                for lo in range(0, len(x), self.batch):
                    idx = order[lo : lo + self.batch]
                    loss = nn.functional.cross_entropy(self.net(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                if progress:
                    progress()
        self.net.eval()
        with torch.no_grad():
            train_acc = float((self.net(x).argmax(-1) == y).float().mean())
        self.info = {"classes": len(classes), "examples": len(x), "dropped_rare": len(tokens) - len(keep),
                     "hidden": self.hidden, "epochs": self.epochs, "train_accuracy": round(train_acc, 4),
                     "fit_seconds": round(time.perf_counter() - t0, 2)}
        return self

    @torch.no_grad()
    def predict(self, states: np.ndarray) -> list[int]:
        x = (features(states) - self.mu) / self.sd
        return self.classes[self.net(x).argmax(-1)].tolist()


class MLPRegressor:
    """A non-linear ridge: state -> MLP -> the direction of the token's input embedding (cosine loss), then
    the cosine-nearest embeddings.  Used only as one of the white-box attacker's candidate rankers."""

    name = "mlpreg"

    def __init__(self, embedding: torch.Tensor, hidden: int = 1024, epochs: int = 4, lr: float = 2e-3,
                 batch: int = 256, seed: int = 0):
        self.embedding = unit(embedding.detach().float())
        self.hidden, self.epochs, self.lr, self.batch, self.seed = hidden, epochs, lr, batch, seed
        self.fit_seconds = 0.0

    def fit(self, states: np.ndarray, tokens: Sequence[int]) -> "MLPRegressor":
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        x = features(states)
        self.mu, self.sd = x.mean(0), x.std(0).clamp_min(1e-4)
        x = (x - self.mu) / self.sd
        y = self.embedding[torch.as_tensor(list(tokens))]
        h = x.shape[1]
        self.net = nn.Sequential(nn.Linear(h, self.hidden), nn.GELU(), nn.Linear(self.hidden, y.shape[1]))
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-4)
        g = torch.Generator().manual_seed(self.seed)
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(self.epochs):
                order = torch.randperm(len(x), generator=g)
                for lo in range(0, len(x), self.batch):
                    idx = order[lo : lo + self.batch]
                    loss = (1 - nn.functional.cosine_similarity(self.net(x[idx]), y[idx])).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        self.net.eval()
        self.fit_seconds = time.perf_counter() - t0
        return self

    @torch.no_grad()
    def scores(self, states: np.ndarray) -> torch.Tensor:
        return unit(self.net((features(states) - self.mu) / self.sd)) @ self.embedding.T


def zsum(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rankers combined: the sum of each one's scores standardised per position."""
    return sum((s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-12) for s in scores)


# ---------------------------------------------------------------------------- the white-box attacker


@dataclass
class WhiteBoxConfig:
    ranker_candidates: int = 32  # the baselines' top-k per ranker, tried first
    lm_candidates: int = 32  # the public model's top next-token predictions, tried when the rankers' first picks miss
    schedule: tuple[int, ...] = (8, 96, 448, 2048)  # batch sizes; the last repeats over the rest of the vocabulary
    max_scan: int | None = None  # None: fall back to the whole vocabulary
    tol: float = field(default_factory=fp16_tolerance)  # relative L2: within this, a candidate matches exactly
    noise_sigma: float = 0.0  # a known noise defence widens the tolerance accordingly
    min_scan: int = 0  # under noise: always compare at least this many candidates, then take the nearest
    ratio: float | None = None  # accept the best when it beats the runner-up by this factor (perturbed weights)
    ratio_min_scan: int = 64
    use_lm: bool = True

    def as_dict(self) -> dict:
        d = asdict(self)
        d["schedule"] = list(self.schedule)
        return d


def _interleave(lists: Sequence[torch.Tensor]) -> list[int]:
    out: list[int] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [int(x[i]) for x in lists if i < len(x)]
    return out


class WhiteBox:
    """Position-by-position exact matching with the public first k layers.

    For position t, with the prefix recovered so far in a KV cache of the public layers 0..k-1:
      1. the rankers' top picks (ridge, nearest neighbour, an MLP regressor, and their standardised sum)
         for the observed state;
      2. then the public model's own top next-token predictions given the recovered prefix
         (computed lazily: the prefix's pending positions go through the deeper public layers in one block);
      3. then the whole vocabulary in the combined rankers' order, in batches,
    each batch pushed through the public layers 0..k-1 at position t on top of the prefix cache; the first
    candidate whose state is within the float16 noise floor of the observed one (relative L2 <= tol) is
    taken, and its own keys and values join the prefix cache.  Without an exact match (defences) the
    nearest candidate scanned is taken (see `WhiteBoxConfig` for when the scan stops).
    """

    name = "whitebox"

    def __init__(self, public: Public, depth: int, rankers: Sequence[Callable[[np.ndarray], torch.Tensor]] = (),
                 config: WhiteBoxConfig | None = None):
        self.public, self.depth, self.rankers = public, depth, list(rankers)
        self.config = config or WhiteBoxConfig()
        self.accept = self.config.tol + noise_tolerance(self.config.noise_sigma, public.hidden_size)

    @torch.inference_mode()
    def attack(self, observed: np.ndarray) -> tuple[list[int], dict]:
        cfg, pub, depth, V = self.config, self.public, self.depth, self.public.vocab_size
        T = len(observed)
        # The rankers do not depend on the prefix: score every position at once, alone and combined.
        scores = [r(observed) for r in self.rankers]  # each [T, V]
        if len(scores) > 1:
            scores.insert(0, zsum(scores))
        tops = [sc.topk(min(cfg.ranker_candidates, V), dim=1).indices for sc in scores]
        cache = PrefixKV(append=True)
        pending: list[torch.Tensor] = []  # recovered positions' states at layer k, not yet through the deeper layers
        last_logits: torch.Tensor | None = None
        limit = V if cfg.max_scan is None else min(cfg.max_scan, V)
        out: list[int] = []
        scanned_total, how, distances, lm_calls, most = 0, Counter(), [], 0, 0

        for t in range(T):
            o = torch.from_numpy(observed[t].astype(np.float32))
            onorm = o.norm().clamp_min(1e-12)
            seen = torch.zeros(V, dtype=torch.bool)
            best = {"d": float("inf"), "second": float("inf"), "token": None, "row": 0, "view": None, "state": None}

            def batches():
                nonlocal last_logits, pending, lm_calls
                first = [x for x in _interleave([top[t] for top in tops])]
                yield first[: cfg.schedule[0]] if first else list(range(min(cfg.schedule[0], V)))
                extra = []
                if cfg.use_lm and t > 0:
                    if pending:
                        last_logits = pub.continue_block(torch.stack(pending), cache, depth)[-1]
                        pending = []
                        lm_calls += 1
                    extra.append(last_logits.topk(min(cfg.lm_candidates, V)).indices)
                yield _interleave(extra + [top[t] for top in tops])
                order = scores[0][t].argsort(descending=True) if scores else torch.arange(V)
                rest = order[~seen[order]]
                lo, step = 0, 2
                while lo < len(rest):
                    size = cfg.schedule[min(step, len(cfg.schedule) - 1)]
                    yield rest[lo : lo + size].tolist()
                    lo += size
                    step += 1

            scanned, verdict = 0, "exhausted"
            for batch in batches():
                batch = [c for c in dict.fromkeys(batch) if not seen[c]][: limit - scanned]
                if not batch:
                    continue
                cand = torch.tensor(batch, dtype=torch.long)
                seen[cand] = True
                states, view = pub.candidate_states(cand, cache, depth)
                d = (states - o).norm(dim=1) / onorm
                scanned += len(batch)
                vals, idx = d.topk(min(2, len(d)), largest=False)
                for v, i in zip(vals.tolist(), idx.tolist()):
                    if v < best["d"]:
                        best.update(second=best["d"], d=v, token=batch[i], row=i, view=view, state=states[i])
                    elif v < best["second"]:
                        best["second"] = v
                if best["d"] <= self.accept and scanned >= min(cfg.min_scan, limit):
                    verdict = "match"
                    break
                if cfg.ratio is not None and scanned >= cfg.ratio_min_scan and best["d"] <= cfg.ratio * best["second"]:
                    verdict = "ratio"
                    break
                if scanned >= limit:
                    break
            out.append(best["token"])
            cache.adopt(best["view"], best["row"])
            pending.append(best["state"])
            scanned_total += scanned
            most = max(most, scanned)
            how[verdict] += 1
            distances.append(best["d"])
        info = {"candidates": scanned_total, "most_candidates_one_position": most, "verdicts": dict(how), "lm_blocks": lm_calls,
                "median_distance": float(np.median(distances)) if distances else None}
        return out, info


# ---------------------------------------------------------------------------- output direction


class OutputReader:
    """The cloud's own output through the public last layers, final norm and LM head: the next token, read."""

    name = "output"

    def __init__(self, public: Public, tail_start: int):
        self.public, self.tail_start = public, tail_start

    @torch.inference_mode()
    def read(self, returned: np.ndarray) -> list[int]:
        """returned [T, H] float16 (prefill block + one row per decoding step) -> argmax token at each position."""
        pub, T = self.public, len(returned)
        cos, sin = pub.rope(range(T))
        mask = masks.additive(masks.full_mask(0, masks.causal(T)), DTYPE)
        h = torch.from_numpy(returned.astype(np.float32))[None]
        h = pub.run(h, self.tail_start, pub.num_layers, cos, sin, mask, None)
        return pub.lm_head(pub.norm(h))[0].argmax(-1).tolist()
