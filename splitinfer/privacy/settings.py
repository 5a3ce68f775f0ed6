"""What the inversion sweep runs: `Settings`, importable without torch (the CLI shows its defaults in --help)."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
