"""Published shapes with random weights: make-random-model, --random-weights, and the unsplit reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from splitinfer import decoding
from splitinfer.cli import model_problem
from splitinfer.config import Split
from splitinfer.decoding.sequential import sequential
from splitinfer.engine import SplitModel
from splitinfer.identity import of_model
from splitinfer.models import RandomWeights, load_config, resolve_model
from splitinfer.parts import load_cloud, load_local, load_whole
from splitinfer.random_model import LIKE, make_random_model, tensor_shapes
from splitinfer.testing import InProcessSpan

# The 7B shape scaled down: the same architecture, config fields and code path, seconds instead of minutes.
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=300, initializer_range=0.2)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    # The tokenizer is irrelevant here; the tiny models have none, so take the default model's.
    return make_random_model("mistral-7b", tmp_path_factory.mktemp("m") / "small", seed=5, dtype=torch.float32,
                             tokenizer_from=resolve_model(None), overrides=SMALL)


def test_the_published_shapes_have_the_published_sizes():
    """Parameter counts of the configs as written: 7.25B for Mistral 7B v0.3, 12.25B for NeMo 12B."""
    from transformers import AutoConfig

    counts = {}
    for like, fields in LIKE.items():
        shapes = tensor_shapes(AutoConfig.for_model(**fields))
        counts[like] = sum(torch.Size(s).numel() for s in shapes.values())
        assert len([n for n in shapes if n.endswith("self_attn.q_proj.weight")]) == fields["num_hidden_layers"]
    assert round(counts["mistral-7b"] / 1e9, 2) == 7.25
    assert round(counts["mistral-nemo-12b"] / 1e9, 2) == 12.25


def test_written_weights_are_the_seeds_draws(small):
    config = load_config(small)
    assert config.model_type == "mistral" and config.head_dim == 16
    draw = RandomWeights(5, 0.2)
    index = json.loads((small / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("model.layers.3.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"):
        with safe_open(small / index[name], "pt") as f:
            stored = f.get_tensor(name)
        drawn = torch.empty_like(stored)
        draw.fill(name, drawn)
        assert torch.equal(stored, drawn), name
    assert abs(drawn.std().item() - 0.2) < 0.01 and drawn.abs().max() <= 0.2 * 3**0.5  # lm_head: std as configured
    # Each tensor has its own stream: a layer's draw does not depend on which other tensors a side holds.
    a, b = torch.empty(4, 4), torch.empty(4, 4)
    draw.fill("model.layers.0.mlp.up_proj.weight", a)
    draw.fill("model.layers.1.mlp.up_proj.weight", b)
    assert not torch.equal(a, b)


def test_both_sides_drawing_from_the_seed_equal_the_files_and_the_unsplit_model(small):
    """The local side and the cloud draw only their own layers, yet together they are the written model; and the
    split's greedy output equals transformers' generate on the unsplit model drawn from the same seed."""
    split = Split(6)
    drawn_head, drawn_tail, _, held = load_local(small, split, "cpu", torch.float32, seed=5)
    read_head, _, _, _ = load_local(small, split, "cpu", torch.float32)
    assert all(not n.startswith(f"model.layers.{i}.") for n in held for i in split.cloud_layers)
    for (n, a), (_, b) in zip(drawn_head.state_dict().items(), read_head.state_dict().items()):
        assert torch.equal(a, b), n
    span, _, cloud_held = load_cloud(small, split, "cpu", torch.float32, seed=5)
    assert {n.split(".")[2] for n in cloud_held} == {str(i) for i in split.cloud_layers}
    lm = SplitModel(drawn_head, drawn_tail, InProcessSpan(span, torch.float32), torch.float32)
    prompt = [1, 17, 42, 99, 7]
    got = decoding.run(sequential(lm, prompt, 12, frozenset())).tokens
    whole = load_whole(small, "cpu", torch.float32, seed=5)
    out = whole.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist()


def test_the_identity_names_the_seed(small):
    config = load_config(small)
    layers = Split(6).cloud_layers
    seeded = of_model(small, config, layers, seed=5)
    assert seeded == of_model(small, config, layers, seed=5)
    assert seeded.differences(of_model(small, config, layers, seed=6))  # another seed: other weights
    assert seeded.differences(of_model(small, config, layers))  # the files are not "the seed"


def test_no_weights_needs_random_weights(small, tmp_path):
    bare = make_random_model("mistral-7b", tmp_path / "bare", seed=None, tokenizer_from=small, overrides=SMALL)
    assert not list(bare.glob("*.safetensors")) and (bare / "tokenizer.json").is_file()
    assert "--random-weights" in model_problem(bare)
    assert model_problem(bare, weights=False) is None
    with pytest.raises(Exception, match="random-weights"):
        resolve_model(bare)
    assert resolve_model(bare, weights=False) == bare


def test_the_command_writes_a_model(tmp_path):
    out = tmp_path / "m"
    r = subprocess.run([sys.executable, "-m", "splitinfer", "make-random-model", "--like", "mistral-nemo-12b",
                        "--out", str(out), "--no-weights"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (40, 5120, 128)
    assert json.loads((out / "random_model.json").read_text())["seed"] is None
    r = subprocess.run([sys.executable, "-m", "splitinfer", "make-random-model", "--like", "gpt-5", "--out",
                        str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.slow
def test_the_big_model_measurement_on_a_small_shape(tmp_path):
    """benchmarks/big_models.py's path at a small size: the unsplit reference, a real cloud process drawing its
    layers from the seed and the local side drawing its own, in processes of their own; tokens equal."""
    from splitinfer.experiments.big import measure

    shape = {k: v for k, v in SMALL.items() if k != "vocab_size"}  # the prompt's ids need the published vocabulary
    r = measure("mistral-7b", tmp_path, seed=3, threads=1, tokens=8, overrides=shape, log=lambda _: None)
    assert r["split_equals_unsplit"] is True and len(r["local"]["tokens"]) == 8
    assert r["weights_bytes"]["whole"] == r["weights_bytes"]["cloud"] + r["weights_bytes"]["local"]
    assert r["local"]["weights_bytes"] == r["weights_bytes"]["local"]  # the side holds exactly its share
    assert r["cloud"]["VmHWM"] > 0 and r["local"]["VmHWM"] >= r["local"]["rss_after_load"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_side_reads_the_files_exactly_as_transformers_loads_them(tiny_model, dtype):
    """materialise allocates in the compute dtype and casts each file tensor into it: the same values as
    transformers' from_pretrained in that dtype, bit for bit (the split's numbers did not move with it)."""
    from transformers import AutoModelForCausalLM

    want = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype).state_dict()
    split = Split(6)
    head, tail, _, _ = load_local(tiny_model, split, "cpu", dtype)
    span, _, _ = load_cloud(tiny_model, split, "cpu", dtype)
    got = {f"model.embed_tokens.{k}": v for k, v in head.embed.state_dict().items()}
    for part in (head.span, tail.span, span):
        for i, layer in zip(part.indices, part.layers):
            got.update({f"model.layers.{i}.{k}": v for k, v in layer.state_dict().items()})
    got.update({f"model.norm.{k}": v for k, v in tail.norm.state_dict().items()})
    assert set(got) == {k for k in want if k != "lm_head.weight"}
    for name, tensor in got.items():
        assert tensor.dtype == dtype and torch.equal(tensor, want[name]), name
    assert torch.equal(tail.lm_head.weight, want["lm_head.weight"])
