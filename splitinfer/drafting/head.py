"""The draft head: an EAGLE-1-style feature predictor that runs entirely on the trusted side.

At position i the base model's last feature f_i (the final-norm output that the LM head reads) predicted
token i+1.  The head reads f_i together with the embedding of the token that actually came next, e_{i+1},
and predicts f_{i+1}; the model's own LM head turns that into a guess at token i+2.  Fed its own
predictions, it drafts several tokens ahead without a round trip:

    x_i   = fc([e_{i+1}; f_i])                       # [q, 2H] -> [q, H]
    g_i   = decoder_layer(x_i, attending to x_<i)    # one layer of the base model's own class
    f^_i+1 = g_i                                     # regressed onto the true f_{i+1}
    logits = f^ W_draft^T                            # W_draft: rows d2t of the base LM head

Only fc and the layer are trained and stored; the embedding and the LM head are the base model's, shared
at run time and never copied into the drafter's file.  `d2t` picks the draft vocabulary (the tokens the
model actually writes, most frequent first), so a draft step costs a fraction of a full LM head.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .. import hf

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "splitinfer-eagle1"  # config.json "format": what wrote the directory


@dataclass(frozen=True)
class DraftConfig:
    """The head's geometry (the base model's, so one base decoder layer fits) and its draft vocabulary."""

    base_model_type: str  # the base config's model_type: the decoder layer and rotary classes come from it
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int  # the base model's: token ids index its embedding and LM head
    draft_vocab_size: int  # rows of the LM head the head scores (d2t's length)
    base_digest: str = ""  # identity.weights_digest-style fingerprint of the base weights the head was trained on
    layer_input_norm: bool = True  # False: the layer's input RMSNorm is the identity (EAGLE-1's layer 0 has none)

    @classmethod
    def from_base(cls, base: PretrainedConfig, draft_vocab_size: int | None = None, base_digest: str = "") -> "DraftConfig":
        head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
        rope = getattr(base, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(base, "rope_theta", 10000.0))
        return cls(
            base_model_type=base.model_type,
            hidden_size=base.hidden_size,
            intermediate_size=base.intermediate_size,
            num_attention_heads=base.num_attention_heads,
            num_key_value_heads=base.num_key_value_heads,
            head_dim=head_dim,
            rms_norm_eps=base.rms_norm_eps,
            rope_theta=float(theta),
            max_position_embeddings=base.max_position_embeddings,
            vocab_size=base.vocab_size,
            draft_vocab_size=draft_vocab_size or base.vocab_size,
            base_digest=base_digest,
        )

    def layer_config(self) -> PretrainedConfig:
        """A one-layer config of the base model's type: builds the head's decoder layer and rotary tables."""
        config = AutoConfig.for_model(
            self.base_model_type,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=1,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            vocab_size=self.vocab_size,
        )
        hf.set_attention(config, "sdpa")
        return config

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> "DraftConfig":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} drafter config (format {data.get('format')!r})")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class DraftHead(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        self.config = config
        layer_config = config.layer_config()
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=True)
        self.layer = hf.decoder_layer(layer_config)
        if not config.layer_input_norm:  # published EAGLE-1 heads: fc's output goes straight into attention
            self.layer.input_layernorm = nn.Identity()
        self.rotary = hf.rotary_for(layer_config)
        # draft index -> token id; the identity until training picks the model's frequent tokens
        self.register_buffer("d2t", torch.arange(config.draft_vocab_size, dtype=torch.long))

    def forward(
        self,
        features: torch.Tensor,  # [1, q, H] f_i: the base model's final-norm features (or the head's own guesses)
        embeds: torch.Tensor,  # [1, q, H] e_{i+1}: embeddings of the tokens that follow
        positions: torch.Tensor,  # [1, q] rotary positions
        mask: torch.Tensor | None,  # [1, 1, q, past + q] additive, against the head's cache; None: causal block
        cache: hf.Cache | None,
    ) -> torch.Tensor:  # [1, q, H] predicted f_{i+1}
        x = self.fc(torch.cat([embeds, features], dim=-1))
        cos, sin = hf.rope(self.rotary, positions, x.dtype)
        return hf.call_layer(self.layer, x, mask, cos, sin, cache)


def save(head: DraftHead, out_dir: Path, provenance: dict | None = None) -> None:
    """float16 safetensors (fc, layer, d2t) + config.json (+ provenance.json); no base weights."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous().cpu()
             for k, v in head.state_dict().items() if not k.startswith("rotary.")}
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": FORMAT})
    (out_dir / CONFIG).write_text(json.dumps(head.config.to_json(), indent=1) + "\n")
    if provenance is not None:
        (out_dir / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")


def load(path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DraftHead:
    """A drafter directory written by `save`."""
    from safetensors.torch import load_file

    path = Path(path)
    config = DraftConfig.from_json(json.loads((path / CONFIG).read_text()))
    head = DraftHead(config)
    state = load_file(str(path / WEIGHTS))
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("rotary.")]
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    head.to(device)
    head.fc.to(dtype)
    head.layer.to(dtype)  # the rotary tables stay float32, as the base model keeps its own
    return head.eval()
