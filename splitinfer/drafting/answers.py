"""The drafter's training data: the base model's own answers to the corpus, with the features it computed.

Self-distillation: the base model answers each corpus prompt (greedily, and sampled for variety).  While
it generates, hooks on its final norm and its LM head record, at every position i, the feature f_i that
the LM head reads and the LM head's argmax a_i (the token greedy decoding picks there).  A KV-cached
generation computes exactly what a teacher-forced forward over prompt + answer computes, so the data
costs no second pass over the text (tests/test_drafter_training.py checks the two agree).

Each generation batch is written to OUT/work/data/ as soon as it finishes (safetensors, float16
features) and listed in done.jsonl, so an interrupted run loses at most the batch in flight and a rerun
skips every answer already written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .. import hf
from ..experiments.prompts import CATEGORIES

INDEX = "done.jsonl"  # one line per written batch: the data phase's source of truth
COMPLETE = "complete.json"  # written when the data phase has ended (every answer, or the time budget)


# ---------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Prompt:
    index: int  # position in the corpus: categories in CATEGORIES order, each file in its own order
    category: str
    text: str


def load_corpus(directory: Path | None = None, per_category: int | None = None) -> list[Prompt]:
    """The training prompts (the package's drafting/corpus/*.json unless `directory`), the first
    `per_category` of each category (all when None)."""
    prompts: list[Prompt] = []
    for category in CATEGORIES:
        if directory is None:
            text = (resources.files("splitinfer") / "drafting" / "corpus" / f"{category}.json").read_text()
        else:
            text = (Path(directory) / f"{category}.json").read_text()
        for line in json.loads(text)[:per_category]:
            prompts.append(Prompt(len(prompts), category, line))
    return prompts


def corpus_digest(prompts: list[Prompt]) -> str:
    """SHA-256 of the prompts used (category and text, in order): names the exact training text."""
    body = json.dumps([[p.category, p.text] for p in prompts], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def split_held_out(prompts: list[Prompt], fraction: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held_out): a seeded `fraction` of each category held out (at least one where a category has
    two or more prompts and fraction > 0), never trained on."""
    train, held = [], []
    for category in CATEGORIES:
        group = [p for p in prompts if p.category == category]
        n = round(fraction * len(group))
        if fraction > 0 and len(group) >= 2:
            n = max(1, n)
        chosen = set(random.Random(f"{seed}:{category}").sample(range(len(group)), n))
        for i, p in enumerate(group):
            (held if i in chosen else train).append(p)
    return train, held


def eos_ids(model_dir: Path, config, tokenizer) -> tuple[int, ...]:
    """Every end-of-sequence id the config, the tokenizer and generation_config.json name (as LocalSide does)."""
    ids: set[int] = set()
    values = [getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        values.append(json.loads(gen.read_text()).get("eos_token_id"))
    for value in values:
        ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return tuple(sorted(ids))


def encode(tokenizer, prompt: str) -> list[int]:
    """Prompt text -> ids as the run time encodes a user turn (LocalSide.encode): the chat template, else raw."""
    if not tokenizer.chat_template:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    messages = [{"role": "user", "content": prompt}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


# ---------------------------------------------------------------------------- the jobs


@dataclass(frozen=True, order=True)
class Job:
    prompt: int  # Prompt.index
    sample: int  # 0: the greedy answer; k >= 1: the k-th sampled answer


def passes(train: list[Prompt], held_out: list[Prompt], samples: int) -> list[list[Job]]:
    """Every answer, in the order they are generated: the held-out prompts' greedy answers first (the
    evaluation needs them whatever the budget), then every training prompt's greedy answer (what the run
    time decodes), then the sampled passes, one answer per training prompt each."""
    out = [[Job(p.index, 0) for p in held_out], [Job(p.index, 0) for p in train]]
    return out + [[Job(p.index, k) for p in train] for k in range(1, samples + 1)]


def batches(jobs: list[Job], key: Callable[[Job], tuple], size: int, seed: str) -> list[list[Job]]:
    """One pass cut into batches of `size` after sorting by `key`: answers of similar length share a batch,
    so fewer rows sit finished while the longest one goes on (and less left padding).  The batches run in a
    seeded random order, so a pass the time budget cuts short still covers every kind of prompt."""
    jobs = sorted(jobs, key=lambda j: (*key(j), j.prompt))
    out = [jobs[i:i + size] for i in range(0, len(jobs), size)]
    random.Random(seed).shuffle(out)
    return out


# ---------------------------------------------------------------------------- one answer's record


@dataclass
class Sequence:
    """Prompt + answer as the base model saw it; the answer's last token is dropped (no feature follows it).

    Position j pairs (f_j, x_{j+1}) -> f_{j+1}: a drafter trained on it predicts the feature after x_{j+1},
    and through the LM head the token after that (targets[j+1]).
    """

    job: Job
    tokens: torch.Tensor  # [n] int64 x_0 .. x_{n-1}
    features: torch.Tensor  # [n, H] float16 f_j: the final-norm output at position j
    targets: torch.Tensor  # [n] int64 a_j: the LM head's argmax at j; -1 in the prompt before its last position
    prompt_len: int
    eos: bool  # the answer ended with an end-of-sequence token (else it hit max_new_tokens)

    @property
    def answer_len(self) -> int:
        """Tokens the model generated (the dropped last one included)."""
        return len(self.tokens) - self.prompt_len + 1

    def answer_targets(self) -> torch.Tensor:  # [answer_len - 1]
        """The tokens a drafter is asked for: a_j at every answer position that has a feature."""
        return self.targets[self.prompt_len:]


# ---------------------------------------------------------------------------- generation


@contextmanager
def recording(model: nn.Module) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Hooks on the final norm and the LM head for the duration: (features per forward [B, q, H],
    argmax of the last position's logits per forward [B])."""
    parts = hf.decoder_parts(model)
    features: list[torch.Tensor] = []
    argmax: list[torch.Tensor] = []
    hooks = [
        parts.norm.register_forward_hook(lambda _m, _i, out: features.append(out.detach())),
        parts.lm_head.register_forward_hook(lambda _m, _i, out: argmax.append(out[:, -1].argmax(-1))),
    ]
    try:
        yield features, argmax
    finally:
        for h in hooks:
            h.remove()


def left_pad(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask [B, L], padded on the left (generation appends on the right)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float  # for sampled answers
    eos: tuple[int, ...]
    pad: int


def generation_config(sampling: Sampling, sample: bool):
    """Plain decoding, whatever the model's generation_config.json says (the run time applies no penalty nor
    top-k): greedy, or sampling at the temperature from the whole distribution."""
    from transformers import GenerationConfig

    # top_k 0 and top_p 1 switch off the warpers a model's own generation_config could bring in
    extra = {"temperature": sampling.temperature, "top_k": 0, "top_p": 1.0} if sample else {}
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens, do_sample=sample, num_beams=1, repetition_penalty=1.0,
        pad_token_id=sampling.pad, eos_token_id=list(sampling.eos) or None, **extra,
    )


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], jobs: list[Job], sampling: Sampling,
             seed: int) -> list[Sequence]:
    """One batched `generate` call (left padding), greedy or sampled as the jobs say, with the features and
    argmaxes recorded on the way."""
    sample = jobs[0].sample > 0
    assert all((j.sample > 0) == sample for j in jobs), "a batch mixes greedy and sampled answers"
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, sampling.pad, device)
    torch.manual_seed(seed)  # sampled answers: the same batch draws the same answers on a rerun
    with recording(model) as (features, argmax):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation_config(sampling, sample))
    width = ids.shape[1]
    feats = torch.cat(features, dim=1)  # [B, width + steps - 1, H]: the last token generated is never fed
    tops = torch.stack(argmax, dim=1)  # [B, steps]: a_j for j = width - 1 ...
    answers = out[:, width:]  # [B, steps]
    return [_sequence(job, p, answers[b], feats[b, width - len(p):], tops[b], sampling.eos)
            for b, (job, p) in enumerate(zip(jobs, prompts))]


def _sequence(job: Job, prompt: list[int], answer: torch.Tensor, feats: torch.Tensor, tops: torch.Tensor,
              eos: tuple[int, ...]) -> Sequence:
    """One row of a batch, cut after its first end-of-sequence token (what follows is padding)."""
    answer = answer.cpu()
    ends = torch.isin(answer, torch.tensor(eos, dtype=answer.dtype)).nonzero() if eos else torch.empty(0)
    n_answer = int(ends[0]) + 1 if len(ends) else len(answer)
    tokens = torch.cat([torch.tensor(prompt, dtype=torch.long), answer[:n_answer - 1]])  # [n]
    n = len(tokens)
    targets = torch.full((n,), -1, dtype=torch.long)
    targets[len(prompt) - 1:] = tops[:n_answer].cpu()
    return Sequence(job, tokens, feats[:n].to(torch.float16).cpu(), targets, len(prompt), bool(len(ends)))


def greedy_mismatches(seq: Sequence) -> int:
    """For a greedy answer, positions whose recorded argmax is not the token generated next (should be 0:
    a nonzero count means the hooks saw something else than the decoding)."""
    if seq.job.sample:
        return 0
    nxt = seq.tokens[seq.prompt_len:]  # x_{P} .. x_{n-1}: generated, each the argmax one position earlier
    return int((seq.targets[seq.prompt_len - 1:len(seq.tokens) - 1] != nxt).sum())


# ---------------------------------------------------------------------------- storage


class Store:
    """OUT/work/data: one safetensors file per generation batch, listed in done.jsonl once written."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def entries(self) -> list[dict]:
        path = self.dir / INDEX
        if not path.is_file():
            return []
        # a line cut short by a kill mid-write is not a batch that was written
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]

    def done_jobs(self) -> set[Job]:
        return {Job(*j) for e in self.entries() for j in e["jobs"]}

    def greedy_lengths(self) -> dict[int, int]:
        """Prompt index -> length of its greedy answer, for those written."""
        return {j[0]: n for e in self.entries() for j, n in zip(e["jobs"], e["answer_lens"]) if j[1] == 0}

    def seconds(self) -> float:
        return sum(e["seconds"] for e in self.entries())

    def append(self, sequences: list[Sequence], seconds: float) -> None:
        """Write the batch's file (atomically), then list it: a kill in between leaves an unlisted file that
        the rerun writes again."""
        from safetensors.torch import save_file

        name = f"batch-{len(self.entries()):05d}.safetensors"
        tmp = self.dir / (name + ".tmp")
        save_file(_pack(sequences), str(tmp))
        tmp.replace(self.dir / name)
        line = {"file": name, "jobs": [[s.job.prompt, s.job.sample] for s in sequences],
                "answer_lens": [s.answer_len for s in sequences],
                "tokens": sum(len(s.tokens) for s in sequences), "answer_tokens": sum(s.answer_len for s in sequences),
                "seconds": round(seconds, 3)}
        with open(self.dir / INDEX, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def load(self) -> list[Sequence]:
        from safetensors.torch import load_file

        out: list[Sequence] = []
        for entry in self.entries():
            out += _unpack(load_file(str(self.dir / entry["file"])))
        return out

    def complete(self) -> dict | None:
        path = self.dir / COMPLETE
        return json.loads(path.read_text()) if path.is_file() else None

    def mark_complete(self, info: dict) -> None:
        (self.dir / COMPLETE).write_text(json.dumps(info, indent=1) + "\n")


def _pack(sequences: list[Sequence]) -> dict[str, torch.Tensor]:
    """Sequences concatenated, with their lengths: a few large tensors instead of many small ones."""
    return {
        "tokens": torch.cat([s.tokens for s in sequences]).to(torch.int32),
        "features": torch.cat([s.features for s in sequences]).contiguous(),
        "targets": torch.cat([s.targets for s in sequences]).to(torch.int32),
        "lengths": torch.tensor([len(s.tokens) for s in sequences], dtype=torch.int64),
        "prompt_lens": torch.tensor([s.prompt_len for s in sequences], dtype=torch.int64),
        "eos": torch.tensor([s.eos for s in sequences], dtype=torch.int8),
        "jobs": torch.tensor([[s.job.prompt, s.job.sample] for s in sequences], dtype=torch.int64),
    }


def _unpack(data: dict[str, torch.Tensor]) -> list[Sequence]:
    out, start = [], 0
    for i, n in enumerate(data["lengths"].tolist()):
        end = start + n
        prompt, sample = data["jobs"][i].tolist()
        out.append(Sequence(Job(prompt, sample), data["tokens"][start:end].long(), data["features"][start:end],
                            data["targets"][start:end].long(), int(data["prompt_lens"][i]), bool(data["eos"][i])))
        start = end
    return out


# ---------------------------------------------------------------------------- the data phase


@dataclass
class Progress:
    """What the data phase reports per batch (for the bar and the log)."""

    answers: int
    answer_tokens: int
    seconds: float


def run_passes(model: nn.Module, store: Store, plan: list[list[Job]], sort_key: Callable[[], Callable[[Job], tuple]],
               size: int, encoded: dict[int, list[int]], sampling: Sampling, seed: int,
               stop: Callable[[], str | None], on_batch: Callable[[Progress], None]) -> str:
    """Generate every answer not yet in the store, pass by pass, each cut into batches as it starts (by
    `sort_key()`, which may read the answers before it); returns why it ended ("all answers" or what `stop`
    said before a batch)."""
    import time

    done = store.done_jobs()
    for number, jobs in enumerate(plan):
        todo = [j for j in jobs if j not in done]
        for index, batch in enumerate(batches(todo, sort_key(), size, f"{seed}:{number}") if todo else []):
            if reason := stop():
                return reason
            start = time.perf_counter()
            seqs = generate(model, [encoded[j.prompt] for j in batch], batch, sampling,
                            seed * 1_000_003 + number * 10_007 + index)
            seconds = time.perf_counter() - start
            store.append(seqs, seconds)
            on_batch(Progress(len(seqs), sum(s.answer_len for s in seqs), seconds))
    return "all answers"
