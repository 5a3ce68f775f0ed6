"""Train a draft head for --model by self-distillation: the model answers the training corpus (greedy, then
sampled), and an EAGLE-1-style head learns to predict its next feature and token from those answers.

Writes OUT/model.safetensors and OUT/config.json (the drafter) and OUT/provenance.json (settings, data,
draft-vocabulary coverage, timings, training curve).  OUT/work holds the generated data and checkpoints:
interrupted (Ctrl-C, kill), the same command continues where it stopped.  Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ..cli import HelpFormatter, add_model_args, fail, model_problem, setup

# Defaults sized for the default model on a 2-core CPU (docs/drafter.md, "Training"): every prompt's greedy
# answer and one sampled pass take ~27 minutes of generation and ~7 of training; the time budget then stops
# the second sampled pass where training on it would end the run past 42 minutes.
SAMPLES = 2
MAX_NEW_TOKENS = 128
TEMPERATURE = 0.8
DRAFT_VOCAB = 8192
EPOCHS = 3
LR = 1e-3
BATCH_TOKENS = 2048
TIME_BUDGET_MIN = 42.0
GEN_BATCH = {"cpu": 64, "cuda": 256}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, kernels=False)
    p.add_argument("--out", type=Path, required=True, help="output directory (the drafter; OUT/work for scratch)")
    g = p.add_argument_group("data (the model's own answers)")
    g.add_argument("--corpus", type=Path, default=None,
                   help="directory of code/structured/conversational/creative.json prompt lists "
                   "(default: the package's splitinfer/drafting/corpus, 1200 prompts)")
    g.add_argument("--per-category", type=int, default=None, help="use the first N prompts of each category "
                   "(default: all)")
    g.add_argument("--held-out", type=float, default=0.05,
                   help="fraction of each category's prompts held out for evaluation, never trained on")
    g.add_argument("--samples", type=int, default=SAMPLES,
                   help="sampled answers per training prompt, after every prompt's greedy answer")
    g.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="longest answer, in tokens")
    g.add_argument("--temperature", type=float, default=TEMPERATURE, help="temperature of the sampled answers")
    g.add_argument("--gen-batch", type=int, default=None,
                   help=f"answers generated per batch (default: {GEN_BATCH['cpu']} on a CPU, "
                   f"{GEN_BATCH['cuda']} on a GPU)")
    g.add_argument("--time-budget-min", type=float, default=TIME_BUDGET_MIN,
                   help="stop generating answers when training on those so far would end the run after this many "
                   "minutes (at the training speed measured first); 0: no budget")
    g = p.add_argument_group("training")
    g.add_argument("--draft-vocab", type=int, default=DRAFT_VOCAB,
                   help="draft vocabulary: the N tokens most frequent in the answers (the rows of the LM head a "
                   "draft step scores)")
    g.add_argument("--epochs", type=int, default=EPOCHS, help="passes over the training answers")
    g.add_argument("--lr", type=float, default=LR, help="AdamW peak learning rate (warm-up, then cosine)")
    g.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS, help="padded tokens per training batch")
    g.add_argument("--warmup", type=float, default=0.03, help="warm-up, as a fraction of the steps")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--clip", type=float, default=0.5, help="gradient-norm clipping")
    g.add_argument("--ce-weight", type=float, default=0.1,
                   help="weight of the token cross-entropy beside the feature SmoothL1 (EAGLE-1's 0.1)")
    g.add_argument("--noise", type=float, default=0.1,
                   help="uniform noise on the input features, +- this times their RMS (EAGLE-1's robustness)")
    g.add_argument("--unroll", type=int, choices=(1, 2), default=1,
                   help="1: teacher-forced only; 2: also train one step on the head's own predicted feature "
                   "(twice the training time; the curve reports that step either way)")
    g.add_argument("--init", choices=("random", "last-layer"), default="random",
                   help="the head's layer: random (as EAGLE), or a copy of the base model's last decoder layer "
                   "with fc passing the feature through (measured worse: docs/drafter.md)")
    g.add_argument("--seed", type=int, default=0, help="seed of the held-out split, sampling, shuffling and noise")
    g = p.add_argument_group("run")
    g.add_argument("--stop-after", choices=("data",), default=None,
                   help="end after the answers are generated (a later run without it trains)")
    g.add_argument("--restart", action="store_true", help="discard OUT/work (data and checkpoints) and start over")
    g.add_argument("--retrain", action="store_true",
                   help="keep the generated answers, discard the training checkpoint (for new training settings)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # `kill`: the same checkpoint-and-exit path as Ctrl-C


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if problem := model_problem(args.model):
        return fail(problem)
    if args.corpus is not None and not args.corpus.is_dir():
        return fail(f"--corpus {args.corpus}: no such directory")
    setup(args)
    from ..drafting import train
    from ..models import ModelError, default_device, dtype_name, resolve_dtype, resolve_model

    try:
        model_dir = resolve_model(args.model)
        device = args.device or default_device()
        dtype = resolve_dtype(args.dtype, device)
    except ModelError as exc:
        return fail(exc)
    data = train.DataSettings(
        corpus="package" if args.corpus is None else str(args.corpus), per_category=args.per_category,
        held_out=args.held_out, samples=args.samples, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, dtype=dtype_name(dtype), seed=args.seed,
    )
    training = train.TrainSettings(
        draft_vocab=args.draft_vocab, epochs=args.epochs, lr=args.lr, batch_tokens=args.batch_tokens,
        warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip, ce_weight=args.ce_weight,
        noise=args.noise, unroll=args.unroll, init=args.init, seed=args.seed,
    )
    options = train.Options(
        gen_batch=args.gen_batch or GEN_BATCH["cuda" if device.startswith("cuda") else "cpu"],
        time_budget_min=args.time_budget_min or None, stop_after=args.stop_after, progress=not args.no_progress,
    )
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = train.run(train.Paths(model_dir, args.out, args.corpus), data, training, options, device, dtype,
                           restart=args.restart, retrain=args.retrain)
    except train.SettingsError as exc:
        return fail(exc)
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun the same command to continue (the state is in {args.out / train.WORK})",
              file=sys.stderr)
        return 130
    if result is None:
        print(f"answers ready in {args.out / train.WORK}; rerun without --stop-after to train", file=sys.stderr)
        return 0
    final = result["final"] or {}
    held = final.get("held_out", {})
    print(f"held-out top-1 {held.get('top1', 0):.3f}, after its own feature {held.get('top1_step2', '-')}; "
          f"wrote {args.out}", file=sys.stderr)
    return 0
