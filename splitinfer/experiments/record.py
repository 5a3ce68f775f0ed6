"""Every result file says how it was made: command, settings, model, commit, machine, date."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..config import CHECKOUT

_STARTED = time.monotonic()  # imported as a script starts: wall_seconds is (almost) the whole run


# What the experiments themselves write: a run of several scripts must not call its own results "dirty".
OUTPUTS = ("experiment_data", "README.md", "paper.md", "docs/privacy.md", "docs/security.md")


def commit(root: Path | None = CHECKOUT) -> str:
    """HEAD's hash, with '+dirty' when the code differs from it (the experiments' outputs aside).

    "unknown" outside a git checkout (an installed wheel, a source tarball).
    """
    if root is None:
        return "unknown"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *(f":!{p}" for p in OUTPUTS)]
        dirty = subprocess.run(status, cwd=root, capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    import torch  # here: importing this module (for an experiment's --help) must not wait for torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
    }


def provenance(settings: dict[str, Any], model: str | Path) -> dict[str, Any]:
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": settings,
        "model": str(model),
        "commit": commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "wall_seconds": round(time.monotonic() - _STARTED, 1),
    }


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write atomically, so an interrupted run never leaves half a result file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident memory of a process (VmHWM), or of this one."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmHWM for process {pid}")
