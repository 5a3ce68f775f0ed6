"""A light terminal client for the splitinfer local server (`splitinfer serve`, jacobi_server.py).

Chat with the split model from another machine (a Mac, say): answers stream in as
they are generated, and a status line after each one shows the speed (tokens/s),
the tokens gained per cloud round trip and the cloud round-trip time.  It needs
only Python 3.10+ and `requests` (pip install requests): no torch, no model.

Commands in the chat: /reset forgets the conversation; an empty line, /quit or
Ctrl-D leaves; Ctrl-C stops an answer half way.

This module imports only the standard library and `requests`, so mac_client.py runs
from a copy of the repository without installing the package or torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, TextIO

import requests

from ..helpformat import HelpFormatter

DEFAULT_SERVER = "http://127.0.0.1:5002"

EPILOG = """\
examples:
  %(prog)s --local-server http://192.168.1.20:5002
  %(prog)s --prompt "Why is the sky blue?" --max-new-tokens 64
  # a server bound to loopback on another machine: tunnel its port first
  ssh -N -L 5002:127.0.0.1:5002 user@host &
  %(prog)s
"""


class ClientError(Exception):
    """Something to tell the user in one line; `fatal` ones end a chat too."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


@dataclass
class Answer:
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # the server's "splitinfer" extension
    seconds: float = 0.0
    interrupted: bool = False


def _reason(exc: Exception) -> str:
    """The useful end of a requests exception's message ("Connection refused"), not its whole chain."""
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1).strip()
    m = re.search(r"(Name or service not known|nodename nor servname provided|timed out|Connection refused)", text)
    return m.group(1) if m else type(exc).__name__


def _error_message(r: requests.Response) -> str:
    try:
        error = r.json()["error"]
        message = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        message = r.reason or "no details"
    return f"the server answered HTTP {r.status_code}: {message}"


def read_api_key(path: str) -> str:
    """The API key: the file's first line, stripped (the server's --api-key-file holds the same)."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.readline().strip()
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ClientError(f"cannot read the API key file {path}: {reason}", True) from None
    if not key:
        raise ClientError(f"the API key file {path} is empty; put the key on its first line", True)
    return key


class Client:
    def __init__(self, server: str, timeout: float = 300.0, api_key: str | None = None):
        server = server.strip().rstrip("/")
        self.server = server if "://" in server else f"http://{server}"  # HOST:PORT is enough
        self.timeout = timeout
        self.http = requests.Session()
        if api_key is not None:
            self.http.headers["Authorization"] = f"Bearer {api_key}"  # as OpenAI clients send it
        self.writing = False

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.server}{path}"
        try:
            return self.http.request(method, url, timeout=(10, self.timeout), **kwargs)
        except requests.exceptions.ConnectTimeout:
            message = f"cannot reach the local server at {self.server}: the connection timed out"
            raise ClientError(message, True) from None
        except requests.exceptions.ReadTimeout:
            message = f"the local server at {self.server} did not answer within {self.timeout:.0f} s"
            raise ClientError(message, True) from None
        except requests.exceptions.InvalidURL as exc:
            raise ClientError(f"bad server address {self.server!r}: {exc}", True) from None
        except requests.exceptions.MissingSchema:
            raise ClientError(f"bad server address {self.server!r}: give it as http://HOST:PORT", True) from None
        except requests.RequestException as exc:
            raise ClientError(
                f"cannot reach the local server at {self.server} ({_reason(exc)}); is jacobi_server.py running there?",
                True,
            ) from None

    def health(self) -> dict[str, Any]:
        r = self._call("GET", "/health")
        if 400 <= r.status_code < 500:  # a refusal (API key, Host), not a degraded server: nothing will work
            raise ClientError(_error_message(r), True)
        try:
            body = r.json()
        except ValueError:
            message = f"{self.server} does not look like a splitinfer server (HTTP {r.status_code})"
            raise ClientError(message, True) from None
        return body if isinstance(body, dict) else {}

    def chat(self, messages: list[dict[str, str]], options: dict[str, Any], out: TextIO, prefix: str = "") -> Answer:
        """One streamed answer, written to `out` (after `prefix`, once the server has accepted) as it arrives."""
        body = {**options, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        answer = Answer()
        t0 = time.perf_counter()
        self.writing = False
        r = self._call("POST", "/v1/chat/completions", json=body, stream=True)
        with r:
            if r.status_code != 200:
                raise ClientError(_error_message(r))  # the chat goes on: the next question may do better
            out.write(prefix)
            out.flush()
            self.writing = True  # an error from here on interrupts a line
            try:
                for event in _events(r):
                    if event == "[DONE]":
                        break
                    chunk = json.loads(event)
                    if "error" in chunk:
                        error = chunk["error"]
                        message = error.get("message", error) if isinstance(error, dict) else error
                        raise ClientError(f"the server failed mid-answer: {message}")
                    answer.stats = chunk.get("splitinfer") or answer.stats
                    answer.usage = chunk.get("usage") or answer.usage
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            out.write(text)
                            out.flush()
                            answer.text += text
                        answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
            except KeyboardInterrupt:
                answer.interrupted = True  # leaving `with r` closes the connection: the server stops generating
            except requests.RequestException as exc:
                raise ClientError(f"the connection to the server broke off mid-answer ({_reason(exc)})", True) from None
            except ValueError:
                raise ClientError("the server sent something that is not a JSON event", True) from None
        answer.seconds = time.perf_counter() - t0
        return answer


def _events(r: requests.Response) -> Iterator[str]:
    """The data of each server-sent event, as it arrives (comments skipped)."""
    buffer = b""
    data: list[str] = []
    for piece in r.iter_content(chunk_size=None):
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8")
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
            elif line.startswith("data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def status_line(answer: Answer) -> str:
    s = answer.stats
    tokens = (answer.usage or {}).get("completion_tokens", s.get("tokens"))
    parts = [f"{tokens} tokens" if tokens is not None else None]
    if s:
        parts += [
            f"{s.get('tokens_per_second', 0.0):.1f} tokens/s",
            f"{s.get('tokens_per_step', 0.0):.2f} tokens/round trip",
            f"cloud round trip {s.get('round_trip_ms', 0.0):.0f} ms",
            f"{s.get('steps', 0)} round trips",
        ]
        if s.get("mode"):
            parts.append(str(s["mode"]))
    else:
        parts.append(f"{answer.seconds:.1f} s")
    if answer.interrupted:
        parts.append("interrupted")
    elif answer.finish_reason == "length":
        parts.append("cut at the token limit")
    return "[" + ", ".join(p for p in parts if p) + "]"


def _dim(text: str, stream: TextIO) -> str:
    if stream.isatty() and not os.environ.get("NO_COLOR"):
        return f"\x1b[2m{text}\x1b[0m"
    return text


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument(
        "--local-server", "--server", dest="server", metavar="URL", default=DEFAULT_SERVER,
        help="the local server's address (`splitinfer serve --port`; the cloud's address is the server's own "
        "business); --server is the old spelling",
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        help="file whose first line is the server's API key (jacobi_server.py --api-key-file), sent as "
        "'Authorization: Bearer'; needed only when the server was started with one",
    )
    p.add_argument("--prompt", default=None, help="ask this once, print the answer and the status line, and exit")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    p.add_argument(
        "--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=None,
        help="tokens per answer (default: the server's --max-new-tokens); --max-tokens is the old spelling",
    )
    p.add_argument("--temperature", type=float, default=None, help="0 or unset: greedy; > 0: sampling")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (with --temperature)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling, to repeat an answer")
    p.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable, up to 4)")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the server between two pieces of an answer"
    )
    p.add_argument("--no-status", action="store_true", help="do not print the status line")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    return args


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {
        "max_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
    }
    return {k: v for k, v in options.items() if v is not None}


def _ask(client: Client, messages: list[dict[str, str]], args: argparse.Namespace, prefix: str = "") -> Answer:
    answer = client.chat(messages, request_options(args), sys.stdout, prefix)
    print(flush=True)
    if not args.no_status:
        print(_dim(status_line(answer), sys.stderr), file=sys.stderr, flush=True)
    return answer


def chat_loop(client: Client, args: argparse.Namespace) -> int:
    health = client.health()
    model = health.get("model", "?")
    cloud = (health.get("split") or {}).get("cloud") or []
    where = f", cloud layers {cloud[0]}-{cloud[-1]}" if cloud else ""
    print(f"splitinfer chat with {model} via {client.server} (mode {health.get('mode', '?')}{where})", file=sys.stderr)
    if health.get("status") != "ok":
        problems = "; ".join(health.get("problems") or ["status " + str(health.get("status"))])
        print(f"warning: the server reports: {problems}", file=sys.stderr)
    print(
        "empty line, /quit or Ctrl-D to leave; /reset forgets the conversation; Ctrl-C stops an answer",
        file=sys.stderr,
    )
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("\nyou> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        if not line or line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history.clear()
            print("(conversation forgotten)", file=sys.stderr)
            continue
        messages = [*system, *history, {"role": "user", "content": line}]
        try:
            answer = _ask(client, messages, args, "model> ")
        except KeyboardInterrupt:  # before the answer began
            print("\n(interrupted)", file=sys.stderr)
            continue
        except ClientError as exc:
            print("\n" if client.writing else "", end="", flush=True)
            print(f"error: {exc}", file=sys.stderr)
            if exc.fatal:
                return 1
            continue
        if not answer.interrupted:
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer.text}]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    try:
        api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    client = Client(args.server, args.timeout, api_key)
    try:
        if args.prompt is not None:
            system = [{"role": "system", "content": args.system}] if args.system else []
            answer = _ask(client, [*system, {"role": "user", "content": args.prompt}], args)
            return 130 if answer.interrupted else 0
        return chat_loop(client, args)
    except ClientError as exc:
        print("\n" if client.writing else "", end="", flush=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
