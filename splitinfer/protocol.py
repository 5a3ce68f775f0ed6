"""The wire format, sans I/O: pure `encode` / `decode` between bytes and frames.

One frame (one binary WebSocket message):

    +----------------+----------------------+------------------------------+
    | 4 B header_len | header: UTF-8 JSON   | payload: raw tensors, packed |
    | big-endian u32 | (header_len bytes)   | back to back, little-endian  |
    +----------------+----------------------+------------------------------+

The header names every tensor with its dtype, shape, byte offset and byte
count inside the payload, so nothing is implied.  Floats are float16; masks
are bool (one byte per entry, 1 = may attend).  There is no pickle, base64 or
`torch.load` anywhere: a frame is JSON plus numbers, checked before use.

This module owns no sockets and no models; `docs/protocol.md` has a worked
byte-level example, and tests/test_protocol.py checks it against literal bytes.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# 2: `opened` states the cloud span's identity (splitinfer/identity.py), checked by the local side.
VERSION = 2
# Versions whose error frame has the layout `error` writes (v, op, session, step, code, message, tensors): a peer
# speaking one of them is refused in its own version, so that it reads a typed "version" error, not garbage.
ERROR_READABLE_BY = frozenset({1, 2})

# Requests (local -> cloud) and replies (cloud -> local).
REQUESTS = frozenset({"open", "forward", "crop", "relocate", "close"})
REPLIES = frozenset({"opened", "result", "ok", "error"})

DTYPES: dict[str, np.dtype] = {"float16": np.dtype("<f2"), "bool": np.dtype("|b1")}
TENSOR_NAMES = frozenset({"hidden", "cos", "sin", "mask"})
SESSION_RE = re.compile(r"^[0-9a-f]{32}$")  # 128 random bits, hex

MAX_HEADER_BYTES = 1 << 20
MAX_FRAME_BYTES = 64 << 20
_LEN = struct.Struct(">I")


class ProtocolError(ValueError):
    """Anything wrong with a frame.  `code` is stable and machine-readable; the message says what and why."""

    def __init__(self, code: str, message: str, peer_version: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.peer_version = peer_version  # set on a "version" error: the version the frame was written in


@dataclass
class Frame:
    header: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def op(self) -> str:
        return self.header["op"]

    @property
    def session(self) -> str | None:
        return self.header.get("session")

    @property
    def step(self) -> int:
        return self.header.get("step", 0)


# ---------------------------------------------------------------------------- encode


def encode(header: dict[str, Any], tensors: dict[str, np.ndarray] | None = None, *, version: int = VERSION) -> bytes:
    """Frame bytes for `header` (without its tensor table, which is filled in here) and `tensors`."""
    header = {"v": version, **header}
    table, chunks, offset = [], [], 0
    for name, array in (tensors or {}).items():
        dtype = _dtype_name(array.dtype)
        data = np.ascontiguousarray(array, dtype=DTYPES[dtype]).tobytes()
        table.append({"name": name, "dtype": dtype, "shape": list(array.shape), "offset": offset, "nbytes": len(data)})
        chunks.append(data)
        offset += len(data)
    header["tensors"] = table
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return _LEN.pack(len(raw)) + raw + b"".join(chunks)


def _dtype_name(dtype: np.dtype) -> str:
    if dtype == np.bool_:
        return "bool"
    if np.issubdtype(dtype, np.floating):
        return "float16"  # the wire is float16 whatever the compute dtype
    raise ProtocolError("bad_dtype", f"cannot send {dtype} tensors")


def error(
    code: str,
    message: str,
    step: int | None = None,
    session: str | None = None,
    *,
    version: int | None = None,
    retry_after: float | None = None,
) -> bytes:
    """An error reply: typed code and a human message, never a traceback.

    `version` is the peer's, when its frame was refused for speaking another one: the reply is
    written in it if its error frames look like ours (ERROR_READABLE_BY), else in ours.
    `retry_after` (seconds) comes with a `busy` refusal: when the same request may succeed.
    """
    version = version if version in ERROR_READABLE_BY else VERSION
    header = {"op": "error", "session": session, "step": step, "code": code, "message": message}
    if retry_after is not None:
        header["retry_after"] = retry_after
    return encode(header, version=version)


# ---------------------------------------------------------------------------- decode


def header_length(prefix: bytes) -> int:
    """The declared header length from the first 4 bytes, checked before anything else is read."""
    if len(prefix) < 4:
        raise ProtocolError("truncated", f"frame of {len(prefix)} bytes has no 4-byte length prefix")
    (n,) = _LEN.unpack_from(prefix)
    if n > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {n} bytes exceeds {MAX_HEADER_BYTES}")
    return n


def decode(
    data: bytes, *, max_frame_bytes: int = MAX_FRAME_BYTES, replies: bool = False, version: int = VERSION
) -> Frame:
    """Parse and validate one frame; raise ProtocolError on anything malformed.

    `version` is the one expected; only a reader of an older peer's frames (a test, a tool) changes it.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("bad_frame", "frames are binary messages")
    data = bytes(data)
    if len(data) > max_frame_bytes:
        raise ProtocolError("too_large", f"frame of {len(data)} bytes exceeds {max_frame_bytes}")
    n = header_length(data)
    if len(data) < 4 + n:
        raise ProtocolError("truncated", f"header declares {n} bytes, only {len(data) - 4} follow")
    header = _parse_header(data[4 : 4 + n], replies, version)
    payload = memoryview(data)[4 + n :]
    return Frame(header, _read_tensors(header["tensors"], payload))


def _parse_header(raw: bytes, replies: bool, version: int) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, huge ints
        raise ProtocolError("bad_header", f"header is not UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header must be a JSON object")
    peer = header.get("v")
    if peer != version:
        raise ProtocolError(
            "version",
            f"the peer speaks protocol version {peer!r}, this side speaks version {version}",
            peer if _is_int(peer, 0) else None,
        )
    ops = REPLIES if replies else REQUESTS
    if header.get("op") not in ops:
        raise ProtocolError("unknown_op", f"op {header.get('op')!r} is not one of {sorted(ops)}")
    session = header.get("session")
    if session is not None and not (isinstance(session, str) and SESSION_RE.match(session)):
        raise ProtocolError("bad_header", "session must be 32 lowercase hex digits")
    step = header.get("step")
    if step is not None and not _is_int(step, 0):
        raise ProtocolError("bad_header", "step must be a non-negative integer")
    if not isinstance(header.get("tensors"), list):
        raise ProtocolError("bad_header", "header lacks its tensor table")
    return header


def _reject_constant(name: str) -> None:
    raise ProtocolError("bad_header", f"{name} is not allowed in the header")


def _is_int(value: Any, lo: int = -(1 << 62), hi: int = 1 << 62) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _read_tensors(table: list, payload: memoryview) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for entry in table:
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "offset", "nbytes"}:
            raise ProtocolError("bad_header", "each tensor entry needs exactly name, dtype, shape, offset, nbytes")
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if name not in TENSOR_NAMES:
            raise ProtocolError("bad_tensor", f"unknown tensor {name!r}")
        if name in tensors:
            raise ProtocolError("bad_tensor", f"tensor {name!r} appears twice")
        if dtype not in DTYPES:
            raise ProtocolError("bad_dtype", f"tensor {name!r} has dtype {dtype!r}; allowed: {sorted(DTYPES)}")
        if not (isinstance(shape, list) and 1 <= len(shape) <= 4 and all(_is_int(d, 0, 1 << 24) for d in shape)):
            raise ProtocolError("bad_shape", f"tensor {name!r} has shape {shape!r}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if entry["nbytes"] != nbytes or entry["offset"] != offset:
            raise ProtocolError(
                "bad_length",
                f"tensor {name!r} {dtype}{shape} needs {nbytes} bytes at offset {offset}, "
                f"header says {entry['nbytes']!r} at {entry['offset']!r}",
            )
        if offset + nbytes > len(payload):
            raise ProtocolError("truncated", f"tensor {name!r} runs past the end of the payload")
        array = np.frombuffer(payload, dtype=DTYPES[dtype], count=math.prod(shape), offset=offset).reshape(shape)
        if dtype == "float16" and not np.isfinite(array).all():
            raise ProtocolError("not_finite", f"tensor {name!r} holds NaN or Inf")
        tensors[name] = array
        offset += nbytes
    if offset != len(payload):
        raise ProtocolError("bad_length", f"payload has {len(payload) - offset} bytes that no tensor declares")
    return tensors


# ---------------------------------------------------------------------------- op checks


def check_edits(edits: Any) -> list[dict[str, Any]]:
    """Cache edits riding on a forward (or sent alone): crop to a length, or keep a path."""
    if edits is None:
        return []
    if not isinstance(edits, list) or len(edits) > 8:
        raise ProtocolError("bad_edit", "edits must be a list of at most 8 edits")
    for edit in edits:
        check_edit(edit)
    return edits


def check_edit(edit: Any) -> None:
    if not isinstance(edit, dict):
        raise ProtocolError("bad_edit", "an edit is a JSON object")
    if edit.get("op") == "crop":
        if set(edit) != {"op", "length"} or not _is_int(edit["length"], 0):
            raise ProtocolError("bad_edit", "crop takes one non-negative integer length")
    elif edit.get("op") == "relocate":
        if set(edit) != {"op", "start", "indices"} or not _is_int(edit["start"], 0):
            raise ProtocolError("bad_edit", "relocate takes a non-negative start and a list of indices")
        indices = edit["indices"]
        if not (isinstance(indices, list) and len(indices) <= 4096 and all(_is_int(i, 0) for i in indices)):
            raise ProtocolError("bad_edit", "relocate indices must be at most 4096 non-negative integers")
    else:
        raise ProtocolError("bad_edit", f"unknown edit {edit.get('op')!r}")


def check_forward(frame: Frame, hidden_size: int, head_dim: int, max_tokens: int) -> int:
    """Shapes of a forward frame against the model; returns q, the number of new tokens."""
    t = frame.tensors
    for name in ("hidden", "cos", "sin"):
        if name not in t:
            raise ProtocolError("bad_tensor", f"forward needs a {name!r} tensor")
        if t[name].dtype != DTYPES["float16"]:
            raise ProtocolError("bad_dtype", f"{name!r} must be float16")
    if set(t) - {"hidden", "cos", "sin", "mask"}:
        raise ProtocolError("bad_tensor", "forward takes hidden, cos, sin and an optional mask")
    shape = t["hidden"].shape
    if len(shape) != 3 or shape[0] != 1 or shape[2] != hidden_size or shape[1] < 1:
        raise ProtocolError("bad_shape", f"hidden must be [1, q, {hidden_size}] with q >= 1, got {list(shape)}")
    q = shape[1]
    if q > max_tokens:
        raise ProtocolError("limit", f"{q} tokens in one step exceeds the server's {max_tokens}")
    for name in ("cos", "sin"):
        if t[name].shape != (1, q, head_dim):
            raise ProtocolError("bad_shape", f"{name} must be [1, {q}, {head_dim}], got {list(t[name].shape)}")
    if "mask" in t:
        mask = t["mask"]
        if mask.dtype != DTYPES["bool"] or mask.ndim != 2 or mask.shape[0] != q or mask.shape[1] < q:
            raise ProtocolError("bad_shape", f"mask must be bool [{q}, {q}] (block) or [{q}, past + {q}] (full)")
        if not mask[:, -q:].diagonal().all():
            raise ProtocolError("bad_mask", "every new token must attend to itself")
    check_edits(frame.header.get("edits"))
    return q
