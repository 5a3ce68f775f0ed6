"""The registry of greedy decoding modes, by their `--mode` names.

Each entry is a factory: `STRATEGIES[mode](memory, **options)` gives the strategy
`(lm, prompt, max_new, eos) -> Iterator[list[int]]`.  Every factory takes the
`Memory` (what speculation learns across generations) and an optional `drafter`
(a draft head), and uses them or not, so no caller has to know which mode needs
them; `make` passes a drafter only when there is one.  Sampling has a factory of the same
shape (`sampling.sampler`) but is not a greedy mode, so it is not listed here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from . import Strategy, TreeDrafter
from .jacobi import jacobi
from .lookahead import Memory, lookahead
from .sequential import sequential

Factory = Callable[..., Strategy]  # (memory, **options) -> Strategy


def _sequential(memory: Memory, *, drafter: TreeDrafter | None = None) -> Strategy:
    return sequential


def _jacobi(memory: Memory, *, block: int = 8, drafter: TreeDrafter | None = None) -> Strategy:
    return functools.partial(jacobi, block=block)


def _lookahead(memory: Memory, *, drafter: TreeDrafter | None = None, **options) -> Strategy:
    return functools.partial(lookahead, memory=memory, drafter=drafter, **options)


STRATEGIES: dict[str, Factory] = {"sequential": _sequential, "jacobi": _jacobi, "lookahead": _lookahead}


def make(mode: str, memory: Memory, drafter: TreeDrafter | None = None, **options) -> Strategy:
    """The registry's strategy for `mode`; the drafter goes to the factory only when there is one."""
    extra = {} if drafter is None else {"drafter": drafter}
    return STRATEGIES[mode](memory, **extra, **options)
