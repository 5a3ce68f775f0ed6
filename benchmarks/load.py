#!/usr/bin/env python3
"""Many sessions on one cloud: throughput and step latency as sessions are added, and memory after a soak.

1. Record: a local side in this process generates prompts one at a time through a real cloud
   process (--mode, --max-new-tokens) and keeps every frame it sent and every reply, until it has
   --prompts generations that ran the full --max-new-tokens (one that ends early is left out).
2. Replay: for each count in --sessions and each RTT in --rtt-ms, that many connections replay
   the recorded generations at once (session i replays prompt i mod --prompts).  Each frame goes
   out RTT ms after the previous reply came back, with no local compute in between: the load
   generator is one light asyncio process, so the cloud's cores are measured alone.  Every reply
   is compared with its recorded solo reply.  Reported per point: aggregate tokens/s, tokens/s
   per session, p50/p99 step latency (send -> reply, the emulated RTT excluded) and the mean
   number of sessions the cloud put in one pass.
3. Soak: --soak sessions opened, filled (a 64-token prefill and a few single steps of random
   activations) and ended by the server's three paths: an explicit close, a dropped connection,
   and idle expiry.  The cloud process's VmRSS, measured after a warm-up, must come back within
   10% of that baseline once they are all gone.

Measures and records (experiment_data/load.json and load.png, with provenance); asserts nothing,
but exits 1 if a reply differed from its solo reply by more than float16 rounding or the memory
did not come back.  The numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from websockets.asyncio.client import connect

from splitinfer import protocol
from splitinfer.cli import HelpFormatter, add_model_args, add_testbed_args, read_token
from splitinfer.config import OUT_HELP, experiment_out
from splitinfer.experiments import prompts as prompt_sets
from splitinfer.experiments.record import provenance, write_json
from splitinfer.procs import cloud_process
from splitinfer.remote import CloudConnection, RemoteSpan, ws_url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="concurrent sessions per point")
    p.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 80.0], help="emulated round trips per point")
    p.add_argument("--prompts", type=int, default=8,
                   help="generations recorded and replayed round-robin; only ones that run the full --max-new-tokens "
                   "count, so that every session of a point runs until the end")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens each recorded generation runs")
    p.add_argument("--mode", default="sequential", help="decoding mode of the recorded generations")
    p.add_argument("--soak", type=int, default=200, help="sessions opened and ended in the soak (0: no soak)")
    p.add_argument("--soak-threads", type=int, default=4, help="soak sessions in flight at once")
    p.add_argument("--idle-timeout", type=float, default=20.0, help="the cloud's --idle-timeout (the soak waits on it)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="the cloud's --prefill-chunk (default: its own)")
    add_testbed_args(p, existing_cloud=False, cloud_device=False)
    p.add_argument("--out", type=Path, default=experiment_out("load.json"), help=OUT_HELP)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ record


@dataclass
class Recording:
    """One generation's forward frames (header without session and step, tensors) and the replies they got."""

    prompt: str
    tokens: int  # generated
    frames: list[tuple[dict, dict[str, np.ndarray]]] = field(default_factory=list)
    replies: list[np.ndarray] = field(default_factory=list)
    max_cache: int = 0  # the largest cache it reached: what a replay's session reserves


class Recorder:
    """A CloudConnection that keeps every forward it carries (RemoteSpan calls only what is delegated)."""

    def __init__(self, conn: CloudConnection, recording: Recording):
        self.conn, self.recording = conn, recording

    def request(self, header, tensors=None, *, timeout=None):
        frame, timing = self.conn.request(header, tensors, timeout=timeout)
        if header["op"] == "forward":
            kept = {k: v for k, v in header.items() if k not in ("session", "step")}
            self.recording.frames.append((kept, {k: np.array(v) for k, v in tensors.items()}))
            self.recording.replies.append(np.array(frame.tensors["hidden"]))
            self.recording.max_cache = max(self.recording.max_cache, int(frame.header["cache_len"]))
        return frame, timing

    def __getattr__(self, name):
        return getattr(self.conn, name)


def record(model: str, ws: str, token: str, prompts: list[str], max_new: int, mode: str, wanted: int
           ) -> tuple[list[Recording], int]:
    """The first `wanted` generations that run the full max_new tokens (a session that ends early would leave
    fewer sessions running than the point names), and how many ended early and were left out."""
    from splitinfer.local import LocalSide

    local = LocalSide(model)
    out, short = [], 0
    for prompt in prompts:
        if len(out) == wanted:
            break
        conn = CloudConnection(ws, token)
        session, limits = conn.open_raw(expected=local.identity)
        rec = Recording(prompt, 0)
        span = RemoteSpan(Recorder(conn, rec), session, limits, expected=local.identity, reconnect_timeout=None)
        try:
            rec.tokens = len(local.generate(span, local.encode(prompt), max_new, mode).token_ids)
        finally:
            span.close()
            conn.close()
        if rec.tokens < max_new:
            short += 1
            continue
        out.append(rec)
    if not out:
        raise SystemExit(f"no prompt generated {max_new} tokens without ending: lower --max-new-tokens")
    return out, short


# ------------------------------------------------------------------------------ replay


def within_rounding(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal up to float16 rounding: at most 2 units in the last place apart, or 1e-3 near zero."""
    a, b = got.astype(np.float32), want.astype(np.float32)
    return bool((np.abs(a - b) <= np.maximum(2 * np.spacing(np.abs(want)).astype(np.float32), 1e-3)).all())


async def replay(ws: str, token: str, rec: Recording, rtt_s: float, start: asyncio.Event, ready) -> dict:
    """One session: open, wait for the others, send each recorded frame RTT after the previous reply."""
    async with connect(ws, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None,
                       compression=None, proxy=None) as conn:
        await conn.send(protocol.encode({"op": "open", "session": None, "step": 0, "max_length": rec.max_cache + 8}))
        opened = protocol.decode(await conn.recv(), replies=True)
        if opened.op != "opened":
            raise RuntimeError(f"the cloud refused a session: {opened.header}")
        sid = opened.session
        frames = [protocol.encode({**h, "session": sid, "step": i + 1}, t) for i, (h, t) in enumerate(rec.frames)]
        ready()
        await start.wait()
        latencies, replies = [], []
        began = time.perf_counter()
        for data in frames:
            if rtt_s:
                await asyncio.sleep(rtt_s)
            sent = time.perf_counter()
            await conn.send(data)
            replies.append(await conn.recv())
            latencies.append((time.perf_counter() - sent) * 1000.0)
        ended = time.perf_counter()
        # Checked once the clock has stopped: the generator shares the machine with the cloud it measures.
        decoded = [protocol.decode(r, replies=True) for r in replies]
        for reply in decoded:
            if reply.op != "result":
                raise RuntimeError(f"a replayed frame was refused: {reply.header}")
        batched = [reply.header.get("batched", 1) for reply in decoded]
        close = all(within_rounding(r.tensors["hidden"], want) for r, want in zip(decoded, rec.replies))
        bitwise = sum(int(np.array_equal(r.tensors["hidden"], want)) for r, want in zip(decoded, rec.replies))
        return {"began": began, "ended": ended, "tokens": rec.tokens, "latencies_ms": latencies,
                "batched": batched, "within_rounding": close, "bitwise": bitwise}


async def point(ws: str, token: str, recordings: list[Recording], sessions: int, rtt_ms: float) -> dict:
    """`sessions` replays at once; their figures together."""
    start, opened = asyncio.Event(), []
    tasks = [asyncio.create_task(replay(ws, token, recordings[i % len(recordings)], rtt_ms / 1000.0, start,
                                        lambda: opened.append(1)))
             for i in range(sessions)]
    while len(opened) < sessions:
        await asyncio.sleep(0.01)
        for t in tasks:
            if t.done() and t.exception():
                raise t.exception()
    start.set()
    runs = await asyncio.gather(*tasks)
    wall = max(r["ended"] for r in runs) - min(r["began"] for r in runs)
    steps = sorted(ms for r in runs for ms in r["latencies_ms"])
    tokens = sum(r["tokens"] for r in runs)
    return {
        "sessions": sessions,
        "rtt_ms": rtt_ms,
        "tokens": tokens,
        "wall_seconds": wall,
        "aggregate_tokens_per_second": tokens / wall,
        "per_session_tokens_per_second": statistics.mean(r["tokens"] / (r["ended"] - r["began"]) for r in runs),
        "step_ms_p50": float(np.percentile(steps, 50)),
        "step_ms_p99": float(np.percentile(steps, 99)),
        "steps": len(steps),
        "mean_sessions_per_pass": statistics.mean(b for r in runs for b in r["batched"]),
        "replies_within_float16_rounding": all(r["within_rounding"] for r in runs),
        "replies_bitwise_equal_share": sum(r["bitwise"] for r in runs) / len(steps),
    }


# ------------------------------------------------------------------------------ soak


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


def sessions_open(url: str, token: str) -> int:
    return requests.get(f"{url}/health", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()["sessions_open"]


def wait_sessions_gone(url: str, token: str, timeout: float) -> float:
    t0 = time.monotonic()
    while sessions_open(url, token):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"sessions still open after {timeout:.0f} s")
        time.sleep(0.25)
    return time.monotonic() - t0


def fill(conn: CloudConnection, session: str, hidden_size: int, head_dim: int, prefill: int, steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    step = 0
    for q in [prefill] + [1] * steps:
        step += 1
        pos = np.arange(step * 1000, step * 1000 + q)[None, :, None] * np.linspace(0.001, 1.0, head_dim)[None, None]
        conn.request(
            {"op": "forward", "session": session, "step": step},
            {"hidden": rng.standard_normal((1, q, hidden_size)).astype(np.float16),
             "cos": np.cos(pos).astype(np.float16), "sin": np.sin(pos).astype(np.float16)},
        )


SOAK_PREFILL = 64  # tokens per soak session (plus 4 single steps): ~2.7 MB of float32 cache for the default model


def soak_session(ws: str, token: str, how: str, dims: tuple[int, int], seed: int, keep: list) -> None:
    """One session, ended by `how`: "close" (the op), "drop" (the connection goes) or "expire" (left idle)."""
    conn = CloudConnection(ws, token)
    session, _ = conn.open_raw(expected=None)  # raw protocol: random activations, no model to check against
    fill(conn, session, *dims, prefill=SOAK_PREFILL, steps=4, seed=seed)
    if how == "close":
        conn.request({"op": "close", "session": session, "step": 99})
        conn.close()
    elif how == "drop":
        conn.close()
    else:
        keep.append(conn)  # the connection stays open and quiet until the server expires the session


def soak(ws: str, url: str, token: str, pid: int, n: int, threads: int, idle: float, dims) -> dict:
    kinds = ["expire"] * min(8, n // 10)
    kinds += ["close" if i % 2 == 0 else "drop" for i in range(n - len(kinds))]
    keep: list[CloudConnection] = []
    samples: list[float] = []
    lock = threading.Lock()
    todo = list(enumerate(kinds))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i, how = todo.pop(0)
            soak_session(ws, token, how, dims, seed=i, keep=keep)
            with lock:
                samples.append(rss_mb(pid))

    t0 = time.monotonic()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    opened_s = time.monotonic() - t0
    open_after = sessions_open(url, token)
    expiry_s = wait_sessions_gone(url, token, timeout=idle + 60)
    for conn in keep:
        conn.close()
    return {"sessions": n, "by": {k: kinds.count(k) for k in ("close", "drop", "expire")}, "seconds": opened_s,
            "open_when_done": open_after, "expiry_wait_seconds": expiry_s,
            "rss_peak_during_mb": max(samples), "rss_samples_mb": samples[:: max(1, len(samples) // 20)]}


# ------------------------------------------------------------------------------ main


def headline(sweep: list[dict], rtt_ms: float, n: int) -> dict | None:
    """n sessions against one, at one RTT: throughput and step-latency ratios."""
    at = {p["sessions"]: p for p in sweep if p["rtt_ms"] == rtt_ms}
    if 1 not in at or n not in at:
        return None
    one, many = at[1], at[n]
    return {"sessions": n, "rtt_ms": rtt_ms,
            "throughput_ratio": many["aggregate_tokens_per_second"] / one["aggregate_tokens_per_second"],
            "step_p50_ratio": many["step_ms_p50"] / one["step_ms_p50"]}


def plot(path: Path, sweep: list[dict]) -> Path:
    from splitinfer.experiments.plots import plt, save

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for rtt in sorted({p["rtt_ms"] for p in sweep}):
        pts = [p for p in sweep if p["rtt_ms"] == rtt]
        n = [p["sessions"] for p in pts]
        left.plot(n, [p["aggregate_tokens_per_second"] for p in pts], "o-", label=f"all sessions, RTT {rtt:g} ms")
        left.plot(n, [p["per_session_tokens_per_second"] for p in pts], "s--", label=f"per session, RTT {rtt:g} ms")
        if rtt == 0:
            right.plot(n, [p["step_ms_p50"] for p in pts], "o-", label="p50")
            right.plot(n, [p["step_ms_p99"] for p in pts], "s--", label="p99")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("tokens/s")
    left.set_title("throughput through one cloud")
    right.set_ylabel("ms")
    right.set_title("cloud step latency (send -> reply, RTT 0)")
    return save(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from splitinfer.models import load_config, resolve_model

    if args.threads:  # the recording local side's; the load generator itself computes nothing
        torch.set_num_threads(args.threads)
    model = resolve_model(args.model)
    config = load_config(model)
    dims = (config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    texts = [p["prompt"] for p in prompt_sets.load(per_category=args.prompts)]  # candidates, 4 x what is kept
    tmp = Path(tempfile.mkdtemp(prefix="splitinfer-load-"))
    token_file = tmp / "token"
    token_file.write_text(secrets.token_urlsafe(32) + "\n")
    token_file.chmod(0o600)
    token = read_token(token_file)
    log = tmp / "cloud.log"
    most = max(args.sessions)
    extra = ["--auth-token-file", str(token_file), "--idle-timeout", str(args.idle_timeout),
             "--max-sessions", str(max(64, most + args.soak_threads + 8))]
    if args.prefill_chunk:
        extra += ["--prefill-chunk", str(args.prefill_chunk)]
    with cloud_process(model, threads=args.cloud_threads, extra=extra, log_file=log) as (url, proc):
        ws = ws_url(url)
        rss_start = rss_mb(proc.pid)
        print(f"cloud up (pid {proc.pid}, {rss_start:.0f} MB); recording {args.prompts} generations ...", flush=True)
        recordings, short = record(str(model), ws, token, texts, args.max_new_tokens, args.mode, args.prompts)
        sweep = []
        for rtt in args.rtt_ms:
            for n in args.sessions:
                p = asyncio.run(point(ws, token, recordings, n, rtt))
                sweep.append(p)
                print(f"  {n:3d} sessions, RTT {rtt:4.0f} ms: {p['aggregate_tokens_per_second']:7.2f} tok/s in all, "
                      f"{p['per_session_tokens_per_second']:6.2f} per session; step p50 {p['step_ms_p50']:6.1f} ms, "
                      f"p99 {p['step_ms_p99']:6.1f} ms; {p['mean_sessions_per_pass']:.1f} sessions per pass; "
                      f"replies as solo: {p['replies_within_float16_rounding']}", flush=True)
        result_soak = None
        if args.soak:
            print(f"soak: warm-up, then {args.soak} sessions ...", flush=True)
            wait_sessions_gone(url, token, 30)
            soak(ws, url, token, proc.pid, 16, args.soak_threads, args.idle_timeout, dims)  # warm-up, all paths
            time.sleep(1.0)
            baseline = rss_mb(proc.pid)
            result_soak = soak(ws, url, token, proc.pid, args.soak, args.soak_threads, args.idle_timeout, dims)
            time.sleep(1.0)
            after = rss_mb(proc.pid)
            result_soak.update(rss_baseline_mb=baseline, rss_after_mb=after, rss_change=(after - baseline) / baseline,
                               rss_within_10pct=abs(after - baseline) <= 0.10 * baseline)
        alive = proc.poll() is None
    log_text = log.read_text()
    figure = plot(args.out.with_suffix(".png"), sweep)
    heads = [h for rtt in args.rtt_ms for n in args.sessions if n > 1 and (h := headline(sweep, rtt, n))]
    result = {
        **provenance(
            {"sessions": args.sessions, "rtt_ms": args.rtt_ms, "prompts": args.prompts,
             "max_new_tokens": args.max_new_tokens, "mode": args.mode, "soak": args.soak,
             "soak_threads": args.soak_threads, "idle_timeout": args.idle_timeout, "cloud_threads": args.cloud_threads,
             "local_threads": torch.get_num_threads(), "prefill_chunk": args.prefill_chunk, "auth": "bearer token",
             "transport": "loopback", "dtype": "float32", "wire": "float16",
             "load_generator": "recorded frames replayed from one asyncio process (no local compute)"},
            model,
        ),
        "recorded": [{"prompt": r.prompt, "tokens": r.tokens, "frames": len(r.frames), "max_cache": r.max_cache}
                     for r in recordings],
        "left_out_as_ending_early": short,
        "sweep": sweep,
        "headlines": heads,
        "figure": figure.name,
        "soak": result_soak,
        "cloud": {"alive_at_end": alive, "rss_at_start_mb": rss_start,
                  "errors_in_log": sum(1 for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line)},
    }
    write_json(args.out, result)
    for h in heads:
        print(f"{h['sessions']} sessions vs 1 at RTT {h['rtt_ms']:g} ms: {h['throughput_ratio']:.2f}x the tokens/s, "
              f"step p50 {h['step_p50_ratio']:.2f}x")
    if result_soak:
        k = result_soak
        print(f"soak: {k['sessions']} sessions {k['by']} in {k['seconds']:.1f} s; cloud RSS baseline "
              f"{k['rss_baseline_mb']:.0f} MB, peak {k['rss_peak_during_mb']:.0f} MB, after {k['rss_after_mb']:.0f} MB "
              f"({100 * k['rss_change']:+.1f}%)")
    print(f"wrote {args.out} and {figure}")
    ok = all(p["replies_within_float16_rounding"] for p in sweep) and alive
    ok = ok and (result_soak is None or result_soak["rss_within_10pct"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
