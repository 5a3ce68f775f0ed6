"""Output identity: every decoding mode through the real split vs the unsplit model's greedy `generate`.

For each prompt and mode: the generated ids, token-level agreement with the
reference, exact-sequence equality, the output's perplexity under the full
model, and where two outputs differ, the first differing position and the
reference model's top-2 logit margin there (near ties are the usual cause).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from . import prompts as prompt_sets
from .identity_summary import REFERENCE, compare, summarise
from .testbed import Bed


class FullModel:
    """The whole model in this process: reference greedy generation and scoring, on the split's device and
    in its dtype, so that the reference differs from the split by the float16 wire alone."""

    def __init__(self, model_dir, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def greedy(self, prompt: list[int], max_new: int, eos: frozenset[int]) -> list[int]:
        out = self.model.generate(
            torch.tensor([prompt], device=self.device), max_new_tokens=max_new, do_sample=False,
            eos_token_id=sorted(eos) or None, pad_token_id=sorted(eos)[0] if eos else 0,
        )
        return out[0, len(prompt):].tolist()

    @torch.inference_mode()
    def logits(self, prompt: list[int], output: list[int]) -> torch.Tensor:
        """Logits [len(output), vocab] predicting each output token."""
        ids = torch.tensor([prompt + output], device=self.device)
        return self.model(ids).logits[0, len(prompt) - 1 : -1].float()

    def perplexity(self, prompt: list[int], output: list[int]) -> float:
        if not output:
            return float("nan")
        logp = torch.log_softmax(self.logits(prompt, output), -1)
        nll = -logp[torch.arange(len(output), device=self.device), torch.tensor(output, device=self.device)].mean().item()
        return math.exp(nll)

    def margin(self, prompt: list[int], output: list[int], position: int) -> float:
        """Top-1 minus top-2 logit of the full model at `position` of `output` (given its own prefix)."""
        top = torch.topk(self.logits(prompt, output[: position + 1])[position], 2).values
        return float(top[0] - top[1])


def run(bed: Bed, runs: dict[str, tuple[str, dict]], per_category: int, max_new: int) -> dict[str, Any]:
    """Every prompt through the unsplit model and each of `runs` (experiments.rows_for); outputs are
    compared under the run's name."""
    modes = list(runs)
    full = FullModel(bed.local.model_dir, bed.local.device, bed.local.dtype)
    eos = bed.local.eos
    prompts = prompt_sets.load(per_category=per_category)
    rows = []
    for p in tqdm(prompts, desc="output identity", unit="prompt"):
        ids = bed.local.encode(p["prompt"])
        ref = full.greedy(ids, max_new, eos)
        row = {"category": p["category"], "prompt": p["prompt"], "outputs": {REFERENCE: ref},
               "perplexity": {REFERENCE: full.perplexity(ids, ref)}, "comparison": {}}
        for mode in modes:
            decoding, options = runs[mode]
            g = bed.generate(ids, decoding, max_new, **options)
            row["outputs"][mode] = g.token_ids
            row["perplexity"][mode] = full.perplexity(ids, g.token_ids)
            cmp = compare(ref, g.token_ids)
            if cmp["first_difference"] is not None and cmp["first_difference"] < min(len(ref), len(g.token_ids)):
                cmp["reference_top2_margin"] = full.margin(ids, ref, cmp["first_difference"])
            cmp["steps"] = g.steps
            cmp["tokens_per_step"] = sum(g.per_step) / g.steps if g.steps else 0.0
            row["comparison"][mode] = cmp
        # Modes against each other: all greedy, so all must agree with sequential.
        for mode in modes:
            if mode != "sequential" and "sequential" in modes:
                row["comparison"][f"{mode}_vs_sequential"] = compare(row["outputs"]["sequential"], row["outputs"][mode])
        rows.append(row)
    return {"prompts": rows, "summary": summarise(rows, modes)}
