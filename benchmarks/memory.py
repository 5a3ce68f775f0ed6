#!/usr/bin/env python3
"""What one cloud session and one cloud connection cost in memory, measured on a real cloud process.

1. Sessions: for each of --contexts, one session reserving and filled to that many tokens (random float16
   activations in chunks of --max-step-tokens); the cloud process's VmRSS growth and its peak
   (VmHWM, reset first) against the bound in splitinfer/cloud/memory.py; then the session closed.
2. Long sessions: --long-sessions sessions of the largest context, two at a time, opened, filled
   and closed; the cloud's VmRSS after they are all gone against its start (the server hands
   freed memory back to the OS after dropping sessions).
3. Connections: with the compute held busy, --flood-connections connections each send
   --flood-frames frames of the largest legal size without reading the replies; the VmRSS
   growth over the frame size is the frames one connection makes the server hold.  This one
   runs the server in this process, so that it can hold the compute lock itself.

Writes experiment_data/memory.json with provenance and prints a summary; asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import socket
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from splitinfer import protocol
from splitinfer.cli import HelpFormatter, add_model_args
from splitinfer.cloud import memory
from splitinfer.config import OUT_HELP, Limits, Split, experiment_out
from splitinfer.experiments.record import provenance, write_json
from splitinfer.models import load_config, resolve_dtype, resolve_model
from splitinfer.cloud.server import build
from splitinfer.procs import cloud_process, free_port
from splitinfer.remote import ws_url

MIB = 2.0**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192], help="session sizes, in tokens")
    p.add_argument("--max-step-tokens", type=int, default=512, help="tokens per forward while filling (the cloud's limit)")
    p.add_argument("--long-sessions", type=int, default=2, help="sessions of the largest context opened and closed")
    p.add_argument("--flood-connections", type=int, default=4, help="connections that send without reading")
    p.add_argument("--flood-frames", type=int, default=10, help="largest-size frames each flooding connection sends")
    p.add_argument("--cloud-threads", type=int, default=2, help="torch threads of the cloud process")
    p.add_argument("--out", type=Path, default=experiment_out("memory.json"), help=OUT_HELP)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ the cloud process


def status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} for process {pid}")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def settle(pid: int, seconds: float = 1.0) -> float:
    time.sleep(seconds)
    return status_mb(pid, "VmRSS")


class Session:
    """A raw protocol session on its own connection (no recovery, no record: only what the cloud holds)."""

    def __init__(self, url: str, hidden: int, head_dim: int, max_length: int | None = None):
        self._stack = ExitStack()  # websockets wants its connections used as context managers
        self.ws = self._stack.enter_context(connect(url, proxy=None, max_size=None, compression=None))
        self.hidden, self.head_dim, self.step = hidden, head_dim, 0
        reserve = {} if max_length is None else {"max_length": max_length}  # else the server's max_context
        self.id = self.ask({"op": "open", "session": None, **reserve}).session

    def ask(self, header: dict, tensors: dict | None = None) -> protocol.Frame:
        header = {**header, "step": self.step}
        if header["session"] is not None:
            header["session"] = self.id
        self.ws.send(protocol.encode(header, tensors))
        frame = protocol.decode(self.ws.recv(timeout=600), max_frame_bytes=1 << 40, replies=True)
        if frame.op == "error":
            raise RuntimeError(f"{frame.header['code']}: {frame.header['message']}")
        self.step += 1
        return frame

    def forward(self, q: int, seed: int, edits: list | None = None) -> None:
        header: dict = {"op": "forward", "session": self.id}
        if edits:
            header["edits"] = edits
        self.ask(header, rows(q, self.hidden, self.head_dim, seed))

    def fill(self, tokens: int, chunk: int) -> None:
        for begin in range(0, tokens, chunk):
            self.forward(min(chunk, tokens - begin), seed=begin)

    def close(self) -> None:
        self.ask({"op": "close", "session": self.id})
        self._stack.close()


def rows(q: int, hidden: int, head_dim: int, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {
        "hidden": g.standard_normal((1, q, hidden)).astype(np.float16),
        "cos": np.ones((1, q, head_dim), np.float16),
        "sin": np.zeros((1, q, head_dim), np.float16),
    }


# ------------------------------------------------------------------------------ the three measurements


def measure_sessions(url: str, pid: int, geometry: memory.Geometry, contexts: list[int], chunk: int) -> list[dict]:
    warm_up = Session(url, geometry.hidden_size, geometry.head_dim)  # first steps allocate pools, threads
    warm_up.fill(2 * chunk, chunk)
    warm_up.close()
    out = []
    for tokens in contexts:
        start = settle(pid)
        reset_peak(pid)
        t0 = time.perf_counter()
        s = Session(url, geometry.hidden_size, geometry.head_dim, max_length=tokens)  # reserves what it fills
        s.fill(tokens, chunk)
        filled, peak = settle(pid, 0.5), status_mb(pid, "VmHWM")
        s.close()
        closed = settle(pid)
        out.append({
            "tokens": tokens,
            "rss_start_mb": start,
            "rss_filled_mb": filled,
            "rss_peak_mb": peak,
            "rss_closed_mb": closed,
            "held_mb": filled - start,
            "peak_growth_mb": peak - start,
            "cache_mb": memory.cache_bytes(geometry, tokens) / MIB,
            "bound_mb": (memory.session_bytes(geometry, tokens) + memory.step_bytes(geometry, tokens, chunk)) / MIB,
            "fill_seconds": time.perf_counter() - t0,
        })
        print(f"session of {tokens} tokens: holds {filled - start:.0f} MiB, peak +{peak - start:.0f} MiB "
              f"(cache {out[-1]['cache_mb']:.0f} MiB, bound {out[-1]['bound_mb']:.0f} MiB); closed: {closed:.0f} MiB "
              f"against {start:.0f} MiB", flush=True)
    return out


def measure_long_sessions(url: str, pid: int, geometry: memory.Geometry, n: int, tokens: int, chunk: int) -> dict:
    start = settle(pid)
    peak = start
    for pair in range(0, n, 2):
        sessions = [Session(url, geometry.hidden_size, geometry.head_dim) for _ in range(min(2, n - pair))]
        for s in sessions:
            s.fill(tokens, chunk)
        peak = max(peak, status_mb(pid, "VmRSS"))
        for s in sessions:
            s.close()
    after = settle(pid, 2.0)
    result = {"sessions": n, "tokens": tokens, "rss_start_mb": start, "rss_peak_mb": peak, "rss_after_mb": after,
              "change": (after - start) / start}
    print(f"{n} sessions of {tokens} tokens: RSS {start:.0f} -> peak {peak:.0f} -> {after:.0f} MiB after closing "
          f"({100 * result['change']:+.1f}%)", flush=True)
    return result


def measure_connections(server, g: memory.Geometry, max_context: int, q: int, conns: int, frames: int) -> dict:
    """Frames one connection makes the server hold while compute is busy, on an in-process server.

    The server runs in this process (its real sockets and code) so that its compute can be held busy by
    taking the compute lock itself: nothing computes meanwhile, and the RSS growth is the buffered frames.
    """
    import asyncio

    port, ready = free_port(), threading.Event()
    threading.Thread(target=lambda: asyncio.run(server.serve_ws("127.0.0.1", port, ready)), daemon=True).start()
    ready.wait(60)
    url = f"ws://127.0.0.1:{port}"
    # The largest legal frame: q new rows and a full mask over the whole context.
    tensors = rows(q, g.hidden_size, g.head_dim, 2)
    tensors["mask"] = np.ones((q, max_context), bool)
    frame = protocol.encode({"op": "forward", "session": secrets.token_hex(16), "step": 1}, tensors)
    del tensors
    pid = os.getpid()
    with server.core.busy():
        before = settle(pid, 1.0)
        # The peers are another process, so that only the server's buffers count in this one's RSS.
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        peers = ctx.Process(target=flood, args=(url, frame, conns, frames, stop), daemon=True)
        peers.start()
        during = settle(pid, 4.0)
        stop.set()
        peers.join(30)
    after = settle(pid, 2.0)
    per_conn = (during - before) * MIB / conns / len(frame)
    result = {"connections": conns, "frames_sent": frames, "frame_bytes": len(frame), "rss_before_mb": before,
              "rss_during_mb": during, "rss_after_mb": after, "frames_held_per_connection": per_conn,
              "bound_frames": memory.FRAMES_PER_CONNECTION}
    print(f"{conns} connections each sending {frames} frames of {len(frame) / MIB:.1f} MiB to a busy server: RSS "
          f"{before:.0f} -> {during:.0f} MiB, {per_conn:.2f} frames held per connection "
          f"(bound {memory.FRAMES_PER_CONNECTION})", flush=True)
    return result


def flood(url: str, frame: bytes, conns: int, frames: int, stop) -> None:
    """`conns` connections, each sending `frames` copies of `frame` and reading nothing, until `stop`."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(connect(url, proxy=None, max_size=None, compression=None)) for _ in range(conns)]
        for ws in sockets:
            for _ in range(frames):  # a send blocks once the server stops reading: TCP flow control
                threading.Thread(target=_send_quietly, args=(ws, frame), daemon=True).start()
        stop.wait(60)
        for ws in sockets:
            ws.socket.shutdown(socket.SHUT_RDWR)


def _send_quietly(ws, frame: bytes) -> None:
    try:
        ws.send(frame)
    except (OSError, ConnectionClosed):  # the connection is shut down under a blocked send at the end
        pass


# ------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict:
    model_dir = resolve_model(args.model)
    config = load_config(model_dir)
    split = Split(config.num_hidden_layers)
    max_context = max(args.contexts)
    geometry = memory.Geometry.of(config, len(split.cloud_layers), resolve_dtype(args.dtype, "cpu"))
    port = free_port(pair=True)
    extra = ["--max-context", str(max_context), "--max-step-tokens", str(args.max_step_tokens),
             "--max-sessions-per-connection", "1"]
    if args.dtype:
        extra += ["--dtype", args.dtype]
    with cloud_process(model_dir, port=port, threads=args.cloud_threads, extra=extra) as (http, proc):
        url = ws_url(http)
        start = settle(proc.pid)
        sessions = measure_sessions(url, proc.pid, geometry, args.contexts, args.max_step_tokens)
        long = measure_long_sessions(url, proc.pid, geometry, args.long_sessions, max_context, args.max_step_tokens)
    server = build(str(model_dir), None, None, "cpu", args.dtype, Limits(max_context=max_context,
                   max_step_tokens=args.max_step_tokens), ws_port=0)
    conns = measure_connections(server, geometry, max_context, args.max_step_tokens, args.flood_connections,
                                args.flood_frames)
    budget = memory.derive_limits(geometry, Limits(max_context=max_context, max_step_tokens=args.max_step_tokens),
                                  available=24 * 2**30)
    return {
        **provenance({"contexts": args.contexts, "max_step_tokens": args.max_step_tokens,
                      "long_sessions": args.long_sessions, "flood_connections": args.flood_connections,
                      "flood_frames": args.flood_frames, "cloud_threads": args.cloud_threads,
                      "dtype": str(geometry.dtype_bytes * 8) + "-bit"}, model_dir),
        "geometry": geometry.__dict__,
        "rss_at_start_mb": start,
        "sessions": sessions,
        "long_sessions": long,
        "connections": conns,
        "defaults_on_24_gib": {"available_gib": 24, "max_sessions": budget.limits.max_sessions,
                               "max_connections": budget.max_connections,
                               "per_session_mb": budget.per_session / MIB, "per_step_mb": budget.per_step / MIB,
                               "per_frame_mb": budget.per_frame / MIB, "per_connection_mb": budget.per_connection / MIB},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
