"""Argument groups and start-up shared by the command-line entry points."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import DEFAULT_MODE, DEFAULT_MODEL_DIR, HTTP_PORT, KERNELS, MEMORY_DIR, MODES, RECONNECT_TIMEOUT_S
from .helpformat import HelpFormatter  # noqa: F401  (every entry point takes it from here)


def fail(exc: BaseException | str) -> int:
    """Tell the user what went wrong in one line (no traceback); the exit code of a failed run."""
    print(f"error: {exc}", file=sys.stderr)
    return 1


def model_problem(model: Path | None, weights: bool = True) -> str | None:
    """What makes --model unusable that can be seen without loading anything; None when it looks usable.

    models.resolve_model says the same when it loads (ModelError); checking here first answers before
    torch is imported.
    """
    if model is None:
        return None  # the default model, prepared on first use
    if not model.exists():
        return f"--model {model}: no such directory"
    if not model.is_dir():
        return f"--model {model}: not a directory"
    if not (model / "config.json").is_file():
        return f"--model {model}: no config.json in it (not a Hugging Face model directory)"
    if weights and not any(model.glob("*.safetensors")):
        return f"--model {model}: no *.safetensors weights in it (--random-weights SEED draws them instead)"
    return None


def add_model_args(parser: argparse.ArgumentParser, kernels: bool = True, random: bool = False) -> None:
    """--model, --device, --dtype, --threads, (unless `kernels` is False: a command that picks its own) --kernels
    and (with `random`: the two sides' commands) --random-weights."""
    g = parser.add_argument_group("model and hardware")
    g.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"local Hugging Face model directory (Llama, Mistral or Qwen2 layout); default: {DEFAULT_MODEL_DIR}, "
        "prepared from the embedded SmolLM2-135M-Instruct GGUF on first use",
    )
    g.add_argument("--device", default=None, help="torch device; default: cuda when a GPU is present, else cpu")
    g.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default=None,
        help="compute dtype; default: float16 on a GPU, float32 on a CPU (the wire is float16 either way)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for this process (default: torch's own choice); set it when the cloud and "
        "local processes share one machine, and record it with any benchmark figure",
    )
    if random:
        g.add_argument(
            "--random-weights",
            type=int,
            default=None,
            metavar="SEED",
            help="draw the weights this side holds from SEED instead of reading them (--model then needs only its "
            "config.json, and the tokenizer on the local side): runs a model of any published shape without its "
            "weights on disk, for memory and speed figures.  Both sides must give the same SEED (the cloud's "
            "identity names it).  The text is gibberish, as from any random model",
        )
    if not kernels:
        return
    g.add_argument(
        "--kernels",
        choices=KERNELS,
        default="auto",
        help="auto: attention on grouped key/value heads without copying the cache, and on a CPU in float32 "
        "linear maps that also keep a oneDNN copy of their weights packed for multi-token blocks, so a token "
        "tree costs little more than one token (more memory); torch: transformers' own sdpa and nn.Linear",
    )


def add_drafter_arg(group) -> None:
    """--drafter: the draft head lookahead drafts with."""
    group.add_argument(
        "--drafter",
        default=None,
        metavar="DIR|none",
        help="draft head for lookahead (a directory with config.json and model.safetensors, trained for this "
        "model), whose token trees join the model-free guesses; 'none': model-free guesses only; "
        "default: drafters/MODEL/ of the checkout when it exists (MODEL: the model directory's name), else none",
    )


def drafter_problem(model: Path | None, drafter: str | None) -> str | None:
    """What makes --drafter unusable that can be seen without loading anything; None when it looks usable
    (the local side checks again when it loads it)."""
    from .drafting import DrafterError, resolve

    try:
        resolve(model or DEFAULT_MODEL_DIR, drafter)
    except DrafterError as exc:
        return str(exc)
    return None


def add_testbed_args(parser: argparse.ArgumentParser, existing_cloud: bool = True, cloud_device: bool = True) -> None:
    """What the experiments take about the cloud they start (or, with --cloud, the one they measure)."""
    parser.add_argument("--cloud-threads", type=int, default=1, help="torch threads of the cloud process")
    if cloud_device:
        parser.add_argument(
            "--cloud-device",
            default=None,
            help="device of the cloud process it starts (default: the local side's --device); e.g. --device cpu "
            "--cloud-device cuda measures a CPU local side against a GPU cloud, as deployed",
        )
    if existing_cloud:
        parser.add_argument(
            "--cloud", default=None, help="measure this existing cloud server (its HTTP URL) instead of starting one"
        )


def setup(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    for noisy in ("websockets", "werkzeug", "waitress", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        import torch  # here, not at the top: --help must not wait for torch

        torch.set_num_threads(args.threads)


TOKEN_ENV = "SPLITINFER_AUTH_TOKEN"


def read_token(path: Path | None) -> str | None:
    """The shared secret: a file's first line (stripped), else $SPLITINFER_AUTH_TOKEN, else None (no auth).

    The variable only supplies the secret when no file is given; it switches nothing else.
    A token travels in an HTTP header, so it must be printable ASCII without spaces.
    """
    if path is None:
        raw, source = os.environ.get(TOKEN_ENV), f"${TOKEN_ENV}"
        if raw is None:
            return None
        token = raw.strip()
        if not token:  # set but blank: a mistake, never a quiet "no authentication"
            raise SystemExit(f"error: ${TOKEN_ENV} is set but blank; put the shared secret in it, or unset it")
    else:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise SystemExit(f"error: cannot read the token file {path}: {exc.strerror}") from None
        token, source = (lines[0].strip() if lines else ""), str(path)
        if not token:
            raise SystemExit(f"error: {path} is empty; put the shared secret on its first line")
        if path.stat().st_mode & 0o077:
            logging.getLogger(__name__).warning("%s is readable by other users; chmod 600 it", path)
    if not all(33 <= ord(c) < 127 for c in token):
        raise SystemExit(f"error: the token in {source} must be printable ASCII without spaces")
    return token


def seconds(text: str) -> float:
    """An argparse type: a duration in seconds, 0 or more."""
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration in seconds (0 or more)")
    return value


def _plus_one(text: str) -> int:
    return int(text) + 1


def _minus_one(text: str) -> int:
    return int(text) - 1


def add_split_args(group) -> None:
    """The split in the one vocabulary both processes use: the cloud's layer range, inclusive.  The spec's
    local spelling (--split-after/--resume-at) is kept as aliases that land in the same place."""
    group.add_argument("--cloud-start", type=int, default=None, metavar="N", help="first cloud layer (default 2)")
    group.add_argument(
        "--cloud-end", type=int, default=None, metavar="N", help="last cloud layer, inclusive; negative counts "
        "from the end (default L-3: the last two layers stay local)"
    )
    group.add_argument(
        "--split-after", type=_plus_one, dest="cloud_start", metavar="N", help="the spec's alias: --cloud-start N+1"
    )
    group.add_argument(
        "--resume-at", type=_minus_one, dest="cloud_end", metavar="N", help="the spec's alias: --cloud-end N-1"
    )


def add_local_args(parser: argparse.ArgumentParser, default_mode: str = DEFAULT_MODE) -> None:
    """What every local-side entry takes: where the cloud is, the split, the decoding mode."""
    g = parser.add_argument_group("cloud and split")
    g.add_argument(
        "--cloud",
        default=f"http://localhost:{HTTP_PORT}",
        help="the cloud server's HTTP address (health); the WebSocket is the same host, port + 1",
    )
    g.add_argument("--cloud-ws", default=None, help="the cloud's WebSocket address, if not --cloud's port + 1")
    add_split_args(g)
    g.add_argument(
        "--auth-token-file",
        type=Path,
        default=None,
        help=f"file holding the cloud's shared secret (first line), sent as 'Authorization: Bearer'; "
        f"without it, ${TOKEN_ENV} if set",
    )
    g.add_argument(
        "--reconnect-timeout",
        type=seconds,
        default=RECONNECT_TIMEOUT_S,
        help="when the cloud connection or session is lost mid-generation, keep reconnecting (and replaying "
        "the context into a new session) for this many seconds before failing the request; 0: fail at once",
    )
    g = parser.add_argument_group("decoding (greedy; every mode gives the same tokens)")
    g.add_argument("--mode", choices=MODES, default=default_mode, help="decoding strategy")
    g.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many generated tokens (or EOS)")
    add_drafter_arg(g)
    g.add_argument(
        "--memory-dir",
        type=Path,
        default=MEMORY_DIR,
        help="where lookahead keeps what it learns between runs (the recycling table: n-grams of your own "
        "prompts and answers, so it stays on this machine, file mode 0600; and the acceptance calibration), "
        "one file per model; a fresh process starts as fast as a warmed-up one",
    )
    g.add_argument(
        "--no-memory", action="store_true", help="neither read nor write the memory file: every run starts cold"
    )
