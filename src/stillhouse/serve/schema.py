"""The OpenAI chat-completions wire format, as ``stillhouse serve`` reads and writes it.

``parse_chat_request`` checks a decoded JSON body field by field and raises
:class:`APIError` (status, message, param, code) naming the bad field and the fix;
the ``*_json`` functions build response bodies, stream chunks and error bodies exactly
in OpenAI's shapes (``choices[].logprobs.content[]`` with token, logprob, bytes,
top_logprobs). Pure functions and dataclasses: no I/O, no model.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from stillhouse.teacher.base import Completion, SamplingParams
from stillhouse.teacher.message import assistant_message

LOGPROB_FLOOR = -9999.0
"""JSON has no -inf; OpenAI reports impossible tokens with this value."""


class APIError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_json(self.message, type=self.type, param=self.param, code=self.code)


def error_json(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completions request."""

    model: str | None
    messages: list[dict[str, Any]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    max_tokens_given: bool
    tools: list[dict[str, Any]] | None = None
    """The request's function tools (None: none offered)."""
    tool_choice: Any = None
    """auto, none, required, or {"type": "function", "function": {"name": ...}}; None when not sent."""


_UNSUPPORTED = {
    "functions": "the legacy function calling; send 'tools'", "function_call": "the legacy function calling; "
    "send 'tool_choice'", "logit_bias": "logit_bias", "audio": "audio output",
}
_ROLES = ("system", "user", "assistant", "developer", "tool")
_ZERO_ONLY = ("frequency_penalty", "presence_penalty")


def _bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"'{key}' must be a number, got {json_type(value)}", key, "invalid_type")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        interval = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise _bad(f"'{key}'={value} is out of range: it must be a finite number in {interval}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad(f"'{key}' must be an integer, got {json_type(value)}", key, "invalid_type")
    return value


def json_type(value: Any) -> str:
    """The JSON type name of a decoded value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def parse_chat_request(
    body: Any, *, max_tokens_limit: int, default_max_tokens: int, max_n: int
) -> ChatRequest:
    """Check a decoded JSON body; raise APIError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {json_type(body)}", code="invalid_json")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {json_type(model)}", "model", "invalid_type")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of {\"role\": ..., \"content\": ...} objects",
                   "messages", "invalid_type" if messages is not None else "missing_required_parameter")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object, got {json_type(m)}", f"messages[{i}]", "invalid_type")
        if m.get("role") not in _ROLES:
            raise _bad(f"messages[{i}].role={m.get('role')!r}: use 'system', 'user', 'assistant' or 'tool'",
                       f"messages[{i}].role")
        content = m.get("content")
        calls = m.get("tool_calls")
        if calls is not None:
            if m.get("role") != "assistant":
                raise _bad(f"messages[{i}]: only an assistant message carries 'tool_calls'", f"messages[{i}]")
            _check_tool_calls(calls, f"messages[{i}].tool_calls")
            if content is None:
                continue  # an assistant turn that only calls tools
        if m.get("role") == "tool" and not isinstance(m.get("tool_call_id", ""), str):
            raise _bad(f"messages[{i}].tool_call_id must be a string, got {json_type(m.get('tool_call_id'))}",
                       f"messages[{i}].tool_call_id", "invalid_type")
        if not isinstance(content, (str, list)):
            raise _bad(f"messages[{i}].content must be a string or an array of text parts, got "
                       f"{json_type(content)}", f"messages[{i}].content", "invalid_type")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise _bad(f"messages[{i}].content[{j}] must be {{\"type\": \"text\", \"text\": \"...\"}}: "
                               "this server reads text only", f"messages[{i}].content[{j}]")
    for key, what in _UNSUPPORTED.items():
        if body.get(key) not in (None, [], {}):
            raise _bad(f"'{key}' is not supported by this server ({what}); remove it", key, "unsupported_parameter")
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad(f"'tools' must be an array of function tools, got {json_type(tools)}", "tools", "invalid_type")
        for j, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not (isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(fn, dict)
                    and isinstance(fn.get("name"), str) and fn["name"]):
                raise _bad(f"tools[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                           "\"parameters\": {...}}}", f"tools[{j}]")
        tools = tools or None
    tool_choice = body.get("tool_choice")
    if tool_choice is not None:
        ok = tool_choice in ("auto", "none", "required") or (
            isinstance(tool_choice, dict) and isinstance((tool_choice.get("function") or {}).get("name"), str))
        if not ok:
            raise _bad("'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                       "\"function\": {\"name\": ...}}", "tool_choice")
        if tools is None and tool_choice != "none":
            raise _bad("'tool_choice' needs 'tools'", "tool_choice")
        if isinstance(tool_choice, dict) and tool_choice["function"]["name"] not in {
                t["function"]["name"] for t in tools or []}:
            raise _bad(f"'tool_choice' names {tool_choice['function']['name']!r}, which is not among 'tools'",
                       "tool_choice")
    for key in _ZERO_ONLY:
        if _number(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise _bad(f"'{key}' is not supported by this server; send 0 or leave it out", key,
                       "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("'response_format' other than {\"type\": \"text\"} is not supported", "response_format",
                   "unsupported_parameter")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be a boolean, got {json_type(stream)}", "stream", "invalid_type")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad(f"'stream_options' must be an object, got {json_type(opts)}", "stream_options", "invalid_type")
    include_usage = bool((opts or {}).get("include_usage", False))

    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    n = _integer(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= max_n:
        raise _bad(f"'n'={n} is out of range: this server allows 1 to {max_n} completions per request", "n")
    given = body.get("max_completion_tokens", body.get("max_tokens"))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key)
    if max_tokens is None:
        max_tokens = min(default_max_tokens, max_tokens_limit)
    elif max_tokens < 1:
        raise _bad(f"'{key}'={max_tokens} must be at least 1", key)
    elif max_tokens > max_tokens_limit:
        raise _bad(f"'{key}'={max_tokens} is over this server's limit of {max_tokens_limit} completion tokens; "
                   f"send at most {max_tokens_limit}", key, "max_tokens_exceeded")
    seed = _integer(body, "seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > 4:
            raise _bad(f"'stop' has {len(stop)} strings; at most 4 are allowed", "stop")
        stops = tuple(s for s in stop if s)
    else:
        raise _bad(f"'stop' must be a string or an array of up to 4 strings, got {json_type(stop)}", "stop",
                   "invalid_type")
    logprobs = body.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise _bad(f"'logprobs' must be a boolean, got {json_type(logprobs)}", "logprobs", "invalid_type")
    top = _integer(body, "top_logprobs")
    top = 0 if top is None else top
    if not 0 <= top <= 20:
        raise _bad(f"'top_logprobs'={top} is out of range: it must be between 0 and 20", "top_logprobs")
    if top and not logprobs:
        raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    extra: dict[str, Any] = {}
    if tools is not None:  # a teacher behind this server gets them as request fields
        extra["tools"] = tools
        if tool_choice is not None:
            extra["tool_choice"] = tool_choice
    params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, n=n, seed=seed,
                            stop=stops, logprobs=logprobs, top_logprobs=top,
                            extra=json.dumps(extra, ensure_ascii=False, separators=(",", ":")) if extra else "")
    return ChatRequest(model=model, messages=messages, params=params, stream=stream,
                       include_usage=include_usage, max_tokens_given=given is not None, tools=tools,
                       tool_choice=tool_choice)


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise _bad(f"'{where}' must be an array of tool calls, got {json_type(calls)}", where, "invalid_type")
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(fn, dict) and isinstance(fn.get("name"), str)
                and isinstance(fn.get("arguments", ""), (str, dict))):
            raise _bad(f"{where}[{j}] must be {{\"id\": ..., \"type\": \"function\", \"function\": {{\"name\": "
                       "..., \"arguments\": \"...\"}}}", f"{where}[{j}]")


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def _lp(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


def logprob_entries(
    tokens: list[str], raw: list[bytes], logprobs: list[float],
    top_tokens: list[list[str]], top_raw: list[list[bytes]], top_logprobs: list[list[float]],
) -> list[dict[str, Any]]:
    """OpenAI ``logprobs.content`` entries for a run of tokens."""
    out = []
    for j, (tok, b, lp) in enumerate(zip(tokens, raw, logprobs)):
        tops = []
        if j < len(top_tokens):
            tops = [{"token": t, "logprob": _lp(v), "bytes": list(tb)}
                    for t, tb, v in zip(top_tokens[j], top_raw[j], top_logprobs[j])]
        out.append({"token": tok, "logprob": _lp(lp), "bytes": list(b), "top_logprobs": tops})
    return out


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_json(
    cid: str, model: str, completions: list[Completion], choice_logprobs: list[dict[str, Any] | None],
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` body."""
    prompt = completions[0].prompt_tokens if completions else 0
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {"index": i, "message": assistant_message(c.text, c.message),
             "logprobs": choice_logprobs[i], "finish_reason": c.finish_reason}
            for i, c in enumerate(completions)
        ],
        "usage": usage_json(prompt, sum(c.completion_tokens for c in completions)),
    }


def chunk_json(
    cid: str, model: str, created: int, index: int, delta: dict[str, Any],
    logprobs: dict[str, Any] | None = None, finish_reason: str | None = None, fingerprint: str | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` for choice ``index``."""
    return {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
