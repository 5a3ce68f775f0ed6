"""Lookahead ablation: n-gram size, candidate sources and verify budget, by prompt category.

Every configuration runs the same prompts through a real cloud server process;
each records tokens per round trip (step) and tokens per second per prompt.
The speculation memory (Token Recycling's table, calibration, cost model)
starts empty for each configuration and is shared across its prompts, in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from ..decoding.lookahead import SOURCES, Memory
from . import prompts as prompt_sets
from .ablation_summary import summarise
from .testbed import Bed


@dataclass(frozen=True)
class Config:
    name: str
    ngram: int = 4
    max_verify: int | None = 32
    sources: frozenset[str] = SOURCES
    per_category: int | None = None  # None: the run's default

    def options(self) -> dict[str, Any]:
        return {"ngram": self.ngram, "max_verify": self.max_verify, "sources": self.sources}

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ngram": self.ngram, "max_verify": self.max_verify, "sources": sorted(self.sources),
                "per_category": self.per_category}


def configs(ngrams: list[int], budgets: list[int | None], base_budget: int, main_budget: int,
            main_per_category: int, drafter: bool = False) -> list[Config]:
    """The headline configuration over the whole prompt set first, then the sweeps; with a `drafter`, the
    headline again without it (the figure beside it), and the source sweep has the drafter alone and the
    model-free sources without it too.  The tree-size sweep uses every source (the drafter's too)."""
    model_free = SOURCES - {"draft"}
    out = [Config(f"main {main_budget}", max_verify=main_budget, per_category=main_per_category)]
    if drafter:
        out.append(Config(f"main {main_budget} model-free", max_verify=main_budget, sources=model_free,
                          per_category=main_per_category))
    out += [Config(f"n={n}", ngram=n, max_verify=base_budget) for n in ngrams]
    for source in sorted(SOURCES if drafter else model_free):
        out.append(Config(f"only {source}", max_verify=base_budget, sources=frozenset({source})))
    if drafter:
        out.append(Config("model-free only", max_verify=base_budget, sources=model_free))
    for budget in budgets:
        out.append(Config(f"budget {budget or 'by cost'}", max_verify=budget))
    return out


def run(bed: Bed, cfgs: list[Config], per_category: int, max_new: int) -> dict[str, Any]:
    sets = {n: prompt_sets.load(per_category=n) for n in {cfg.per_category or per_category for cfg in cfgs}}
    encoded = {p["prompt"]: bed.local.encode(p["prompt"]) for ps in sets.values() for p in ps}
    results = []
    bar = tqdm(total=sum(len(sets[cfg.per_category or per_category]) for cfg in cfgs), desc="lookahead ablation", unit="prompt")
    for cfg in cfgs:
        memory = Memory()
        rows = []
        for p in sets[cfg.per_category or per_category]:
            ids = encoded[p["prompt"]]
            g = bed.generate(ids, "lookahead", max_new, memory=memory, **cfg.options())
            rows.append(
                {
                    "category": p["category"],
                    "prompt": p["prompt"],
                    "new_tokens": len(g.token_ids),
                    "steps": g.steps,
                    "tokens_per_step": sum(g.per_step) / g.steps if g.steps else 0.0,
                    "tokens_per_second": g.tokens_per_second,
                    "accepted_per_step": g.per_step,
                    "verified_per_step": [t["tokens"] for t in g.timings],
                }
            )
            bar.update()
        results.append({"config": cfg.as_dict(), "prompts": rows, "summary": summarise(rows)})
    bar.close()
    return {"configs": results}
