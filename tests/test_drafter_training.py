"""train-drafter on a tiny random Llama with a tiny word-level tokenizer: the data it records, the draft
vocabulary, the loss, the command end to end, and resuming after an interruption."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from conftest import TINY
from splitinfer.commands import train_drafter
from splitinfer.drafting import answers, objective, train
from splitinfer.drafting import head as head_module
from splitinfer.drafting.answers import Job, Sequence

SPECIAL = ["<unk>", "<eos>", "<pad>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word level over the corpus's most frequent words (the rest is <unk>), with a chat template."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Counter(w for p in answers.load_corpus() for w in p.text.lower().split())
    vocab = {t: i for i, t in enumerate(SPECIAL + [w for w, _ in words.most_common(vocab_size - len(SPECIAL))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>",
                                   additional_special_tokens=SPECIAL[3:])
    fast.chat_template = TEMPLATE
    return fast


@pytest.fixture(scope="session")
def chat_llama(tmp_path_factory) -> Path:
    """A tiny random Llama (conftest's geometry) that has a tokenizer with a chat template; <eos> is id 1."""
    out = tmp_path_factory.mktemp("chat_llama")
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "eos_token_id": 1, "pad_token_id": 2}, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tiny_tokenizer(TINY["vocab_size"]).save_pretrained(out)
    return out


TINY_RUN = ["--per-category", "3", "--max-new-tokens", "10", "--samples", "1", "--epochs", "1", "--gen-batch", "4",
            "--batch-tokens", "128", "--draft-vocab", "32", "--time-budget-min", "0", "--no-progress"]


def run_command(model: Path, out: Path, *extra: str) -> int:
    return train_drafter.main(["--model", str(model), "--out", str(out), "--threads", "1", *TINY_RUN, *extra])


def settings(**changes) -> tuple[train.DataSettings, train.TrainSettings, train.Options]:
    data = train.DataSettings(corpus="package", per_category=3, held_out=0.05, samples=1, max_new_tokens=10,
                              temperature=0.8, dtype="float32", seed=0)
    training = train.TrainSettings(draft_vocab=32, epochs=2, lr=1e-3, batch_tokens=128, warmup=0.1,
                                   weight_decay=0.0, clip=0.5, ce_weight=0.1, noise=0.1, unroll=2,
                                   init="last-layer", seed=0)
    return data, replace(training, **changes), train.Options(gen_batch=4, progress=False)


def generated(model_dir: Path, sample: bool) -> tuple[list[Sequence], torch.nn.Module]:
    base = train.load_base(model_dir, "cpu", torch.float32, "")
    data, _, _ = settings()
    prompts = ["write a function", "why do cats purr at night", "a poem"]
    ids = [answers.encode(base.tokenizer, p) for p in prompts]
    jobs = [Job(i, 1 if sample else 0) for i in range(len(prompts))]
    return answers.generate(base.model, ids, jobs, train.sampling_for(base, data), seed=3), base.model


# ---------------------------------------------------------------------------- the data


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_recorded_features_are_a_teacher_forced_forward(chat_llama, sample):
    """What the hooks record while generating (left-padded batch, KV cache) is what one forward over the
    finished text computes: the final-norm features, and the LM head's argmax at each answer position."""
    seqs, model = generated(chat_llama, sample)
    assert len({s.prompt_len for s in seqs}) > 1  # the batch was padded
    for s in seqs:
        with torch.no_grad():
            feats = model.model(s.tokens[None]).last_hidden_state[0]  # [n, H]
            top = model.lm_head(feats).argmax(-1)
        torch.testing.assert_close(s.features.float(), feats, atol=2e-2, rtol=1e-2)  # float16 storage
        assert torch.equal(s.targets[s.prompt_len - 1:], top[s.prompt_len - 1:])
        assert (s.targets[: s.prompt_len - 1] == -1).all()
        assert answers.greedy_mismatches(s) == 0


def test_answers_stop_after_the_first_end_of_sequence():
    answer = torch.tensor([5, 6, 1, 7, 2])
    seq = answers._sequence(Job(0, 0), [3, 4], answer, torch.zeros(8, 4), torch.tensor([5, 6, 1, 7, 2]), (1,))
    assert seq.eos and seq.tokens.tolist() == [3, 4, 5, 6]  # the end token itself is a target, never an input
    assert seq.targets.tolist() == [-1, 5, 6, 1] and seq.answer_len == 3


def test_the_held_out_split_is_per_category_seeded_and_disjoint():
    prompts = answers.load_corpus(per_category=40)
    train_a, held_a = answers.split_held_out(prompts, 0.05, seed=0)
    train_b, held_b = answers.split_held_out(prompts, 0.05, seed=0)
    assert held_a == held_b and len(held_a) == 4 * 2
    assert {p.category for p in held_a} == set(answers.CATEGORIES)
    assert not {p.index for p in held_a} & {p.index for p in train_a}
    assert answers.split_held_out(prompts, 0.05, seed=1)[1] != held_a


def test_the_package_corpus_is_found():
    prompts = answers.load_corpus()
    assert len(prompts) == 1200 and len(answers.corpus_digest(prompts)) == 64


# ---------------------------------------------------------------------------- vocabulary and loss


def fake(targets: list[int], prompt_len: int = 2) -> Sequence:
    n = len(targets)
    return Sequence(Job(0, 0), torch.zeros(n, dtype=torch.long), torch.zeros(n, 4, dtype=torch.float16),
                    torch.tensor(targets), prompt_len, False)


def test_the_draft_vocabulary_is_the_most_frequent_answer_targets():
    seqs = [fake([-1, 9, 5, 5, 7, 5]), fake([-1, 3, 7, 8, 8, 5])]  # prompt positions (< 2) do not count
    counts = train.answer_target_counts(seqs, vocab_size=12)
    assert counts[5] == 4 and counts[9] == 0 and counts[3] == 0
    assert train.draft_vocabulary(counts, 3).tolist() == [5, 7, 8]  # by frequency; 7 and 8 tie: by id
    assert train.coverage(counts, torch.tensor([5, 7])) == pytest.approx(6 / 8)


def test_training_loss_falls_on_a_tiny_overfit(chat_llama):
    seqs, model = generated(chat_llama, sample=False)
    _, training, _ = settings(lr=3e-3, noise=0.0)
    d2t = train.draft_vocabulary(train.answer_target_counts(seqs, TINY["vocab_size"]), 32)
    trainer = objective.Trainer(model, "", d2t, training, noise_scale=1.0)
    batch = objective.collate(seqs, torch.device("cpu"))
    losses = [trainer.train_step(batch, training.lr) for _ in range(60)]
    assert losses[-1] < 0.3 * losses[0]
    assert trainer.evaluate(seqs, 512)["top1"] > 0.9


def test_the_unrolled_step_sees_what_run_time_drafting_sees(chat_llama):
    """Step 2 of training (one batched call with unroll_mask) equals feeding the head as the run time does:
    the true pairs up to j into its cache, then (its own prediction, x_{j+2}) at position j+1."""
    seqs, model = generated(chat_llama, sample=False)
    trainer = objective.Trainer(model, "", torch.arange(32), settings()[1], noise_scale=1.0)
    head, embed = trainer.head.eval(), trainer.frozen.embed
    s = seqs[0]
    f, x = s.features.float()[None], s.tokens[None]
    L = f.shape[1]
    with torch.no_grad():
        cache = objective.hf.new_cache()
        e = embed[x[:, 1:]]
        pred = head(f[:, :-1], e, torch.arange(L - 1)[None], None, cache)
        mask = objective.unroll_mask(L - 2, f.device)
        pred2 = head(pred[:, :-1], e[:, 1:], torch.arange(1, L - 1)[None], mask, cache)
        for j in (0, L // 2, L - 3):
            fresh = objective.hf.new_cache()
            head(f[:, :j + 1], e[:, :j + 1], torch.arange(j + 1)[None], None, fresh)
            one = head(pred[:, j:j + 1], e[:, j + 1:j + 2], torch.tensor([[j + 1]]), None, fresh)
            torch.testing.assert_close(pred2[:, j], one[:, 0], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- the command


def test_the_command_writes_a_drafter_that_loads(chat_llama, tmp_path):
    out = tmp_path / "drafter"
    assert run_command(chat_llama, out) == 0
    head = head_module.load(out)
    prov = json.loads((out / "provenance.json").read_text())
    assert head.config.draft_vocab_size == 32 and head.config.hidden_size == TINY["hidden_size"]
    assert head.config.base_digest == prov["base_model"]["weights_digest"]
    assert prov["data"]["answers"]["greedy"] == 12 and prov["data"]["answers"]["sampled"] == 8  # 4 held out
    assert prov["corpus"]["held_out_prompts"] == 4 and len(prov["corpus"]["held_out"]) == 4
    assert prov["data"]["greedy_argmax_mismatches"] == 0
    assert 0 < prov["draft_vocab"]["train"] <= 1 and "held_out_by_size" in prov["draft_vocab"]
    assert {"load_s", "training_s", "generation_total_s"} <= set(prov["timings"])
    curve = prov["curve"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == prov["training"]["steps"]
    assert {"top1", "top1_step2"} <= set(curve[-1]["held_out"]) and "top1" in curve[-1]["train"]
    assert {"commit", "date", "machine", "command"} <= set(prov)
    # d2t: the most frequent answer targets of the training answers, most frequent first
    sequences = train.Store(out / "work" / "data").load()
    held = {p.index for p in answers.split_held_out(answers.load_corpus(per_category=3), 0.05, 0)[1]}
    counts = train.answer_target_counts([s for s in sequences if s.job.prompt not in held], TINY["vocab_size"])
    assert head.d2t.tolist() == train.draft_vocabulary(counts, 32).tolist()
    assert (counts[head.d2t[:-1]] >= counts[head.d2t[1:]]).all()


def test_a_second_run_reuses_the_answers_and_other_settings_are_refused(chat_llama, tmp_path, capsys):
    out = tmp_path / "drafter"
    assert run_command(chat_llama, out, "--stop-after", "data") == 0
    assert not (out / "model.safetensors").exists()
    assert run_command(chat_llama, out, "--stop-after", "data", "--lr", "0.01") == 0  # no training yet: free
    index = out / "work" / "data" / answers.INDEX
    written = index.read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in index.parent.glob("*.safetensors")}
    assert run_command(chat_llama, out) == 0  # trains on the same answers
    assert index.read_text() == written
    assert {p.name: p.stat().st_mtime_ns for p in index.parent.glob("*.safetensors")} == mtimes
    assert (out / "model.safetensors").is_file()

    capsys.readouterr()
    assert run_command(chat_llama, out, "--lr", "0.01") == 1  # another training: refused, says how
    assert "--retrain" in capsys.readouterr().err
    assert run_command(chat_llama, out, "--max-new-tokens", "5") == 1  # other data: refused
    assert "--restart" in capsys.readouterr().err
    assert run_command(chat_llama, out, "--lr", "0.01", "--retrain") == 0  # new training, same answers
    assert index.read_text() == written


def test_an_interrupted_training_continues_its_step_count(chat_llama, tmp_path):
    data, training, options = settings()
    paths = train.Paths(chat_llama, tmp_path / "drafter")

    def interrupt_at_2(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.run(paths, data, training, options, "cpu", torch.float32, on_step=interrupt_at_2)
    checkpoint = torch.load(paths.out / "work" / train.CHECKPOINT, weights_only=True)
    assert checkpoint["step"] == 2

    seen: list[int] = []
    prov = train.run(paths, data, training, options, "cpu", torch.float32, on_step=seen.append)
    assert seen[0] == 3 and seen[-1] == prov["training"]["steps"]
    assert [p["step"] for p in prov["curve"]][0] == 0  # the curve of the first run continues
    assert torch.load(paths.out / "work" / train.CHECKPOINT, weights_only=True)["step"] == seen[-1]


def test_help_answers_without_torch():
    code = ("import sys; from splitinfer.commands import train_drafter as m; m.build_parser(); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr
    done = subprocess.run([sys.executable, "-m", "splitinfer", "train-drafter", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: splitinfer train-drafter")


def test_a_bad_model_or_corpus_is_one_line(tmp_path, capsys):
    assert train_drafter.main(["--model", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err.strip() == f"error: --model {tmp_path / 'absent'}: no such directory"
    assert train_drafter.main(["--out", str(tmp_path / "o"), "--corpus", str(tmp_path / "none")]) == 1
    assert "--corpus" in capsys.readouterr().err


def test_kill_saves_a_checkpoint_and_the_same_command_resumes(chat_llama, tmp_path):
    """`kill` (SIGTERM) mid-training: exit 130 with a checkpoint; the same command resumes from it."""
    import signal
    import threading
    import time

    out = tmp_path / "drafter"
    args = [sys.executable, "-m", "splitinfer", "train-drafter", "--model", str(chat_llama), "--out", str(out),
            "--threads", "1", *TINY_RUN, "--epochs", "5000"]
    checkpoint = out / "work" / train.CHECKPOINT

    def kill_once_logged(line: str) -> str:
        """Run the command, SIGTERM it a second after it logs `line`; its stderr."""
        proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not any(line in x for x in lines) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(1.0)  # some training steps
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=10)
        assert proc.returncode == 130, "".join(lines)
        return "".join(lines)

    kill_once_logged("step 0/")
    first = torch.load(checkpoint, weights_only=True)["step"]
    assert first > 0
    assert f"resuming training at step {first} " in kill_once_logged("resuming training")
    assert torch.load(checkpoint, weights_only=True)["step"] > first


def test_the_training_corpus_is_disjoint_from_the_evaluation_prompts():
    """No training prompt equals, or shares most of its words with, an evaluation prompt (splitinfer/prompts/)."""
    import json
    import re
    from importlib import resources

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z0-9]+", text.lower()))

    root = resources.files("splitinfer")
    evaluation = [p for f in (root / "prompts").iterdir() if f.name.endswith(".json") for p in json.loads(f.read_text())]
    training = [p for f in (root / "drafting" / "corpus").iterdir() if f.name.endswith(".json") for p in json.loads(f.read_text())]
    assert len(training) >= 1000 and len(set(training)) == len(training)
    assert not set(training) & set(evaluation)
    eval_words = [words(e) for e in evaluation]
    worst = max((len(words(t) & w) / len(words(t) | w), t) for t in training for w in eval_words)
    assert worst[0] < 0.5, worst
