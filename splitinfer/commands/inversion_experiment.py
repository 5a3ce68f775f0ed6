"""Privacy evaluation: how much of the text can the cloud recover from what it receives and returns?

Attacks the exact float16 hidden states the cloud receives (the output of local
layers 0..k-1) at several split depths k, with four attackers (the spec's MLP
classifier, nearest neighbour, ridge + nearest neighbour, and white-box exact
matching with the public weights), reads the generated tokens from the states
the cloud returns, and measures defences (Gaussian noise, perturbed local
layers, LoRA-fine-tuned local layers) with their quality cost.  Writes experiment_data/inversion.json (with
provenance and per-sequence records) and a PNG.  Code: splitinfer/privacy/.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..cli import HelpFormatter, fail, model_problem
from ..config import OUT_HELP, experiment_out

if TYPE_CHECKING:
    from ..privacy.settings import Settings


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    # The defaults shown come from the experiment's Settings (privacy/settings.py, torch-free).
    from ..privacy.settings import INPUT_ATTACKERS, Settings

    d = Settings()
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quick", action="store_true", help="a few minutes on 2 cores: depths 1,2, few short sequences")
    p.add_argument("--depths", type=_ints, default=None,
                   help=f"comma-separated split depths k (default {','.join(map(str, d.depths))})")
    p.add_argument("--attackers", default=None, help=f"comma-separated subset of {','.join(INPUT_ATTACKERS)}")
    p.add_argument("--n-per-kind", type=int, default=None,
                   help=f"held-out sequences per text kind (default {d.n_per_kind})")
    p.add_argument("--train-tokens", type=int, default=None,
                   help=f"training tokens for the learned attackers (default {d.train_tokens})")
    p.add_argument("--noise", type=_floats, default=None,
                   help=f"noise sigmas, relative to RMS (default {d.noise_sigmas})")
    p.add_argument("--perturb", type=_floats, default=None, help=f"perturbation sizes eps (default {d.perturb_eps})")
    p.add_argument("--finetune", type=_ints, default=None,
                   help=f"LoRA fine-tune step counts, one defence each; '' for none (default {d.finetune_steps})")
    p.add_argument("--defence-depth", type=int, default=None,
                   help=f"k at which defences are measured (default {d.defence_depth})")
    p.add_argument("--seed", type=int, default=None, help="seed of every RNG (texts, noise, perturbation, training)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (recorded in the JSON)")
    p.add_argument("--out", type=Path, default=experiment_out("inversion.json"), help=OUT_HELP)
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("-v", "--verbose", action="store_true", help="progress logging")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    from ..privacy.settings import INPUT_ATTACKERS, Settings

    over = {}
    for name, value in (("depths", args.depths), ("n_per_kind", args.n_per_kind), ("train_tokens", args.train_tokens),
                        ("noise_sigmas", args.noise), ("perturb_eps", args.perturb), ("finetune_steps", args.finetune),
                        ("defence_depth", args.defence_depth),
                        ("seed", args.seed)):
        if value is not None:
            over[name] = value
    if args.attackers:
        over["attackers"] = tuple(a for a in args.attackers.split(",") if a)
        unknown = set(over["attackers"]) - set(INPUT_ATTACKERS)
        if unknown:
            raise SystemExit(f"error: unknown attackers: {sorted(unknown)}")
    over["threads"] = args.threads
    return Settings.quick(**over) if args.quick else Settings(**over)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if problem := model_problem(args.model):
        return fail(problem)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    from ..experiments.record import provenance, write_json
    from ..models import ModelError, resolve_model
    from ..privacy import report
    from ..privacy.experiment import run

    settings = settings_from(args)
    try:
        model_dir = resolve_model(args.model)
        result = run(model_dir, settings, progress=not args.no_progress)
    except ModelError as exc:
        return fail(exc)
    prov = provenance({**result.pop("settings"), "quick": args.quick}, model_dir)
    data = {**prov, **result}
    write_json(args.out, data)
    png = report.plot(data, args.plot or args.out.with_suffix(".png"))
    print(report.render(data))
    print(f"\nwrote {args.out} and {png}")
    return 0
