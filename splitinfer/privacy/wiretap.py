"""What actually crosses the socket: a wire tap on the WAN proxy and a WebSocket (RFC 6455) frame parser.

`WireTap` is an observer for `splitinfer.wan.WanEmulator`: the proxy hands it every
byte it writes into either socket, per connection and direction, exactly as it
travelled.  `tapped(port)` puts a zero-delay emulator with a tap in front of a real
server.  `client_messages` then undoes the WebSocket framing (client frames are
masked, which is obfuscation, not encryption, so the unmasked payload is what a
network observer can read) and yields the binary messages the cloud received.
The privacy tests run their checks on these bytes, not on what the code intends
to send.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..wan import UP, Forward, Link, WanEmulator

# ---------------------------------------------------------------------------- the tap


@dataclass
class Capture:
    """Bytes of one proxied TCP connection, per direction, in order."""

    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)


class WireTap:
    """Records what a WanEmulator forwards: one `Capture` per connection, in the order they were accepted.

    Pass it as the emulator's `observer`; it is called on the emulator's thread, so read it
    through `snapshot()`.
    """

    def __init__(self) -> None:
        self._captures: dict[int, Capture] = {}
        self._lock = threading.Lock()

    def __call__(self, connection: int, direction: int, data: bytes) -> None:
        with self._lock:
            capture = self._captures.setdefault(connection, Capture())
            (capture.to_server if direction == UP else capture.to_client).extend(data)

    def snapshot(self) -> list[Capture]:
        """A copy of what has been captured so far, by connection id (the tap keeps appending)."""
        with self._lock:
            return [Capture(bytearray(c.to_server), bytearray(c.to_client))
                    for _, c in sorted(self._captures.items())]


@contextlib.contextmanager
def tapped(upstream_port: int, upstream_host: str = "127.0.0.1") -> Iterator[tuple[WireTap, int]]:
    """A zero-delay WAN proxy to the upstream with a tap on it: yields (tap, local port to connect to)."""
    tap = WireTap()
    with WanEmulator(Link(), [Forward(0, upstream_host, upstream_port)], observer=tap).running() as wan:
        yield tap, wan.addresses[0][1]


# ---------------------------------------------------------------------------- RFC 6455 framing

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


@dataclass
class WsFrame:
    fin: bool
    opcode: int
    masked: bool
    payload: bytes  # unmasked


def split_handshake(stream: bytes) -> tuple[bytes, bytes]:
    """(HTTP upgrade request or response, the WebSocket byte stream after it)."""
    end = stream.find(b"\r\n\r\n")
    if end < 0:
        raise ValueError("no complete HTTP handshake in the stream")
    return bytes(stream[: end + 4]), bytes(stream[end + 4 :])


def parse_frames(data: bytes, expect_masked: bool | None = None) -> list[WsFrame]:
    """Every complete WebSocket frame in `data`; a trailing partial frame is an error."""
    frames: list[WsFrame] = []
    i, n = 0, len(data)
    while i < n:
        if n - i < 2:
            raise ValueError(f"truncated frame header at byte {i}")
        b0, b1 = data[i], data[i + 1]
        fin, opcode, masked, length = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
        if b0 & 0x70:
            raise ValueError("reserved bits set: an extension (compression?) is in use")
        i += 2
        if length == 126:
            (length,) = struct.unpack_from(">H", data, i)
            i += 2
        elif length == 127:
            (length,) = struct.unpack_from(">Q", data, i)
            i += 8
        key = b""
        if masked:
            key = data[i : i + 4]
            i += 4
        if expect_masked is not None and masked != expect_masked:
            raise ValueError(f"frame at byte {i} is {'masked' if masked else 'unmasked'}, against RFC 6455")
        if i + length > n:
            raise ValueError(f"truncated frame payload at byte {i}")
        payload = data[i : i + length]
        i += length
        if masked:
            mask = np.frombuffer((key * (length // 4 + 1))[:length], dtype=np.uint8)
            payload = (np.frombuffer(payload, dtype=np.uint8) ^ mask).tobytes()
        frames.append(WsFrame(fin, opcode, masked, bytes(payload)))
    return frames


def messages(frames: Iterable[WsFrame]) -> list[tuple[int, bytes]]:
    """Reassemble fragmented data messages: [(opcode, payload)], control frames included as they come."""
    out: list[tuple[int, bytes]] = []
    current: tuple[int, bytearray] | None = None
    for f in frames:
        if f.opcode >= 0x8:  # control frames may interleave with fragments
            out.append((f.opcode, f.payload))
            continue
        if f.opcode == OP_CONTINUATION:
            if current is None:
                raise ValueError("continuation frame without a message to continue")
            current[1].extend(f.payload)
        else:
            if current is not None:
                raise ValueError("new data message before the previous one finished")
            current = (f.opcode, bytearray(f.payload))
        if f.fin:
            out.append((current[0], bytes(current[1])))
            current = None
    return out


def client_messages(capture: Capture) -> tuple[bytes, list[tuple[int, bytes]]]:
    """(the HTTP upgrade request, every client->server WebSocket message, unmasked)."""
    handshake, rest = split_handshake(bytes(capture.to_server))
    return handshake, messages(parse_frames(rest, expect_masked=True))


def server_messages(capture: Capture) -> tuple[bytes, list[tuple[int, bytes]]]:
    handshake, rest = split_handshake(bytes(capture.to_client))
    return handshake, messages(parse_frames(rest, expect_masked=False))


# ---------------------------------------------------------------------------- searching the bytes

INT_DTYPES = ("<i2", ">i2", "<u2", ">u2", "<i4", ">i4", "<i8", ">i8")


def id_patterns(ids: Sequence[int], window: int = 3) -> Iterable[tuple[str, int, bytes]]:
    """(dtype, start, bytes) for every run of `window` consecutive ids, in every integer encoding."""
    for dtype in INT_DTYPES:
        info = np.iinfo(np.dtype(dtype))
        for start in range(0, len(ids) - window + 1):
            run = ids[start : start + window]
            if all(info.min <= t <= info.max for t in run):
                yield dtype, start, np.asarray(run, dtype=dtype).tobytes()


def find_id_runs(data: bytes, ids: Sequence[int], window: int = 3) -> list[tuple[str, int]]:
    """Every (dtype, start) whose run of `window` token ids occurs somewhere in `data`."""
    return [(dtype, start) for dtype, start, pattern in id_patterns(ids, window) if pattern in data]


def find_text(data: bytes, text: str, window: int = 8) -> list[str]:
    """Substrings of `text` (every `window`-byte run of its UTF-8, and the whole) found in `data`."""
    raw = text.encode("utf-8")
    hits = []
    if raw in data:
        hits.append(text)
    for start in range(0, max(0, len(raw) - window + 1)):
        piece = raw[start : start + window]
        if piece in data:
            hits.append(piece.decode("utf-8", errors="replace"))
    return hits


# ---------------------------------------------------------------------------- the running process


def mapped_files(pid: int) -> set[str]:
    """Paths of every file mapped into a process (shared libraries, mmapped weights)."""
    paths = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                paths.add(parts[5].strip())
    return paths


def memory_contains(pid: int, needles: Sequence[bytes], chunk: int = 1 << 24) -> list[bool]:
    """Whether each byte string occurs anywhere in the process's readable memory (/proc/PID/mem).

    Needs the right to read the process's memory (same user, ptrace allowed).
    Regions are read in overlapping chunks so a needle across a chunk edge is found.
    """
    found = [False] * len(needles)
    overlap = max(len(n) for n in needles)
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split(maxsplit=5)
            perms = parts[1]
            if not perms.startswith("r") or (len(parts) == 6 and parts[5].strip() in ("[vvar]", "[vsyscall]")):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            pos = lo
            while pos < hi:
                size = min(chunk + overlap, hi - pos)
                try:
                    mem.seek(pos)
                    data = mem.read(size)
                except (OSError, ValueError, OverflowError):
                    break
                for i, needle in enumerate(needles):
                    if not found[i] and needle in data:
                        found[i] = True
                if all(found):
                    return found
                pos += chunk
    return found
