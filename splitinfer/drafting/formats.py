"""Published draft-head checkpoints loaded as a `DraftHead`: EAGLE-1/2 heads for models bigger than ours.

Supported (each maps one-to-one onto head.py's fc + one decoder layer; nothing is approximated):

* The EAGLE repository's EAGLE-1/2 heads (SafeAILab/EAGLE, eagle/model/cnets1.py; EAGLE-2 uses the same
  head).  config.json is a LlamaConfig-like dict of the base model with num_hidden_layers 1, plus "bias"
  (fc's bias; default true) and, for Qwen2 bases, "qkv_bias".  Weights in pytorch_model.bin or
  model.safetensors: fc.weight [H, 2H] (input [embedding; feature], in that order), fc.bias,
  layers.0.self_attn.{q,k,v,o}_proj.weight (+ q/k/v biases with qkv_bias), layers.0.mlp.{gate,up,down}_proj.weight,
  layers.0.post_attention_layernorm.weight, and embed_tokens.weight (the base model's copy: ignored).
  Layer 0 has no input_layernorm: fc's output goes straight into attention.  The attention's head_dim is
  hidden_size / num_attention_heads.
* vLLM speculators' "eagle" (vllm-project/speculators, models/eagle.py) with layernorms false (EAGLE-1/2,
  HASS): config.json with speculators_model_type "eagle", transformer_layer_config (a LlamaConfig dict),
  fusion_bias; model.safetensors with fusion_fc.{weight,bias} and transformer.* (the decoder layer, whose
  input_layernorm is the identity).  The EAGLE-style spellings fc.* and layers.0.* are accepted too.

Refused, with a message saying why: speculators "eagle" with layernorms true (norms on the embedding and
before the LM head, which DraftHead does not have); EAGLE-3 in either repository ("eagle3", or an EAGLE
config with draft_vocab_size / midlayer.* weights: its layer's attention reads [embedding; feature] of
width 2H and fc fuses three base layers, another architecture); rope scaling of any kind; more than one
layer; activations other than SiLU; biases on o_proj or the MLP.  .bin files are read with
torch.load(weights_only=True); nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import head as head_module
from .head import DraftConfig, DraftHead

SPLITINFER = "splitinfer"
EAGLE = "eagle"  # SafeAILab/EAGLE EAGLE-1/2
SPECULATORS_EAGLE = "speculators-eagle"


class FormatError(ValueError):
    """A checkpoint directory this module cannot turn into a DraftHead, and why."""


def detect(path: Path) -> str:
    """Which format the directory holds: SPLITINFER, EAGLE or SPECULATORS_EAGLE (else FormatError)."""
    path = Path(path)
    config = _config(path)
    if config.get("format") == head_module.FORMAT:
        return SPLITINFER
    kind = config.get("speculators_model_type")
    if kind is not None:
        if kind != "eagle":
            raise FormatError(f"{path}: speculators_model_type {kind!r} is not supported (only \"eagle\"; "
                              "EAGLE-3 heads are another architecture than DraftHead)")
        return SPECULATORS_EAGLE
    names = set(read_weights(path))
    if "draft_vocab_size" in config or "d2t" in names or any(n.startswith("midlayer.") for n in names):
        raise FormatError(f"{path}: an EAGLE-3 head (draft_vocab_size / d2t / midlayer.*), another architecture "
                          "than DraftHead's EAGLE-1 layer; not supported")
    if "fc.weight" in names and any(n.startswith("layers.0.") for n in names):
        return EAGLE
    raise FormatError(f"{path}: neither a splitinfer drafter, an EAGLE-1/2 head nor a speculators eagle head")


def load(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DraftHead:
    """Any supported directory as a DraftHead (fc and the layer in `dtype`, as head.load leaves them)."""
    path = Path(path)
    kind = detect(path)
    if kind == SPLITINFER:
        return head_module.load(path, device, dtype)
    config = _config(path)
    weights = read_weights(path)
    if kind == EAGLE:
        draft_config, state = eagle_head(config, weights, str(path))
    else:
        draft_config, state = speculators_head(config, weights, str(path))
    return _build(draft_config, state, device, dtype, str(path))


def convert(path: Path, out: Path) -> DraftHead:
    """Load a published head and write it as a splitinfer drafter directory (head.save)."""
    kind = detect(path)
    head = load(path)
    head_module.save(head, Path(out), provenance={"converted_from": str(path), "format": kind})
    return head


# ---------------------------------------------------------------------------- reading


def _config(path: Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FormatError(f"{path}: no config.json")
    return json.loads(file.read_text())


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The directory's one weights file: model.safetensors (or another single *.safetensors), else
    pytorch_model.bin (torch.load with weights_only=True: tensors only, no code)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if len(files) > 1:
        raise FormatError(f"{path}: several *.safetensors files; a draft head is one file")
    if files:
        from safetensors.torch import load_file

        return load_file(str(files[0]))
    if (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return dict(state)
    raise FormatError(f"{path}: no model.safetensors nor pytorch_model.bin")


# ---------------------------------------------------------------------------- the mappings


def eagle_head(config: dict, weights: dict[str, torch.Tensor], label: str) -> tuple[DraftConfig, dict]:
    """The EAGLE repository's names -> DraftHead's: fc.* stays, layers.0.* -> layer.*, embed_tokens goes."""
    state = _rename(weights, {"fc.": "fc.", "layers.0.": "layer."}, skip={"embed_tokens.weight"}, label=label)
    # cnets1.LlamaAttention: head_dim is hidden / heads whatever the config says
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    draft = _geometry(config, _layer_type(state, label), head_dim, state, label)
    return draft, state


def speculators_head(config: dict, weights: dict[str, torch.Tensor], label: str) -> tuple[DraftConfig, dict]:
    """speculators' names -> DraftHead's: fusion_fc.* -> fc.*, transformer.* -> layer.*."""
    if config.get("layernorms"):
        raise FormatError(f"{label}: a speculators eagle head with layernorms (norms on the embedding and before "
                          "the LM head, as the TTT variant has): DraftHead has no place for them; not supported")
    arch = config.get("transformer_layer_architecture", "LlamaDecoderLayer")
    if arch != "LlamaDecoderLayer":
        raise FormatError(f"{label}: transformer_layer_architecture {arch!r}; only LlamaDecoderLayer is supported")
    layer = config.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise FormatError(f"{label}: no transformer_layer_config in config.json")
    prefixes = {"fusion_fc.": "fc.", "fc.": "fc.", "transformer.": "layer.", "layers.0.": "layer."}
    state = _rename(weights, prefixes, skip={"embed_tokens.weight", "lm_head.weight"}, label=label)
    draft = _geometry(layer, _layer_type(state, label), None, state, label)
    return draft, state


def _rename(weights: dict[str, torch.Tensor], prefixes: dict[str, str], skip: set[str],
            label: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name in skip:
            continue
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            raise FormatError(f"{label}: unexpected tensor {name} (not fc nor the one decoder layer)")
        state[prefixes[prefix] + name[len(prefix):]] = tensor
    return state


def _layer_type(state: dict[str, torch.Tensor], label: str) -> str:
    """The transformers layer class that has exactly these parameters: Llama's (no biases) or Qwen2's
    (biases on q, k and v only)."""
    biases = {n for n in state if n.startswith("layer.") and n.endswith(".bias")}
    qkv = {f"layer.self_attn.{p}_proj.bias" for p in "qkv"}
    if not biases:
        return "llama"
    if biases == qkv:
        return "qwen2"
    raise FormatError(f"{label}: biases {sorted(biases)} fit neither a Llama nor a Qwen2 layer; not supported")


def _llama_config(values: dict, label: str):
    """A LlamaConfig of the dict: the defaults fill what it leaves out (speculators writes only what differs)."""
    from transformers import LlamaConfig

    known = {k: v for k, v in values.items() if k not in ("architectures", "model_type", "transformers_version")}
    try:
        return LlamaConfig(**known)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{label}: config.json is not a Llama-like config: {exc}") from None


def _geometry(values: dict, model_type: str, head_dim: int | None, state: dict[str, torch.Tensor],
              label: str) -> DraftConfig:
    config = _llama_config(values, label)
    if config.num_hidden_layers != 1:
        raise FormatError(f"{label}: num_hidden_layers {config.num_hidden_layers}; DraftHead has one layer")
    if config.hidden_act != "silu":
        raise FormatError(f"{label}: hidden_act {config.hidden_act!r}; only silu is supported")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default" or values.get("rope_scaling"):
        raise FormatError(f"{label}: rope scaling {values.get('rope_scaling') or rope} is not supported "
                          "(DraftHead uses plain rotary tables)")
    heads = config.num_attention_heads
    return DraftConfig(
        base_model_type=model_type,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=config.num_key_value_heads or heads,
        head_dim=head_dim or getattr(config, "head_dim", None) or config.hidden_size // heads,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        max_position_embeddings=config.max_position_embeddings,
        vocab_size=config.vocab_size,
        draft_vocab_size=config.vocab_size,  # EAGLE-1/2 heads score the whole vocabulary
        layer_input_norm="layer.input_layernorm.weight" in state,
    )


def _build(config: DraftConfig, state: dict[str, torch.Tensor], device: str | torch.device, dtype: torch.dtype,
           label: str) -> DraftHead:
    """A DraftHead holding exactly `state` (+ a zero fc bias when the checkpoint has none, identity d2t)."""
    head = DraftHead(config)
    state = dict(state)
    state.setdefault("fc.bias", torch.zeros(config.hidden_size))
    state["d2t"] = torch.arange(config.draft_vocab_size)
    for name, tensor in state.items():
        mine = head.state_dict().get(name)
        if mine is not None and mine.shape != tensor.shape:
            raise FormatError(f"{label}: {name} has shape {list(tensor.shape)}, the config implies {list(mine.shape)}")
    missing, unexpected = head.load_state_dict({k: v.float() if v.is_floating_point() else v
                                                for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.startswith("rotary.")]
    if missing or unexpected:
        raise FormatError(f"{label}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    head.to(device)
    head.fc.to(dtype)
    head.layer.to(dtype)  # the rotary tables stay float32, as head.load leaves them
    return head.eval()
