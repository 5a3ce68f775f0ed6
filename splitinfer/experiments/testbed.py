"""A cloud server process, an optional WAN emulator process in front of it, and the local side.

    with testbed(rtt_ms=80) as bed:
        g = bed.generate(bed.local.encode("Hi"), "lookahead", 64)
        bed.set_rtt(20)   # a second emulator; set_rtt(80) switches back to the first

The emulator runs as its own process (`python -m splitinfer wan`), so its
timers do not compete with the local side's Python for the GIL.  With
`cloud=URL` an existing, real remote server is measured instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..local import Generation, LocalSide
from ..models import dtype_name
from ..procs import cloud_process, free_port, wait_healthy
from ..remote import cloud_session, ws_url


@dataclass
class Bed:
    local: LocalSide
    cloud_http: str
    cloud_ws: str  # the real server's WebSocket, before any emulator
    token: str | None = None
    rtt_ms: float = 0.0
    # One emulator process per RTT, kept running, so that runs at different RTTs can be
    # interleaved (machine drift then spreads over all RTTs instead of biasing one).
    _wans: dict[float, tuple[subprocess.Popen, int]] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        """Where the local side connects: through the current RTT's emulator, if any."""
        if self.rtt_ms <= 0:
            return self.cloud_ws
        return f"ws://127.0.0.1:{self._wans[self.rtt_ms][1]}"

    def set_rtt(self, rtt_ms: float) -> None:
        """Route the next generations through an emulated link of this RTT (0: straight to the cloud)."""
        self.rtt_ms = float(rtt_ms)
        if self.rtt_ms <= 0 or self.rtt_ms in self._wans:
            return
        host_port = self.cloud_ws.split("//", 1)[1]
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "splitinfer", "wan", "--rtt-ms", str(rtt_ms), "-L", f"{port}:{host_port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wans[self.rtt_ms] = (proc, port)
        deadline = time.monotonic() + 30
        while True:  # wait until the emulator accepts connections
            try:
                with cloud_session(self.url, self.token, expected=self.local.identity):
                    return
            except Exception:  # noqa: BLE001 - not up yet; any failure means "try again" until the deadline
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the WAN emulator did not come up") from None
                time.sleep(0.2)

    def stop_wan(self) -> None:
        """Stop every emulator; the next generations go straight to the cloud."""
        for proc, _ in self._wans.values():
            proc.terminate()
        for proc, _ in self._wans.values():
            proc.wait(timeout=10)
        self._wans.clear()
        self.rtt_ms = 0.0

    def generate(self, prompt_ids: list[int], mode: str, max_new: int, **options: Any) -> Generation:
        with cloud_session(self.url, self.token, expected=self.local.identity) as span:
            return self.local.generate(span, prompt_ids, max_new, mode, **options)


@contextmanager
def testbed(
    model: str | Path | None = None,
    rtt_ms: float = 0.0,
    cloud: str | None = None,
    cloud_ws: str | None = None,
    cloud_threads: int = 1,
    local_threads: int = 1,
    token: str | None = None,
    kernels: str = "auto",
    device: str | None = None,
    dtype: str | None = None,
    cloud_device: str | None = None,
    drafter: str | Path | None = None,
) -> Iterator[Bed]:
    """The cloud process it starts computes on the local side's device kind, in its dtype, with its kernels
    (or on `cloud_device`, in that device's default dtype).  `drafter` as LocalSide takes it (None: the
    model's default drafter, if the checkout has one)."""
    torch.set_num_threads(local_threads)
    local = LocalSide(model, device=device, dtype=dtype, kernels=kernels, drafter=drafter)
    with ExitStack() as stack:
        if cloud is None:
            extra = local.cloud_args(cloud_device)
            http, _ = stack.enter_context(cloud_process(local.model_dir, threads=cloud_threads, extra=extra))
        else:
            http = cloud.rstrip("/")
            wait_healthy(http, timeout=30)
        bed = Bed(local, http, ws_url(http, cloud_ws), token)
        stack.callback(bed.stop_wan)
        bed.set_rtt(rtt_ms)
        yield bed


def settings(args: argparse.Namespace, local: LocalSide, drop: tuple[str, ...] = ("out", "model")) -> dict[str, Any]:
    """An experiment's command-line settings as they ran: with the local side's device, dtype, threads and
    drafter (its directory, or None when lookahead ran on model-free guesses alone)."""
    out = {k: v for k, v in vars(args).items() if k not in drop}
    drafter = str(local.drafter_path) if local.drafter_path else None
    out.update(local_threads=args.threads or 1, device=local.device, dtype=dtype_name(local.dtype), drafter=drafter)
    return out


def testbed_for(args: argparse.Namespace, **overrides: Any) -> AbstractContextManager[Bed]:
    """testbed() with what an experiment's command line says (cli.add_model_args, add_testbed_args)."""
    options: dict[str, Any] = {
        "cloud": getattr(args, "cloud", None),
        "cloud_threads": args.cloud_threads,
        "local_threads": args.threads or 1,
        "kernels": args.kernels,
        "device": args.device,
        "dtype": args.dtype,
        "cloud_device": getattr(args, "cloud_device", None),
    }
    if getattr(args, "drafter", None) is not None:  # else testbed's default: the model's default drafter
        options["drafter"] = args.drafter
    return testbed(args.model, **{**options, **overrides})
