#!/usr/bin/env python3
"""One cloud server, many local clients: concurrent correctness, aggregate throughput, memory after a soak.

1. Solo: each prompt generated alone (one local process, one session at a time).
2. Concurrent: --clients local processes (separate OS processes, each loading its own
   local layers), released together by a barrier, one prompt each, through one cloud
   server with a bearer token.  Every output must equal its solo run; the aggregate
   tokens/s is all generated tokens over the span from the first start to the last end.
   One more client goes through the real CLI (interactive.py --json --auth-token-file).
3. Soak: --soak sessions opened, filled (a 64-token prefill and a few single steps of
   random activations) and ended by the server's three paths: an explicit close, a
   dropped connection, and idle expiry.  The cloud process's VmRSS, measured after a
   warm-up, must come back within 10% of that baseline once they are all gone.

Measures and records (experiment_data/load.json, with provenance); asserts nothing,
but exits 1 if an output differed or the memory did not come back.  The numbers
depend on the machine and on what else runs on it: record that with them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from splitinfer.cli import HelpFormatter, add_model_args, add_testbed_args, read_token
from splitinfer.config import OUT_HELP, experiment_out
from splitinfer.experiments import prompts as prompt_sets
from splitinfer.experiments.record import provenance, write_json
from splitinfer.procs import cloud_process
from splitinfer.remote import CloudConnection, ws_url


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--clients", type=int, default=8, help="concurrent local processes")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--mode", default="sequential", help="decoding mode of every client")
    p.add_argument("--soak", type=int, default=200, help="sessions opened and ended in the soak")
    p.add_argument("--soak-threads", type=int, default=4, help="soak sessions in flight at once")
    p.add_argument("--idle-timeout", type=float, default=20.0, help="the cloud's --idle-timeout (the soak waits on it)")
    add_testbed_args(p, existing_cloud=False, cloud_device=False)
    p.add_argument("--out", type=Path, default=experiment_out("load.json"), help=OUT_HELP)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ local clients


def client(model: str, ws: str, token_file: str, prompts: list[str], max_new: int, mode: str, barrier, results) -> None:
    """One local process: load the local layers, wait for the others, generate each prompt in turn."""
    import torch

    torch.set_num_threads(1)
    from splitinfer.local import LocalSide
    from splitinfer.remote import cloud_session

    local = LocalSide(model)
    token = read_token(Path(token_file))
    ids = [local.encode(p) for p in prompts]
    barrier.wait()
    for prompt, prompt_ids in zip(prompts, ids):
        start = time.time()
        with cloud_session(ws, token, expected=local.identity) as span:
            g = local.generate(span, prompt_ids, max_new, mode)
        results.put({
            "prompt": prompt, "token_ids": g.token_ids, "new_tokens": len(g.token_ids), "start": start,
            "end": time.time(), "tokens_per_second": g.tokens_per_second, "steps": g.steps,
            "recoveries": span.recoveries,
            "cloud_ms": sum(t["cloud_ms"] for t in g.timings),
            "round_trip_ms": statistics.mean(t["wait_ms"] for t in g.timings) if g.timings else 0.0,
        })


def run_clients(args, model: str, ws: str, token_file: str, groups: list[list[str]]) -> tuple[list[dict], float]:
    """Each group of prompts in a process of its own, all released together; returns runs and wall seconds."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(groups)), ctx.Queue()
    procs = [
        ctx.Process(target=client, args=(model, ws, token_file, g, args.max_new_tokens, args.mode, barrier, results))
        for g in groups
    ]
    for p in procs:
        p.start()
    runs = [results.get(timeout=1800) for _ in range(sum(len(g) for g in groups))]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a client exited with code {p.exitcode}")
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    return runs, wall


def cli_client(url: str, model: str, token_file: str, prompt: str, max_new: int, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "splitinfer", "chat", "--cloud", url, "--model", model, "--prompt", prompt,
         "--max-new-tokens", str(max_new), "--mode", mode, "--json", "--threads", "1",
         "--auth-token-file", token_file],
        capture_output=True, text=True, timeout=1800, check=True,
    )
    return json.loads(out.stdout)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from splitinfer.models import load_config, resolve_model

    model = resolve_model(args.model)
    config = load_config(model)
    dims = (config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    texts = [p["prompt"] for p in prompt_sets.load(per_category=(args.clients + 3) // 4)][: args.clients]
    tmp = Path(tempfile.mkdtemp(prefix="splitinfer-load-"))
    token_file = tmp / "token"
    token_file.write_text(secrets.token_urlsafe(32) + "\n")
    token_file.chmod(0o600)
    token = read_token(token_file)
    log = tmp / "cloud.log"
    extra = ["--auth-token-file", str(token_file), "--idle-timeout", str(args.idle_timeout),
             "--max-sessions", str(max(64, args.clients + args.soak_threads + 8))]
    with cloud_process(model, threads=args.cloud_threads, extra=extra, log_file=log) as (url, proc):
        ws = ws_url(url)
        rss_start = rss_mb(proc.pid)
        print(f"cloud up (pid {proc.pid}, {rss_start:.0f} MB); solo runs of {len(texts)} prompts ...", flush=True)
        solo, solo_wall = run_clients(args, str(model), ws, str(token_file), [texts])
        solo = {r["prompt"]: r for r in solo}
        print(f"concurrent: {args.clients} local processes ...", flush=True)
        conc, conc_wall = run_clients(args, str(model), ws, str(token_file), [[t] for t in texts])
        equal = {r["prompt"]: r["token_ids"] == solo[r["prompt"]]["token_ids"] for r in conc}
        cli = cli_client(url, str(model), str(token_file), texts[0], args.max_new_tokens, args.mode)
        cli_equal = cli["token_ids"] == solo[texts[0]]["token_ids"]

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
    total = sum(r["new_tokens"] for r in conc)
    result = {
        **provenance(
            {"clients": args.clients, "max_new_tokens": args.max_new_tokens, "mode": args.mode, "soak": args.soak,
             "soak_threads": args.soak_threads, "idle_timeout": args.idle_timeout, "cloud_threads": args.cloud_threads,
             "local_threads": 1, "auth": "bearer token", "transport": "loopback", "dtype": "float32", "wire": "float16",
             "note": "shared machine: other jobs were running; figures are indicative"},
            model,
        ),
        "concurrent": {
            "clients": args.clients,
            "all_equal_to_solo": all(equal.values()),
            "equal_to_solo": equal,
            "cli_client_equal_to_solo": cli_equal,
            "generated_tokens": total,
            "wall_seconds": conc_wall,
            "aggregate_tokens_per_second": total / conc_wall,
            "per_client_tokens_per_second": [r["tokens_per_second"] for r in conc],
            "mean_client_tokens_per_second": statistics.mean(r["tokens_per_second"] for r in conc),
            "recoveries": sum(r["recoveries"] for r in conc),
            "mean_round_trip_ms": statistics.mean(r["round_trip_ms"] for r in conc),
            # Decode steps' cloud compute over the wall time: how busy the one (serialised) cloud was.
            "cloud_busy_share": sum(r["cloud_ms"] for r in conc) / 1000.0 / conc_wall,
        },
        "solo": {
            "generated_tokens": sum(r["new_tokens"] for r in solo.values()),
            "wall_seconds": solo_wall,
            "aggregate_tokens_per_second": sum(r["new_tokens"] for r in solo.values()) / solo_wall,
            "mean_tokens_per_second": statistics.mean(r["tokens_per_second"] for r in solo.values()),
            "mean_round_trip_ms": statistics.mean(r["round_trip_ms"] for r in solo.values()),
        },
        "soak": result_soak,
        "cloud": {"alive_at_end": alive, "rss_at_start_mb": rss_start,
                  "errors_in_log": sum(1 for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line)},
    }
    write_json(args.out, result)
    c, s, k = result["concurrent"], result["solo"], result["soak"]
    print(f"solo: {s['aggregate_tokens_per_second']:.2f} tok/s over {s['wall_seconds']:.1f} s "
          f"(mean per run {s['mean_tokens_per_second']:.2f}, round trip {s['mean_round_trip_ms']:.0f} ms)")
    print(f"{c['clients']} concurrent clients: {c['aggregate_tokens_per_second']:.2f} tok/s aggregate "
          f"({c['generated_tokens']} tokens in {c['wall_seconds']:.1f} s; per client mean "
          f"{c['mean_client_tokens_per_second']:.2f}, round trip {c['mean_round_trip_ms']:.0f} ms, cloud busy "
          f"{100 * c['cloud_busy_share']:.0f}%); outputs equal to solo: {c['all_equal_to_solo']}, "
          f"CLI client: {c['cli_client_equal_to_solo']}")
    print(f"soak: {k['sessions']} sessions {k['by']} in {k['seconds']:.1f} s; cloud RSS baseline {k['rss_baseline_mb']:.0f} MB, "
          f"peak {k['rss_peak_during_mb']:.0f} MB, after {k['rss_after_mb']:.0f} MB ({100 * k['rss_change']:+.1f}%)")
    print(f"wrote {args.out}")
    ok = c["all_equal_to_solo"] and cli_equal and k["rss_within_10pct"] and alive
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
