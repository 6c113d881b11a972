"""What the guard reads from a client's request before it forwards it: the fields it relies on, checked
(a BadRequest names the field: 400), the prompt's text for the log and the detector, a rough token count
for the limits, and a fingerprint of the client's header order."""

from __future__ import annotations

import hashlib
import json
from typing import Any


class BadRequest(Exception):
    """The client's request is malformed; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param = param
        self.code = code


def header_fingerprint(headers: list[tuple[bytes, bytes]]) -> str:
    """Hash of the request's header names in arrival order (clients differ in order and set)."""
    return hashlib.blake2b(b"\n".join(k for k, _ in headers), digest_size=8).hexdigest()


def check_request(path: str, body: Any) -> None:
    """Validate the fields the guard relies on; the upstream checks the rest."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a non-empty string", "model")
    if path == "/v1/chat/completions":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' is required and must be a non-empty array", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise BadRequest(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
            c = m.get("content")
            if c is not None and not isinstance(c, str | list):
                raise BadRequest(f"messages[{i}].content must be a string, an array or null",
                                 f"messages[{i}].content")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list):
            raise BadRequest("'prompt' is required and must be a string or an array", "prompt")
    for name, kind, low in (("max_tokens", int, 1), ("max_completion_tokens", int, 1), ("n", int, 1),
                            ("top_logprobs", int, 0)):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, kind) or v < low):
            raise BadRequest(f"'{name}' must be an integer >= {low}", name)
    v = body.get("stream")
    if v is not None and not isinstance(v, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    v = body.get("logprobs")
    if path == "/v1/chat/completions":
        if v is not None and not isinstance(v, bool):
            raise BadRequest("'logprobs' must be true or false", "logprobs")
    elif v is not None and not (isinstance(v, bool) or (isinstance(v, int) and 0 <= v <= 20)):
        raise BadRequest("'logprobs' must be an integer 0..20 on /v1/completions", "logprobs")
    for name in ("temperature", "top_p"):
        v = body.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise BadRequest(f"'{name}' must be a number", name)


def public_url(url: str) -> str:
    """``url`` without user:password@, query string or fragment (safe to show without a key)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        netloc = f"{host}:{parts.port}" if parts.port is not None else host
    except ValueError:  # an unparsable port: show nothing rather than something wrong
        return ""
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def prompt_text(body: dict[str, Any]) -> str:
    if "messages" in body:
        parts = []
        for m in body["messages"]:
            c = m.get("content")
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(p.get("text", "") for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
        return "\n".join(parts)
    p = body.get("prompt")
    return p if isinstance(p, str) else json.dumps(p)
