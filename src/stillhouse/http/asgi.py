"""Reading a request from an ASGI client: the body under a byte limit, its JSON strictly.

Shared by ``stillhouse serve`` and the guard (both plain ASGI)::

    raw = await read_body(receive, limit=cfg.max_body_bytes, length=content_length(scope["headers"]))
    body = loads_strict(raw)

Failures carry the HTTP status, an OpenAI error ``code`` and, where one value is to blame, the
``param`` (its path, e.g. ``temperature`` or ``messages[0].content``)::

    RequestError
    ├── BodyTooLarge    413  Content-Length over the limit (nothing is read), or the bytes received
    │                        passed it (a chunked body: reading stops there)
    ├── ClientGone      499  the client disconnected before the body was complete
    └── BadJSON         400  not JSON, NaN / Infinity (not JSON numbers, though Python's json takes
                             them) or a number that overflows to infinity (1e999), or nested
                             deeper than ``max_depth``

The depth check costs nothing on ordinary bodies: only when the body holds more brackets than
``max_depth`` is the parsed value walked (iteratively); a body deep enough to exhaust the
parser's recursion is caught as such.
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects a request body may have (a chat request needs about 5;
tool schemas a few more)."""


class RequestError(Exception):
    """A request that cannot be read; ``status``, ``code`` and ``param`` go into the error answer."""

    status = 400
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class BodyTooLarge(RequestError):
    status = 413
    code = "body_too_large"


class ClientGone(RequestError):
    status = 499
    code = "client_disconnected"


class BadJSON(RequestError):
    status = 400
    code = "invalid_json"


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length header as a number, or None (absent or not a number)."""
    for k, v in headers:
        if k == b"content-length":
            return int(v) if v.isdigit() else None
    return None


async def read_body(receive: Receive, limit: int, length: int | None = None) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes.

    ``length`` is the Content-Length when the caller has it: a larger one is refused before any of
    the body is read. A chunked (or lying) body is refused as soon as what arrived passes ``limit``."""
    if length is not None and length > limit:
        raise BodyTooLarge(f"the request body of {length} bytes exceeds this server's limit of {limit} "
                           "bytes; send a smaller body (a shorter prompt)")
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone("the client disconnected while sending the body")
    body: bytes = message.get("body", b"")
    if len(body) > limit:
        raise _too_large(limit)
    if not message.get("more_body", False):
        return body  # the common case: one message
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("the client disconnected while sending the body")
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            raise _too_large(limit)
        chunks.append(part)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"the request body exceeds this server's limit of {limit} bytes; send a smaller body "
                        "(a shorter prompt)")


class _NonFinite(Exception):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFinite(name)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if value - value != 0.0:  # inf (1e999 overflows); NaN cannot come from a JSON literal
        raise _NonFinite(literal)
    return value


_BOM_STARTS = b"\xef\xfe\xff"
_STRICT = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_LAX = json.JSONDecoder()


def loads_strict(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse a request body as JSON; :class:`BadJSON` for anything JSON does not allow or that is too deep.

    Bytes are decoded as ``json.loads`` does (UTF-8, or UTF-16/32 by their BOM)."""
    try:
        if not isinstance(data, bytes):
            text = data
        elif data[:1] in _BOM_STARTS or b"\x00" in data[:4]:  # a BOM, or UTF-16/32: as json.loads reads them
            text = data.decode(json.detect_encoding(data), "surrogatepass")
        else:
            text = data.decode("utf-8", "surrogatepass")
        value = _STRICT.decode(text)
    except _NonFinite as exc:
        try:
            path = _non_finite_path(_LAX.decode(text))
        except (ValueError, RecursionError):  # invalid or too deep further on: name no field
            path = None
        where = f"'{path}' is" if path else "the body holds"
        literal = exc.args[0]
        what = "not a JSON number" if literal in ("NaN", "Infinity", "-Infinity") else "too large for a number"
        raise BadJSON(f"{where} {literal}, which is {what}: send a finite number (NaN and Infinity are "
                      "not allowed)", path or None) from None
    except RecursionError:
        raise BadJSON(f"the JSON body is nested too deeply: at most {max_depth} levels of arrays and objects "
                      "are allowed") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise BadJSON(f"the request body is not valid JSON ({exc}); send a JSON object") from None
    if text.count("[") + text.count("{") > max_depth and _deeper_than(value, max_depth):
        raise BadJSON(f"the JSON body is nested more than {max_depth} levels deep; at most {max_depth} levels "
                      "of arrays and objects are allowed")
    return value


def _deeper_than(value: Any, max_depth: int) -> bool:
    """Whether arrays/objects nest more than ``max_depth`` levels (iterative: no recursion limit)."""
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        for c in children:
            if isinstance(c, dict | list):
                if d + 1 > max_depth:
                    return True
                stack.append((c, d + 1))
    return False


def _non_finite_path(value: Any, path: str = "") -> str | None:
    """The path (``a.b[2]``) of the first NaN or infinite number in ``value``, None when there is none."""
    queue = collections.deque([(value, path)])
    while queue:
        v, p = queue.popleft()
        if isinstance(v, float) and not math.isfinite(v):
            return p
        if isinstance(v, dict):
            queue.extend((c, f"{p}.{k}" if p else str(k)) for k, c in v.items())
        elif isinstance(v, list):
            queue.extend((c, f"{p}[{i}]") for i, c in enumerate(v))
    return None
