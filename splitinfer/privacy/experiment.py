"""The inversion experiment: every attacker x split depth x defence x text kind, in both directions.

`run(model_dir, Settings)` returns a JSON-ready dict: settings, phase timings, the held-out texts, one
record per (attacker, depth, defence, sequence) with the recovered ids, aggregates with bootstrap CIs,
and the defences' quality cost.  `inversion_experiment.py` is the command line around it.

`run` is the list of phases, in order; each phase is one function below it. They share a `Sweep` (the
public model, the held-out texts, the records and timings so far); the attack phases also share the
`Attackers`, fitted per depth on the training states the first time a depth is attacked.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..decoding import run as drain
from ..decoding.sequential import sequential
from ..engine import SplitModel
from ..models import load_config
from ..remote import InProcessSpan
from . import texts as T
from .attackers import MLPClassifier, MLPRegressor, OutputReader, RidgeNN, TableNN, WhiteBox, WhiteBoxConfig
from .defences import lora_finetune, perturb_layers
from .metrics import pii_recovered, score, summarise
from .public import DTYPE, Public
from .settings import INPUT_ATTACKERS, Settings
from .victim import TapSpan, load_victim, wire_states

log = logging.getLogger(__name__)


def run(model_dir: Path, settings: Settings, progress: bool = True) -> dict[str, Any]:
    """The whole sweep, phase by phase; returns the JSON-ready results (see the module docstring)."""
    torch.set_num_threads(settings.threads)
    sweep = Sweep.prepare(Path(model_dir), settings, progress)
    training = training_data(sweep)
    attackers = Attackers(sweep, training, vocabulary_tables(sweep))
    attack_by_depth(sweep, attackers)
    attack_noise(sweep, attackers)
    perturbation = attack_perturbation(sweep, attackers)
    finetuned, finetune_info = attack_finetuned(sweep, attackers, training.train_seqs)
    quality = generations_and_quality(sweep, finetuned)
    depth_cost = depth_costs(sweep)
    sweep.finish()
    return results(sweep, attackers.info, perturbation, finetune_info, quality, depth_cost)


# ---------------------------------------------------------------------------- what the phases share


@dataclass
class Sweep:
    """The settings, the public model, the held-out texts (and which ones each phase uses), and what the
    phases have produced so far: attack records and timings."""

    model_dir: Path
    s: Settings
    tokenizer: Any  # None for tiny test models, which have none
    pub: Public
    texts: list[T.Text]
    attackers: list[str]  # the input-direction attackers to run
    defence_texts: list[int]  # indices into texts attacked under each defence
    output_texts: list[int]  # indices into texts generated from (output direction, quality)
    bar: Progress
    started: float = field(default_factory=time.perf_counter)
    records: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def prepare(cls, model_dir: Path, s: Settings, progress: bool) -> "Sweep":
        started = time.perf_counter()
        tokenizer = _tokenizer(model_dir)
        pub = Public(model_dir)
        kinds = s.kinds if tokenizer is not None else tuple(k for k in s.kinds if k == "random")
        texts = T.held_out(tokenizer, pub.vocab_size, s.n_per_kind, s.prose_tokens, s.random_tokens, s.seed, kinds)
        out_kinds = [k for k in s.output_kinds if k in kinds] or list(kinds[:1])
        defence_texts = _first_per_kind(texts, s.defence_n_per_kind, kinds)
        output_texts = _first_per_kind(texts, s.output_n_per_kind, out_kinds)
        attackers = [a for a in s.attackers if a in INPUT_ATTACKERS]
        n_def = len(s.noise_sigmas) + len(s.perturb_eps) + len(s.finetune_steps)
        total = (len(s.depths) * len(attackers) * len(texts) + n_def * len(attackers) * len(defence_texts)
                 + (1 + n_def) * len(output_texts))
        return cls(model_dir, s, tokenizer, pub, texts, attackers, defence_texts, output_texts,
                   Progress(total, progress), started)

    @property
    def all_depths(self) -> list[int]:
        """Every depth any phase attacks (the sweep's and the defences')."""
        return sorted(set(self.s.depths) | {self.s.defence_depth})

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.timings[key] = time.perf_counter() - t0

    def finish(self) -> None:
        self.bar.close()
        self.timings["total"] = time.perf_counter() - self.started


def _first_per_kind(texts: list[T.Text], n: int, kinds) -> list[int]:
    """Indices of the first `n` texts of each kind in `kinds`, in text order."""
    return [i for i, t in enumerate(texts) if t.kind in kinds and sum(u.kind == t.kind for u in texts[:i]) < n]


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


# ---------------------------------------------------------------------------- phase: training states


@dataclass
class TrainingData:
    """The learned attackers' data: public-weight states of text that is not held out, per depth."""

    train_seqs: list[list[int]]
    train_states: dict[int, np.ndarray]  # depth -> [N, H] float16
    train_y: list[int]
    rand_states: dict[int, np.ndarray]  # the white-box ranker's extra random ids, depth -> [M, H]
    rand_y: list[int]
    info: dict[str, Any]


def training_data(sweep: Sweep) -> TrainingData:
    s, pub, tokenizer = sweep.s, sweep.pub, sweep.tokenizer
    sweep.bar.phase("training states")
    with sweep.timed("training_states"):
        if tokenizer is not None:
            train_seqs, corpus = T.training_sequences(tokenizer, s.train_tokens, s.train_seq_len, s.seed + 1)
        else:
            train_seqs = T.random_sequences(pub.vocab_size, s.train_tokens, s.train_seq_len, s.seed + 1)
            corpus = {"sequences": len(train_seqs), "tokens": sum(map(len, train_seqs)),
                      "documents": {"random": len(train_seqs)}}
        specials = set(tokenizer.all_special_ids) if tokenizer is not None else set()
        rand_seqs = T.random_sequences(pub.vocab_size, s.ranker_random_tokens, s.train_seq_len, s.seed + 2,
                                       exclude=specials.__contains__)
        train_states = _states_by_depth(pub, train_seqs, sweep.all_depths)
        rand_states = _states_by_depth(pub, rand_seqs, sweep.all_depths)
    rand_y = [t for seq in rand_seqs for t in seq]
    info = {"corpus": corpus, "ranker_random": {"sequences": len(rand_seqs), "tokens": len(rand_y)}, "per_depth": {}}
    return TrainingData(train_seqs, train_states, [t for seq in train_seqs for t in seq], rand_states, rand_y, info)


def _states_by_depth(pub: Public, seqs: list[list[int]], depths: list[int]) -> dict[int, np.ndarray]:
    """Every sequence's states after k public layers, stacked: depth -> [sum of lengths, H] float16."""
    per_depth: dict[int, list[np.ndarray]] = {k: [] for k in depths}
    for seq in seqs:
        for k, st in pub.states(seq, depths).items():
            per_depth[k].append(st)
    return {k: np.concatenate(v, axis=0) for k, v in per_depth.items()}


# ---------------------------------------------------------------------------- phase: vocabulary tables


def vocabulary_tables(sweep: Sweep) -> dict[int, np.ndarray]:
    """Every token alone through k public layers, depth -> [V, H]; only the table-based attackers need it."""
    if "nn" not in sweep.attackers and "whitebox" not in sweep.attackers:
        return {}
    sweep.bar.phase("vocabulary tables")
    with sweep.timed("vocabulary_tables"):
        return sweep.pub.vocab_table(sweep.all_depths)


# ---------------------------------------------------------------------------- the attackers, and one attack


class Attackers:
    """The input-direction attackers, fitted per depth the first time that depth is attacked."""

    def __init__(self, sweep: Sweep, data: TrainingData, tables: dict[int, np.ndarray]):
        self.sweep, self.data, self.tables = sweep, data, tables
        self.embedding = sweep.pub.embed.weight.detach()
        self.fitted: dict[int, dict[str, Any]] = {}
        self.info = data.info  # training info; per_depth is filled in as depths are fitted

    def at(self, k: int) -> dict[str, Any]:
        if k not in self.fitted:
            self.fitted[k] = self._fit(k)
        return self.fitted[k]

    def _fit(self, k: int) -> dict[str, Any]:
        s, d, names = self.sweep.s, self.data, self.sweep.attackers
        self.sweep.bar.phase(f"fitting attackers, depth {k}")
        t0 = time.perf_counter()
        made: dict[str, Any] = {}
        info: dict[str, Any] = {}
        if "mlp" in names:
            made["mlp"] = MLPClassifier(s.mlp_hidden, s.mlp_classes, s.mlp_epochs, seed=s.seed).fit(d.train_states[k], d.train_y)
            info["mlp"] = made["mlp"].info
        if "ridge" in names or "whitebox" in names:
            made["ridge"] = RidgeNN(self.embedding).fit(d.train_states[k], d.train_y)
            info["ridge_fit_seconds"] = round(made["ridge"].fit_seconds, 3)
        if "nn" in names or "whitebox" in names:
            made["nn"] = TableNN(self.tables[k])
        if "whitebox" in names:
            # The white-box attacker's own ranker: the same ridge map, fitted on the training text plus random
            # ids it draws itself (it has the public weights, so it can label as much data as it likes).
            both, both_y = np.concatenate([d.train_states[k], d.rand_states[k]]), d.train_y + d.rand_y
            made["ranker"] = RidgeNN(self.embedding).fit(both, both_y)
            made["mlpreg"] = MLPRegressor(self.embedding, epochs=s.mlpreg_epochs, seed=s.seed).fit(both, both_y)
            info["whitebox_rankers_fit_seconds"] = round(made["ranker"].fit_seconds + made["mlpreg"].fit_seconds, 2)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        self.info["per_depth"][str(k)] = info
        return made


def attack(sweep: Sweep, attackers: Attackers, k: int, observed: dict[int, np.ndarray], defence: str,
           wb_config: WhiteBoxConfig) -> None:
    """Every attacker on every observed sequence (text index -> [T, H] states at depth k): one record each."""
    made = attackers.at(k)
    sweep.bar.phase(f"attacking k={k}, defence {defence}")
    for name in sweep.attackers:
        for i, obs in observed.items():
            text = sweep.texts[i]
            t0 = time.perf_counter()
            extra: dict[str, Any] = {}
            if name == "whitebox":
                rankers = [made["ranker"].scores, made["nn"].scores, made["mlpreg"].scores]
                pred, extra = WhiteBox(sweep.pub, k, rankers, wb_config).attack(obs)
            else:
                pred = made[name].predict(obs)
            seconds = time.perf_counter() - t0
            correct, n, exact = score(text.ids, pred)
            rec = {"direction": "input", "attacker": name, "depth": k, "defence": defence, "kind": text.kind,
                   "text": i, "n": n, "correct": correct, "exact": exact, "seconds": round(seconds, 4),
                   "pred": [int(t) for t in pred]}
            if text.pii:
                rec["pii"] = pii_recovered(text.pii, sweep.decode(pred))
            if extra:
                rec["whitebox"] = extra
            sweep.records.append(rec)
            sweep.bar.step()


# The white-box settings per defence: exact matching without one; a wider scan and a looser ratio with one.
EXACT_CONFIG = WhiteBoxConfig()


def _noise_config(s: Settings, sigma: float = 0.0) -> WhiteBoxConfig:
    """Noise: the tolerance widens with the known sigma, and the nearest of a bounded scan is taken."""
    return WhiteBoxConfig(noise_sigma=sigma, min_scan=64, max_scan=s.defence_max_scan)


def _changed_weights_config(s: Settings) -> WhiteBoxConfig:
    """Perturbed or fine-tuned local layers: nothing matches exactly, so accept the best of a bounded scan."""
    return WhiteBoxConfig(ratio=0.5, max_scan=s.defence_max_scan)


# ---------------------------------------------------------------------------- phase: attacks by depth


def attack_by_depth(sweep: Sweep, attackers: Attackers) -> None:
    """Input direction, no defence: every held-out text at every depth of the sweep."""
    for k in sweep.s.depths:
        head, _, _ = load_victim(sweep.model_dir, k)
        observed = {i: wire_states(head, t.ids) for i, t in enumerate(sweep.texts)}
        with sweep.timed(f"attack_depth_{k}"):
            attack(sweep, attackers, k, observed, "none", EXACT_CONFIG)


# ---------------------------------------------------------------------------- phases: the defences at one depth


def attack_noise(sweep: Sweep, attackers: Attackers) -> None:
    """Gaussian noise on the sent states, one level at a time."""
    s, d = sweep.s, sweep.s.defence_depth
    for sigma in s.noise_sigmas:
        head, _, _ = load_victim(sweep.model_dir, d)
        observed = {i: wire_states(head, sweep.texts[i].ids, sigma, torch.Generator().manual_seed(s.seed * 1000 + i))
                    for i in sweep.defence_texts}
        with sweep.timed(f"attack_noise_{sigma:g}"):
            attack(sweep, attackers, d, observed, f"noise:{sigma:g}", _noise_config(s, sigma))


def attack_perturbation(sweep: Sweep, attackers: Attackers) -> dict[str, dict]:
    """Local layers perturbed away from the public weights, one size at a time; returns what was changed."""
    s, d = sweep.s, sweep.s.defence_depth
    perturb_info = {}
    for eps in s.perturb_eps:
        head, _, _ = load_victim(sweep.model_dir, d)
        perturb_info[f"{eps:g}"] = perturb_layers(list(head.span.layers), eps, s.perturb_rank, s.seed + 11)
        observed = {i: wire_states(head, sweep.texts[i].ids) for i in sweep.defence_texts}
        with sweep.timed(f"attack_perturb_{eps:g}"):
            attack(sweep, attackers, d, observed, f"perturb:{eps:g}", _changed_weights_config(s))
    return perturb_info


def attack_finetuned(sweep: Sweep, attackers: Attackers, train_seqs: list[list[int]]) -> tuple[dict[int, Any], dict[str, dict]]:
    """Local layers LoRA-fine-tuned, one step count at a time.

    Returns (steps -> fine-tuned head, reused for the quality measurements; steps -> fine-tune info)."""
    s, d = sweep.s, sweep.s.defence_depth
    finetuned: dict[int, Any] = {}
    finetune_info: dict[str, dict] = {}
    for steps in s.finetune_steps:
        sweep.bar.phase(f"fine-tuning the local head, {steps} steps")
        head, finetune_info[str(steps)] = finetune_head(sweep.model_dir, d, train_seqs, steps, s)
        finetuned[steps] = head
        sweep.timings[f"finetune_{steps}"] = finetune_info[str(steps)]["seconds"]
        observed = {i: wire_states(head, sweep.texts[i].ids) for i in sweep.defence_texts}
        with sweep.timed(f"attack_finetune_{steps}"):
            attack(sweep, attackers, d, observed, f"finetune:{steps}", _changed_weights_config(s))
    return finetuned, finetune_info


def finetune_head(model_dir: Path, depth: int, train_seqs: list[list[int]], steps: int, s: Settings) -> tuple[Any, dict]:
    """(a fresh victim head LoRA-fine-tuned for `steps` on the attackers' training text, its info dict).

    Trained through the public cloud layers and public tail, as the owner of the local layers would."""
    head, tail, _, cloud = load_victim(model_dir, depth, with_cloud=True)
    info = lora_finetune(head, cloud, tail, train_seqs, steps, rank=s.finetune_rank, lr=s.finetune_lr,
                         away_weight=s.finetune_away, away_cap=s.finetune_away_cap, batch=s.finetune_batch,
                         seq_len=s.train_seq_len, seed=s.seed + 13)
    return head, info


# ---------------------------------------------------------------------------- phase: generations and quality


@dataclass
class _Generating:
    """What every defence's generations share: the public-model output reader, the victim's parts, the
    no-defence greedy generations to compare with, and the no-defence perplexity."""

    reader: OutputReader
    head: Any
    tail: Any
    cloud: Any
    eos: frozenset[int]
    baseline: dict[int, list[int]] = field(default_factory=dict)
    base_nll: float | None = None


def generations_and_quality(sweep: Sweep, finetuned: dict[int, Any]) -> list[dict]:
    """Output direction (the cloud reads the generated tokens) and each defence's quality cost, with and
    without every defence: greedy agreement with the undefended generation, and perplexity on prose."""
    s, d = sweep.s, sweep.s.defence_depth
    sweep.bar.phase("generations: output direction and quality")
    quality: list[dict] = []
    with sweep.timed("generations_and_quality"):
        eos = _eos(sweep.model_dir, sweep.tokenizer)
        head0, tail0, split, cloud = load_victim(sweep.model_dir, d, with_cloud=True)
        g = _Generating(OutputReader(sweep.pub, split.tail_layers.start), head0, tail0, cloud, eos)
        for label, sigma, eps in _defence_configs(s):
            head, tail = _defended_parts(s, g, finetuned, label, eps)
            agree, identical = _output_direction(sweep, g, head, tail, label, sigma)
            mean_nll, count = _prose_nll(sweep, g, head, tail, sigma)
            if label == "none":
                g.base_nll = mean_nll
            quality.append(_quality_row(label, d, mean_nll, count, g.base_nll, agree, identical))
    return quality


def _defence_configs(s: Settings) -> list[tuple[str, float, float]]:
    """(label, noise sigma, perturbation eps) for no defence first, then every defence of the sweep."""
    configs: list[tuple[str, float, float]] = [("none", 0.0, 0.0)]
    configs += [(f"noise:{x:g}", x, 0.0) for x in s.noise_sigmas]
    configs += [(f"perturb:{x:g}", 0.0, x) for x in s.perturb_eps]
    configs += [(f"finetune:{x}", 0.0, 0.0) for x in s.finetune_steps]
    return configs


def _defended_parts(s: Settings, g: _Generating, finetuned: dict[int, Any], label: str, eps: float):
    """(head, tail) the victim generates with under a defence: perturbation changes both local parts (copies),
    a fine-tune only the head; noise is added on the wire by the TapSpan instead."""
    head, tail = g.head, g.tail
    if eps:
        head, tail = copy.deepcopy(g.head), copy.deepcopy(g.tail)
        perturb_layers(list(head.span.layers) + list(tail.span.layers), eps, s.perturb_rank, s.seed + 11)
    if label.startswith("finetune:"):
        head = finetuned[int(label.split(":")[1])]  # only the head was fine-tuned; the tail stays public
    return head, tail


def _output_direction(sweep: Sweep, g: _Generating, head, tail, label: str, sigma: float) -> tuple[list[float], list[bool]]:
    """Greedy generations under one defence, each read back by the cloud (one output record per text);
    returns the per-text greedy agreement with, and identity to, the undefended generation."""
    s, d = sweep.s, sweep.s.defence_depth
    agree: list[float] = []
    identical: list[bool] = []
    for j, i in enumerate(sweep.output_texts):
        text = sweep.texts[i]
        tap = TapSpan(InProcessSpan(g.cloud, DTYPE), sigma, s.seed * 1000 + 500 + j)
        lm = SplitModel(head, tail, tap, DTYPE)
        t1 = time.perf_counter()
        gen = drain(sequential(lm, text.ids, s.output_new_tokens, g.eos)).tokens
        gen_seconds = time.perf_counter() - t1
        returned = np.concatenate(tap.returned, axis=0)
        t1 = time.perf_counter()
        read = g.reader.read(returned)[len(text.ids) - 1 : len(text.ids) - 1 + len(gen)]
        seconds = time.perf_counter() - t1
        correct, n, exact = score(gen, read)
        rec = {"direction": "output", "attacker": "output", "depth": d, "defence": label, "kind": text.kind,
               "text": i, "n": n, "correct": correct, "exact": exact, "seconds": round(seconds, 4),
               "generate_seconds": round(gen_seconds, 3), "generated": gen, "pred": [int(t) for t in read]}
        if text.pii and sweep.tokenizer is not None:
            said = sweep.decode(gen)
            present = {f: v for f, v in text.pii.items() if v in said}
            if present:
                rec["pii"] = pii_recovered(present, sweep.decode(read))
        sweep.records.append(rec)
        if label == "none":
            g.baseline[i] = gen
        else:
            ref = g.baseline[i]
            span = max(len(ref), len(gen))
            agree.append(sum(a == b for a, b in zip(ref, gen)) / span if span else 1.0)
            identical.append(ref == gen)
        sweep.bar.step()
    return agree, identical


def _prose_nll(sweep: Sweep, g: _Generating, head, tail, sigma: float) -> tuple[float, int]:
    """(mean next-token negative log-likelihood, tokens scored) of the split model on the prose texts
    (every text when there is no prose)."""
    s = sweep.s
    prose = [i for i, t in enumerate(sweep.texts) if t.kind == "prose"] or list(range(len(sweep.texts)))
    nll, count = 0.0, 0
    for j, i in enumerate(prose):
        ids = sweep.texts[i].ids
        lm = SplitModel(head, tail, TapSpan(InProcessSpan(g.cloud, DTYPE), sigma, s.seed * 1000 + 900 + j), DTYPE)
        logits = lm.forward(ids)  # [T, V]
        lm.commit()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nll -= float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
        count += len(ids) - 1
    return nll / max(count, 1), count


def _quality_row(label: str, depth: int, mean_nll: float, count: int, base_nll: float | None,
                 agree: list[float], identical: list[bool]) -> dict:
    q = {"defence": label, "depth": depth, "perplexity": math.exp(mean_nll), "tokens_scored": count,
         "perplexity_ratio": math.exp(mean_nll - base_nll) if base_nll is not None else 1.0}
    if label != "none":
        q["greedy_identical_rate"] = float(np.mean(identical)) if identical else None
        q["greedy_token_agreement"] = float(np.mean(agree)) if agree else None
    else:
        q["greedy_identical_rate"] = 1.0
        q["greedy_token_agreement"] = 1.0
    return q


# ---------------------------------------------------------------------------- phase: the price of depth


def depth_costs(sweep: Sweep) -> dict[str, dict]:
    """Per depth: how many layers run locally and the local head's prefill time per token."""
    depth_cost = {}
    ids = sweep.texts[0].ids
    for k in sweep.all_depths:
        head, _, sp = load_victim(sweep.model_dir, k)
        t1 = time.perf_counter()
        for _ in range(3):
            wire_states(head, ids)
        ms = (time.perf_counter() - t1) / 3 / len(ids) * 1000.0
        depth_cost[str(k)] = {"local_layers": len(sp.local_layers), "of": sweep.pub.num_layers,
                              "head_ms_per_token_prefill": round(ms, 4)}
    return depth_cost


# ---------------------------------------------------------------------------- phase: summary


def summary(records: list[dict], s: Settings) -> list[dict]:
    """Aggregates with bootstrap CIs per (direction, attacker, depth, defence, kind), "all" kinds included."""
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        for kind in (r["kind"], "all"):
            groups.setdefault((r["direction"], r["attacker"], r["depth"], r["defence"], kind), []).append(r)
    for (direction, attacker, depth, defence, kind), recs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        agg = summarise(recs, s.n_boot, s.seed)
        rows.append({"direction": direction, "attacker": attacker, "depth": depth, "defence": defence, "kind": kind, **agg})
        if attacker == "whitebox":
            rows[-1].update(_whitebox_totals(recs))
    return rows


def _whitebox_totals(recs: list[dict]) -> dict[str, Any]:
    """Candidates scanned per token and the verdict counts, over a group of white-box records."""
    verdicts: dict[str, int] = {}
    for r in recs:
        for v, c in r["whitebox"]["verdicts"].items():
            verdicts[v] = verdicts.get(v, 0) + c
    candidates = sum(r["whitebox"]["candidates"] for r in recs) / max(1, sum(r["n"] for r in recs))
    return {"candidates_per_token": candidates, "verdicts": verdicts}


def results(sweep: Sweep, training_info: dict, perturbation: dict, finetune_info: dict, quality: list[dict],
            depth_cost: dict) -> dict[str, Any]:
    """The JSON-ready result (the schema inversion_experiment.py writes and the reports read)."""
    s, pub = sweep.s, sweep.pub
    return {
        "settings": {**asdict(s), "model_layers": pub.num_layers, "hidden_size": pub.hidden_size,
                     "vocab_size": pub.vocab_size},
        "seconds": {k: round(v, 2) for k, v in sweep.timings.items()},
        "training": training_info,
        "perturbation": perturbation,
        "finetune": finetune_info,
        "whitebox_config": {"no_defence": EXACT_CONFIG.as_dict(),
                            "noise": _noise_config(s).as_dict(),
                            "perturb": _changed_weights_config(s).as_dict(),
                            "finetune": _changed_weights_config(s).as_dict()},
        "texts": [{"kind": t.kind, "ids": t.ids, "text": t.text, "pii": t.pii} for t in sweep.texts],
        "records": sweep.records,
        "summary": summary(sweep.records, s),
        "quality": quality,
        "depth_cost": depth_cost,
    }
