"""The wire to the cloud: one persistent WebSocket, frames out and replies in, typed errors.

`CloudConnection.request` sends one frame and returns the reply with its `WireTiming`;
everything that goes wrong comes back as a `CloudError` with the protocol's error code.
Nothing here knows about sessions surviving a loss (recovery.py) or about tokens.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from .. import protocol
from ..identity import Identity
from ..protocol import ProtocolError


class CloudError(RuntimeError):
    """The cloud refused a request or could not be reached; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"cloud: {code}: {message}")
        self.code, self.message = code, message
        self.retry_after = retry_after  # seconds, with `busy`: when the cloud expects to have room


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


# WebSocket close codes the server uses on purpose (RFC 6455): not a lost link, so not retried.
_CLOSE_CODES = {1009: "too_large", 1008: "policy", 1007: "bad_frame", 1002: "bad_frame"}

# A reply is never larger than its request; this caps what a hostile or broken server can make us buffer.
MAX_REPLY_BYTES = 256 << 20


class CloudConnection:
    """One persistent connection; sessions are opened on it."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        open_timeout: float = 10.0,
        reply_timeout: float = 60.0,
        close_timeout: float = 2.0,
    ):
        self.url, self.reply_timeout = url, reply_timeout
        self.open_timeout, self.close_timeout = open_timeout, close_timeout
        self._token = token  # kept for reconnecting; never logged
        self.max_frame_bytes: int | None = None  # the server's limit, once a session tells us
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._stack = ExitStack()  # websockets wants its connections used as context managers
        try:
            self.ws: ClientConnection = self._stack.enter_context(connect(
                url,
                additional_headers=headers,
                open_timeout=open_timeout,
                close_timeout=close_timeout,  # a dead peer must not hold up a reconnect
                max_size=MAX_REPLY_BYTES,
                compression=None,
                proxy=None,  # the tunnel is the route; never a proxy from the environment
            ))
        except InvalidStatus as exc:
            code = exc.response.status_code
            if code == 401:
                raise CloudError("auth", f"{url} refused the handshake (HTTP 401): missing or wrong token") from None
            if code == 503:
                raise CloudError("busy", f"{url} is at its connection limit (HTTP 503)") from None
            raise CloudError("handshake", f"{url} answered HTTP {code}") from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise CloudError("unreachable", f"cannot connect to {url}: {exc}") from None

    def reconnect(self, open_timeout: float | None = None) -> "CloudConnection":
        """A new connection to the same server with the same token and timeouts."""
        return CloudConnection(
            self.url,
            self._token,
            open_timeout=self.open_timeout if open_timeout is None else open_timeout,
            reply_timeout=self.reply_timeout,
            close_timeout=self.close_timeout,
        )

    def request(
        self, header: dict[str, Any], tensors: dict[str, np.ndarray] | None = None, *, timeout: float | None = None
    ) -> tuple[protocol.Frame, WireTiming]:
        timeout = self.reply_timeout if timeout is None else timeout
        t0 = time.perf_counter()
        data = protocol.encode(header, tensors)
        if self.max_frame_bytes is not None and len(data) > self.max_frame_bytes:
            # The server would close the connection on it (WebSocket 1009); say why instead.
            raise CloudError("too_large", f"a {len(data)}-byte frame exceeds the server's {self.max_frame_bytes}")
        t1 = time.perf_counter()
        try:
            self.ws.send(data)
            raw = self.ws.recv(timeout=timeout)
        except TimeoutError:
            raise CloudError("timeout", f"no reply from {self.url} within {timeout:g} s") from None
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            if code in _CLOSE_CODES:
                raise CloudError(_CLOSE_CODES[code], f"{self.url} closed the connection: {exc}") from None
            if exc.sent is not None and exc.sent.code == 1009:
                raise CloudError("bad_reply", f"{self.url} sent a reply over {MAX_REPLY_BYTES} bytes") from None
            raise CloudError("disconnected", f"connection to {self.url} lost: {exc}") from None
        except OSError as exc:
            raise CloudError("disconnected", f"connection to {self.url} lost: {exc}") from None
        t2 = time.perf_counter()
        try:
            frame = protocol.decode(raw, max_frame_bytes=1 << 40, replies=True)
        except ProtocolError as exc:
            if exc.code == "version":  # an older or newer cloud: say so, not "bad reply"
                raise CloudError("version", f"{self.url}: {exc.message}") from None
            raise CloudError("bad_reply", exc.message) from None
        t3 = time.perf_counter()
        if frame.op == "error":
            hint = frame.header.get("retry_after")
            raise CloudError(str(frame.header.get("code", "error")), str(frame.header.get("message", "")),
                             float(hint) if isinstance(hint, (int, float)) and 0 <= hint <= 60 else None)
        if frame.step != header.get("step", 0) or (header.get("session") and frame.session != header["session"]):
            raise CloudError("bad_reply", f"a reply for step {frame.step!r} of another session or step")
        timing = WireTiming(
            serialize_ms=((t1 - t0) + (t3 - t2)) * 1000.0,
            wait_ms=(t2 - t1) * 1000.0,
            cloud_ms=float(frame.header.get("cloud_ms", 0.0)),
            bytes_sent=len(data),
            bytes_received=len(raw),
        )
        return frame, timing

    def open_raw(self, *, expected: Identity | None) -> tuple[str, dict[str, Any]]:
        """Open a session; returns its id and the server's limits.

        `expected` is what the cloud must compute (LocalSide.identity): any difference in what
        `opened` states raises CloudError "mismatch" before a single activation is sent.  Only a
        test or tool speaking raw protocol, with no model of its own, passes None.
        """
        frame, _ = self.request({"op": "open", "session": None, "step": 0})
        if expected is not None:
            check_identity(self.url, frame.header.get("identity"), expected)
        limits = frame.header.get("limits") or {}
        if isinstance(limits.get("max_frame_bytes"), int):
            self.max_frame_bytes = limits["max_frame_bytes"]
        return frame.session, limits

    def close(self) -> None:
        self._stack.close()


def check_identity(url: str, stated: Any, expected: Identity) -> None:
    """Refuse a cloud whose stated identity differs from `expected`: CloudError "mismatch" names each difference."""
    if stated is None:
        raise CloudError("mismatch", f"{url} does not state which layers and weights it holds")
    try:
        found = Identity.from_json(stated)
    except ValueError as exc:
        raise CloudError("bad_reply", f"{url} stated a malformed identity: {exc}") from None
    differences = found.differences(expected)
    if differences:
        raise CloudError("mismatch", f"{url} computes something else: {'; '.join(differences)}")
