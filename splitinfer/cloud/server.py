"""The cloud server's sockets: a websockets endpoint for frames and a Flask app for /health.

The WebSocket side is asyncio; each frame is decoded and checked in a worker
thread and its forward queued for CloudCore's scheduler, which computes every
waiting session's rows in one pass (sessions.py), so the event loop keeps
accepting and answering other connections.  One connection has at most one
frame in work and a short queue behind it, so a peer that floods gets rows in
the passes like any other connection, and its backlog costs bounded memory.

Security (see docs/security.md): with a token, the WebSocket handshake needs
`Authorization: Bearer <token>` (compared in constant time) or is refused with
HTTP 401 before any frame is read; /health hides sessions and tensor names
without it.  Every malformed frame gets a typed error reply, never a traceback.

Strangers' connections are bounded (admission.py): the open-file limit is raised
to its hard limit and shared out so that neither port's strangers can use the
descriptors authenticated connections need; /health runs on waitress
(webserver.py), which caps and times out its connections; refusals are logged
rate-limited, so nobody can flood the log.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import ipaddress
import itertools
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from flask import Flask, jsonify, request
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .. import protocol
from ..config import Batching
from ..protocol import ProtocolError
from ..webserver import HttpLimits, RateLimitedLog, create_http_server, raise_open_file_limit
from .admission import (
    HANDSHAKE_TIMEOUT_S,
    PENDING_HANDSHAKES,
    WS_ACCEPT_BURST,
    Descriptors,
    PendingHandshakes,
    close_if_failed,
    counted_connection,
    open_file_limit,
    plan_descriptors,
)
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


def auth_refusal(headers: list[str], token: str | None) -> str | None:
    """Why the Authorization headers of a handshake do not authorise it; None when they do."""
    if token is None:
        return None
    if not headers:
        return "no token"
    if len(headers) > 1:  # which one would count is ambiguous, and proxies disagree: neither
        return "several Authorization headers"
    return None if _token_ok(headers[0], token) else "a wrong token"


# Seconds an HTTP connection may sit idle (or take to send its request) on the /health port.  waitress
# closes it within this plus its cleanup interval, 25 s by default.
HTTP_IDLE_TIMEOUT_S = HttpLimits().idle_timeout


def health_limits(connections: int, idle_timeout: int = HTTP_IDLE_TIMEOUT_S) -> HttpLimits:
    """The /health port's limits: a few threads (the answer is a small dict), `connections` at once."""
    return HttpLimits(
        threads=4,
        connection_limit=connections,
        idle_timeout=idle_timeout,
        cleanup_interval=max(1, min(5, idle_timeout // 2)),
        max_body_bytes=4096,  # GET /health has no body
    )


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
        # What strangers can cause is logged at most a few lines per interval (webserver.RateLimitedLog).
        self.refusals = RateLimitedLog(log, "refused a WebSocket handshake")
        self.closures = RateLimitedLog(log, "closed an unanswered WebSocket connection")

    # -- websocket -----------------------------------------------------------------

    def _check_auth(self, connection: ServerConnection, req: Request) -> Response | None:
        """websockets' process_request: refuse the handshake (no frame is ever read) unless authorised."""
        why = auth_refusal(req.headers.get_all("Authorization"), self.token)
        if why is not None:
            self.refusals(f"{why} (HTTP 401)", detail=f"from {_peer(connection)}")
            response = connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="splitinfer"'
            return response
        if self.connections >= self.max_connections:
            self.refusals("at the connection limit (HTTP 503)",
                          detail=f"from {_peer(connection)}, {self.connections} open")
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        return None

    async def _check_before_answer(self, connection: ServerConnection, req: Request, response: Response) -> None:
        """websockets' process_response: a connection that already failed gets no answer (admission.py)."""
        if await close_if_failed(connection):
            self.closures("bytes that are not WebSocket frames arrived before the handshake was answered",
                          detail=f"from {_peer(connection)}")

    def _pending_cap_reached(self) -> None:
        self.closures("pending-handshake cap reached: closed the oldest")

    async def _handler(self, ws: ServerConnection) -> None:
        conn = next(self._conn_ids)
        self.connections += 1
        log.info("connection %d from %s (%d open)", conn, _peer(ws), self.connections)
        try:
            while True:
                try:
                    # A connection silent for twice as long as a session may idle (its sessions have expired
                    # by then) is closed, so idle peers cannot hold every connection slot; the local side
                    # reconnects if it comes back.
                    message = await asyncio.wait_for(ws.recv(), timeout=2 * self.core.limits.idle_seconds)
                except TimeoutError:
                    await ws.close(1000, "idle")
                    break
                pending = await asyncio.to_thread(self._reply, conn, message)
                await ws.send(await asyncio.wrap_future(pending))
        except ConnectionClosed:
            pass
        finally:
            self.connections -= 1
            dropped = await asyncio.to_thread(self.core.drop_connection, conn)
            log.info("connection %d closed (%s), %d session(s) dropped", conn, _close_reason(ws), dropped)

    def _reply(self, conn: int, message: bytes | str) -> Future:
        """One message -> the future of one reply frame, whatever the message holds; never raises."""
        if isinstance(message, str):
            return _answered(protocol.error("bad_frame", "frames are binary messages, not text"))
        try:
            frame = protocol.decode(message, max_frame_bytes=self.core.limits.max_frame_bytes)
        except ProtocolError as exc:
            # A peer of another protocol version is answered in its own, so that it can read why.
            return _answered(protocol.error(exc.code, exc.message, version=exc.peer_version))
        except (RecursionError, MemoryError, ValueError, TypeError, OverflowError) as exc:  # JSON nested too deep
            log.info("connection %d sent an undecodable frame: %s", conn, type(exc).__name__)
            return _answered(protocol.error("bad_header", "the header could not be parsed"))
        try:
            return self.core.submit(conn, frame)
        except Exception:  # a bug must not take other sessions down, nor leak a traceback to the peer
            log.exception("internal error on connection %d", conn)
            step = frame.header.get("step")
            return _answered(
                protocol.error("internal", "the server failed on this frame", step if isinstance(step, int) else None)
            )

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, min(5.0, self.core.limits.idle_seconds / 4)))
            try:
                await asyncio.to_thread(self.core.expire)
            except Exception:  # never let housekeeping die silently and sessions pile up
                log.exception("expiring sessions failed")

    async def _log_flush_loop(self) -> None:
        """Summaries of rate-limited log lines come out even when the events that fill them stop."""
        while True:
            await asyncio.sleep(1.0)
            self.refusals.flush()
            self.closures.flush()

    async def serve_ws(
        self, host: str, port: int, ready: threading.Event | None = None, pending_cap: int = PENDING_HANDSHAKES
    ) -> None:
        pending = PendingHandshakes(pending_cap, self._pending_cap_reached)
        async with serve(
            self._handler,
            host,
            port,
            process_request=self._check_auth,
            process_response=self._check_before_answer,
            create_connection=counted_connection(pending),
            open_timeout=HANDSHAKE_TIMEOUT_S,  # a connection that does not finish its handshake is closed
            backlog=WS_ACCEPT_BURST,  # what asyncio accepts at once before PendingHandshakes counts it
            # The frame's declared length is checked against max_size before its payload is read; a
            # larger frame closes that connection with 1009 (message too big), and nothing else.
            max_size=self.core.limits.max_frame_bytes,
            max_queue=MAX_QUEUED_FRAMES,
            compression=None,  # activations do not compress; deflate would only cost CPU
            server_header=None,  # no version banner for scanners
        ):
            housekeeping = [asyncio.create_task(self._expiry_loop()), asyncio.create_task(self._log_flush_loop())]
            if ready is not None:
                ready.set()
            try:
                await asyncio.Future()  # run until cancelled
            finally:
                for task in housekeeping:
                    task.cancel()

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
                "identity": self.core.identity.to_json() if self.core.identity is not None else None,
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

    def run(self, host: str, http_port: int, ws_port: int, http_idle_timeout: int = HTTP_IDLE_TIMEOUT_S) -> None:
        """Serve both ports until interrupted."""
        _warn_if_exposed(host, self.token)
        descriptors = self._share_descriptors()
        web = create_http_server(
            self.health_app(), host, http_port, health_limits(descriptors.http_connections, http_idle_timeout)
        )
        threading.Thread(target=web.run, name="health", daemon=True).start()
        log.info("cloud server: health on http://%s:%d/health (idle connections closed after %d s), frames on "
                 "ws://%s:%d", host, http_port, http_idle_timeout, host, ws_port)
        serve = self.serve_ws(host, ws_port, pending_cap=descriptors.pending_handshakes)
        try:
            if self.core.has_passes_thread:
                asyncio.run(serve)
            else:  # the passes in this thread, the one that loaded the layers (CloudCore.serve_passes says why)
                self._frames_beside_passes(serve)
        finally:
            web.close()

    def _frames_beside_passes(self, serve) -> None:
        """The WebSocket side in a thread of its own while this thread runs the passes; either ending ends both."""
        failed: list[BaseException] = []

        def frames() -> None:
            try:
                asyncio.run(serve)
            except BaseException as exc:  # e.g. the port is taken: the main thread re-raises it
                failed.append(exc)
            finally:
                self.core.close()

        threading.Thread(target=frames, name="frames", daemon=True).start()
        self.core.serve_passes()
        if failed:
            raise failed[0]

    def _share_descriptors(self) -> Descriptors:
        """Raise the open-file limit and share it out (admission.py); lowers max_connections if it must."""
        before = open_file_limit()
        raise_open_file_limit()  # the soft limit (often 1024) to the hard one: connections need descriptors
        try:
            descriptors = plan_descriptors(open_file_limit(), self.max_connections)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
        if descriptors.max_connections < self.max_connections:
            log.warning("the open-file limit allows %d WebSocket connections, not %d: serving %d (raise `ulimit -n`)",
                        descriptors.max_connections, self.max_connections, descriptors.max_connections)
            self.max_connections = descriptors.max_connections
        raised = f" (soft limit raised from {before})" if descriptors.limit != before else ""
        log.info("descriptors: %s%s", descriptors.describe(), raised)
        return descriptors


def _answered(reply: bytes) -> Future:
    done: Future = Future()
    done.set_result(reply)
    return done


def _warn_if_exposed(host: str, token: str | None) -> None:
    if is_loopback(host):
        return
    if token is None:
        log.warning("listening on %s WITHOUT a token: anyone who can reach it can use these layers; "
                    "give --auth-token-file and put TLS in front (docs/security.md)", host)
    else:
        log.warning("listening on %s: frames and the token travel in clear unless TLS is in front "
                    "(docs/security.md)", host)


def _peer(ws: ServerConnection) -> str:
    try:
        host, port = ws.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError, OSError):
        return "?"


def _close_reason(ws: ServerConnection) -> str:
    code = ws.close_code
    return "no close frame" if code is None else f"code {code}{' ' + ws.close_reason if ws.close_reason else ''}"


def _runs(indices: list[int], devices: list) -> list[tuple[str, list[int]]]:
    """Consecutive layers on one device: [(device, [layer indices])] in order (for the start-up log)."""
    runs: list[tuple[str, list[int]]] = []
    for i, d in zip(indices, devices):
        if runs and runs[-1][0] == str(d):
            runs[-1][1].append(i)
        else:
            runs.append((str(d), [i]))
    return runs


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
    *,
    max_sessions: int | None = None,
    max_cache_tokens: int | None = None,
    max_frame_bytes: int | None = None,
    batching: Batching = Batching(),
    passes_thread: bool = True,
    seed: int | None = None,
    device_map: str | None = None,
) -> CloudServer:
    """Load the cloud's layers (and nothing else) and wrap them in a server.

    With `passes_thread` False the passes run in the thread that calls CloudServer.run (the cloud command's
    main thread, which loaded the layers); else in a thread of their own, for callers that serve_ws themselves.

    `seed`: the layers are drawn from it (models.RandomWeights), not read from files.  `device_map`: auto,
    balanced or a JSON file spreading the layers over several devices (placement.py); `device` is then the
    first layer's.
    `limits` holds the bounds the user set; sessions, connections and the frame size left as None are
    derived from the memory available once the layers are loaded (cloud/memory.py).
    """
    from ..config import Split
    from ..models import default_device, dtype_name, load_config, resolve_dtype, resolve_model
    from ..identity import of_model
    from ..kernels import use_kernels
    from ..parts import describe, load_cloud
    from .memory import Geometry, derive_limits

    model_dir = resolve_model(model, weights=seed is None)
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    split = Split.of(load_config(model_dir).num_hidden_layers, cloud_start, cloud_end)
    span, config, held = load_cloud(model_dir, split, device, torch_dtype, seed, device_map)
    if device_map is not None:
        device = str(span.devices[0])
        log.info("device map %s: %s", device_map, ", ".join(
            f"layers {run[0]}..{run[-1]} on {d}" for d, run in _runs(span.indices, span.devices)))
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
    # Computed from the files (or the seed), as the local side computes what it expects: no tensor loaded.
    identity = of_model(model_dir, config, split.cloud_layers, seed)
    log.info("cloud identity: layers %s, weights digest %s", identity.layers, identity.weights[:12])
    budget = derive_limits(
        Geometry.of(config, len(split.cloud_layers), torch_dtype),
        limits,
        max_sessions=max_sessions,
        max_cache_tokens=max_cache_tokens,
        max_connections=max_connections,
        max_frame_bytes=max_frame_bytes,
        max_batch_tokens=batching.max_batch_tokens,
    )
    log.info("%s", budget.describe())
    log.info("batching: prompts in chunks of %d rows, at most %d rows in one pass", batching.prefill_chunk,
             batching.max_batch_tokens)
    core = CloudCore(span, config, device, torch_dtype, budget.limits, identity, batching, passes_thread)
    info = ServerInfo(
        model=str(model_dir),
        layers=list(split.cloud_layers),
        held=summary,
        ws_port=ws_port,
        device=device,
        dtype=dtype_name(torch_dtype),
    )
    return CloudServer(core, info, token, budget.max_connections)
