#!/usr/bin/env python3
"""A newcomer's first hour, timed: installing, preparing the default model, each entry point's --help,
one demo, and the test suite.

Everything runs as child processes in a fresh, temporary per-user data directory (XDG_DATA_HOME),
so the default model is prepared from scratch as on a first run, and the user's own prepared
model is neither used nor touched.  With --install, `make install` first builds a fresh virtual
environment in a temporary directory (from whatever package index or wheel cache pip is set up
with) and every later step runs in it, as on a fresh clone; with --tests, `make test`'s pytest run
is timed too.  Writes experiment_data/first_hour.json with its provenance.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from splitinfer.cli import HelpFormatter
from splitinfer.config import OUT_HELP, experiment_out

CHECKOUT = Path(__file__).resolve().parent.parent
SCRIPTS = ["cloud_server_kv.py", "interactive.py", "jacobi_server.py", "mac_client.py", "inversion_experiment.py",
           "lookahead_ablation.py", "rtt_analysis.py", "perplexity_comparison.py"]
COMMANDS = ["cloud", "serve", "chat", "client", "demo", "prepare-model", "report", "wan"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the demo's local side and cloud")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens the demo generates")
    p.add_argument("--help-repeats", type=int, default=3, help="runs of each --help; the fastest is kept")
    p.add_argument("--install", action="store_true",
                   help="time `make install` into a fresh temporary virtual environment and run the rest in it")
    p.add_argument("--tests", action="store_true", help="time the test suite as `make test` runs it")
    p.add_argument("--out", type=Path, default=experiment_out("first_hour.json"), help=OUT_HELP)
    return p.parse_args(argv)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one child process, which must succeed."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds


def help_seconds(python: str, env: dict[str, str], repeats: int) -> dict[str, float]:
    """The fastest of `repeats` runs of each entry point's --help (the first run also pays for cold caches)."""
    entries = {s: [python, str(CHECKOUT / s)] for s in SCRIPTS}
    entries |= {f"splitinfer {c}": [python, "-m", "splitinfer", c] for c in COMMANDS}
    return {name: round(min(timed([*cmd, "--help"], env) for _ in range(repeats)), 3) for name, cmd in entries.items()}


def install_seconds(venv: Path, env: dict[str, str]) -> float:
    """`make install` into a fresh virtual environment `venv` (the checkout's own .venv is left alone)."""
    return timed(["make", "-C", str(CHECKOUT), "install", f"VENV={venv}", f"PYTHON={sys.executable}"], env)


def test_run(python: str, env: dict[str, str]) -> dict:
    """The suite as `make test` runs it: wall seconds and pytest's final counts."""
    t0 = time.perf_counter()
    done = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=CHECKOUT, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)", summary)}
    return {"seconds": round(seconds, 1), "returncode": done.returncode, "counts": counts, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from splitinfer.experiments.record import provenance, write_json

    with tempfile.TemporaryDirectory(prefix="splitinfer-first-hour-") as scratch:
        env = {**os.environ, "XDG_DATA_HOME": scratch}  # platformdirs' per-user data dir, for the children
        result: dict = {}
        python = sys.executable
        if args.install:
            venv = Path(scratch) / "venv"
            result["install_seconds"] = round(install_seconds(venv, env), 1)
            python = str(venv / "bin" / "python")
        result["prepare_model_seconds"] = round(timed([python, "-m", "splitinfer", "prepare-model"], env), 2)
        result["help_seconds"] = help_seconds(python, env, args.help_repeats)
        result["demo_seconds"] = round(timed([python, "-m", "splitinfer", "demo", "--threads", str(args.threads),
                                              "--cloud-threads", str(args.threads),
                                              "--max-new-tokens", str(args.max_new_tokens)], env), 2)
        if args.tests:
            result["tests"] = test_run(python, env)
    settings = {"threads": args.threads, "max_new_tokens": args.max_new_tokens, "help_repeats": args.help_repeats,
                "install": args.install, "tests": args.tests}
    write_json(args.out, {**provenance(settings, "default (prepared in a temporary data directory)"), **result})
    slowest = max(result["help_seconds"].items(), key=lambda kv: kv[1])
    print(f"prepare-model {result['prepare_model_seconds']} s, demo {result['demo_seconds']} s, "
          f"slowest --help {slowest[0]} {slowest[1]} s")
    if "install_seconds" in result:
        print(f"make install {result['install_seconds']} s")
    if "tests" in result:
        print(f"tests {result['tests']['seconds']} s: {result['tests']['summary']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
