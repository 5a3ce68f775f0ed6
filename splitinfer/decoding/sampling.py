"""Sampling: temperature and nucleus (top-p), one token per round trip.

The loop of `sequential` (`one_by_one`: yields the tokens committed by each
model call, the prefill's first), but each token is drawn from

    p(t) = softmax(logits / temperature)(t), restricted to the nucleus and renormalised,

where the nucleus is the smallest set of most probable tokens whose mass reaches
`top_p` (the most probable token always belongs to it).  Draws come from the
given `torch.Generator`, so a seed reproduces a run.

Speculative strategies (lookahead, Jacobi) are exact only for greedy decoding:
accepting a guessed token is right when it equals the argmax, but a sampled
token must be drawn from the distribution *after* its prefix, and verifying a
guess against a draw would need rejection sampling.  So sampling is one token
per round trip, whatever the configured --mode.

It is deliberately not in `strategies.STRATEGIES`: that registry holds the
greedy modes, which all give the same tokens.  `sampler` is its factory, of
the same shape as the registry's.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterator, Sequence

import torch

from . import Strategy, TreeLM
from .lookahead import Memory
from .sequential import one_by_one


def make_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or with fresh randomness when None (no shared global state)."""
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)


def probabilities(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a token is drawn from: float64 [vocab] on the CPU, summing to 1."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature}; use greedy decoding for 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    probs = torch.softmax(logits.detach().reshape(-1).to("cpu", torch.float64) / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, 0) - sorted_p  # mass of the tokens ranked above each token
        keep = before < top_p  # the top token (mass before it: 0) is always kept
        nucleus = torch.zeros_like(probs)
        nucleus[order[keep]] = sorted_p[keep]
        probs = nucleus / nucleus.sum()
    return probs


def sample_token(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> int:
    return int(torch.multinomial(probabilities(logits, temperature, top_p), 1, generator=generator))


def sampling(
    lm: TreeLM,
    prompt: Sequence[int],
    max_new: int,
    eos: frozenset[int],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Iterator[list[int]]:
    """Sample up to `max_new` tokens (EOS included and ending the run), one per model call."""
    probabilities(torch.zeros(1), temperature, top_p)  # check the parameters before any round trip
    generator = generator if generator is not None else make_generator()
    yield from one_by_one(lm, prompt, max_new, eos, lambda logits: sample_token(logits, temperature, top_p, generator))


def sampler(
    memory: Memory | None, *, temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Strategy:
    """The registry's factory shape for sampling: no speculation, so `memory` goes unused."""
    return functools.partial(sampling, temperature=temperature, top_p=top_p, generator=generator)
