"""Cloud side of splitinfer: holds only the middle decoder layers and one KV cache per session.

It never loads the embedding, the LM head, the final norm or the tokenizer:
it sees float16 hidden states, rotary tables and masks, never text or token ids.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli import TOKEN_ENV, HelpFormatter, add_model_args, add_split_args, fail, model_problem, read_token, setup
from ..config import HTTP_PORT, WS_PORT, Batching, Limits
from ..webserver import HttpLimits

POSITIVE = ("max_sessions", "max_sessions_per_connection", "max_context", "max_step_tokens", "max_frame_mb",
            "idle_timeout", "max_connections", "http_idle_timeout", "max_cache_tokens", "prefill_chunk",
            "max_batch_tokens")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p, random=True)
    p.add_argument(
        "--device-map",
        default=None,
        metavar="auto|balanced|FILE",
        help="spread the cloud's layers over several devices with accelerate's device maps (whole layers; each "
        "session's cache follows its layers): auto fills the GPUs in order, balanced gives each the same share, "
        "FILE is a JSON map in accelerate's format ({\"model.layers.2\": 0, \"model.layers.16\": 1, ...}); "
        "overrides --device (docs/scaling.md)",
    )
    add_split_args(p.add_argument_group("the layers this cloud serves (the local side must say the same)"))
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; keep loopback and reach it through an SSH tunnel or a TLS proxy (docs/security.md)",
    )
    p.add_argument("--port", type=int, default=HTTP_PORT, help="HTTP port for GET /health")
    p.add_argument("--ws-port", type=int, default=WS_PORT, help="WebSocket port for activation frames")
    p.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help="file holding a shared secret (first line); clients must send it as 'Authorization: Bearer <token>' "
        f"or are refused at the handshake (HTTP 401); without it, ${TOKEN_ENV} if set, else no authentication",
    )
    d = Limits()
    g = p.add_argument_group(
        "limits",
        "what one server accepts; sessions, connections and the frame size default to what the memory available "
        "at start allows (the formula and its numbers are logged at start-up; docs/security.md, 'Memory')",
    )
    g.add_argument("--idle-timeout", type=float, default=d.idle_seconds,
                   help="seconds without a forward before a session is dropped")
    g.add_argument("--max-sessions", type=int, default=None, help="sessions held at once (default: from memory)")
    g.add_argument("--max-sessions-per-connection", type=int, default=d.max_sessions_per_connection,
                   help="sessions one connection may hold, so one peer cannot take every slot")
    g.add_argument("--max-context", type=int, default=d.max_context, help="tokens held in one session's cache")
    g.add_argument("--max-step-tokens", type=int, default=d.max_step_tokens, help="new tokens in one forward")
    g.add_argument("--max-connections", type=int, default=None,
                   help="WebSocket connections at once (default: from memory, at most 4 x sessions)")
    g.add_argument("--max-frame-mb", type=float, default=None,
                   help="largest frame accepted, MiB (default: the largest legal forward at --max-context and "
                   "--max-step-tokens)")
    g.add_argument("--max-cache-tokens", type=int, default=None,
                   help="cache entries all sessions together may reserve; each reserves its max_length (at most "
                   "--max-context) when it opens, and beyond this a new session is answered `busy` with a retry "
                   "hint (default: from memory)")
    b, dflt = p.add_argument_group("batching", "every waiting session's step runs in one pass (docs/batching.md)"), Batching()
    b.add_argument("--prefill-chunk", type=int, default=dflt.prefill_chunk,
                   help="rows a prompt contributes to one pass: a longer prompt goes in chunks between the other "
                   "sessions' steps (smaller: their steps wait less; larger: the prompt finishes in fewer passes)")
    b.add_argument("--max-batch-tokens", type=int, default=dflt.max_batch_tokens,
                   help="rows in one pass, all sessions together; bounds a pass's memory and latency")
    b.add_argument("--gather-ms", type=float, default=dflt.gather_ms,
                   help="when sessions of the last two passes have not sent their next step yet, wait up to "
                   "this long for them before starting a pass (0: start at once; a lone session never waits)")
    p.add_argument("--http-idle-timeout", type=int, default=HttpLimits().idle_timeout,
                   help="seconds an HTTP connection may sit idle or take to send its request before it is closed")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.gather_ms < 0:
        p.error("--gather-ms must be 0 or more")
    for name in POSITIVE:
        value = getattr(args, name)
        if value is not None and not value > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    if problem := model_problem(args.model, weights=args.random_weights is None):
        return fail(problem)
    setup(args)
    token = read_token(args.auth_token_file)  # before loading the model: a bad token file fails at once
    logging.getLogger("splitinfer.cloud").info(
        "authentication: %s", "bearer token required" if token else "OFF (no --auth-token-file or $" + TOKEN_ENV + ")"
    )
    from ..cloud.server import build
    from ..models import ModelError

    limits = Limits(
        max_context=args.max_context,
        max_step_tokens=args.max_step_tokens,
        idle_seconds=args.idle_timeout,
        max_sessions_per_connection=args.max_sessions_per_connection,
    )
    try:
        server = build(
            args.model, args.cloud_start, args.cloud_end, args.device, args.dtype, limits, args.ws_port,
            token, args.max_connections, args.kernels,
            max_sessions=args.max_sessions,
            max_cache_tokens=args.max_cache_tokens,
            batching=Batching(args.prefill_chunk, args.max_batch_tokens, args.gather_ms),
            passes_thread=False,  # server.run computes in this thread, which loads the layers
            max_frame_bytes=None if args.max_frame_mb is None else int(args.max_frame_mb * 2**20),
            seed=args.random_weights,
            device_map=args.device_map,
        )
    except ModelError as exc:
        return fail(exc)
    try:
        server.run(args.host, args.port, args.ws_port, http_idle_timeout=args.http_idle_timeout)
    except KeyboardInterrupt:
        pass
    return 0
