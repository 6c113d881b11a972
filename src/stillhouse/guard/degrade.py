"""Degrade mode: a weaker service for suspicious accounts, without telling them apart from a bug.

Three levers, each switched by the config:

- **request side** (``degrade_request``): cap ``max_tokens``/``max_completion_tokens``, refuse
  ``logprobs``/``top_logprobs`` and ``n > 1`` (403, OpenAI-style);
- **response side, whole JSON** (``strip_reasoning``): drop ``reasoning_content``/``reasoning``
  fields and ``<think>...</think>`` blocks from message content;
- **response side, streaming** (``SSEReasoningStripper``): the same, event by event. Only
  in this mode is a little buffering added: an SSE event is held until its blank-line
  terminator arrives so it can be parsed, and a possible partial ``<think>`` tag at the
  end of a delta is held until the next one.
"""

from __future__ import annotations

import json
import re
from typing import Any

_THINK_BLOCK = re.compile(r"<think>.*?(</think>\s*|$)", re.DOTALL)
_REASONING_FIELDS = ("reasoning_content", "reasoning")
_OPEN, _CLOSE = "<think>", "</think>"


def degrade_request(body: dict[str, Any], max_tokens: int, refuse_logprobs: bool,
                    refuse_n: bool) -> tuple[dict[str, Any], str | None]:
    """The degraded request body, or a refusal message (then the body is not sent)."""
    if refuse_logprobs and (body.get("logprobs") or body.get("top_logprobs")):
        return body, "logprobs are not available for this account"
    n = body.get("n")
    if refuse_n and isinstance(n, int) and n > 1:
        return body, "n > 1 is not available for this account"
    out = dict(body)
    for name in ("max_tokens", "max_completion_tokens"):
        value = out.get(name)
        too_big = not isinstance(value, int) or value > max_tokens
        if too_big and (name == "max_tokens" or name in out):
            out[name] = max_tokens
    return out, None


def strip_think(text: str) -> str:
    """Remove ``<think>...</think>`` blocks (an unclosed one runs to the end)."""
    return _THINK_BLOCK.sub("", text) if _OPEN in text else text


def strip_reasoning(resp: dict[str, Any]) -> dict[str, Any]:
    """A chat/completions response without reasoning fields or think blocks (modified in place)."""
    choices = resp.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        msg = choice.get("message")
        if isinstance(msg, dict):
            for f in _REASONING_FIELDS:
                msg.pop(f, None)
            if isinstance(msg.get("content"), str):
                msg["content"] = strip_think(msg["content"])
        if isinstance(choice.get("text"), str):
            choice["text"] = strip_think(choice["text"])
    return resp


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


class ThinkFilter:
    """Streaming removal of think blocks from one choice's content deltas."""

    def __init__(self) -> None:
        self.inside = False
        self.held = ""
        self.skip_ws = False
        """Whitespace right after a closing tag is dropped, even when it arrives in a later chunk."""

    def feed(self, text: str) -> str:
        text = self.held + text
        self.held = ""
        out: list[str] = []
        while text:
            if self.inside:
                i = text.find(_CLOSE)
                if i < 0:
                    k = _partial_tag_suffix(text, _CLOSE)
                    self.held = text[len(text) - k:] if k else ""
                    return "".join(out)
                text = text[i + len(_CLOSE):]
                self.inside = False
                self.skip_ws = True
            else:
                if self.skip_ws:
                    text = text.lstrip()
                    if not text:
                        break
                    self.skip_ws = False
                i = text.find(_OPEN)
                if i < 0:
                    k = _partial_tag_suffix(text, _OPEN)
                    out.append(text[:len(text) - k])
                    self.held = text[len(text) - k:] if k else ""
                    return "".join(out)
                out.append(text[:i])
                text = text[i + len(_OPEN):]
                self.inside = True
        return "".join(out)


class SSEReasoningStripper:
    """Feed upstream SSE bytes, get degraded SSE bytes (event-aligned)."""

    def __init__(self) -> None:
        self._buf = b""
        self._filters: dict[int, ThinkFilter] = {}

    def feed(self, chunk: bytes) -> bytes:
        self._buf += chunk
        out = []
        while True:
            i = self._buf.find(b"\n\n")
            if i < 0:
                break
            event, self._buf = self._buf[:i + 2], self._buf[i + 2:]
            out.append(self._event(event))
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        return self._event(rest) if rest.strip() else b""

    def _event(self, event: bytes) -> bytes:
        text = event.decode("utf-8", "replace")
        lines = text.split("\n")
        data_lines = [ln for ln in lines if ln.startswith("data:")]
        if len(data_lines) != 1:
            return event
        payload = data_lines[0][5:].strip()
        if payload == "[DONE]":
            return event
        try:
            obj = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return event
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            return event
        for choice in obj["choices"]:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            idx = choice.get("index", 0)
            f = self._filters.setdefault(idx if isinstance(idx, int) else 0, ThinkFilter())
            if isinstance(delta, dict):
                for name in _REASONING_FIELDS:
                    delta.pop(name, None)
                if isinstance(delta.get("content"), str):
                    delta["content"] = f.feed(delta["content"])
            if isinstance(choice.get("text"), str):
                choice["text"] = f.feed(choice["text"])
        return f"data: {json.dumps(obj)}\n\n".encode()
