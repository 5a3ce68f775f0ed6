"""The draft head: a small trusted-side model that proposes token trees for lookahead (head.py, draft.py).

This module only finds a drafter directory, from JSON alone: the command line checks `--drafter` with it
before torch is imported, and the local side loads what it names.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import CHECKOUT

DRAFTERS = "drafters"  # in the checkout: drafters/<model directory name>/, each model's default drafter
FILES = ("config.json", "model.safetensors")  # what a drafter directory holds (head.CONFIG, head.WEIGHTS)


class DrafterError(ValueError):
    """A drafter directory that cannot be used, with a one-line message naming it."""


def default_dir(model_dir: Path) -> Path | None:
    """Where the checkout keeps `model_dir`'s drafter (None when not run from a checkout)."""
    return CHECKOUT / DRAFTERS / Path(model_dir).name if CHECKOUT is not None else None


def resolve(model_dir: Path, arg: str | Path | None) -> Path | None:
    """The drafter directory `--drafter` names: "none" -> None; a path -> that directory; None (the default)
    -> the checkout's drafters/<model directory name>/ if it exists, else None.  Raises DrafterError when the
    directory lacks its files or was made for another hidden size or vocabulary than the model's."""
    if arg is not None and str(arg) == "none":
        return None
    if arg is None:
        path = default_dir(model_dir)
        if path is None or not path.exists():
            return None
        label = f"the default drafter {path} (--drafter none runs without one)"
    else:
        path, label = Path(arg), f"--drafter {arg}"
    check(path, label, model_dir)
    return path


def check(path: Path, label: str, model_dir: Path) -> None:
    """Raise DrafterError unless `path` holds a drafter that fits the model in `model_dir`."""
    if not path.is_dir():
        raise DrafterError(f"{label}: no such directory")
    for name in FILES:
        if not (path / name).is_file():
            raise DrafterError(f"{label}: no {name} in it (not a drafter directory)")
    mine = _read_json(path / FILES[0], label)
    base_file = Path(model_dir) / "config.json"
    if not base_file.is_file():  # the default model before its first preparation: checked again when loaded
        return
    base = _read_json(base_file, str(model_dir))
    for key in ("hidden_size", "vocab_size"):
        if mine.get(key) != base.get(key):
            raise DrafterError(
                f"{label}: made for {key} {mine.get(key)}, but the model {model_dir} has {base.get(key)}"
            )


def _read_json(path: Path, label: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DrafterError(f"{label}: cannot read {path.name}: {exc}") from None
    if not isinstance(data, dict):
        raise DrafterError(f"{label}: {path.name} is not a JSON object")
    return data
