"""Configuration of the split: which layers live where, and the knobs of each side.

Everything here is plain data; nothing imports torch modules or opens sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from platformdirs import user_cache_path, user_data_path

# The SSH tunnel of the spec maps these two ports; the local server for clients
# therefore defaults to the next free one.
HTTP_PORT = 5000
WS_PORT = 5001
LOCAL_SERVER_PORT = 5002

# The per-user data directory (~/.local/share/splitinfer on Linux, ~/Library/Application Support/splitinfer
# on macOS), never the working directory or the checkout: a test run or a script started elsewhere finds
# the same prepared model and writes nothing into the repo.
DATA_DIR: Path = user_data_path("splitinfer")
DEFAULT_MODEL_DIR: Path = DATA_DIR / "models" / "smollm2-135m-instruct"
# Lookahead's memory, one file per model (memory_file.py): ~/.cache/splitinfer/memory on Linux.  A cache:
# deleting it costs speed only.
MEMORY_DIR: Path = user_cache_path("splitinfer") / "memory"


def _checkout() -> Path | None:
    """The source tree this package runs from (an editable install, or a script beside it); None for a wheel."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "experiment_data").is_dir() else None


CHECKOUT: Path | None = _checkout()


def experiment_out(name: str) -> Path:
    """An experiment's default --out: experiment_data/NAME of the checkout, else of the current directory."""
    return (CHECKOUT or Path()) / "experiment_data" / name


OUT_HELP = "result file (experiment_data/ of the checkout when run from one, else of the current directory)"

# --mode: the greedy decoding strategies (decoding.strategies.STRATEGIES has one per name; a test checks),
# named here so that argument parsers need not import torch.
MODES = ("jacobi", "lookahead", "sequential")
DEFAULT_MODE = "lookahead"  # the most tokens per round trip; every mode gives the same tokens

# --kernels: auto = ours where they help (kernels.py); torch = transformers' own (sdpa, nn.Linear).
KERNELS = ("auto", "torch")

# How long the local side keeps reconnecting (and replaying) after losing the cloud mid-generation.
RECONNECT_TIMEOUT_S = 30.0

# The largest request body the local server reads (a 413 beyond): far above any prompt that fits a context
# of a few thousand tokens, far below what would take seconds to buffer and parse.
DEFAULT_MAX_BODY_BYTES = 4 << 20

# Idle cloud sessions are dropped after this long (the spec's 5 minutes).
SESSION_IDLE_SECONDS = 300.0


@dataclass(frozen=True)
class Split:
    """Which decoder layers run where, for a model of `num_layers` layers: the cloud runs layers
    cloud_start..cloud_end (inclusive, both sides' one vocabulary); the trusted side runs the layers
    before (the head) and after (the tail).  The spec's local flags say the same thing from the other
    end: --split-after N is cloud_start N+1, --resume-at M is cloud_end M-1 (cli.add_split_args).
    """

    num_layers: int
    cloud_start: int = 2  # first cloud layer: deeper = more private, more local compute per token
    cloud_end: int = -3  # last cloud layer; negative counts from the end (-3: the last two layers stay local)

    def __post_init__(self) -> None:
        if self.cloud_end < 0:
            object.__setattr__(self, "cloud_end", self.num_layers + self.cloud_end)
        # At least one trusted layer on each side: with none before, the cloud would see the embedding
        # (a table lookup away from the tokens); with none after, its output would be the final state.
        if not 1 <= self.cloud_start <= self.cloud_end <= self.num_layers - 2:
            raise ValueError(
                f"cloud layers {self.cloud_start}..{self.cloud_end} must leave at least one local layer "
                f"on each side of a {self.num_layers}-layer model (1 <= start <= end <= {self.num_layers - 2})"
            )

    @property
    def head_layers(self) -> range:
        return range(0, self.cloud_start)

    @property
    def cloud_layers(self) -> range:
        return range(self.cloud_start, self.cloud_end + 1)

    @property
    def tail_layers(self) -> range:
        return range(self.cloud_end + 1, self.num_layers)

    @property
    def local_layers(self) -> list[int]:
        return [*self.head_layers, *self.tail_layers]

    @classmethod
    def of(cls, num_layers: int, cloud_start: int | None = None, cloud_end: int | None = None) -> "Split":
        """None means the default (cloud 2..L-3)."""
        return cls(num_layers, 2 if cloud_start is None else cloud_start, -3 if cloud_end is None else cloud_end)


@dataclass(frozen=True)
class Limits:
    """What one cloud server accepts; each bound keeps a hostile or buggy peer from exhausting it."""

    # The cloud server derives max_sessions, max_cache_tokens and max_frame_bytes from the memory available
    # at start (cloud/memory.py); these fixed values serve tests and in-process use.
    max_sessions: int = 64
    max_context: int = 8192  # tokens held in one session's cache (a session may reserve fewer when it opens)
    # Cache entries all sessions together may reserve (each reserves its max_length when it opens); beyond
    # it a new session is answered `busy`.  None: max_sessions alone bounds them.
    max_cache_tokens: int | None = None
    max_step_tokens: int = 512  # new tokens in one forward (prefill chunks are split by the client)
    max_frame_bytes: int = 64 << 20  # checked from the length prefix before the payload is read
    max_sessions_per_connection: int = 4  # so one connection cannot take every session slot
    idle_seconds: float = SESSION_IDLE_SECONDS


@dataclass(frozen=True)
class Batching:
    """How the cloud shares its passes between sessions (cloud/sessions.py)."""

    # Rows a causal block (a prompt) contributes to one pass: a long prompt goes in chunks between the other
    # sessions' steps.  Smaller chunks keep their steps quicker; larger ones finish a prompt in fewer passes.
    prefill_chunk: int = 256
    # Rows in one pass, all sessions together (a single forward larger than this still goes alone): bounds
    # a pass's activations and its latency when many prompts arrive at once.
    max_batch_tokens: int = 2048
    # When the compute frees while sessions of the last two passes have not sent their next forward, wait up
    # to this long for them: their frames are usually a loopback hop away, and a pass that misses them makes
    # them wait a whole pass.  0 starts every pass at once with whatever is waiting.
    gather_ms: float = 2.0
