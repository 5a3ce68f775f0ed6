"""The cloud server's sockets: a websockets endpoint for frames and a Flask app for /health.

The WebSocket side is asyncio; each frame is decoded and computed in a worker
thread (CloudCore's lock serialises compute), so the event loop keeps accepting
and answering other connections.  One connection has at most one frame in
work and a short queue behind it, so a peer that floods competes for the
compute like any other connection, and its backlog costs bounded memory.

Security (see docs/security.md): with a token, the WebSocket handshake needs
`Authorization: Bearer <token>` (compared in constant time) or is refused with
HTTP 401 before any frame is read; /health hides sessions and tensor names
without it.  Every malformed frame gets a typed error reply, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import ipaddress
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
    """Whether an Authorization header carries the token; True when the server has none."""
    if token is None:
        return True
    if header is None:
        return False
    try:
        given = header.encode("utf-8", "surrogateescape")  # header bytes as received
    except UnicodeError:
        return False
    # compare_digest takes time independent of where the bytes differ (not of their lengths,
    # which tell an attacker nothing useful about the token's value).
    return hmac.compare_digest(given, f"Bearer {token}".encode())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# Frames a connection may have received and not yet handled: one in work, one waiting.  Each can be
# up to max_frame_bytes, so this bounds what one peer can make the server hold.
MAX_QUEUED_FRAMES = 2


class CloudServer:
    def __init__(self, core: CloudCore, info: ServerInfo, token: str | None = None, max_connections: int | None = None):
        self.core, self.info, self.token = core, info, token
        self.max_connections = max_connections or 4 * core.limits.max_sessions
        self._conn_ids = itertools.count(1)
        self.connections = 0  # open WebSocket connections (only the event loop changes it)

    # -- websocket -----------------------------------------------------------------

    def _check_auth(self, connection: ServerConnection, req) -> Any:
        """websockets' process_request: refuse the handshake (no frame is ever read) unless authorised."""
        if not _token_ok(req.headers.get("Authorization"), self.token):
            why = "no token" if req.headers.get("Authorization") is None else "a wrong token"
            log.warning("refused a WebSocket handshake from %s: %s (HTTP 401)", _peer(connection), why)
            response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="splitinfer"'
            return response
        if self.connections >= self.max_connections:
            log.warning("refused a WebSocket handshake from %s: %d connections open (HTTP 503)",
                        _peer(connection), self.connections)
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        conn = next(self._conn_ids)
        self.connections += 1
        log.info("connection %d from %s (%d open)", conn, _peer(ws), self.connections)
        try:
            async for message in ws:
                reply = await asyncio.to_thread(self._reply, conn, message)
                await ws.send(reply)
        except ConnectionClosed:
            pass
        finally:
            self.connections -= 1
            dropped = await asyncio.to_thread(self.core.drop_connection, conn)
            log.info("connection %d closed (%s), %d session(s) dropped", conn, _close_reason(ws), dropped)

    def _reply(self, conn: int, message: bytes | str) -> bytes:
        """One message -> one reply frame, whatever the message holds; never raises."""
        if isinstance(message, str):
            return protocol.error("bad_frame", "frames are binary messages, not text")
        try:
            frame = protocol.decode(message, max_frame_bytes=self.core.limits.max_frame_bytes)
        except ProtocolError as exc:
            return protocol.error(exc.code, exc.message)
        except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as exc:  # JSON nested too deep
            log.info("connection %d sent an undecodable frame: %s", conn, type(exc).__name__)
            return protocol.error("bad_header", "the header could not be parsed")
        try:
            return self.core.handle(conn, frame)
        except Exception:  # a bug must not take other sessions down, nor leak a traceback to the peer
            log.exception("internal error on connection %d", conn)
            step = frame.header.get("step")
            return protocol.error("internal", "the server failed on this frame", step if isinstance(step, int) else None)

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, min(5.0, self.core.limits.idle_seconds / 4)))
            try:
                await asyncio.to_thread(self.core.expire)
            except Exception:  # never let housekeeping die silently and sessions pile up
                log.exception("expiring sessions failed")

    async def serve_ws(self, host: str, port: int, ready: threading.Event | None = None) -> None:
        async with serve(
            self._handler,
            host,
            port,
            process_request=self._check_auth,
            # The frame's declared length is checked against max_size before its payload is read; a
            # larger frame closes that connection with 1009 (message too big), and nothing else.
            max_size=self.core.limits.max_frame_bytes,
            max_queue=MAX_QUEUED_FRAMES,
            compression=None,  # activations do not compress; deflate would only cost CPU
            server_header=None,  # no version banner for scanners
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
        if not is_loopback(host):
            if self.token is None:
                log.warning("listening on %s WITHOUT a token: anyone who can reach it can use these layers; "
                            "give --auth-token-file and put TLS in front (docs/security.md)", host)
            else:
                log.warning("listening on %s: frames and the token travel in clear unless TLS is in front "
                            "(docs/security.md)", host)
        web = make_server(host, http_port, self.health_app(), threaded=True)
        threading.Thread(target=web.serve_forever, name="health", daemon=True).start()
        log.info("cloud server: health on http://%s:%d/health, frames on ws://%s:%d", host, http_port, host, ws_port)
        try:
            asyncio.run(self.serve_ws(host, ws_port))
        finally:
            web.shutdown()


def _peer(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError, OSError):
        return "?"


def _close_reason(ws: ServerConnection) -> str:
    code = ws.close_code
    return "no close frame" if code is None else f"code {code}{' ' + ws.close_reason if ws.close_reason else ''}"


def build(
    model: str | None,
    cloud_start: int | None,
    cloud_end: int | None,
    device: str | None,
    dtype: str | None,
    limits,
    ws_port: int,
    token: str | None = None,
    max_connections: int | None = None,
    kernels: str = "auto",
) -> CloudServer:
    """Load the cloud's layers (and nothing else) and wrap them in a server."""
    from ..config import Split
    from ..models import default_device, dtype_name, load_config, resolve_dtype, resolve_model
    from ..kernels import use_kernels
    from ..parts import describe, load_cloud

    model_dir = resolve_model(model)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    split = Split.from_cloud_range(load_config(model_dir).num_hidden_layers, cloud_start, cloud_end)
    span, config, held = load_cloud(model_dir, split, device, torch_dtype)
    packed = use_kernels([span], config, kernels, device, torch_dtype)
    summary = describe(held)
    log.info(
        "cloud side: %s, layers %d..%d, %d tensors, %.1fM parameters, %s %s, %d linear maps packed",
        model_dir,
        split.cloud_layers.start,
        split.cloud_layers.stop - 1,
        summary["tensors"],
        summary["parameters"] / 1e6,
        device,
        dtype_name(torch_dtype),
        packed,
    )
    core = CloudCore(span, config, device, torch_dtype, limits)
    info = ServerInfo(
        model=str(model_dir),
        layers=list(split.cloud_layers),
        held=summary,
        ws_port=ws_port,
        device=device,
        dtype=dtype_name(torch_dtype),
    )
    return CloudServer(core, info, token, max_connections)
