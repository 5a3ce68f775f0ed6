"""The Flask app: OpenAI-compatible endpoints over a `Service`.

    POST /v1/chat/completions   chat, streamed (server-sent events) or not
    POST /v1/completions        plain text completion, streamed or not
    GET  /v1/models             the one model served
    GET  /health                this server and the cloud behind it

Run it threaded (`serve()` does, on waitress): each request holds its own cloud session.
Before any work a request must pass `guard.check` (Host, Origin, API key), carry a JSON
body no larger than `max_body_bytes`, and a prompt whose characters alone do not prove
it too long for the context (`Tokenization.check_length`, in tokens.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from ..config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MODE
from ..local import LocalSide
from ..remote import RECONNECT_TIMEOUT_S, CloudError
from ..webserver import HttpLimits, RateLimitedLog, create_http_server
from . import api, guard
from .api import APIError, Refused, Shapes
from .guard import AccessPolicy
from .service import Job, Service
from .waitress_errors import json_errors

log = logging.getLogger(__name__)

JSON_TYPES = frozenset({"application/json"})


def cloud_error(exc: CloudError) -> APIError:
    log.warning("%s", exc)
    detail = str(exc).removeprefix(f"cloud: {exc.code}: ")
    return APIError(f"The cloud server failed ({exc.code}): {detail}", None, f"cloud_{exc.code}", 502, "server_error")


def error_response(exc: APIError) -> Response:
    response = jsonify(exc.body())
    response.status_code = exc.status
    return response


def too_large(max_body_bytes: int) -> Refused:
    return Refused(
        f"The request body is larger than this server accepts ({max_body_bytes} bytes; jacobi_server.py "
        "--max-body-bytes).",
        "request_too_large",
        413,
        "body too large",
    )


def require_json(content_type: str | None, mimetype: str) -> None:
    """Refuse a body that is not declared JSON: a web page can send text/plain or a form without a preflight."""
    if mimetype not in JSON_TYPES:
        raise Refused(
            f"Unsupported Content-Type {(content_type or 'none')[:80]!r}: send the body as application/json.",
            "unsupported_media_type",
            415,
            "not application/json",
        )


def disconnected(environ: dict[str, Any]) -> bool:
    """Whether the client of this request has hung up (waitress tells; other servers: never)."""
    check = environ.get("waitress.client_disconnected")
    return bool(check()) if check is not None else False


def token_problem(service: Service, cloud: dict[str, Any]) -> str | None:
    """Whether the cloud refuses this side's token: its /health shows sessions only to a request it accepts."""
    if not cloud.get("reachable") or not cloud.get("auth_required") or "sessions_open" in cloud:
        return None
    if service.token is None:
        return "the cloud requires a token and this side has none (--auth-token-file or $SPLITINFER_AUTH_TOKEN)"
    return "the cloud refuses this side's token (--auth-token-file or $SPLITINFER_AUTH_TOKEN)"


def readiness(service: Service) -> tuple[dict[str, Any], int]:
    """`Service.health`, token included: "ok" (200) only when a request would succeed, else its problems (503)."""
    body, status = service.health()
    if problem := token_problem(service, body.get("cloud") or {}):
        body["status"] = "degraded"
        body["problems"] = [*body.get("problems", []), problem]
        status = 503
    return body, status


def create_app(
    local: LocalSide,
    cloud_ws_url: str,
    token: str | None = None,
    mode: str = DEFAULT_MODE,
    *,
    cloud_http_url: str | None = None,
    model_name: str | None = None,
    default_max_tokens: int = 128,
    strategy_options: dict[str, Any] | None = None,
    reconnect_timeout: float | None = RECONNECT_TIMEOUT_S,
    policy: AccessPolicy | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Flask:
    """An app serving `local` with the cloud at `cloud_ws_url` (sessions opened per request).

    `mode` names a greedy strategy in `splitinfer.decoding.strategies.STRATEGIES`; requests
    with temperature > 0 sample instead.  `cloud_http_url` is the cloud's HTTP address, for
    /health; `default_max_tokens` applies when a request sets no max_tokens.  `policy` says
    which Host, Origin and API key requests must carry (default: a loopback server without a
    key); bodies above `max_body_bytes` are refused (413).
    """
    policy = policy or AccessPolicy()
    refused = RateLimitedLog(log, "refused requests")
    service = Service(
        local,
        cloud_ws_url,
        token,
        mode,
        cloud_http_url=cloud_http_url,
        model_name=model_name,
        default_max_tokens=default_max_tokens,
        strategy_options=strategy_options,
        reconnect_timeout=reconnect_timeout,
        tokenizer_copies=HttpLimits().threads,  # one per worker thread of serve(), made now
    )
    app = Flask("splitinfer.serve")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes  # waitress refuses first; this covers other servers
    app.extensions["splitinfer"] = service
    app.extensions["splitinfer.refused"] = refused  # serve() logs waitress's own refusals here too

    @app.before_request
    def admit():
        """Host, Origin and key first: nothing else runs for a request from where it should not come."""
        preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        guard.check(
            policy,
            request.headers.get("Host"),
            request.headers.get("Origin"),
            request.headers.get("Authorization"),
            preflight,
        )
        if preflight:  # an allowed page asks whether it may POST JSON with a key: it may
            return Response(status=204, headers=guard.CORS_HEADERS)
        return None

    @app.after_request
    def cors(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is not None and policy.origin_ok(origin):  # refused origins never reach a response body
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
        return response

    @app.errorhandler(APIError)
    def on_api_error(exc: APIError):
        if isinstance(exc, Refused):
            refused(exc.reason, detail=f"from {request.remote_addr}{exc.detail}")
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException):
        if exc.code == 413:
            return on_api_error(too_large(max_body_bytes))
        kind = "invalid_request_error" if (exc.code or 500) < 500 else "server_error"
        return error_response(APIError(f"{exc.name}: {exc.description}", None, None, exc.code or 500, kind))

    @app.errorhandler(Exception)
    def on_error(exc: Exception):
        log.exception("internal error")
        return error_response(APIError("The server failed on this request.", None, "internal", 500, "server_error"))

    @app.get("/health")
    def health():
        body, status = readiness(service)
        return jsonify(body), status

    def model_card() -> dict[str, Any]:
        return {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "splitinfer"}

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/<path:model>")
    def model(model: str):
        if model != service.model_name:
            message = f"The model '{model}' does not exist; this server serves '{service.model_name}'."
            raise APIError(message, "model", "model_not_found", 404)
        return jsonify(model_card())

    def body() -> Any:
        require_json(request.content_type, request.mimetype)
        data = request.get_json(silent=True)
        if data is None:
            message = "We could not parse the JSON body of your request: send a JSON object."
            raise APIError(message, None, "invalid_json")
        return data

    @app.post("/v1/chat/completions")
    def chat():
        return complete(api.parse_chat(body()))

    @app.post("/v1/completions")
    def completions():
        return complete(api.parse_completion(body()))

    def complete(req: api.Request):
        job = service.job(req)
        shapes = Shapes(req.kind, service.model_name)
        stack = ExitStack()
        try:
            span = stack.enter_context(service.session())
        except CloudError as exc:
            raise cloud_error(exc) from None
        if req.stream:
            response = Response(stream(job, span, shapes, stack), mimetype="text/event-stream")
            response.headers["Cache-Control"] = "no-cache"
            response.headers["X-Accel-Buffering"] = "no"
            response.call_on_close(stack.close)  # also when the stream never started
            return response
        steps = service.run(job, span)
        with stack, closing(steps):  # closing: a generation left early counts as cancelled
            text, last = [], None
            try:
                for step in steps:
                    text.append(step.text)
                    last = step
                    if disconnected(request.environ):  # nobody waits for the answer: stop generating
                        return client_gone()
            except CloudError as exc:
                raise cloud_error(exc) from None
        assert last is not None and last.finish_reason is not None
        use = api.usage(len(job.prompt_ids), last.completion_tokens)
        return jsonify(shapes.response("".join(text), last.finish_reason, use, last.extension))

    def client_gone() -> Response:
        """What a request whose client hung up returns: nobody reads it, waitress only needs an answer."""
        log.info("client gone: generation stopped")
        return error_response(APIError("The client closed the connection.", None, "client_closed", 499))

    def stream(job: Job, span, shapes: Shapes, stack: ExitStack) -> Iterator[bytes]:
        """Server-sent events; closing this generator (the client went away) stops the generation."""
        req = job.request
        steps = service.run(job, span)
        try:
            if req.kind == "chat":  # the role comes first, before any round trip
                yield api.sse(shapes.chunk(None, None, None, req.include_usage, first=True))
            last = None
            for step in steps:
                last = step
                if step.text or step.finish_reason:
                    yield api.sse(shapes.chunk(step.text, step.finish_reason, step.extension, req.include_usage))
                else:
                    yield api.SSE_KEEPALIVE  # nothing to show this round trip; a write notices a gone client
            steps.close()
            stack.close()  # generation is over: the cloud session is closed before the client hears [DONE]
            if req.include_usage and last is not None:
                use = api.usage(len(job.prompt_ids), last.completion_tokens)
                yield api.sse(shapes.usage_chunk(use, last.extension))
            yield api.SSE_DONE
        except CloudError as exc:  # headers are gone: the error travels as an event (openai raises APIError)
            yield api.sse(cloud_error(exc).body())
        except Exception:
            log.exception("internal error while streaming")
            yield api.sse(APIError("The server failed on this request.", None, "internal", 500, "server_error").body())
        finally:
            steps.close()
            stack.close()

    return app


def waitress_refusal(app: Flask) -> Callable[[int, str, str], bytes]:
    """The JSON body of a request waitress refuses before the app sees it (a body too large, bad framing)."""
    refused: RateLimitedLog = app.extensions["splitinfer.refused"]
    max_body_bytes: int = app.config["MAX_CONTENT_LENGTH"]

    def body(status: int, reason: str, detail: str) -> bytes:
        if status == 413:
            exc = too_large(max_body_bytes)
        else:  # malformed framing, headers too large: waitress's words, in the API's shape
            kind = "invalid_request_error" if status < 500 else "server_error"
            exc = Refused(f"{reason}: {detail}", reason.lower().replace(" ", "_"), status, f"HTTP {status}")
            exc.type = kind
        refused(exc.reason)
        return json.dumps(exc.body()).encode()

    return body


def serve(app: Flask, host: str, port: int) -> None:
    """Serve until interrupted, on waitress: a pool of worker threads, bodies capped at the app's limit.

    waitress, unlike werkzeug's development server, sends no Server banner, refuses an
    oversized body from its Content-Length before reading it, and tells a request when its
    client has hung up (see `disconnected`).
    """
    # waitress refuses a body of max_request_body_size bytes or more; the app's limit is the largest allowed.
    limits = HttpLimits(max_body_bytes=app.config["MAX_CONTENT_LENGTH"] + 1)
    server = create_http_server(app, host, port, limits)
    json_errors(server, waitress_refusal(app))
    log.info("serving OpenAI-compatible API on http://%s:%d/v1 (health: /health)", host, port)
    try:
        server.run()
    finally:
        server.close()
