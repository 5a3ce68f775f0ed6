"""Train the draft head by self-distillation (`python -m splitinfer train-drafter`).

Three phases, each resumable (OUT/work holds their state; rerunning the same command continues):

1. data      the base model answers the training corpus (answers.py): greedy answers to every prompt, then
             sampled ones while the time budget allows; the features and argmaxes come with them.
2. vocab     the draft vocabulary: the N tokens the model most often writes (head.d2t, most frequent first).
3. training  EAGLE-1's objective (objective.py): from (f_j, x_{j+1}) predict f_{j+1} (SmoothL1) and,
             through the base LM head's draft rows, the token the model picks next (cross-entropy against
             its argmax).  With --unroll 2 the head also learns from its own prediction: (f^_{j+1}, x_{j+2})
             -> f_{j+2}, attending to the true features before it, as it drafts at run time.

Held-out prompts (a seeded 5% of each category) are answered greedily and never trained on; the training
curve reports top-1 on them.  OUT/model.safetensors + config.json (head.save) and OUT/provenance.json are
the result; OUT/work is scratch (checkpoints and the generated data), never part of a committed drafter.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .. import hf
from ..identity import weights_digest
from . import answers
from .answers import Job, Prompt, Sequence, Store
from .head import save
from .objective import Tally, Trainer, TrainSettings, collate, feature_rms, learning_rate, schedule

log = logging.getLogger(__name__)

WORK = "work"
SETTINGS = "settings.json"
CHECKPOINT = "train.pt"
PROBE = "probe.json"
COVERAGE_SIZES = (1024, 2048, 4096, 8192, 16384, 32768)


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DataSettings:
    """What decides the generated data; a rerun must match them to reuse OUT/work/data."""

    corpus: str  # "package" (splitinfer/drafting/corpus) or the --corpus directory
    per_category: int | None
    held_out: float
    samples: int
    max_new_tokens: int
    temperature: float
    dtype: str
    seed: int


@dataclass(frozen=True)
class Options:
    """How this run goes, without changing what it computes."""

    gen_batch: int
    time_budget_min: float | None = None
    stop_after: str | None = None  # "data": end after the data phase
    checkpoint_min: float = 2.0
    eval_points: int = 8
    progress: bool = True


# ---------------------------------------------------------------------------- the work directory


def prepare_work(out: Path, identity: dict, restart: bool, retrain: bool) -> Path:
    """OUT/work, checked against the settings it was made with: a mismatch is an error naming the
    differences, unless --restart (discard everything) or --retrain (keep the data, new training)."""
    work = out / WORK
    if restart and work.exists():
        shutil.rmtree(work)
    path = work / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        if old["data"] != identity["data"]:
            raise SettingsError(f"{work} holds data made with other settings ({_diff(old['data'], identity['data'])}); "
                                "rerun with the same settings to continue, or --restart to discard it")
        if old["training"] != identity["training"] and (work / CHECKPOINT).is_file():  # before training: free
            if not retrain:
                raise SettingsError(
                    f"{work} holds a training run with other settings "
                    f"({_diff(old['training'], identity['training'])}); "
                    "rerun with the same settings to continue, --retrain to train anew on the same data, "
                    "or --restart to discard everything")
    if retrain:
        (work / CHECKPOINT).unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(identity, indent=1) + "\n")
    return work


class SettingsError(ValueError):
    """OUT/work was made with other settings."""


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in {*old, *new} if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


# ---------------------------------------------------------------------------- the base model


@dataclass
class Base:
    model_dir: Path
    model: torch.nn.Module | None  # dropped after the data phase and the warm start
    tokenizer: object
    config: object  # the decoder's PretrainedConfig
    digest: str  # identity.weights_digest over every decoder layer
    device: torch.device


def base_digest(model_dir: Path) -> str:
    """The decoder layers' weights digest (identity.weights_digest, all layers): cheap, no tensor loaded."""
    from ..models import load_config

    return weights_digest(model_dir, range(load_config(model_dir).num_hidden_layers))


def load_base(model_dir: Path, device: str, dtype: torch.dtype, digest: str) -> Base:
    """The whole base model, locally (the trusted side holds every weight), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf.check_version()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    hf.set_attention(model.config, "sdpa")
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    return Base(model_dir, model, tokenizer, config, digest, torch.device(device))


def sampling_for(base: Base, data: DataSettings) -> answers.Sampling:
    eos = answers.eos_ids(base.model_dir, base.config, base.tokenizer)
    pad = base.tokenizer.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    return answers.Sampling(data.max_new_tokens, data.temperature, eos, pad)


# ---------------------------------------------------------------------------- phase 1: data


def data_phase(base: Base, store: Store, prompts: list[Prompt], split: tuple[list[Prompt], list[Prompt]],
               data: DataSettings, train: TrainSettings, options: Options, work: Path, overhead_s: float) -> dict:
    """Generate what is missing, unless the phase already ended; returns its record (complete.json)."""
    if done := store.complete():
        return done
    encoded = {p.index: answers.encode(base.tokenizer, p.text) for p in prompts}
    plan = answers.passes(split[0], split[1], data.samples)
    held_batches = math.ceil(len(split[1]) / options.gen_batch)
    stop = _budget_stop(base, store, train, options, work, overhead_s, held_batches)
    jobs = sum(map(len, plan))
    bar = tqdm(total=jobs, initial=len(store.done_jobs()), desc="answers", unit="answer", disable=not options.progress,
               dynamic_ncols=True)
    tokens = {"n": 0, "s": 0.0}

    def on_batch(p: answers.Progress) -> None:
        tokens["n"] += p.answer_tokens
        tokens["s"] += p.seconds
        bar.update(p.answers)
        bar.set_postfix_str(f"{tokens['n'] / max(tokens['s'], 1e-9):.0f} tok/s")

    try:
        reason = answers.run_passes(base.model, store, plan, _sort_key(store, prompts, encoded), options.gen_batch,
                                    encoded, sampling_for(base, data), data.seed, stop, on_batch)
    finally:
        bar.close()
    record = {"ended_by": reason, "answers": len(store.done_jobs()), "planned_answers": jobs}
    store.mark_complete(record)
    log.info("data phase ended (%s): %d of %d answers", reason, record["answers"], jobs)
    return record


def _sort_key(store: Store, prompts: list[Prompt],
              encoded: dict[int, list[int]]) -> Callable[[], Callable[[Job], tuple]]:
    """How a pass is ordered into batches: sampled answers by their prompt's greedy answer length (the best
    guess at their own), greedy ones by category (answers of a kind run to similar lengths), then prompt length."""
    category = {p.index: answers.CATEGORIES.index(p.category) for p in prompts}

    def key() -> Callable[[Job], tuple]:
        greedy = store.greedy_lengths()
        return lambda j: (greedy.get(j.prompt, 0) if j.sample else 0, category[j.prompt], len(encoded[j.prompt]))

    return key


def _budget_stop(base: Base, store: Store, train: TrainSettings, options: Options, work: Path, overhead_s: float,
                 held_batches: int) -> Callable[[], str | None]:
    """Before each batch: would generating it still leave time to train on everything generated (at the
    measured training speed) within --time-budget-min?  Never stops before the held-out answers and one
    batch of training answers exist."""
    if options.time_budget_min is None:
        return lambda: None
    budget = options.time_budget_min * 60
    tokens_per_s = probe_training_speed(base, train, work)

    def stop() -> str | None:
        entries = store.entries()
        if len(entries) <= held_batches:
            return None
        spent = store.seconds() + overhead_s  # generation (every run's) + this run's start-up
        tokens = sum(e["tokens"] for e in entries)
        # each curve point evaluates the held-out answers and as many training ones, two steps without
        # gradients: about what a teacher-forced training step costs per token
        held = sum(e["tokens"] for e in entries[:held_batches])  # generated first
        evaluation = (options.eval_points + 1) * 2 * held
        training = 1.1 * (train.epochs * tokens + evaluation) / tokens_per_s  # 1.1: padding
        next_batch = max(e["seconds"] for e in entries[-3:])
        return "time budget" if spent + next_batch + training + 60 > budget else None

    return stop


def probe_training_speed(base: Base, train: TrainSettings, work: Path) -> float:
    """Training tokens per second on this machine (a few steps on random data of the configured batch size),
    measured once per work directory: what the time budget plans with."""
    path = work / PROBE
    if path.is_file() and (probe := json.loads(path.read_text())).get("settings") == asdict(train):
        return probe["tokens_per_s"]
    length = 160  # about a prompt and an answer
    rows = max(1, train.batch_tokens // length)
    hidden, vocab = base.config.hidden_size, base.config.vocab_size
    seqs = [Sequence(Job(-1, 0), torch.randint(0, vocab, (length,)), torch.randn(length, hidden).half(),
                     torch.randint(0, vocab, (length,)), 32, False) for _ in range(rows)]
    d2t = torch.arange(min(train.draft_vocab, vocab))
    trainer = Trainer(base.model, base.digest, d2t, train, noise_scale=1.0)
    batch = collate(seqs, base.device)
    trainer.train_step(batch, lr=0.0)  # warm-up: allocations, oneDNN kernels
    start = time.perf_counter()
    for _ in range(3):
        trainer.train_step(batch, lr=0.0)
    tokens_per_s = 3 * rows * length / (time.perf_counter() - start)
    probe = {"tokens_per_s": tokens_per_s, "batch": [rows, length], "settings": asdict(train)}
    path.write_text(json.dumps(probe) + "\n")
    log.info("training speed probe: %.0f tokens/s", tokens_per_s)
    return tokens_per_s


# ---------------------------------------------------------------------------- phase 2: the draft vocabulary


def answer_target_counts(sequences: list[Sequence], vocab_size: int) -> torch.Tensor:  # [vocab_size]
    """How often each token is the one a drafter is asked for (the model's argmax at answer positions)."""
    targets = [s.answer_targets() for s in sequences]
    flat = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long)
    return torch.bincount(flat[flat >= 0], minlength=vocab_size)


def draft_vocabulary(counts: torch.Tensor, size: int) -> torch.Tensor:  # [size] token ids, most frequent first
    """The `size` most frequent tokens; ties (and unseen tokens, when fewer occur) in token-id order."""
    order = torch.sort(-counts, stable=True).indices
    return order[:size].clone()


def coverage(counts: torch.Tensor, d2t: torch.Tensor) -> float:
    """Share of target occurrences that the draft vocabulary can name at all (top-1 can be right at most this often)."""
    total = int(counts.sum())
    return float(counts[d2t].sum()) / total if total else 0.0


def coverage_report(train_counts: torch.Tensor, held_counts: torch.Tensor, size: int) -> dict:
    order = torch.sort(-train_counts, stable=True).indices
    sizes = sorted({s for s in COVERAGE_SIZES if s < len(train_counts)} | {size})
    return {
        "size": size,
        "distinct_answer_tokens": int((train_counts > 0).sum()),
        "train": coverage(train_counts, order[:size]),
        "held_out": coverage(held_counts, order[:size]),
        "held_out_by_size": {str(s): round(coverage(held_counts, order[:s]), 5) for s in sizes},
    }


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, trainer: Trainer, step: int, curve: list[dict], seconds: float) -> None:
    """head + optimizer + step + noise RNG + curve, written atomically (a kill mid-write keeps the last one)."""
    state = {"head": trainer.head.state_dict(), "optimizer": trainer.optimizer.state_dict(), "step": step,
             "noise_rng": trainer.noise.get_state(), "curve": curve, "seconds": seconds}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_checkpoint(path: Path, trainer: Trainer) -> tuple[int, list[dict], float]:
    """(step, curve, training seconds so far) from a checkpoint this command wrote."""
    state = torch.load(path, map_location=trainer.frozen.embed.device, weights_only=True)
    if not torch.equal(state["head"]["d2t"].cpu(), trainer.head.d2t.cpu()):
        raise SettingsError(f"{path} was trained with another draft vocabulary; rerun with --retrain")
    trainer.head.load_state_dict(state["head"], strict=False)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.noise.set_state(state["noise_rng"].cpu())
    return state["step"], state["curve"], state["seconds"]


# ---------------------------------------------------------------------------- the training loop


@dataclass
class Sets:
    """The answers by use: trained on, held out (never trained on), and a sample of the trained-on ones."""

    train: list[Sequence]
    held_out: list[Sequence]
    train_eval: list[Sequence]  # greedy training answers about as many as the held-out ones: top-1 on seen text


def split_sequences(sequences: list[Sequence], held_out: list[Prompt], seed: int) -> Sets:
    held_ids = {p.index for p in held_out}
    train = [s for s in sequences if s.job.prompt not in held_ids]
    held = [s for s in sequences if s.job.prompt in held_ids]
    greedy = [s for s in train if s.job.sample == 0]
    random.Random(f"{seed}:train-eval").shuffle(greedy)
    return Sets(train, held, greedy[: max(1, len(held))])


def train_phase(trainer: Trainer, sets: Sets, settings: TrainSettings, options: Options, work: Path,
                on_step: Callable[[int], None] | None) -> tuple[list[dict], float, int]:
    """Train to the end of the schedule from the last checkpoint; (curve, training seconds, steps)."""
    batches = schedule(sets.train, settings)
    total = len(batches)
    path = work / CHECKPOINT
    step, curve, seconds = load_checkpoint(path, trainer) if path.is_file() else (0, [], 0.0)
    if step:
        log.info("resuming training at step %d of %d", step, total)
    evals = {round(total * k / options.eval_points) for k in range(options.eval_points + 1)}
    device = trainer.frozen.embed.device
    started, last_save = time.monotonic(), time.monotonic()
    running = Tally()
    bar = tqdm(total=total, initial=step, desc="training", unit="step", disable=not options.progress,
               dynamic_ncols=True)

    def elapsed() -> float:
        return seconds + time.monotonic() - started

    try:
        if step == 0 and not curve:
            curve.append(_curve_point(trainer, sets, settings, 0, total, running, elapsed()))
        while step < total:
            lr = learning_rate(step, total, settings)
            loss = trainer.train_step(collate([sets.train[i] for i in batches[step]], device), lr, running)
            step += 1
            bar.update(1)
            bar.set_postfix_str(f"loss {loss:.3f} top1 {running.summary().get('top1', 0):.3f}")
            if on_step is not None:
                on_step(step)
            if step in evals:
                curve.append(_curve_point(trainer, sets, settings, step, total, running, elapsed()))
                running = Tally()
            if time.monotonic() - last_save > options.checkpoint_min * 60 or step == total:
                save_checkpoint(path, trainer, step, curve, elapsed())
                last_save = time.monotonic()
    except KeyboardInterrupt:
        save_checkpoint(path, trainer, step, curve, elapsed())
        bar.close()
        log.warning("interrupted at step %d of %d; checkpoint saved: rerun the same command to continue", step, total)
        raise
    bar.close()
    return curve, elapsed(), total


def _curve_point(trainer: Trainer, sets: Sets, settings: TrainSettings, step: int, total: int, running: Tally,
                 seconds: float) -> dict:
    point = {
        "step": step,
        "epoch": round(step / total * settings.epochs, 3) if total else 0.0,
        "lr": learning_rate(max(0, step - 1), total, settings),
        "seconds": round(seconds, 1),
        "train_running": running.summary(),  # the batches since the last point, with input noise
        "train": trainer.evaluate(sets.train_eval, settings.batch_tokens),
        "held_out": trainer.evaluate(sets.held_out, settings.batch_tokens),
    }
    held, seen = point["held_out"], point["train"]
    log.info("step %d/%d: held-out top-1 %.3f (after own feature %s), train top-1 %.3f", step, total,
             held.get("top1", 0.0), held.get("top1_step2", "-"), seen.get("top1", 0.0))
    return point


# ---------------------------------------------------------------------------- the whole run


@dataclass(frozen=True)
class Paths:
    model_dir: Path
    out: Path
    corpus_dir: Path | None = None


def run(paths: Paths, data: DataSettings, train: TrainSettings, options: Options, device: str, dtype: torch.dtype,
        restart: bool = False, retrain: bool = False, on_step: Callable[[int], None] | None = None) -> dict | None:
    """The three phases; returns the provenance written to OUT/provenance.json (None after --stop-after data)."""
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    prompts = answers.load_corpus(paths.corpus_dir, data.per_category)
    split = answers.split_held_out(prompts, data.held_out, data.seed)
    digest = base_digest(paths.model_dir)
    identity = {"data": {**asdict(data), "base_digest": digest, "corpus_digest": answers.corpus_digest(prompts)},
                "training": asdict(train)}
    work = prepare_work(paths.out, identity, restart, retrain)
    store = Store(work / "data")

    base = load_base(paths.model_dir, device, dtype, digest)
    timings["load_s"] = time.monotonic() - t0
    if train.draft_vocab > base.config.vocab_size:
        raise SettingsError(f"--draft-vocab {train.draft_vocab} exceeds the vocabulary ({base.config.vocab_size})")
    t = time.monotonic()
    data_record = data_phase(base, store, prompts, split, data, train, options, work, timings["load_s"])
    timings["data_this_run_s"] = time.monotonic() - t
    if options.stop_after == "data":
        return None

    t = time.monotonic()
    sequences = store.load()
    sets = split_sequences(sequences, split[1], data.seed)
    if not sets.train or not sets.held_out:
        raise SettingsError("no training or no held-out answers: more prompts (--per-category) or --held-out > 0")
    vocab = base.config.vocab_size
    train_counts = answer_target_counts(sets.train, vocab)
    d2t = draft_vocabulary(train_counts, train.draft_vocab)
    vocab_report = coverage_report(train_counts, answer_target_counts(sets.held_out, vocab), train.draft_vocab)
    timings["vocab_s"] = time.monotonic() - t
    log.info("draft vocabulary %d: covers %.2f%% of training and %.2f%% of held-out answer tokens",
             train.draft_vocab, 100 * vocab_report["train"], 100 * vocab_report["held_out"])

    trainer = Trainer(base.model, base.digest, d2t, train, noise_scale=feature_rms(sets.train))
    base.model = None  # the rest of the base model is no longer needed (the trainer keeps the frozen tensors)
    curve, train_s, steps = train_phase(trainer, sets, train, options, work, on_step)
    timings["training_s"] = train_s

    provenance = _provenance(paths, data, train, options, base, prompts, split, store, data_record, sets,
                             vocab_report, curve, steps, timings, t0)
    save(trainer.head, paths.out, provenance)
    log.info("wrote %s (model.safetensors, config.json, provenance.json)", paths.out)
    return provenance


def _provenance(paths: Paths, data: DataSettings, train: TrainSettings, options: Options, base: Base,
                prompts: list[Prompt], split: tuple[list[Prompt], list[Prompt]], store: Store, data_record: dict,
                sets: Sets, vocab_report: dict, curve: list[dict], steps: int, timings: dict, t0: float) -> dict:
    from ..experiments.record import provenance

    settings = {"data": asdict(data), "training": asdict(train),
                "run": {k: v for k, v in asdict(options).items() if k != "progress"}, "device": str(base.device)}
    timings = {**timings, "generation_total_s": store.seconds(), "total_this_run_s": time.monotonic() - t0}
    train_tokens = sum(len(s.tokens) for s in sets.train)
    return {
        **provenance(settings, paths.model_dir),
        "wall_seconds": round(time.monotonic() - t0, 1),  # provenance's own clock starts at its (late) import
        "base_model": {"path": str(paths.model_dir), "weights_digest": base.digest,
                       "config": json.loads(base.config.to_json_string())},
        "corpus": _corpus_summary(data, prompts, split),
        "data": {**data_record, **_data_summary(sets, store)},
        "draft_vocab": vocab_report,
        "training": {"steps": steps, "tokens_per_epoch": train_tokens,
                     "answer_positions_per_epoch": sum(s.answer_len - 1 for s in sets.train),
                     # the whole phase: training steps and the curve's evaluations
                     "tokens_per_s": round(train.epochs * train_tokens / timings["training_s"], 1)
                     if timings["training_s"] else None},
        "torch_threads": torch.get_num_threads(),
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "curve": curve,
        "final": curve[-1] if curve else None,
    }


def _corpus_summary(data: DataSettings, prompts: list[Prompt], split: tuple[list[Prompt], list[Prompt]]) -> dict:
    return {"source": data.corpus, "digest": answers.corpus_digest(prompts), "prompts": len(prompts),
            "by_category": {c: sum(p.category == c for p in prompts) for c in answers.CATEGORIES},
            "train_prompts": len(split[0]), "held_out_prompts": len(split[1]),
            "held_out": [{"category": p.category, "prompt": p.text} for p in split[1]]}


def _data_summary(sets: Sets, store: Store) -> dict:
    every = sets.train + sets.held_out
    tokens = {"greedy": sum(s.answer_len for s in every if not s.job.sample),
              "sampled": sum(s.answer_len for s in every if s.job.sample)}
    seconds = store.seconds()
    return {
        "answers": {"greedy": sum(not s.job.sample for s in every), "sampled": sum(bool(s.job.sample) for s in every)},
        "answer_tokens": tokens,
        "mean_answer_tokens": round(sum(tokens.values()) / max(1, len(every)), 1),
        "ended_with_eos": round(sum(s.eos for s in every) / max(1, len(every)), 4),
        "greedy_argmax_mismatches": sum(answers.greedy_mismatches(s) for s in every),
        "generation_batches": len(store.entries()),
        "generation_tokens_per_s": round(sum(tokens.values()) / seconds, 1) if seconds else None,
        "held_out_answer_positions": sum(s.answer_len - 1 for s in sets.held_out),
    }
