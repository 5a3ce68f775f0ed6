"""Shared fixtures: tiny random models written as real model directories, and the default model."""

from __future__ import annotations

import os
import tempfile
from functools import cache
from pathlib import Path

# Lookahead's memory file (splitinfer/memory_file.py) lives in the user cache directory: this test session and
# every process it starts get an empty one of their own, so no test reads what the user's runs learned, and no
# test writes there.  Set before splitinfer.config computes the directory.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="splitinfer-tests-cache-")

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from splitinfer.config import Split
from splitinfer.engine import SplitModel
from splitinfer.identity import Identity, of_model
from splitinfer.models import load_config, resolve_model
from splitinfer.parts import load_cloud, load_local
from splitinfer.testing import InProcessSpan

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
    max_position_embeddings=512,
    # Large random weights make the argmax decisive, so float16 rounding on the wire cannot flip it.
    initializer_range=0.2,
    eos_token_id=None,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**TINY, tie_word_embeddings=False, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=False, use_sliding_window=False),
}


def write_tiny(kind: str, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind]())
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def tiny_model(request, tmp_path_factory) -> Path:
    return write_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def default_model() -> Path:
    return resolve_model(None)


def cloud_identity(model_dir: Path, cloud_layers: range | None = None) -> Identity:
    """What a local side on `model_dir` expects of its cloud (by default the cloud's default layers 2..L-3)."""
    config = load_config(model_dir)
    layers = Split(config.num_hidden_layers).cloud_layers if cloud_layers is None else cloud_layers
    return of_model(model_dir, config, layers)


def split_model(model_dir: Path, cloud_start: int = 2, cloud_end: int = -3, dtype=torch.float32) -> SplitModel:
    """A SplitModel with the cloud's layers in-process (float16 wire rounding included)."""
    split = Split(load_config(model_dir).num_hidden_layers, cloud_start, cloud_end)
    head, tail, _, _ = load_local(model_dir, split, "cpu", dtype)
    span, _, _ = load_cloud(model_dir, split, "cpu", dtype)
    return SplitModel(head, tail, InProcessSpan(span, dtype), dtype)


@cache
def reference_model(model_dir: Path) -> torch.nn.Module:
    """The unsplit model, loaded once per model directory for the whole session (tests only read it)."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model_dir: Path, prompt: list[int], max_new: int, eos: int | None = None) -> list[int]:
    model = reference_model(Path(model_dir).resolve())
    ids = torch.tensor([prompt])  # [1, prompt]
    out = model.generate(
        ids, max_new_tokens=max_new, min_new_tokens=max_new if eos is None else 0, do_sample=False,
        eos_token_id=eos, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()
