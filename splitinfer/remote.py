"""The local side's view of the cloud: one persistent WebSocket, one session, frames in and out.

A `RemoteSpan` behaves like the cloud's layers called in-process: `forward`
takes hidden states and returns hidden states.  Cache edits (`crop`, keep a
path) are queued and ride in the header of the next `forward`, so a decoding
step is exactly one request and one reply.  Nothing here knows about tokens.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from . import protocol
from .protocol import ProtocolError

log = logging.getLogger(__name__)


class CloudError(RuntimeError):
    """The cloud refused a request or could not be reached; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"cloud: {code}: {message}")
        self.code = code


def ws_url(cloud: str, ws: str | None = None) -> str:
    """The WebSocket address: --cloud-ws as given, else --cloud's host with port + 1 (the spec's tunnel)."""
    if ws:
        return ws
    parts = urlsplit(cloud if "://" in cloud else f"http://{cloud}")
    if parts.hostname is None:
        raise ValueError(f"cannot read a host from --cloud {cloud!r}")
    port = (parts.port or (443 if parts.scheme == "https" else 80)) + 1
    scheme = "wss" if parts.scheme == "https" else "ws"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return urlunsplit((scheme, f"{host}:{port}", "", "", ""))


@dataclass
class WireTiming:
    """One round trip as the local side saw it."""

    serialize_ms: float  # encoding the request + decoding the reply
    wait_ms: float  # from the send to the reply, cloud compute included
    cloud_ms: float  # the cloud's own compute, from the reply header
    bytes_sent: int
    bytes_received: int

    @property
    def network_ms(self) -> float:
        return max(0.0, self.wait_ms - self.cloud_ms)


def to_wire(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float16).numpy()


class CloudConnection:
    """One persistent connection; sessions are opened on it."""

    def __init__(self, url: str, token: str | None = None, *, open_timeout: float = 10.0, reply_timeout: float = 60.0):
        self.url, self.reply_timeout = url, reply_timeout
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._stack = ExitStack()  # websockets wants its connections used as context managers
        try:
            self.ws: ClientConnection = self._stack.enter_context(connect(
                url,
                additional_headers=headers,
                open_timeout=open_timeout,
                max_size=None,  # replies are as large as our own requests
                compression=None,
                proxy=None,  # the tunnel is the route; never a proxy from the environment
            ))
        except InvalidStatus as exc:
            code = exc.response.status_code
            raise CloudError("auth" if code == 401 else "handshake", f"{url} answered HTTP {code}") from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise CloudError("unreachable", f"cannot connect to {url}: {exc}") from None

    def request(self, header: dict[str, Any], tensors: dict[str, np.ndarray] | None = None) -> tuple[protocol.Frame, WireTiming]:
        t0 = time.perf_counter()
        data = protocol.encode(header, tensors)
        t1 = time.perf_counter()
        try:
            self.ws.send(data)
            raw = self.ws.recv(timeout=self.reply_timeout)
        except TimeoutError:
            raise CloudError("timeout", f"no reply within {self.reply_timeout:.0f} s") from None
        except (ConnectionClosed, OSError) as exc:
            raise CloudError("disconnected", f"connection to {self.url} lost: {exc}") from None
        t2 = time.perf_counter()
        try:
            frame = protocol.decode(raw, max_frame_bytes=1 << 40, replies=True)
        except ProtocolError as exc:
            raise CloudError("bad_reply", exc.message) from None
        t3 = time.perf_counter()
        if frame.op == "error":
            raise CloudError(frame.header.get("code", "error"), frame.header.get("message", ""))
        timing = WireTiming(
            serialize_ms=((t1 - t0) + (t3 - t2)) * 1000.0,
            wait_ms=(t2 - t1) * 1000.0,
            cloud_ms=float(frame.header.get("cloud_ms", 0.0)),
            bytes_sent=len(data),
            bytes_received=len(raw),
        )
        return frame, timing

    def open_session(self) -> "RemoteSpan":
        frame, _ = self.request({"op": "open", "session": None, "step": 0})
        return RemoteSpan(self, frame.session, frame.header.get("limits", {}))

    def close(self) -> None:
        self._stack.close()


class RemoteSpan:
    """The cloud's layers for one session."""

    def __init__(self, conn: CloudConnection, session: str, limits: dict[str, int]):
        self.conn, self.session, self.limits = conn, session, limits
        self.max_step_tokens = int(limits.get("max_step_tokens", 512))
        self._step = 0
        self._edits: list[dict[str, Any]] = []
        self.last: WireTiming | None = None

    def crop(self, length: int) -> None:
        self._edits.append({"op": "crop", "length": length})

    def keep(self, start: int, indices: list[int]) -> None:
        self._edits.append({"op": "relocate", "start": start, "indices": list(indices)})

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block: torch.Tensor | None) -> torch.Tensor:
        """hidden [1, q, H], cos/sin [1, q, D], block [q, q] bool or None (plain chain) -> hidden [1, q, H]."""
        t0 = time.perf_counter()
        tensors = {"hidden": to_wire(hidden), "cos": to_wire(cos), "sin": to_wire(sin)}
        if block is not None:
            tensors["mask"] = block.cpu().numpy()
        pre_ms = (time.perf_counter() - t0) * 1000.0
        self._step += 1
        header = {"op": "forward", "session": self.session, "step": self._step}
        if self._edits:
            header["edits"] = self._edits
        frame, timing = self.conn.request(header, tensors)
        self._edits = []  # applied by the cloud before it ran this forward
        t1 = time.perf_counter()
        out = torch.from_numpy(frame.tensors["hidden"].copy()).to(hidden.device, hidden.dtype)
        timing.serialize_ms += pre_ms + (time.perf_counter() - t1) * 1000.0
        self.last = timing
        return out

    def close(self) -> None:
        self._step += 1
        try:
            self.conn.request({"op": "close", "session": self.session, "step": self._step})
        except CloudError as exc:
            log.debug("closing session: %s", exc)


@contextmanager
def cloud_session(url: str, token: str | None = None) -> Iterator[RemoteSpan]:
    """A connection and one session on it, both closed on exit (Petals' `inference_session` shape)."""
    conn = CloudConnection(url, token)
    try:
        span = conn.open_session()
        try:
            yield span
        finally:
            span.close()
    finally:
        conn.close()
