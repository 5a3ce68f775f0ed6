"""The Flask app: OpenAI-compatible endpoints over a `Service`.

    POST /v1/chat/completions   chat, streamed (server-sent events) or not
    POST /v1/completions        plain text completion, streamed or not
    GET  /v1/models             the one model served
    GET  /health                this server and the cloud behind it

Run it threaded (`serve()` does): each request holds its own cloud session.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from ..local import LocalSide
from ..remote import RECONNECT_TIMEOUT_S, CloudError
from . import api
from .api import APIError, Shapes
from .service import Job, Service

log = logging.getLogger(__name__)


def cloud_error(exc: CloudError) -> APIError:
    log.warning("%s", exc)
    detail = str(exc).removeprefix(f"cloud: {exc.code}: ")
    return APIError(f"The cloud server failed ({exc.code}): {detail}", None, f"cloud_{exc.code}", 502, "server_error")


def error_response(exc: APIError) -> Response:
    response = jsonify(exc.body())
    response.status_code = exc.status
    return response


def create_app(
    local: LocalSide,
    cloud_ws_url: str,
    token: str | None = None,
    mode: str = "sequential",
    *,
    cloud_http_url: str | None = None,
    model_name: str | None = None,
    default_max_tokens: int = 128,
    strategy_options: dict[str, Any] | None = None,
    reconnect_timeout: float | None = RECONNECT_TIMEOUT_S,
) -> Flask:
    """An app serving `local` with the cloud at `cloud_ws_url` (sessions opened per request).

    `mode` names a greedy strategy in `splitinfer.decoding.strategies.STRATEGIES`; requests
    with temperature > 0 sample instead.  `cloud_http_url` is the cloud's HTTP address, for
    /health; `default_max_tokens` applies when a request sets no max_tokens.
    """
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
    )
    app = Flask("splitinfer.serve")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["splitinfer"] = service

    @app.errorhandler(APIError)
    def on_api_error(exc: APIError):
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException):
        kind = "invalid_request_error" if (exc.code or 500) < 500 else "server_error"
        return error_response(APIError(f"{exc.name}: {exc.description}", None, None, exc.code or 500, kind))

    @app.errorhandler(Exception)
    def on_error(exc: Exception):
        log.exception("internal error")
        return error_response(APIError("The server failed on this request.", None, "internal", 500, "server_error"))

    @app.get("/health")
    def health():
        body, status = service.health()
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
        data = request.get_json(force=True, silent=True)
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
        with stack:
            text, last = [], None
            try:
                for step in service.run(job, span):
                    text.append(step.text)
                    last = step
            except CloudError as exc:
                raise cloud_error(exc) from None
        assert last is not None and last.finish_reason is not None
        use = api.usage(len(job.prompt_ids), last.completion_tokens)
        return jsonify(shapes.response("".join(text), last.finish_reason, use, last.extension))

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


def serve(app: Flask, host: str, port: int) -> None:
    """Serve until interrupted: threaded, one thread per request."""
    server = make_server(host, port, app, threaded=True)
    log.info("serving OpenAI-compatible API on http://%s:%d/v1 (health: /health)", host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
