"""The inversion experiment: every attacker x split depth x defence x text kind, in both directions.

`run(model_dir, Settings)` returns a JSON-ready dict: settings, phase timings, the held-out texts, one
record per (attacker, depth, defence, sequence) with the recovered ids, aggregates with bootstrap CIs,
and the defences' quality cost.  `inversion_experiment.py` is the command line around it.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..decoding import run as drain
from ..decoding.sequential import sequential
from ..engine import InProcessSpan, SplitModel
from ..models import load_config
from . import texts as T
from .attackers import MLPClassifier, MLPRegressor, OutputReader, RidgeNN, TableNN, WhiteBox, WhiteBoxConfig
from .metrics import pii_recovered, score, summarise
from .public import DTYPE, Public, TapSpan, load_victim, lora_finetune, perturb_layers, wire_states

log = logging.getLogger(__name__)

INPUT_ATTACKERS = ("mlp", "nn", "ridge", "whitebox")


@dataclass
class Settings:
    depths: tuple[int, ...] = (1, 2, 4, 8)
    attackers: tuple[str, ...] = INPUT_ATTACKERS
    kinds: tuple[str, ...] = ("prose", "chat", "random")
    n_per_kind: int = 8  # held-out sequences per kind, attacked at every depth
    prose_tokens: int = 40
    random_tokens: int = 20
    train_tokens: int = 16000  # learned attackers' training text (stdlib docstrings, licenses, docs)
    train_seq_len: int = 64
    ranker_random_tokens: int = 6000  # the white-box ranker's extra data: random ids it draws itself
    mlp_hidden: int = 512
    mlp_classes: int = 8192
    mlp_epochs: int = 4
    mlpreg_epochs: int = 3  # the white-box attacker's MLP-regression ranker
    defence_depth: int = 2
    noise_sigmas: tuple[float, ...] = (0.05, 0.2, 1.0)  # relative to each sent vector's RMS
    perturb_eps: tuple[float, ...] = (0.03, 0.1, 0.3)  # relative Frobenius change of every local linear map
    perturb_rank: int = 8
    # A trained defence: the head's layers LoRA-fine-tuned (rank r, merged) on the attackers' training text, one
    # run per step count; the whole model's next-token loss keeps quality, a capped push of the sent states away
    # from the public head's makes them differ.  ~3 s a step on one core for the 135M model.
    finetune_steps: tuple[int, ...] = (60,)
    finetune_rank: int = 8
    finetune_lr: float = 1e-3
    finetune_away: float = 1.0  # weight of the push away from the public head's states (0: quality loss alone)
    finetune_away_cap: float = 0.5  # per-position relative distance beyond which the push stops
    finetune_batch: int = 4
    defence_n_per_kind: int = 3
    defence_max_scan: int = 512  # white-box candidates per position when nothing can match exactly
    output_kinds: tuple[str, ...] = ("chat", "prose")
    output_n_per_kind: int = 4
    output_new_tokens: int = 20
    n_boot: int = 1000
    seed: int = 0
    threads: int = 2

    @classmethod
    def quick(cls, **over) -> "Settings":
        """A few minutes on 2 cores: two depths, a handful of short sequences, one level of each defence."""
        base = cls(depths=(1, 2), n_per_kind=3, prose_tokens=20, random_tokens=10, train_tokens=3000,
                   ranker_random_tokens=1500, mlp_epochs=3, mlpreg_epochs=2, noise_sigmas=(0.5,), perturb_eps=(0.1,),
                   finetune_steps=(3,),
                   defence_n_per_kind=2, defence_max_scan=512, output_n_per_kind=2, output_new_tokens=10, n_boot=300)
        return replace(base, **over)


def _tokenizer(model_dir: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):  # tiny test models have no tokenizer
        return None


def _eos(model_dir: Path, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for source in (load_config(model_dir), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return frozenset(ids)


class Progress:
    """One tqdm bar over all attack jobs, with the phase in its description."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="job", dynamic_ncols=True)

    def phase(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)
        log.info("%s", text)

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stack(seqs_states: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(seqs_states, axis=0)


def finetune_head(model_dir: Path, depth: int, train_seqs: list[list[int]], steps: int, s: Settings) -> tuple[Any, dict]:
    """(a fresh victim head LoRA-fine-tuned for `steps` on the attackers' training text, its info dict).

    Trained through the public cloud layers and public tail, as the owner of the local layers would."""
    head, tail, _, cloud = load_victim(model_dir, depth, with_cloud=True)
    info = lora_finetune(head, cloud, tail, train_seqs, steps, rank=s.finetune_rank, lr=s.finetune_lr,
                         away_weight=s.finetune_away, away_cap=s.finetune_away_cap, batch=s.finetune_batch,
                         seq_len=s.train_seq_len, seed=s.seed + 13)
    return head, info


def run(model_dir: Path, settings: Settings, progress: bool = True) -> dict[str, Any]:
    s = settings
    torch.set_num_threads(s.threads)
    model_dir = Path(model_dir)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    tokenizer = _tokenizer(model_dir)
    pub = Public(model_dir)
    V, H, L = pub.vocab_size, pub.hidden_size, pub.num_layers
    specials = set(tokenizer.all_special_ids) if tokenizer is not None else set()
    decode = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else (lambda ids: "")
    kinds = s.kinds if tokenizer is not None else tuple(k for k in s.kinds if k == "random")
    texts = T.held_out(tokenizer, V, s.n_per_kind, s.prose_tokens, s.random_tokens, s.seed, kinds)
    defence_texts = [i for i, t in enumerate(texts) if sum(u.kind == t.kind for u in texts[:i]) < s.defence_n_per_kind]
    out_kinds = [k for k in s.output_kinds if k in kinds] or list(kinds[:1])
    output_texts = [i for i, t in enumerate(texts)
                    if t.kind in out_kinds and sum(u.kind == t.kind for u in texts[:i]) < s.output_n_per_kind]
    attackers = [a for a in s.attackers if a in INPUT_ATTACKERS]
    n_def = len(s.noise_sigmas) + len(s.perturb_eps) + len(s.finetune_steps)
    total = (len(s.depths) * len(attackers) * len(texts) + n_def * len(attackers) * len(defence_texts)
             + (1 + n_def) * len(output_texts))
    bar = Progress(total, progress)

    # ---- training data for the learned attackers (public weights on text that is not held out) ----
    bar.phase("training states")
    t0 = time.perf_counter()
    all_depths = sorted(set(s.depths) | {s.defence_depth})
    if tokenizer is not None:
        train_seqs, corpus = T.training_sequences(tokenizer, s.train_tokens, s.train_seq_len, s.seed + 1)
    else:
        train_seqs = T.random_sequences(V, s.train_tokens, s.train_seq_len, s.seed + 1)
        corpus = {"sequences": len(train_seqs), "tokens": sum(map(len, train_seqs)), "documents": {"random": len(train_seqs)}}
    rand_seqs = T.random_sequences(V, s.ranker_random_tokens, s.train_seq_len, s.seed + 2, exclude=specials.__contains__)
    train_states = {k: [] for k in all_depths}
    rand_states = {k: [] for k in all_depths}
    for seq in train_seqs:
        for k, st in pub.states(seq, all_depths).items():
            train_states[k].append(st)
    for seq in rand_seqs:
        for k, st in pub.states(seq, all_depths).items():
            rand_states[k].append(st)
    train_y = [t for seq in train_seqs for t in seq]
    rand_y = [t for seq in rand_seqs for t in seq]
    train_states = {k: _stack(v) for k, v in train_states.items()}
    rand_states = {k: _stack(v) for k, v in rand_states.items()}
    timings["training_states"] = time.perf_counter() - t0

    tables: dict[int, np.ndarray] = {}
    if "nn" in attackers or "whitebox" in attackers:
        bar.phase("vocabulary tables")
        t0 = time.perf_counter()
        tables = pub.vocab_table(all_depths)
        timings["vocabulary_tables"] = time.perf_counter() - t0

    embedding = pub.embed.weight.detach()
    trained: dict[int, dict[str, Any]] = {}
    training_info: dict[str, Any] = {"corpus": corpus, "ranker_random": {"sequences": len(rand_seqs), "tokens": len(rand_y)},
                                     "per_depth": {}}

    def attackers_at(k: int) -> dict[str, Any]:
        if k in trained:
            return trained[k]
        bar.phase(f"fitting attackers, depth {k}")
        t0 = time.perf_counter()
        made: dict[str, Any] = {}
        info: dict[str, Any] = {}
        if "mlp" in attackers:
            made["mlp"] = MLPClassifier(s.mlp_hidden, s.mlp_classes, s.mlp_epochs, seed=s.seed).fit(train_states[k], train_y)
            info["mlp"] = made["mlp"].info
        if "ridge" in attackers or "whitebox" in attackers:
            made["ridge"] = RidgeNN(embedding).fit(train_states[k], train_y)
            info["ridge_fit_seconds"] = round(made["ridge"].fit_seconds, 3)
        if "nn" in attackers or "whitebox" in attackers:
            made["nn"] = TableNN(tables[k])
        if "whitebox" in attackers:
            # The white-box attacker's own ranker: the same ridge map, fitted on the training text plus random
            # ids it draws itself (it has the public weights, so it can label as much data as it likes).
            both, both_y = np.concatenate([train_states[k], rand_states[k]]), train_y + rand_y
            made["ranker"] = RidgeNN(embedding).fit(both, both_y)
            made["mlpreg"] = MLPRegressor(embedding, epochs=s.mlpreg_epochs, seed=s.seed).fit(both, both_y)
            info["whitebox_rankers_fit_seconds"] = round(made["ranker"].fit_seconds + made["mlpreg"].fit_seconds, 2)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        training_info["per_depth"][str(k)] = info
        trained[k] = made
        return made

    records: list[dict] = []

    def attack_all(k: int, observed: dict[int, np.ndarray], defence: str, wb_config: WhiteBoxConfig) -> None:
        made = attackers_at(k)
        bar.phase(f"attacking k={k}, defence {defence}")
        for name in attackers:
            for i, obs in observed.items():
                text = texts[i]
                t0 = time.perf_counter()
                extra: dict[str, Any] = {}
                if name == "whitebox":
                    rankers = [made["ranker"].scores, made["nn"].scores, made["mlpreg"].scores]
                    pred, extra = WhiteBox(pub, k, rankers, wb_config).attack(obs)
                else:
                    pred = made[name].predict(obs)
                seconds = time.perf_counter() - t0
                correct, n, exact = score(text.ids, pred)
                rec = {"direction": "input", "attacker": name, "depth": k, "defence": defence, "kind": text.kind,
                       "text": i, "n": n, "correct": correct, "exact": exact, "seconds": round(seconds, 4),
                       "pred": [int(t) for t in pred]}
                if text.pii:
                    rec["pii"] = pii_recovered(text.pii, decode(pred))
                if extra:
                    rec["whitebox"] = extra
                records.append(rec)
                bar.step()

    # ---- input direction: every depth, no defence ----
    exact_cfg = WhiteBoxConfig()
    for k in s.depths:
        head, _, _ = load_victim(model_dir, k)
        observed = {i: wire_states(head, t.ids) for i, t in enumerate(texts)}
        t0 = time.perf_counter()
        attack_all(k, observed, "none", exact_cfg)
        timings[f"attack_depth_{k}"] = time.perf_counter() - t0

    # ---- defences at one depth: Gaussian noise, perturbed local layers, LoRA-fine-tuned local layers ----
    d = s.defence_depth
    perturb_info = {}
    for sigma in s.noise_sigmas:
        head, _, _ = load_victim(model_dir, d)
        observed = {i: wire_states(head, texts[i].ids, sigma, torch.Generator().manual_seed(s.seed * 1000 + i))
                    for i in defence_texts}
        t0 = time.perf_counter()
        cfg = WhiteBoxConfig(noise_sigma=sigma, min_scan=64, max_scan=s.defence_max_scan)
        attack_all(d, observed, f"noise:{sigma:g}", cfg)
        timings[f"attack_noise_{sigma:g}"] = time.perf_counter() - t0
    for eps in s.perturb_eps:
        head, _, _ = load_victim(model_dir, d)
        perturb_info[f"{eps:g}"] = perturb_layers(list(head.span.layers), eps, s.perturb_rank, s.seed + 11)
        observed = {i: wire_states(head, texts[i].ids) for i in defence_texts}
        t0 = time.perf_counter()
        cfg = WhiteBoxConfig(ratio=0.5, max_scan=s.defence_max_scan)
        attack_all(d, observed, f"perturb:{eps:g}", cfg)
        timings[f"attack_perturb_{eps:g}"] = time.perf_counter() - t0
    finetuned: dict[int, Any] = {}  # steps -> fine-tuned head, reused for the quality measurements
    finetune_info = {}
    for steps in s.finetune_steps:
        bar.phase(f"fine-tuning the local head, {steps} steps")
        head, finetune_info[str(steps)] = finetune_head(model_dir, d, train_seqs, steps, s)
        finetuned[steps] = head
        timings[f"finetune_{steps}"] = finetune_info[str(steps)]["seconds"]
        observed = {i: wire_states(head, texts[i].ids) for i in defence_texts}
        t0 = time.perf_counter()
        cfg = WhiteBoxConfig(ratio=0.5, max_scan=s.defence_max_scan)
        attack_all(d, observed, f"finetune:{steps}", cfg)
        timings[f"attack_finetune_{steps}"] = time.perf_counter() - t0

    # ---- output direction and the defences' quality cost (greedy agreement, perplexity) ----
    bar.phase("generations: output direction and quality")
    t0 = time.perf_counter()
    eos = _eos(model_dir, tokenizer)
    head0, tail0, split, cloud = load_victim(model_dir, d, with_cloud=True)
    reader = OutputReader(pub, split.resume_at)
    configs: list[tuple[str, float, float]] = [("none", 0.0, 0.0)]
    configs += [(f"noise:{x:g}", x, 0.0) for x in s.noise_sigmas]
    configs += [(f"perturb:{x:g}", 0.0, x) for x in s.perturb_eps]
    configs += [(f"finetune:{x}", 0.0, 0.0) for x in s.finetune_steps]
    quality: list[dict] = []
    baseline: dict[int, list[int]] = {}
    base_nll: float | None = None
    prose = [i for i, t in enumerate(texts) if t.kind == "prose"] or [i for i, t in enumerate(texts)]
    for label, sigma, eps in configs:
        head, tail = head0, tail0
        if eps:
            head, tail = copy.deepcopy(head0), copy.deepcopy(tail0)
            perturb_layers(list(head.span.layers) + list(tail.span.layers), eps, s.perturb_rank, s.seed + 11)
        if label.startswith("finetune:"):
            head = finetuned[int(label.split(":")[1])]  # only the head was fine-tuned; the tail stays public
        agree, identical, gens = [], [], {}
        for j, i in enumerate(output_texts):
            text = texts[i]
            tap = TapSpan(InProcessSpan(cloud, DTYPE), sigma, s.seed * 1000 + 500 + j)
            lm = SplitModel(head, tail, tap, DTYPE)
            t1 = time.perf_counter()
            gen = drain(sequential(lm, text.ids, s.output_new_tokens, eos)).tokens
            gen_seconds = time.perf_counter() - t1
            returned = np.concatenate(tap.returned, axis=0)
            t1 = time.perf_counter()
            read = reader.read(returned)[len(text.ids) - 1 : len(text.ids) - 1 + len(gen)]
            seconds = time.perf_counter() - t1
            correct, n, exact = score(gen, read)
            rec = {"direction": "output", "attacker": "output", "depth": d, "defence": label, "kind": text.kind,
                   "text": i, "n": n, "correct": correct, "exact": exact, "seconds": round(seconds, 4),
                   "generate_seconds": round(gen_seconds, 3), "generated": gen, "pred": [int(t) for t in read]}
            if text.pii and tokenizer is not None:
                said = decode(gen)
                present = {f: v for f, v in text.pii.items() if v in said}
                if present:
                    rec["pii"] = pii_recovered(present, decode(read))
            records.append(rec)
            gens[i] = gen
            if label == "none":
                baseline[i] = gen
            else:
                ref = baseline[i]
                span = max(len(ref), len(gen))
                agree.append(sum(a == b for a, b in zip(ref, gen)) / span if span else 1.0)
                identical.append(ref == gen)
            bar.step()
        nll, count = 0.0, 0
        for j, i in enumerate(prose):
            ids = texts[i].ids
            lm = SplitModel(head, tail, TapSpan(InProcessSpan(cloud, DTYPE), sigma, s.seed * 1000 + 900 + j), DTYPE)
            logits = lm.forward(ids)
            lm.commit()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            nll -= float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
            count += len(ids) - 1
        mean_nll = nll / max(count, 1)
        if label == "none":
            base_nll = mean_nll
        q = {"defence": label, "depth": d, "perplexity": math.exp(mean_nll), "tokens_scored": count,
             "perplexity_ratio": math.exp(mean_nll - base_nll) if base_nll is not None else 1.0}
        if label != "none":
            q["greedy_identical_rate"] = float(np.mean(identical)) if identical else None
            q["greedy_token_agreement"] = float(np.mean(agree)) if agree else None
        else:
            q["greedy_identical_rate"] = 1.0
            q["greedy_token_agreement"] = 1.0
        quality.append(q)
    timings["generations_and_quality"] = time.perf_counter() - t0

    # ---- the price of depth: local layers and the local head's time per token ----
    depth_cost = {}
    ids = texts[0].ids
    for k in sorted(set(s.depths) | {d}):
        head, _, sp = load_victim(model_dir, k)
        t1 = time.perf_counter()
        for _ in range(3):
            wire_states(head, ids)
        ms = (time.perf_counter() - t1) / 3 / len(ids) * 1000.0
        depth_cost[str(k)] = {"local_layers": len(sp.local_layers), "of": L,
                              "head_ms_per_token_prefill": round(ms, 4)}

    bar.close()
    timings["total"] = time.perf_counter() - t_start

    # ---- aggregates ----
    summary = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        for kind in (r["kind"], "all"):
            groups.setdefault((r["direction"], r["attacker"], r["depth"], r["defence"], kind), []).append(r)
    for (direction, attacker, depth, defence, kind), recs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        agg = summarise(recs, s.n_boot, s.seed)
        summary.append({"direction": direction, "attacker": attacker, "depth": depth, "defence": defence, "kind": kind, **agg})
        if attacker == "whitebox":
            summary[-1]["candidates_per_token"] = sum(r["whitebox"]["candidates"] for r in recs) / max(1, sum(r["n"] for r in recs))
            verdicts: dict[str, int] = {}
            for r in recs:
                for v, c in r["whitebox"]["verdicts"].items():
                    verdicts[v] = verdicts.get(v, 0) + c
            summary[-1]["verdicts"] = verdicts

    return {
        "settings": {**asdict(s), "model_layers": L, "hidden_size": H, "vocab_size": V},
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "training": training_info,
        "perturbation": perturb_info,
        "finetune": finetune_info,
        "whitebox_config": {"no_defence": exact_cfg.as_dict(),
                            "noise": WhiteBoxConfig(min_scan=64, max_scan=s.defence_max_scan).as_dict(),
                            "perturb": WhiteBoxConfig(ratio=0.5, max_scan=s.defence_max_scan).as_dict(),
                            "finetune": WhiteBoxConfig(ratio=0.5, max_scan=s.defence_max_scan).as_dict()},
        "texts": [{"kind": t.kind, "ids": t.ids, "text": t.text, "pii": t.pii} for t in texts],
        "records": records,
        "summary": summary,
        "quality": quality,
        "depth_cost": depth_cost,
    }
