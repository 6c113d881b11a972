"""What the guard reads from the upstream's answer for its log: the text of every choice and the usage,
from a JSON body or an SSE stream. Never raises: an upstream body of any shape is logged, as text when
it is not a response."""

from __future__ import annotations

import json
from typing import Any


def parse_json_response(data: bytes) -> tuple[str, int | None, int | None]:
    """(text of every choice, prompt_tokens, completion_tokens) of a non-streamed response.

    Never raises: an upstream body of any shape is logged, as text when it is not a response."""
    try:
        return _parse_json_response(data)
    except Exception:  # noqa: BLE001 - the upstream's body shape is not ours to trust
        return data.decode("utf-8", "replace")[:10000], None, None


def _parse_json_response(data: bytes) -> tuple[str, int | None, int | None]:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return data.decode("utf-8", "replace")[:10000], None, None
    if not isinstance(obj, dict):
        return "", None, None
    texts = []
    for ch in obj.get("choices") or []:
        if isinstance(ch, dict):
            msg = ch.get("message")
            if isinstance(msg, dict) and isinstance(msg.get("content"), str):
                texts.append(msg["content"])
            elif isinstance(ch.get("text"), str):
                texts.append(ch["text"])
    raw_usage = obj.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    return "\n\n".join(texts), usage.get("prompt_tokens"), usage.get("completion_tokens")


def parse_sse(data: bytes) -> tuple[str, int | None, int | None]:
    """(concatenated text per choice, prompt_tokens, completion_tokens) of a streamed response. Never raises."""
    try:
        return _parse_sse(data)
    except Exception:  # noqa: BLE001
        return data.decode("utf-8", "replace")[:10000], None, None


def _parse_sse(data: bytes) -> tuple[str, int | None, int | None]:
    by_choice: dict[int, list[str]] = {}
    pt = ct = None
    for line in data.decode("utf-8", "replace").split("\n"):
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == "[DONE]":
            continue
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        for ch in obj.get("choices") or []:
            if not isinstance(ch, dict):
                continue
            idx = ch.get("index", 0) if isinstance(ch.get("index", 0), int) else 0
            delta = ch.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else ch.get("text")
            if isinstance(piece, str):
                by_choice.setdefault(idx, []).append(piece)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            pt, ct = usage.get("prompt_tokens", pt), usage.get("completion_tokens", ct)
    return "\n\n".join("".join(by_choice[i]) for i in sorted(by_choice)), pt, ct
