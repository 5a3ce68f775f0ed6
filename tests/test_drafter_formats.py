"""Published draft heads (formats.py): tiny checkpoints in the EAGLE repository's and speculators' layouts,
random tensors, loaded into a DraftHead that must compute what the checkpoint's own code would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from splitinfer.drafting import formats
from splitinfer.drafting import head as head_module

H, HEADS, KV, INTER, VOCAB, THETA, EPS = 64, 4, 2, 128, 96, 50000.0, 1e-6
HEAD_DIM = H // HEADS


def eagle_weights(fc_bias: bool = True, qkv_bias: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """An EAGLE-1 head's state dict (cnets1.Model): fc, layer 0 without input_layernorm, embed_tokens."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    w = {
        "fc.weight": rand(H, 2 * H),
        "layers.0.self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, H),
        "layers.0.self_attn.k_proj.weight": rand(KV * HEAD_DIM, H),
        "layers.0.self_attn.v_proj.weight": rand(KV * HEAD_DIM, H),
        "layers.0.self_attn.o_proj.weight": rand(H, HEADS * HEAD_DIM),
        "layers.0.mlp.gate_proj.weight": rand(INTER, H),
        "layers.0.mlp.up_proj.weight": rand(INTER, H),
        "layers.0.mlp.down_proj.weight": rand(H, INTER),
        "layers.0.post_attention_layernorm.weight": 1 + rand(H),
        "embed_tokens.weight": rand(VOCAB, H),
    }
    if fc_bias:
        w["fc.bias"] = rand(H)
    if qkv_bias:
        for p, n in (("q", HEADS), ("k", KV), ("v", KV)):
            w[f"layers.0.self_attn.{p}_proj.bias"] = rand(n * HEAD_DIM)
    return w


def eagle_config(**extra) -> dict:
    """A full LlamaConfig-like dict, as the EAGLE repository ships (EConfig)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": INTER,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "num_hidden_layers": 1, "hidden_act": "silu",
        "max_position_embeddings": 512, "rms_norm_eps": EPS, "rope_theta": THETA, "rope_scaling": None,
        "vocab_size": VOCAB, "bias": True, **extra,
    }


def write_eagle(out: Path, weights: dict, config: dict, bin_file: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    if bin_file:
        torch.save(weights, out / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    return out


def write_speculators(out: Path, eagle: dict, layer_config: dict, **config) -> Path:
    """The same head as speculators' converter writes it: fusion_fc.*, transformer.*, no embed_tokens."""
    out.mkdir(parents=True, exist_ok=True)
    renamed = {}
    for name, tensor in eagle.items():
        if name == "embed_tokens.weight":
            continue
        renamed[name.replace("fc.", "fusion_fc.", 1) if name.startswith("fc.") else
                name.replace("layers.0.", "transformer.", 1)] = tensor.contiguous()
    body = {"speculators_model_type": "eagle", "architectures": ["EagleSpeculator", "LlamaDecoderLayer"],
            "transformer_layer_architecture": "LlamaDecoderLayer", "transformer_layer_config": layer_config,
            "layernorms": False, "fusion_bias": "fc.bias" in eagle, **config}
    (out / "config.json").write_text(json.dumps(body))
    save_file(renamed, str(out / "model.safetensors"))
    return out


# ---------------------------------------------------------------------------- the reference: EAGLE's own arithmetic


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # x [T, heads, hd]
    inv = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    freqs = positions.float()[:, None] * inv[None]  # [T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    half = torch.cat([-x[..., HEAD_DIM // 2:], x[..., :HEAD_DIM // 2]], dim=-1)
    return x * cos + half * sin


def reference(w: dict, embeds: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """cnets1.Model.forward for one sequence: fc([e; f]), then layer 0 without an input norm."""
    T = len(embeds)
    x = torch.cat([embeds, feats], dim=-1) @ w["fc.weight"].T + w.get("fc.bias", torch.zeros(H))
    L = "layers.0."

    def proj(name: str, h: torch.Tensor) -> torch.Tensor:
        out = h @ w[f"{L}self_attn.{name}.weight"].T
        return out + w[f"{L}self_attn.{name}.bias"] if f"{L}self_attn.{name}.bias" in w else out

    positions = torch.arange(T)
    q = rotate(proj("q_proj", x).view(T, HEADS, HEAD_DIM), positions)
    k = rotate(proj("k_proj", x).view(T, KV, HEAD_DIM), positions).repeat_interleave(HEADS // KV, dim=1)
    v = proj("v_proj", x).view(T, KV, HEAD_DIM).repeat_interleave(HEADS // KV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / HEAD_DIM ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, H)
    x = x + attn @ w[f"{L}self_attn.o_proj.weight"].T
    m = rms(x, w[f"{L}post_attention_layernorm.weight"])
    gate, up = m @ w[f"{L}mlp.gate_proj.weight"].T, m @ w[f"{L}mlp.up_proj.weight"].T
    return x + (F.silu(gate) * up) @ w[f"{L}mlp.down_proj.weight"].T


def head_output(head: head_module.DraftHead, embeds: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return head(feats[None], embeds[None], torch.arange(len(embeds))[None], None, None)[0]


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(9, H, generator=g), torch.randn(9, H, generator=g)  # embeds, features


# ---------------------------------------------------------------------------- EAGLE-1/2


@pytest.mark.parametrize("bin_file", [False, True], ids=["safetensors", "pytorch_model.bin"])
def test_an_eagle_head_computes_what_eagle_computes(tmp_path, inputs, bin_file):
    w = eagle_weights()
    path = write_eagle(tmp_path / "eagle", w, eagle_config(), bin_file=bin_file)
    assert formats.detect(path) == formats.EAGLE
    head = formats.load(path)
    assert torch.equal(head.fc.weight, w["fc.weight"]) and torch.equal(head.fc.bias, w["fc.bias"])
    assert isinstance(head.layer.input_layernorm, torch.nn.Identity)  # EAGLE's layer 0 has no input norm
    assert head.config.rope_theta == THETA and head.config.draft_vocab_size == VOCAB
    assert torch.equal(head.d2t, torch.arange(VOCAB))
    torch.testing.assert_close(head_output(head, *inputs), reference(w, *inputs), atol=1e-4, rtol=1e-4)


def test_an_eagle_head_without_fc_bias_gets_a_zero_bias(tmp_path, inputs):
    w = eagle_weights(fc_bias=False)
    head = formats.load(write_eagle(tmp_path / "eagle", w, eagle_config(bias=False), bin_file=True))
    assert not head.fc.bias.any()
    torch.testing.assert_close(head_output(head, *inputs), reference(w, *inputs), atol=1e-4, rtol=1e-4)


def test_a_qwen2_style_eagle_head_keeps_its_qkv_biases(tmp_path, inputs):
    w = eagle_weights(qkv_bias=True)
    head = formats.load(write_eagle(tmp_path / "eagle", w, eagle_config(qkv_bias=True)))
    assert head.config.base_model_type == "qwen2"
    assert torch.equal(head.layer.self_attn.q_proj.bias, w["layers.0.self_attn.q_proj.bias"])
    torch.testing.assert_close(head_output(head, *inputs), reference(w, *inputs), atol=1e-4, rtol=1e-4)


def test_a_converted_head_saves_and_loads_as_a_splitinfer_drafter(tmp_path, inputs):
    w = eagle_weights()
    src = write_eagle(tmp_path / "eagle", w, eagle_config())
    formats.convert(src, tmp_path / "mine")
    assert formats.detect(tmp_path / "mine") == formats.SPLITINFER
    loaded = head_module.load(tmp_path / "mine")
    assert not loaded.config.layer_input_norm
    rounded = {k: v.half().float() for k, v in w.items()}  # what a float16 file keeps
    torch.testing.assert_close(head_output(loaded, *inputs), reference(rounded, *inputs), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- speculators


def test_a_speculators_eagle_head_computes_what_eagle_computes(tmp_path, inputs):
    w = eagle_weights()
    # to_diff_dict style: only what differs from LlamaConfig's defaults (the rest comes from them)
    layer = {"model_type": "llama", "hidden_size": H, "intermediate_size": INTER, "num_attention_heads": HEADS,
             "num_key_value_heads": KV, "num_hidden_layers": 1, "max_position_embeddings": 512,
             "rope_theta": THETA, "vocab_size": VOCAB}
    path = write_speculators(tmp_path / "spec", w, layer)
    assert formats.detect(path) == formats.SPECULATORS_EAGLE
    head = formats.load(path)
    assert torch.equal(head.fc.weight, w["fc.weight"])
    assert head.config.rms_norm_eps == EPS  # LlamaConfig's default filled in
    torch.testing.assert_close(head_output(head, *inputs), reference(w, *inputs), atol=1e-4, rtol=1e-4)


def test_a_speculators_head_with_layernorms_is_refused(tmp_path):
    layer = {"hidden_size": H, "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV,
             "num_hidden_layers": 1, "vocab_size": VOCAB}
    path = write_speculators(tmp_path / "spec", eagle_weights(), layer, layernorms=True)
    with pytest.raises(formats.FormatError, match="layernorms"):
        formats.load(path)


def test_eagle3_heads_are_refused_with_a_reason(tmp_path):
    spec = tmp_path / "spec3"
    spec.mkdir()
    (spec / "config.json").write_text(json.dumps({"speculators_model_type": "eagle3"}))
    with pytest.raises(formats.FormatError, match="eagle3"):
        formats.detect(spec)
    w = eagle_weights()
    w["midlayer.hidden_norm.weight"] = torch.ones(H)
    path = write_eagle(tmp_path / "eagle3", w, eagle_config(draft_vocab_size=32))
    with pytest.raises(formats.FormatError, match="EAGLE-3"):
        formats.load(path)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling"),
    ({"num_hidden_layers": 2}, "num_hidden_layers"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_what_a_draft_head_cannot_represent_is_refused(tmp_path, change, message):
    path = write_eagle(tmp_path / "eagle", eagle_weights(), eagle_config(**change))
    with pytest.raises(formats.FormatError, match=message):
        formats.load(path)


def test_a_wrong_shape_names_the_tensor(tmp_path):
    w = eagle_weights()
    w["layers.0.mlp.up_proj.weight"] = torch.zeros(INTER + 1, H)
    with pytest.raises(formats.FormatError, match="up_proj"):
        formats.load(write_eagle(tmp_path / "eagle", w, eagle_config()))
