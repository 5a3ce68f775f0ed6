"""The registry of decoding modes, by their `--mode` names."""

from .jacobi import jacobi
from .lookahead import lookahead
from .sequential import sequential

STRATEGIES = {"sequential": sequential, "jacobi": jacobi, "lookahead": lookahead}
