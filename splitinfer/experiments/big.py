"""The seed's model sizes on this machine: each side's memory, and the split's greedy output against the
unsplit model's, with weights drawn from a seed (random_model.py) since the real ones cannot be downloaded.

One process per role, one after another where memory demands it (a 7B model is 14.5 GB in bfloat16, so the
unsplit reference and the split's cloud do not fit in 24 GB together):

    reference  the unsplit model drawn from the seed: transformers' greedy `generate`
    cloud      the real cloud server process, --random-weights SEED
    local      the real local side (LocalSide, the same seed), generating through that cloud; when both sides
               do not fit at once, through a layer-less stand-in instead (its memory only), and then
    driver     opens a real session on the cloud alone and sends it random hidden states (its memory only)

Each child prints one JSON line; every process's peak resident memory is its VmHWM (Linux /proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "Write a short story about a robot who learns to paint."


# -- memory --------------------------------------------------------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM (peak resident) and VmRSS of a process, in bytes."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def sizes(model_dir: Path, dtype_bytes: int) -> dict[str, int]:
    """Bytes of weights each side holds (and the whole model), from the config's tensor shapes."""
    import torch

    from ..config import Split
    from ..models import load_config
    from ..random_model import tensor_shapes

    config = load_config(model_dir)
    shapes = tensor_shapes(config)
    cloud = {f"model.layers.{i}." for i in Split.of(config.num_hidden_layers, None, None).cloud_layers}
    numel = {name: torch.Size(s).numel() for name, s in shapes.items()}
    in_cloud = sum(n for name, n in numel.items() if any(name.startswith(p) for p in cloud))
    return {"whole": sum(numel.values()) * dtype_bytes, "cloud": in_cloud * dtype_bytes,
            "local": (sum(numel.values()) - in_cloud) * dtype_bytes}


# -- the child roles -----------------------------------------------------------------------------------


def reference(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ..parts import load_whole

    t0 = time.perf_counter()
    model = load_whole(args.model, "cpu", _dtype(args.dtype), args.seed)
    loaded = time.perf_counter()
    ids = torch.tensor([args.prompt_ids])
    out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                         pad_token_id=0)
    done = time.perf_counter()
    return {"tokens": out[0, len(args.prompt_ids):].tolist(), "load_s": loaded - t0, "generate_s": done - loaded,
            **proc_status()}


def local(args: argparse.Namespace) -> dict[str, Any]:
    from ..local import LocalSide
    from ..parts import CloudSpan
    from ..remote import InProcessSpan, cloud_session

    t0 = time.perf_counter()
    side = LocalSide(args.model, device="cpu", dtype=args.dtype, seed=args.seed)
    loaded = time.perf_counter()
    after_load = proc_status()
    if args.ws:
        with cloud_session(args.ws, expected=side.identity) as span:
            tokens = side.generate(span, args.prompt_ids, args.tokens, "sequential").token_ids
    else:  # the cloud does not fit beside this side: hidden states pass through untouched (memory only)
        stand_in = InProcessSpan(CloudSpan({}), _dtype(args.dtype))
        tokens = side.generate(stand_in, args.prompt_ids, args.tokens, "sequential").token_ids
    done = time.perf_counter()
    weights = sum(p.numel() * p.element_size() for m in (side.head, side.tail) for p in _unique_params(m))
    return {"tokens": tokens if args.ws else None, "load_s": loaded - t0, "generate_s": done - loaded,
            "weights_bytes": weights, "rss_after_load": after_load["VmRSS"], **proc_status()}


def driver(args: argparse.Namespace) -> dict[str, Any]:
    """A session on the cloud alone: a prompt of random hidden states, then one-token steps."""
    import torch

    from .. import hf, masks
    from ..config import Split
    from ..identity import of_model
    from ..models import load_config
    from ..remote import cloud_session

    config = load_config(args.model)
    split = Split.of(config.num_hidden_layers, None, None)
    expected = of_model(args.model, config, split.cloud_layers, args.seed)
    rotary, dtype = hf.rotary_for(config), _dtype(args.dtype)
    gen = torch.Generator().manual_seed(0)
    steps = []
    with cloud_session(args.ws, expected=expected) as span:
        length = 0
        for q in [len(args.prompt_ids)] + [1] * args.tokens:
            hidden = torch.randn(1, q, config.hidden_size, generator=gen).to(dtype)
            cos, sin = hf.rope(rotary, masks.positions(length, masks.chain(q)), dtype)
            t = time.perf_counter()
            span.forward(hidden, cos, sin, None)
            steps.append(time.perf_counter() - t)
            length += q
    return {"step_s": steps}


def _unique_params(module):
    seen: set[int] = set()
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _dtype(name: str):
    from ..models import resolve_dtype

    return resolve_dtype(name, "cpu")


ROLES = {"reference": reference, "local": local, "driver": driver}


def child(role: str, model: Path, seed: int, dtype: str, threads: int, prompt_ids: list[int], tokens: int,
          ws: str | None = None, timeout: float = 1800.0) -> dict[str, Any]:
    """Run one role in a fresh process and return its JSON line."""
    cmd = [sys.executable, "-m", __name__, role, "--model", str(model), "--seed", str(seed), "--dtype", dtype,
           "--threads", str(threads), "--tokens", str(tokens), "--prompt-ids", *map(str, prompt_ids)]
    if ws:
        cmd += ["--ws", ws]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{role} failed (exit {r.returncode}): {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- one shape, every role -----------------------------------------------------------------------------


def measure(like: str, workdir: Path, seed: int = 0, dtype: str = "bfloat16", threads: int = 2, tokens: int = 8,
            overrides: dict | None = None, log=print) -> dict[str, Any]:
    """Every figure for one published shape: the parts that fit this machine's memory, the rest skipped with
    the reason recorded."""
    from transformers import AutoTokenizer

    from ..cloud.memory import available_bytes
    from ..models import resolve_model
    from ..procs import cloud_process, free_port
    from ..random_model import make_random_model

    model = make_random_model(like, workdir / like, seed=None, tokenizer_from=resolve_model(None),
                              overrides=overrides)
    # Raw text, not the chat template: the default model's system prompt has ids beyond Mistral 7B's 32768.
    prompt_ids = AutoTokenizer.from_pretrained(model)(PROMPT)["input_ids"]
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    if max(prompt_ids) >= vocab:
        raise ValueError(f"the prompt's ids reach {max(prompt_ids)}, beyond {like}'s vocabulary of {vocab}")
    need = sizes(model, _dtype(dtype).itemsize)
    free = available_bytes()
    result: dict[str, Any] = {"like": like, "overrides": overrides or {}, "seed": seed, "dtype": dtype,
                              "threads": threads, "tokens": tokens, "prompt_tokens": len(prompt_ids),
                              "weights_bytes": need, "available_bytes_at_start": free}
    margin = 1.15  # weights plus what torch, the tokenizer and the activations take
    if need["whole"] * margin < free:
        log(f"{like}: the unsplit reference ({need['whole'] / 2**30:.1f} GiB of weights)")
        result["reference"] = child("reference", model, seed, dtype, threads, prompt_ids, tokens)
    else:
        result["reference"] = {"skipped": f"{need['whole'] / 2**30:.1f} GiB of weights do not fit in "
                                          f"{free / 2**30:.1f} GiB available"}
    together = (need["cloud"] + need["local"]) * margin < free
    port = free_port(pair=True)
    extra = ["--random-weights", str(seed), "--dtype", dtype, "--device", "cpu"]
    log(f"{like}: the cloud process ({need['cloud'] / 2**30:.1f} GiB of weights)")
    with cloud_process(model, port, extra, threads, timeout=1800.0) as (_, proc):
        ws = f"ws://127.0.0.1:{port + 1}"
        if together:
            log(f"{like}: the local side ({need['local'] / 2**30:.1f} GiB) generating through it")
            result["local"] = child("local", model, seed, dtype, threads, prompt_ids, tokens, ws)
        else:
            log(f"{like}: both sides do not fit at once; the cloud alone, driven with random hidden states")
            result["driver"] = child("driver", model, seed, dtype, threads, prompt_ids, tokens, ws)
        result["cloud"] = proc_status(proc.pid)
    if not together:
        log(f"{like}: the local side alone, through a layer-less stand-in")
        result["local"] = child("local", model, seed, dtype, threads, prompt_ids, tokens)
    ref, loc = result["reference"].get("tokens"), result["local"].get("tokens")
    result["split_equals_unsplit"] = None if ref is None or loc is None else ref == loc
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one role of the big-model measurement (run by benchmarks/big_models.py)")
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--prompt-ids", type=int, nargs="+", required=True)
    p.add_argument("--ws", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(ROLES[args.role](args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
