"""Where each cloud layer lives when the span is larger than one device: accelerate's device maps.

    --device-map auto      fill the devices in order (accelerate.infer_auto_device_map)
    --device-map balanced  the same layers-per-memory share on every GPU (accelerate.utils.get_balanced_memory)
    --device-map FILE      a JSON map in accelerate's format: module name -> device ("model.layers.2": 0,
                           "model.layers": "cuda:1", ...); the longest matching name wins

Whole decoder layers are the unit (a layer is never split across devices).  The span moves its hidden
states to the next layer's device as it goes (parts.LayerSpan, cloud/batch.py), and each session's cache
keeps a layer's keys and values on that layer's device (cloud/cache.py).  Offloading to disk is refused:
a step would read the weights from disk on every round trip.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..models import ModelError

KINDS = ("auto", "balanced")


def layer_name(index: int) -> str:
    """The module name of layer `index` in the model's own naming, which device maps use."""
    return f"model.layers.{index}"


def resolve(spec: str, layers: Mapping[int, nn.Module], dtype: torch.dtype,
            max_memory: Mapping[int | str, int] | None = None) -> dict[int, str]:
    """Layer index -> torch device for `spec` (auto, balanced or a JSON file); `layers` may be on the meta device.

    `max_memory` (accelerate's device -> bytes) defaults to what accelerate finds free on each device.
    """
    if spec in KINDS:
        named = _by_accelerate(spec, layers, dtype, max_memory)
    else:
        path = Path(spec)
        try:
            named = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"--device-map {spec}: not auto, balanced or a readable JSON file ({exc})") from None
        if not isinstance(named, dict):
            raise ModelError(f"--device-map {spec}: the JSON must be an object of module name -> device")
    return place(named, sorted(layers), f"--device-map {spec}")


def place(named: Mapping[str, int | str], indices: list[int], source: str) -> dict[int, str]:
    """Each layer's device from an accelerate-style map, by the longest module name that is the layer or holds it."""
    placed: dict[int, str] = {}
    missing = []
    for i in indices:
        name = layer_name(i)
        keys = [k for k in named if k == "" or name == k or name.startswith(k + ".")]
        if not keys:
            missing.append(i)
            continue
        placed[i] = device_name(named[max(keys, key=len)], source)
    if missing:
        raise ModelError(f"{source}: no device for cloud layer(s) {missing} (name them as {layer_name(missing[0])})")
    return placed


def device_name(device: int | str, source: str) -> str:
    """accelerate's device names as torch's: 0 -> cuda:0; "disk" (offloading) is refused."""
    if isinstance(device, bool) or not isinstance(device, (int, str)):
        raise ModelError(f"{source}: {device!r} is not a device")
    if isinstance(device, int):
        return f"cuda:{device}"
    if device == "disk":
        raise ModelError(f"{source}: offloading layers to disk is not supported (every step would read them)")
    try:
        torch.device(device)
    except RuntimeError:
        raise ModelError(f"{source}: {device!r} is not a torch device") from None
    return device


def _by_accelerate(kind: str, layers: Mapping[int, nn.Module], dtype: torch.dtype,
                   max_memory: Mapping[int | str, int] | None) -> dict[str, int | str]:
    """accelerate's map for a model holding only these layers, under their own names."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    holder = nn.Module()
    holder.model = nn.Module()
    holder.model.layers = nn.ModuleDict({str(i): layer for i, layer in layers.items()})
    no_split = sorted({type(layer).__name__ for layer in layers.values()})
    memory = dict(max_memory) if max_memory is not None else get_max_memory()
    if kind == "balanced":
        memory = get_balanced_memory(holder, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    return dict(infer_auto_device_map(holder, max_memory=memory, no_split_module_classes=no_split, dtype=dtype))


def devices(placed: Mapping[int, str]) -> list[str]:
    """The distinct devices of a placement, in layer order."""
    return list(dict.fromkeys(placed[i] for i in sorted(placed)))
