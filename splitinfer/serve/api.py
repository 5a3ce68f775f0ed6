"""The OpenAI API's request checking and response shapes; nothing here touches a model.

Requests are checked the way OpenAI's own server does: a wrong type, a missing
field, an unknown field or a feature this server does not have is a 400 with

    {"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}

Any `model` name is accepted (clients insist on sending one, often a hosted
model's name); responses name the model actually served.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
# Temperatures below this count as 0 (greedy): sampling that cold picks the argmax anyway, and a
# denormal one (1e-320) would turn logits / temperature into infinities.
GREEDY_BELOW = 1e-4

# Accepted and ignored: they change nothing about the tokens.
IGNORED = {"model", "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}

# Known but not supported: allowed only at a value that asks for nothing (the API's default).
CHAT_NEUTRAL: dict[str, tuple] = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
}
COMPLETION_NEUTRAL: dict[str, tuple] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None,),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}
SAMPLING = {"max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options"}
CHAT_FIELDS = {"messages", "max_completion_tokens", *SAMPLING, *IGNORED, *CHAT_NEUTRAL}
COMPLETION_FIELDS = {"prompt", *SAMPLING, *IGNORED, *COMPLETION_NEUTRAL}

WHY_UNSUPPORTED = {
    "n": "this server generates one choice per request; send n=1 or leave it out",
    "best_of": "this server generates one choice per request",
    "logprobs": "log probabilities are not returned by this server",
    "top_logprobs": "log probabilities are not returned by this server",
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "tool_choice": "tool calling is not supported",
    "function_call": "function calling is not supported",
    "response_format": "only plain text responses are supported",
    "presence_penalty": "penalties are not supported",
    "frequency_penalty": "penalties are not supported",
    "logit_bias": "logit_bias is not supported",
    "echo": "echo is not supported",
    "suffix": "suffix (insertion) is not supported",
}
CHAT_ROLES = {"system", "developer", "user", "assistant"}


class APIError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Refused(APIError):
    """A request turned away before any work (wrong Host, too big...): logged, rate-limited, under `reason`.

    `reason` is a short fixed phrase, never a value from the request, so an attacker cannot make
    the rate-limited log keep one counter per value it sends.
    """

    def __init__(self, message: str, code: str, status: int, reason: str, param: str | None = None, detail: str = ""):
        super().__init__(message, param, code, status)
        self.reason = reason
        self.detail = detail  # for the log line: the refused value (truncated), say


@dataclass
class Request:
    """One checked request: everything generation needs, the prompt still as text or messages."""

    kind: str  # "chat" or "completion"
    messages: list[dict[str, str]] | None = None  # chat: role + content (text only)
    prompt: str | list[int] | None = None  # completion: text, or token ids
    max_tokens: int | None = None  # None: the server's default
    temperature: float = 0.0  # 0: greedy (the configured --mode)
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# -- checking -------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _bad_type(name: str, expected: str, value: Any) -> APIError:
    return APIError(
        f"Invalid type for '{name}': expected {expected}, but got {_type_name(value)} instead.", name, "invalid_type"
    )


def _missing(name: str) -> APIError:
    return APIError(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")


def _integer(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_type(name, "an integer", value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise APIError(f"Invalid value for '{name}': {value}; it must be {bounds}.", name, "invalid_value")
    return value


def _number(body: dict, name: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_type(name, "a number", value)
    if not (low < value if low_open else low <= value) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(f"Invalid value for '{name}': {value}; it must be in {interval}.", name, "invalid_value")
    return float(value)


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad_type(name, "a boolean", value)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _bad_type("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP_SEQUENCES:
        message = f"'stop' holds at most {MAX_STOP_SEQUENCES} sequences, got {len(value)}."
        raise APIError(message, "stop", "invalid_value")
    return [s for s in value if s]


def _neutral(body: dict, table: dict[str, tuple]) -> None:
    for name, allowed in table.items():
        value = body.get(name)
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            why = WHY_UNSUPPORTED.get(name, f"'{name}' is not supported by this server")
            message = f"Unsupported value for '{name}': {json.dumps(body[name])[:80]}; {why}."
            raise APIError(message, name, "unsupported_value")


def _unknown(body: dict, known: set[str]) -> None:
    for name in body:
        if name not in known:
            raise APIError(f"Unrecognized request argument supplied: {name}", name, "unknown_parameter")


def _common(body: Any, kind: str, known: set[str], neutral: dict[str, tuple]) -> Request:
    if not isinstance(body, dict):
        raise APIError("The request body must be a JSON object.", None, "invalid_json")
    _unknown(body, known)
    _neutral(body, neutral)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad_type("model", "a string", model)
    req = Request(kind)
    req.temperature = _number(body, "temperature", 0.0, 2.0, 0.0)
    if req.temperature < GREEDY_BELOW:  # 1e-320 would overflow logits / temperature; it means greedy anyway
        req.temperature = 0.0
    req.top_p = _number(body, "top_p", 0.0, 1.0, 1.0, low_open=True)
    req.seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    req.stop = _stop(body)
    req.stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not req.stream:
            message = "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            raise APIError(message, "stream_options", "invalid_value")
        if not isinstance(options, dict):
            raise _bad_type("stream_options", "an object", options)
        for name in options:
            if name not in ("include_usage", "include_obfuscation"):
                param = f"stream_options.{name}"
                raise APIError(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
        req.include_usage = _boolean(options, "include_usage")
    return req


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise APIError(
                    f"Unsupported content part at '{where}.content[{j}]' (type {kind!r}): "
                    "only text parts are supported.",
                    f"{where}.content",
                    "unsupported_value",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise _bad_type(f"{where}.content", "a string or an array of text parts", content)


def parse_chat(body: Any) -> Request:
    req = _common(body, "chat", CHAT_FIELDS, CHAT_NEUTRAL)
    a, b = _integer(body, "max_tokens", 1), _integer(body, "max_completion_tokens", 1)
    req.max_tokens = b if b is not None else a
    messages = body.get("messages")
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _bad_type("messages", "an array", messages)
    if not messages:
        raise APIError("'messages' must hold at least one message.", "messages", "empty_array")
    req.messages = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad_type(where, "an object", m)
        role = m.get("role")
        if not isinstance(role, str):
            raise _missing(f"{where}.role")
        if role not in CHAT_ROLES:
            raise APIError(
                f"Unsupported role '{role}' at '{where}.role': supported roles are {', '.join(sorted(CHAT_ROLES))}.",
                f"{where}.role",
                "unsupported_value",
            )
        if m.get("tool_calls") or m.get("function_call"):
            message = f"'{where}' holds tool calls; tool calling is not supported."
            raise APIError(message, f"{where}.tool_calls", "unsupported_value")
        content = m.get("content")
        if content is None and role != "assistant":
            raise _missing(f"{where}.content")
        text = "" if content is None else _text_content(content, where)
        req.messages.append({"role": "system" if role == "developer" else role, "content": text})
    return req


def parse_completion(body: Any) -> Request:
    req = _common(body, "completion", COMPLETION_FIELDS, COMPLETION_NEUTRAL)
    req.max_tokens = _integer(body, "max_tokens", 1)
    prompt = body.get("prompt")
    if prompt is None:
        raise _missing("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        req.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        req.prompt = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError("This server takes one prompt per request, not a batch.", "prompt", "unsupported_value")
    else:
        raise _bad_type("prompt", "a string or an array of token ids", prompt)
    if not req.prompt:
        raise APIError("'prompt' must not be empty.", "prompt", "invalid_value")
    return req


# -- responses --------------------------------------------------------------------------------------------


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class Shapes:
    """Builds the response objects of one request (same id, created and model on every chunk)."""

    kind: str
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or new_id(self.kind)
        self.created = self.created or int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, text: str, finish_reason: str, use: dict, extension: dict) -> dict[str, Any]:
        if self.kind == "chat":
            body = self._base("chat.completion")
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            body = self._base("text_completion")
            choice = {"index": 0, "text": text, "logprobs": None}
        body["choices"] = [{**choice, "finish_reason": finish_reason}]
        body["usage"] = use
        body["splitinfer"] = extension
        return body

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None,
        extension: dict | None,
        include_usage: bool,
        first: bool = False,
    ) -> dict[str, Any]:
        if self.kind == "chat":
            body = self._base("chat.completion.chunk")
            delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None}
        else:
            body = self._base("text_completion")
            choice = {"index": 0, "text": text or "", "logprobs": None}
        body["choices"] = [{**choice, "finish_reason": finish_reason}]
        if include_usage:
            body["usage"] = None
        if extension is not None:
            body["splitinfer"] = extension
        return body

    def usage_chunk(self, use: dict, extension: dict) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._base(obj), "choices": [], "usage": use, "splitinfer": extension}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")
SSE_KEEPALIVE = b": keep-alive\n\n"  # a comment: clients skip it; writing it notices a gone client
