"""Kernels that keep a token tree nearly as cheap as a single token on a CPU.

Attention: transformers' sdpa path expands the grouped key/value heads to one
copy per query head (`repeat_kv`, a fresh copy of the whole cache per layer)
whenever a mask is given and the block has more than one token; on a CPU,
torch's SDPA takes the grouped heads directly (`enable_gqa`) with our mask.

Linear layers:

A decoding step on a CPU is bound by reading the weights from memory, once per
step, whatever the block size.  MKL's GEMM for a handful of rows (2..16, a
token tree) re-reads the weights and costs nearly twice as much as one row, and
its one-row kernel (GEMV) does not use a second thread; oneDNN with weights
packed ahead of time for a small batch stays near the one-row cost up to ~8
rows and spreads every block, one row included, over the threads.  So on a CPU
in float32 each linear map keeps a oneDNN copy of its weight and uses it for
every block but a single row on a single thread, where the GEMV is faster.
The price is a second copy of every packed matrix in memory (the plain weight
stays for a tied embedding and for anything that reads `.weight`).  The
measurements behind these choices are in experiment_data/step_cost.json
(a step with transformers' kernels against these).

Elsewhere (GPU, float16, a torch built without oneDNN) the model's own
nn.Linear is left alone: `pack_linears` reports 0 modules packed.  The private
oneDNN ops and transformers' attention table are reached through hf.py.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PretrainedConfig

from . import hf
from .config import KERNELS

log = logging.getLogger(__name__)

PACK_BATCH = 16  # the block size oneDNN lays the weights out for; measured flat from 2 to 16 rows


ATTENTION = "splitinfer_sdpa"  # use_kernels registers `attention` under this name and names it in a side's config
GPU_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]  # no cuDNN


def attention(
    module: nn.Module,
    query: torch.Tensor,  # [batch, heads, q, head_dim]
    key: torch.Tensor,  # [batch, kv_heads, past + q, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # [1, 1, q, past + q] additive
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:  # [batch, q, heads, head_dim]
    if query.device.type != "cpu":  # CUDA's fused kernels refuse enable_gqa with a mask: transformers' own path
        # ...but not through cuDNN's attention, which torch tries first for a masked block on recent GPUs:
        # profiled on an H200 (benchmarks/profile_step.py), its host time per call made a 2-token step
        # cost several times a one-token step.
        with sdpa_kernel(GPU_ATTENTION):
            return hf.sdpa_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


class PackedLinear(nn.Module):
    """y = x W^T + b by oneDNN on weights prepacked for blocks of up to PACK_BATCH rows."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight  # shared with the original (and with a tied embedding)
        self.bias = linear.bias
        self.packed = hf.onednn_pack(linear.weight, PACK_BATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., rows, in] -> [..., rows, out]
        if x.shape[-2] == 1 and torch.get_num_threads() == 1:  # one row on one thread: MKL's GEMV is faster
            return F.linear(x, self.weight, self.bias)
        return hf.onednn_linear(x, self.packed, self.bias)


def packing_works(device: str | torch.device, dtype: torch.dtype) -> bool:
    """True where packed oneDNN linears run and agree with F.linear (CPU, float32, oneDNN built in)."""
    if torch.device(device).type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    probe = nn.Linear(8, 4)
    x = torch.randn(1, 3, 8)
    try:
        with torch.inference_mode():
            return torch.allclose(PackedLinear(probe)(x), probe(x), atol=1e-5)
    except RuntimeError as exc:  # e.g. an ARM build whose oneDNN lacks the reorder op
        log.info("packed linears unavailable: %s", exc)
        return False


def use_kernels(
    parts: list[nn.Module], config: PretrainedConfig, kernels: str, device: str | torch.device, dtype: torch.dtype
) -> int:
    """Switch one side's modules (sharing `config`) to `kernels`; returns how many linear maps were packed."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "auto":
        hf.register_attention(ATTENTION, attention)
    hf.set_attention(config, ATTENTION if kernels == "auto" else "sdpa")
    return sum(pack_linears(part, kernels, device, dtype) for part in parts)


def pack_linears(module: nn.Module, kernels: str, device: str | torch.device, dtype: torch.dtype) -> int:
    """Replace every nn.Linear under `module` by a PackedLinear where that helps; returns how many."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "torch" or not packing_works(device, dtype):
        return 0
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count
