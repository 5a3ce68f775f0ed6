"""The cloud server's sockets: a websockets endpoint for frames and a Flask app for /health.

The WebSocket side is asyncio; compute runs in one worker thread (CloudCore's
lock serialises it), so the event loop keeps answering other connections.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import itertools
import logging
import threading
from dataclasses import dataclass
from typing import Any

from flask import Flask, jsonify, request
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from werkzeug.serving import make_server

from .. import protocol
from ..protocol import ProtocolError
from .sessions import CloudCore

log = logging.getLogger(__name__)


@dataclass
class ServerInfo:
    """What /health reports about this server (never about other users' sessions without the token)."""

    model: str
    layers: list[int]
    held: dict[str, Any]
    ws_port: int
    device: str
    dtype: str


def _token_ok(header: str | None, token: str | None) -> bool:
    if token is None:
        return True
    expected = f"Bearer {token}".encode()
    return header is not None and hmac.compare_digest(header.encode(), expected)  # constant time


class CloudServer:
    def __init__(self, core: CloudCore, info: ServerInfo, token: str | None = None):
        self.core, self.info, self.token = core, info, token
        self._conn_ids = itertools.count(1)

    # -- websocket -----------------------------------------------------------------

    def _check_auth(self, connection: ServerConnection, req) -> Any:
        if not _token_ok(req.headers.get("Authorization"), self.token):
            log.warning("refused a WebSocket handshake from %s: missing or wrong token", connection.remote_address)
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        conn = next(self._conn_ids)
        log.info("connection %d from %s", conn, ws.remote_address)
        try:
            async for message in ws:
                reply = await asyncio.to_thread(self._reply, conn, message)
                await ws.send(reply)
        except ConnectionClosed:
            pass
        finally:
            dropped = self.core.drop_connection(conn)
            log.info("connection %d closed, %d session(s) dropped", conn, dropped)

    def _reply(self, conn: int, message: bytes | str) -> bytes:
        if isinstance(message, str):
            return protocol.error("bad_frame", "frames are binary messages, not text")
        try:
            frame = protocol.decode(message, max_frame_bytes=self.core.limits.max_frame_bytes)
        except ProtocolError as exc:
            return protocol.error(exc.code, exc.message)
        try:
            return self.core.handle(conn, frame)
        except Exception:  # a bug must not take other sessions down, nor leak a traceback to the peer
            log.exception("internal error on connection %d", conn)
            return protocol.error("internal", "the server failed on this frame", frame.header.get("step"))

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.core.limits.idle_seconds / 4))
            await asyncio.to_thread(self.core.expire)

    async def serve_ws(self, host: str, port: int, ready: threading.Event | None = None) -> None:
        async with serve(
            self._handler,
            host,
            port,
            process_request=self._check_auth,
            max_size=self.core.limits.max_frame_bytes,  # checked from the frame's length before reading it
            compression=None,  # activations do not compress; deflate would only cost CPU
        ):
            expiry = asyncio.create_task(self._expiry_loop())
            if ready is not None:
                ready.set()
            try:
                await asyncio.Future()  # run until cancelled
            finally:
                expiry.cancel()

    # -- http ------------------------------------------------------------------------

    def health_app(self) -> Flask:
        app = Flask("splitinfer.cloud")

        @app.get("/health")
        def health():
            body: dict[str, Any] = {
                "status": "ok",
                "protocol_version": protocol.VERSION,
                "ws_port": self.info.ws_port,
                "model": self.info.model,
                "layers": self.info.layers,
                "device": self.info.device,
                "dtype": self.info.dtype,
                "held": {"tensors": self.info.held["tensors"], "parameters": self.info.held["parameters"]},
                "auth_required": self.token is not None,
            }
            if _token_ok(request.headers.get("Authorization"), self.token):
                body["sessions_open"] = len(self.core.sessions)
                body["held"]["names"] = self.info.held["names"]
            return jsonify(body)

        return app

    def run(self, host: str, http_port: int, ws_port: int) -> None:
        """Serve both ports until interrupted."""
        web = make_server(host, http_port, self.health_app(), threaded=True)
        threading.Thread(target=web.serve_forever, name="health", daemon=True).start()
        log.info("cloud server: health on http://%s:%d/health, frames on ws://%s:%d", host, http_port, host, ws_port)
        try:
            asyncio.run(self.serve_ws(host, ws_port))
        finally:
            web.shutdown()


def build(
    model: str | None,
    cloud_start: int | None,
    cloud_end: int | None,
    device: str | None,
    dtype: str | None,
    limits,
    ws_port: int,
    token: str | None = None,
) -> CloudServer:
    """Load the cloud's layers (and nothing else) and wrap them in a server."""
    from ..config import Split
    from ..models import default_device, load_config, resolve_dtype, resolve_model
    from ..parts import describe, load_cloud

    model_dir = resolve_model(model)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    split = Split.from_cloud_range(load_config(model_dir).num_hidden_layers, cloud_start, cloud_end)
    span, config, held = load_cloud(model_dir, split, device, torch_dtype)
    summary = describe(held)
    log.info(
        "cloud side: %s, layers %d..%d, %d tensors, %.1fM parameters, %s %s",
        model_dir,
        split.cloud_layers.start,
        split.cloud_layers.stop - 1,
        summary["tensors"],
        summary["parameters"] / 1e6,
        device,
        str(torch_dtype).removeprefix("torch."),
    )
    core = CloudCore(span, config, device, torch_dtype, limits)
    info = ServerInfo(
        model=str(model_dir),
        layers=list(split.cloud_layers),
        held=summary,
        ws_port=ws_port,
        device=device,
        dtype=str(torch_dtype).removeprefix("torch."),
    )
    return CloudServer(core, info, token)
