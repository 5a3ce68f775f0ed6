"""Local side of splitinfer, serving clients: an OpenAI-compatible HTTP API over the split model.

The tokenizer, embedding, first and last layers and LM head run here; the middle
layers run on the cloud server (`splitinfer cloud`), reached over one WebSocket per
request (the spec's SSH tunnel: --cloud http://localhost:5000 means the WebSocket is
localhost:5001).  Only float16 activations cross that link: no text, no token ids.

Without --prompt it serves clients (mac_client.py, the official `openai` package,
anything OpenAI-compatible) on --host:--port:

    POST /v1/chat/completions, POST /v1/completions  (stream: true -> server-sent events)
    GET  /v1/models, GET /health

At start it asks the cloud whether a request would succeed (reachable, token accepted,
same model and layers) and logs a warning naming the problem if not.
With --prompt it generates once, prints the text and exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..cli import (
    HelpFormatter, add_local_args, add_model_args, drafter_problem, fail, model_problem, read_token, setup,
)
from ..config import DEFAULT_MAX_BODY_BYTES, HTTP_PORT, LOCAL_SERVER_PORT, WS_PORT

if TYPE_CHECKING:  # the real imports wait until the arguments are parsed
    from flask import Flask

    from ..local import LocalSide
    from ..serve.guard import AccessPolicy

log = logging.getLogger("splitinfer.serve")

EPILOG = f"""\
examples:
  # serve clients on 127.0.0.1:{LOCAL_SERVER_PORT}, the cloud behind the SSH tunnel on :{HTTP_PORT}/:{WS_PORT}
  %(prog)s --cloud http://localhost:{HTTP_PORT}
  # one generation, then exit
  %(prog)s --prompt "Why is the sky blue?" --max-new-tokens 64

when serving, --max-new-tokens is the max_tokens of requests that set none, and --mode
decodes requests without a temperature (greedy); a temperature > 0 samples instead, one
token per round trip whatever --mode.  See docs/local_server.md for the three-process
setup (cloud, local server, client).
"""


def byte_size(text: str) -> int:
    """An argparse type: a size in bytes, "4194304", "4096K" or "4M"."""
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not (digits.isascii() and digits.isdigit()) or int(digits) * scale < 1024:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size of at least 1024 bytes (e.g. 4M)")
    return int(digits) * scale


def origin_arg(text: str) -> str:
    """An argparse type: a web origin, kept as given once it parses."""
    from ..serve.guard import origin  # the serve package imports torch: only when an origin is given

    if origin(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not an origin: give scheme://host[:port], no path")
    return text


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter)
    add_model_args(p, random=True)
    add_local_args(p)
    g = p.add_argument_group("serving clients (without --prompt)")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; keep loopback and reach it from another machine through an SSH tunnel "
        "(ssh -L), or bind a LAN address only on a trusted network, with --api-key-file",
    )
    g.add_argument(
        "--port",
        type=int,
        default=LOCAL_SERVER_PORT,
        help=f"HTTP port for clients; ports {HTTP_PORT} and {WS_PORT} on this machine are the SSH tunnel's "
        "to the cloud (its HTTP health and WebSocket), hence the next one",
    )
    g.add_argument(
        "--served-model-name",
        default=None,
        help="model id reported by /v1/models and in responses (default: the model directory's name); "
        "requests may name any model",
    )
    g = p.add_argument_group(
        "who may use the API (see docs/local_server.md)",
        "Host must name this server (localhost, a loopback address, --host, an --allowed-host;\n"
        "any IP address when --host is 0.0.0.0 or ::), else 421, so a web page cannot reach the\n"
        "API by pointing its own domain at this machine (DNS rebinding).  A browser's Origin\n"
        "must be this server at --port or an --allowed-origin, else 403.  Bodies must be\n"
        "application/json (else 415) and at most --max-body-bytes (else 413).",
    )
    g.add_argument(
        "--allowed-host",
        action="append",
        metavar="NAME",
        help="a host name clients may use to reach this server besides localhost and --host, e.g. the "
        "machine's LAN name (repeatable)",
    )
    g.add_argument(
        "--allowed-origin",
        action="append",
        type=origin_arg,
        metavar="ORIGIN",
        help="a web page origin (scheme://host[:port], e.g. http://localhost:3000) allowed to call the API "
        "from a browser, with CORS headers (repeatable; default: none besides this server itself)",
    )
    g.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="file whose first line is the API key every request must send as 'Authorization: Bearer KEY' "
        "(the openai package's api_key, mac_client.py --api-key-file); without it, no key is asked for",
    )
    g.add_argument(
        "--max-body-bytes",
        type=byte_size,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="SIZE",
        help="largest request body accepted, in bytes (suffix K or M for KiB or MiB); a larger one is refused "
        "(413) before it is read",
    )
    g = p.add_argument_group("one-shot use")
    g.add_argument("--prompt", default=None, help="generate once for this prompt, print the text and exit (no server)")
    g.add_argument("--raw", action="store_true", help="with --prompt: send the prompt as is, without the chat template")
    g.add_argument("--json", action="store_true", help="with --prompt: print one JSON object instead of the text")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.prompt is None and (args.raw or args.json):
        p.error("--raw and --json go with --prompt")
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    return args


def one_shot(local: LocalSide, args: argparse.Namespace, token: str | None) -> int:
    from ..remote import CloudError, cloud_session, ws_url

    try:
        url = ws_url(args.cloud, args.cloud_ws)
        with cloud_session(url, token, expected=local.identity, reconnect_timeout=args.reconnect_timeout) as span:
            g = local.generate(span, local.encode(args.prompt, args.raw), args.max_new_tokens, args.mode)
    except CloudError as exc:
        return fail(exc)
    print(json.dumps(g.as_dict()) if args.json else g.text)
    return 0


def bind_problem(host: str, port: int) -> str | None:
    """Why --host:--port cannot be served, checked before the model loads; None when it can."""
    try:
        socket.create_server((host, port)).close()
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno else str(exc)
    return None


def access_policy(args: argparse.Namespace, api_key: str | None) -> AccessPolicy:
    from ..serve.guard import AccessPolicy

    hosts, origins = frozenset(args.allowed_host or ()), frozenset(args.allowed_origin or ())
    return AccessPolicy(args.host, args.port, hosts, origins, api_key)


def build_app(local: LocalSide, args: argparse.Namespace, token: str | None, api_key: str | None) -> Flask:
    from ..remote import ws_url
    from ..serve import create_app

    return create_app(
        local,
        ws_url(args.cloud, args.cloud_ws),
        token,
        args.mode,
        cloud_http_url=args.cloud if "://" in args.cloud else f"http://{args.cloud}",
        model_name=args.served_model_name,
        default_max_tokens=args.max_new_tokens,
        reconnect_timeout=args.reconnect_timeout,
        policy=access_policy(args, api_key),
        max_body_bytes=args.max_body_bytes,
    )


def warn_unless_ready(app: Flask) -> None:
    """Ask the cloud now, as /health would, so a wrong address, token or split shows at start, not per request."""
    from ..serve.app import readiness

    body, _ = readiness(app.extensions["splitinfer"])
    if problems := body.get("problems"):
        log.warning("requests will fail until this is fixed (GET /health tells): %s", "; ".join(problems))
    else:
        log.info("the cloud at %s is ready for this split", body["cloud"].get("url") or body["cloud"].get("ws_url"))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if problem := model_problem(args.model, weights=args.random_weights is None) or drafter_problem(args.model, args.drafter):
        return fail(problem)
    setup(args)
    token = read_token(args.auth_token_file)
    api_key = read_token(args.api_key_file) if args.api_key_file else None  # never the cloud's variable
    if args.prompt is None and (problem := bind_problem(args.host, args.port)):
        return fail(f"cannot serve on {args.host}:{args.port}: {problem}")
    from ..local import LocalSide
    from ..models import ModelError
    from ..serve import serve
    from ..serve.guard import is_loopback

    try:
        local = LocalSide(
            args.model, args.cloud_start, args.cloud_end, args.device, args.dtype, args.kernels, args.drafter,
            memory_dir=None if args.no_memory else args.memory_dir, seed=args.random_weights,
        )
    except ModelError as exc:
        return fail(exc)
    try:
        if args.prompt is not None:
            return one_shot(local, args, token)
        app = build_app(local, args, token, api_key)
        warn_unless_ready(app)
        if api_key is None and not is_loopback(args.host):
            log.warning("serving on %s without --api-key-file: anyone who can reach this port can use the model", args.host)
        serve(app, args.host, args.port)
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, or the address is not ours
        return fail(f"cannot serve on {args.host}:{args.port}: {exc}")
    finally:
        local.close()  # keeps lookahead's memory for the next run
    return 0
