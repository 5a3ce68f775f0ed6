"""The registry of greedy decoding modes, by their `--mode` names.

Each entry is a factory: `STRATEGIES[mode](memory, **options)` gives the strategy
`(lm, prompt, max_new, eos) -> Iterator[list[int]]`.  Every factory takes the
`Memory` (what speculation learns across generations) and uses it or not, so no
caller has to know which mode needs it.  Sampling has a factory of the same
shape (`sampling.sampler`) but is not a greedy mode, so it is not listed here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from . import Strategy
from .jacobi import jacobi
from .lookahead import Memory, lookahead
from .sequential import sequential

Factory = Callable[..., Strategy]  # (memory, **options) -> Strategy


def _sequential(memory: Memory) -> Strategy:
    return sequential


def _jacobi(memory: Memory, *, block: int = 8) -> Strategy:
    return functools.partial(jacobi, block=block)


def _lookahead(memory: Memory, **options) -> Strategy:
    return functools.partial(lookahead, memory=memory, **options)


STRATEGIES: dict[str, Factory] = {"sequential": _sequential, "jacobi": _jacobi, "lookahead": _lookahead}
