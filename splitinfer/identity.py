"""What the cloud computes, stated at `opened` and checked by the local side before any forward.

A cloud started with other layers (`--cloud-start 3`), another layer count or
other weights answers every frame without complaint: only the generated text
goes wrong, a few tokens later.  An `Identity` names what a cloud span is:

* the architecture fingerprint: hidden size, attention heads, kv heads, head
  dim and the model's layer count;
* the exact layer range, inclusive, as the command lines give it;
* a digest of that range's weights, read straight from the safetensors files
  (or, for weights drawn from a seed with --random-weights, of the seed).

Both sides compute it from a model directory and a layer range with the same
code, the cloud for what it loaded, the local side for what it expects, so
equal identities mean the same span of the same checkpoint.  The digest samples
the files (see `weights_digest`) instead of hashing them: it is computed once at
load, in milliseconds, without loading a tensor.  It catches a misconfigured or
restarted cloud; it proves nothing against a cloud that lies (the cloud is
untrusted and states its own identity).

This module reads bytes and JSON only: no torch, no transformers, no tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

# The digest's definition; changing any of these changes every digest, so it is versioned by the wire protocol.
DIGEST_DOMAIN = b"splitinfer-weights-digest-1\0"
RANDOM_DOMAIN = b"splitinfer-random-weights-1\0"
SAMPLE_WINDOWS = 16  # byte windows per tensor: first, last, and evenly spaced between
WINDOW_BYTES = 64
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own bound

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")  # the names models.materialise reads for a layer
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_INT_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_layers")
_LABELS = {
    "num_layers": "model layers",
    "hidden_size": "hidden size",
    "num_attention_heads": "attention heads",
    "num_key_value_heads": "kv heads",
    "head_dim": "head dim",
}


class TextConfig(Protocol):
    """The attributes of a (transformers) decoder config that the fingerprint reads."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int


@dataclass(frozen=True)
class Identity:
    """One cloud span: architecture, layers first..last (inclusive) and a digest of their weights."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_layers: int
    first_layer: int
    last_layer: int
    weights: str  # weights_digest(), 64 hex digits

    @property
    def layers(self) -> str:
        return f"{self.first_layer}..{self.last_layer}"

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {name: getattr(self, name) for name in _INT_FIELDS}
        return {**body, "layers": [self.first_layer, self.last_layer], "weights": self.weights}

    @classmethod
    def from_json(cls, value: Any) -> "Identity":
        """Parse a peer's identity; ValueError says what is malformed (it comes from the untrusted side)."""
        keys = {*_INT_FIELDS, "layers", "weights"}
        if not isinstance(value, dict) or set(value) != keys:
            raise ValueError(f"an identity is an object with exactly {sorted(keys)}")
        for name in _INT_FIELDS:
            if not _is_int(value[name], 1, 1 << 20):
                raise ValueError(f"identity {name} must be a positive integer, got {value[name]!r}")
        layers = value["layers"]
        if not (isinstance(layers, list) and len(layers) == 2 and all(_is_int(i, 0, 1 << 20) for i in layers)):
            raise ValueError(f"identity layers must be [first, last], got {layers!r}")
        if not layers[0] <= layers[1] < value["num_layers"]:
            raise ValueError(f"identity layers {layers!r} do not fit a {value['num_layers']}-layer model")
        if not (isinstance(value["weights"], str) and _DIGEST_RE.fullmatch(value["weights"])):
            raise ValueError("identity weights must be 64 lowercase hex digits")
        return cls(**{name: value[name] for name in _INT_FIELDS}, first_layer=layers[0], last_layer=layers[1],
                   weights=value["weights"])

    def differences(self, expected: "Identity") -> list[str]:
        """How this (the cloud's) identity differs from `expected`, a phrase each: "layers 3..27, expected 2..27"."""
        found = [
            f"{_LABELS[name]} {getattr(self, name)}, expected {getattr(expected, name)}"
            for name in _INT_FIELDS
            if getattr(self, name) != getattr(expected, name)
        ]
        if self.layers != expected.layers:
            found.append(f"layers {self.layers}, expected {expected.layers}")
        elif self.weights != expected.weights:
            # Only comparable over the same layers: another range always has another digest, and saying so
            # beside the range would only bury the real difference.
            found.append(f"weights digest {self.weights[:12]}, expected {expected.weights[:12]} (other weights)")
        return found


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def of_model(model_dir: Path, config: TextConfig, layers: range, seed: int | None = None) -> Identity:
    """The identity of `layers` of the model in `model_dir` (whose decoder config is `config`); with `seed`,
    of those layers drawn from it (models.RandomWeights) instead of read from the files."""
    if not layers:
        raise ValueError("an identity needs at least one layer")
    heads = config.num_attention_heads
    return Identity(
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        # As CloudCore and the rotary tables see it: an explicit head_dim wins over hidden / heads.
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        num_layers=config.num_hidden_layers,
        first_layer=layers.start,
        last_layer=layers.stop - 1,
        weights=weights_digest(model_dir, layers) if seed is None else random_digest(seed, layers),
    )


def random_digest(seed: int, layers: range) -> str:
    """The digest of `layers` drawn from `seed`: the draw is a function of (seed, tensor name) and the shapes
    are in the fingerprint, so the seed and the layer range say everything about the values."""
    body = json.dumps([seed, layers.start, layers.stop - 1], separators=(",", ":")).encode()
    return hashlib.sha256(RANDOM_DOMAIN + body).hexdigest()


# ---------------------------------------------------------------------------- the weights digest


@dataclass(frozen=True)
class _Entry:
    """One tensor as its safetensors header describes it; `start` is absolute in the file."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


def weights_digest(model_dir: Path, layers: range) -> str:
    """SHA-256 over every tensor of `layers`, in name order: its name, dtype, shape, byte count and sampled bytes.

    The samples are SAMPLE_WINDOWS windows of WINDOW_BYTES raw bytes each, the first at
    the tensor's start, the last at its end, the rest evenly spaced between (a tensor
    of at most SAMPLE_WINDOWS * WINDOW_BYTES bytes is taken whole).  The bytes come from
    the files as stored, so the digest does not depend on the dtype either side
    computes in, nor on how the checkpoint is sharded.  About 1 KiB read per tensor.
    """
    entries = _layer_entries(Path(model_dir), layers)
    digest = hashlib.sha256(DIGEST_DOMAIN)
    handles: dict[Path, BinaryIO] = {}
    try:
        for name in sorted(entries):
            e = entries[name]
            if e.path not in handles:
                handles[e.path] = open(e.path, "rb", buffering=0)  # unbuffered: each window reads its 64 bytes only
            f = handles[e.path]
            meta = json.dumps([name, e.dtype, list(e.shape), e.nbytes], separators=(",", ":")).encode()
            digest.update(struct.pack("<I", len(meta)) + meta)
            for offset in sample_offsets(e.nbytes):
                f.seek(e.start + offset)
                window = f.read(min(WINDOW_BYTES, e.nbytes - offset))
                digest.update(window)
    finally:
        for f in handles.values():
            f.close()
    return digest.hexdigest()


def sample_offsets(nbytes: int) -> list[int]:
    """Where the sampled windows of an `nbytes`-byte tensor start (relative to the tensor)."""
    if nbytes <= SAMPLE_WINDOWS * WINDOW_BYTES:
        return list(range(0, nbytes, WINDOW_BYTES))
    last = nbytes - WINDOW_BYTES
    return [k * last // (SAMPLE_WINDOWS - 1) for k in range(SAMPLE_WINDOWS)]


def _layer_entries(model_dir: Path, layers: range) -> dict[str, _Entry]:
    """Every tensor of `layers` in the model's safetensors files; each layer must have some."""
    wanted, found = set(layers), set()
    entries: dict[str, _Entry] = {}
    for path in _weight_files(model_dir):
        for name, entry in _read_header(path).items():
            m = _LAYER_RE.match(name)
            if m is None or int(m.group(1)) not in wanted:
                continue
            if name in entries:
                raise ValueError(f"{model_dir}: tensor {name} is in both {entries[name].path.name} and {path.name}")
            entries[name] = entry
            found.add(int(m.group(1)))
    missing = sorted(wanted - found)
    if missing:
        raise ValueError(f"{model_dir}: the safetensors files hold no tensors for layer(s) {missing}")
    return entries


def _weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's files: those its index names, or every *.safetensors when it has no index."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no *.safetensors weights")
    return files


def _read_header(path: Path) -> dict[str, _Entry]:
    """A safetensors file's tensor table: 8-byte little-endian length, JSON, then the data (offsets relative to it)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_SAFETENSORS_HEADER:
            raise ValueError(f"{path}: safetensors header of {n} bytes")
        header = json.loads(f.read(n))
        size = f.seek(0, 2)
    data_start = 8 + n
    table: dict[str, _Entry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= size - data_start:
            raise ValueError(f"{path}: tensor {name} has data_offsets {begin}..{end} outside the file")
        table[name] = _Entry(path, info["dtype"], tuple(info["shape"]), data_start + begin, end - begin)
    return table
