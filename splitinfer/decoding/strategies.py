"""The registry of decoding modes, by their `--mode` names."""

from .sequential import sequential

STRATEGIES = {"sequential": sequential}
