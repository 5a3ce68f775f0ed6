"""Models of a published shape with random weights: the seed's 7B and 12B configurations, run here.

`python -m splitinfer make-random-model --like mistral-7b --out DIR` writes a model directory
with the published architecture (config.json as the model's own), weights drawn from a seed
(models.RandomWeights, so the files hold exactly what `--random-weights SEED` would draw) and
the default model's tokenizer, the only one at hand without a download.  With `--no-weights`
it writes the config and tokenizer only: both sides then draw the layers they hold at load
time (`--random-weights SEED`), for sizes that should not be written to disk.

Speed and memory depend on the shape only, so these stand in for the real checkpoints in the
step-cost and memory figures; the text they generate is gibberish.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DEFAULT_MODEL_DIR

if TYPE_CHECKING:  # torch is imported where used: the command-line parser lists LIKE without it
    import torch

_MISTRAL = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,  # the default model's tokenizer agrees: 1 and 2 are <|im_start|> and <|im_end|>
    "eos_token_id": 2,
    "use_cache": True,
}

# The published configs (mistralai/Mistral-7B-Instruct-v0.3 and Mistral-Nemo-Instruct-2407, config.json),
# the two models the seed evaluates.  NeMo's head_dim (128) is not hidden / heads (160).
LIKE: dict[str, dict] = {
    "mistral-7b": {
        **_MISTRAL,
        "vocab_size": 32768,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 32768,
    },
    "mistral-nemo-12b": {
        **_MISTRAL,
        "vocab_size": 131072,
        "hidden_size": 5120,
        "intermediate_size": 14336,
        "num_hidden_layers": 40,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 1024000,
    },
}

SHARD_BYTES = 2 << 30  # safetensors files of about 2 GiB, as published checkpoints are sharded


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of `config`'s causal LM, name -> shape, from a meta-device skeleton (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def make_random_model(
    like: str,
    out: Path,
    seed: int | None = 0,
    dtype: torch.dtype | None = None,
    tokenizer_from: Path = DEFAULT_MODEL_DIR,
    overrides: dict | None = None,
) -> Path:
    """Write `like`'s config (with `overrides`), the tokenizer of `tokenizer_from` and, unless `seed` is None,
    the weights drawn from `seed` in `dtype` (default bfloat16).  Written beside `out` and renamed, so a
    stopped run leaves no half model."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from .models import RandomWeights, written_whole

    dtype = dtype or torch.bfloat16
    if like not in LIKE:
        raise ValueError(f"unknown shape {like!r}; known: {', '.join(LIKE)}")
    with written_whole(out) as tmp:
        config = AutoConfig.for_model(**{**LIKE[like], **(overrides or {})})
        config.dtype = dtype
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(tmp)
        if seed is not None:
            write_weights(config, RandomWeights(seed, config.initializer_range), dtype, tmp)
        (tmp / "random_model.json").write_text(json.dumps({
            "like": like,
            "overrides": overrides or {},
            "seed": seed,
            "weights": "written" if seed is not None else "none: run both sides with --random-weights SEED",
            "dtype": str(dtype).removeprefix("torch."),
            "tokenizer": f"copied from {tokenizer_from} (the published tokenizer is not available offline)",
        }, indent=2) + "\n")
    return out


def write_weights(config, weights, dtype: torch.dtype, out: Path) -> None:
    """The drawn tensors as safetensors shards of about SHARD_BYTES, with the index transformers reads."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    shapes = tensor_shapes(config)
    shards: list[list[str]] = [[]]
    size = 0
    itemsize = torch.empty(0, dtype=dtype).element_size()
    for name, shape in shapes.items():
        nbytes = itemsize * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    with tqdm(total=len(shapes), desc="drawing weights", unit="tensor") as bar:
        for k, names in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in names:
                tensors[name] = torch.empty(shapes[name], dtype=dtype)
                weights.fill(name, tensors[name])
                total += tensors[name].numel() * itemsize
                weight_map[name] = fname
                bar.update()
            save_file(tensors, out / fname, metadata={"format": "pt"})
            del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
