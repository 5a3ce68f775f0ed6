"""`python -m splitinfer wan` / `python -m splitinfer.wan`: run the emulator until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from .forward import Forward
from .link import Link
from .proxy import WanEmulator

DESCRIPTION = """\
Forward local TCP ports to targets through an emulated WAN link, like `ssh -L` port
forwarding with added latency: each chunk is delivered rtt/2 later in each direction,
in order, optionally with jitter and a bandwidth cap. Runs until Ctrl-C."""

EPILOG = """\
example: emulate an 80 ms path to a cloud server's HTTP and WebSocket ports
  python -m splitinfer wan --rtt-ms 80 -L 6000:127.0.0.1:5000 -L 6001:127.0.0.1:5001
then point the client at 127.0.0.1:6000 / :6001 instead of :5000 / :5001."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rtt-ms", type=float, default=0.0, metavar="MS",
                        help="round-trip time to add; each direction gets half (default: 0)")
    parser.add_argument("--jitter-ms", type=float, default=0.0, metavar="MS",
                        help="extra per-chunk delay, uniform in [0, MS] per direction; never reorders (default: 0)")
    parser.add_argument("--mbit", type=float, default=None, metavar="MBIT",
                        help="bandwidth cap per direction in megabits/s, shared by all connections "
                             "(default: unlimited)")
    parser.add_argument("--seed", type=int, default=None, help="seed for the jitter draws (default: random)")
    parser.add_argument("-L", dest="forwards", metavar="SPEC", action="append", required=True,
                        type=_forward_arg,
                        help="forward [LISTEN_HOST:]LISTEN_PORT:HOST:PORT, as in ssh -L; "
                             "repeat for several ports (listen host defaults to 127.0.0.1)")


def add_subparser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `wan` subcommand; its `func` default runs it (returns an exit code)."""
    parser = subparsers.add_parser("wan", help="forward ports through an emulated WAN link (added RTT)",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitinfer.wan", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


def run_cli(args: argparse.Namespace) -> int:
    """Run the emulator described by parsed arguments until Ctrl-C or SIGTERM."""
    try:
        link = Link(args.rtt_ms, args.jitter_ms, args.mbit, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return asyncio.run(_serve_until_signal(WanEmulator(link, args.forwards)))


async def _serve_until_signal(wan: WanEmulator) -> int:
    try:
        await wan.start()
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 1
    for forward, (host, port) in zip(wan.forwards, wan.addresses):
        print(f"wan: {host}:{port} -> {forward.target_host}:{forward.target_port} ({wan.link.describe()})",
              flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread / Windows
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await wan.stop()
    return 0


def _forward_arg(spec: str) -> Forward:
    try:
        return Forward.parse(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
