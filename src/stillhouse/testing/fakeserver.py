"""A fast fake OpenAI-compatible server with fixed latency and scheduled faults.

It stands in for a real model API wherever throughput or failure handling is under test:
the harvester's crash/fault tests, ``stillhouse bench harvest``, the guard's upstream in
its benchmarks, the arena. Answers are deterministic (arithmetic questions get a sum that
is right most of the time; anything else gets a few Greek-letter words), every answer
waits ``latency_ms`` before it is sent, and faults are chosen by a deterministic schedule.

Run it::

    python -m stillhouse.testing.fakeserver --port 8001 --latency-ms 50
    python -m stillhouse.testing.fakeserver --port 8001 --faults 429=0.1,500=0.05,truncated=0.05 \\
        --permanent-faults empty=0.02

Endpoints: ``POST /v1/chat/completions`` (``n``, ``max_tokens``, ``logprobs``,
``top_logprobs``, ``stream``, ``tools``, ``tool_choice``, ``reasoning_effort``), ``GET /v1/models``,
``GET /health``, ``GET /stats`` (request and fault counters as JSON), ``POST /stats/reset``.

Reasoning and tools, as :mod:`stillhouse.teacher.fake` answers them: ``--reasoning FORM`` makes every
answer carry a chain of thought in a ``reasoning_content`` or ``reasoning`` field or as a leading
``<think>`` block (a request with ``reasoning_effort`` gets ``reasoning_content`` anyway); a request
with ``tools`` is answered with a tool call (null content, finish_reason ``tool_calls``) unless its
last message is a tool's result. ``keep_bodies`` keeps every 200 answer's exact bytes, by request
body, for byte-exact tests.

Fault schedule. Each request is keyed by the SHA-1 of its body; the server counts how many
times it has seen that body (the *attempt*). ``--faults KIND=RATE,...`` are transient: a
fault is drawn from a hash of (body, attempt), and only while attempt < ``--fault-attempts``
(default 2), so a client that retries enough times always gets through — the outcome of
every request is a pure function of (body, attempt), independent of arrival order.
``--permanent-faults KIND=RATE,...`` are drawn from the body alone and hit every attempt:
those records can never succeed. Kinds:

    429        429 with ``Retry-After: <retry_after_s>`` and an OpenAI-style error body
    503        503 with ``Retry-After``
    500        500 Internal Server Error
    400        400 Bad Request (only sensible as a permanent fault)
    timeout    the answer is held for ``--hang-s`` seconds (default 30) before it is sent
    truncated  200 with the JSON body cut in half
    empty      200 with ``"choices": []``
    drop       the connection is closed without an answer

Engines (``--engine``): ``aiohttp`` (default; everything above) and ``raw``, a bare
asyncio.Protocol HTTP/1.1 keep-alive responder for throughput benchmarks (no faults, no
streaming): about a third of aiohttp.web's server CPU per request, and 3x its capacity, measured
with ``stillhouse bench harvest --only server`` (docs/benchmarks.md). The foreground server runs
on uvloop when it is installed (STILLHOUSE_LOOP=asyncio forces asyncio's loop).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from stillhouse.teacher.fake import REASONING_FORMS, fake_message

FaultKind = Literal["429", "503", "500", "400", "timeout", "truncated", "empty", "drop"]
FAULT_KINDS: tuple[str, ...] = ("429", "503", "500", "400", "timeout", "truncated", "empty", "drop")

_SUM = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)")
_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")


def parse_faults(text: str) -> tuple[tuple[str, float], ...]:
    """Parse ``"429=0.1,500=0.05"`` into ((kind, rate), ...), validating kinds and rates."""
    out: list[tuple[str, float]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, rate_s = part.partition("=")
        if not sep:
            raise ValueError(f"fault {part!r}: write KIND=RATE, e.g. 429=0.1")
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {kind!r}: choose from {', '.join(FAULT_KINDS)}")
        try:
            rate = float(rate_s)
        except ValueError as exc:
            raise ValueError(f"fault {part!r}: rate {rate_s!r} is not a number") from exc
        out.append((kind, rate))
    return tuple(out)


@dataclass(frozen=True)
class FakeServerConfig:
    """How the fake server behaves."""

    latency_ms: float = 50.0
    """Every answer waits this long before it is sent (the fixed latency L)."""
    model: str = "fake-model"
    """The id /v1/models lists and completions carry."""
    faults: tuple[tuple[str, float], ...] = ()
    """Transient faults as (kind, rate); see the module docstring."""
    permanent_faults: tuple[tuple[str, float], ...] = ()
    """Faults drawn per request body that hit every attempt."""
    fault_attempts: int = 2
    """Transient faults can only hit the first this-many attempts of a body."""
    retry_after_s: float = 0.2
    """The Retry-After a 429/503 carries."""
    hang_s: float = 30.0
    """How long a 'timeout' fault holds the answer."""
    error_rate: float = 0.3
    """Share of arithmetic answers that are off by one."""
    seed: int = 0
    """Changes every answer and every fault draw."""
    stream_chunk_delay_ms: float = 0.0
    """Pause between SSE chunks when streaming."""
    reasoning: str = "off"
    """How answers carry a chain of thought: off, reasoning_content, reasoning or think (inline)."""
    keep_bodies: bool = False
    """Keep the bytes of every 200 answer (``FakeServer.bodies``: request body -> answer bodies)."""

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or math.isnan(self.latency_ms):
            raise ValueError(f"latency_ms={self.latency_ms}: must be >= 0")
        for name in ("faults", "permanent_faults"):
            pairs = getattr(self, name)
            for kind, rate in pairs:
                if kind not in FAULT_KINDS:
                    raise ValueError(f"{name}: unknown kind {kind!r}; choose from {', '.join(FAULT_KINDS)}")
                if not 0.0 <= rate <= 1.0:
                    raise ValueError(f"{name}: rate {rate} for {kind} must be between 0 and 1")
            if sum(r for _, r in pairs) > 1.0 + 1e-9:
                raise ValueError(f"{name}: rates sum to more than 1")
        if self.fault_attempts < 0:
            raise ValueError(f"fault_attempts={self.fault_attempts}: must be >= 0")
        if self.retry_after_s < 0 or self.hang_s < 0:
            raise ValueError("retry_after_s and hang_s must be >= 0")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate={self.error_rate}: must be between 0 and 1")
        if self.reasoning not in REASONING_FORMS:
            raise ValueError(f"reasoning={self.reasoning!r}: choose from {', '.join(REASONING_FORMS)}")


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def _pick(pairs: tuple[tuple[str, float], ...], u: float) -> str | None:
    acc = 0.0
    for kind, rate in pairs:
        acc += rate
        if u < acc:
            return kind
    return None


def choose_fault(cfg: FakeServerConfig, body_key: str, attempt: int) -> str | None:
    """The fault (or None) for the ``attempt``-th sighting (0-based) of a body: a pure function."""
    if cfg.permanent_faults:
        kind = _pick(cfg.permanent_faults, _unit(cfg.seed, "perm", body_key))
        if kind is not None:
            return kind
    if cfg.faults and attempt < cfg.fault_attempts:
        return _pick(cfg.faults, _unit(cfg.seed, "tr", body_key, attempt))
    return None


def answer_text(cfg: FakeServerConfig, last: str, index: int) -> str:
    """The deterministic text of completion ``index`` for a last user message."""
    h = zlib.crc32(f"{cfg.seed}|{index}|{last}".encode())
    m = _SUM.search(last)
    if m:
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        value = a + b if op == "+" else a - b if op == "-" else a * b
        if (h % 1000) / 1000 < cfg.error_rate:
            value += 1 if h & 1 else -1
        return f"{a} {op} {b} = {value}"
    return " ".join(_WORDS[(h >> (3 * i)) % 8] for i in range(3 + h % 8))


def _logprob_content(words: list[str], top_k: int, salt: int) -> list[dict[str, Any]]:
    out = []
    for j, w in enumerate(words):
        tok = w if j == len(words) - 1 else w + " "
        lp = -(((salt >> (j % 24)) + j) % 50) / 100.0
        entry: dict[str, Any] = {"token": tok, "logprob": lp, "bytes": list(tok.encode())}
        if top_k:
            tops = [{"token": tok, "logprob": lp, "bytes": list(tok.encode())}]
            for r in range(1, top_k):
                alt = f"alt{r} "
                tops.append({"token": alt, "logprob": lp - r, "bytes": list(alt.encode())})
            entry["top_logprobs"] = tops
        else:
            entry["top_logprobs"] = []
        out.append(entry)
    return out


def _error_body(message: str, type_: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class FakeServer:
    """The server's state (counters, attempt counts) and its aiohttp.web application."""

    def __init__(self, config: FakeServerConfig | None = None):
        self.config = config or FakeServerConfig()
        self.stats: Counter[str] = Counter()
        self._seen: dict[str, int] = {}
        self._track = bool(self.config.faults or self.config.permanent_faults)
        self._created = int(time.time())
        self.bodies: dict[bytes, list[bytes]] = {}
        """With ``keep_bodies``: each request body's 200 answers, byte for byte, in order."""

    # -- application -------------------------------------------------------------------------
    def app(self) -> Any:
        """The aiohttp.web Application serving this fake."""
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/stats/reset", self._reset)
        return app

    def simple_answer(self, path: str) -> dict[str, Any]:
        """The JSON of GET /health, /v1/models or /stats."""
        if path == "/health":
            return {"status": "ok"}
        if path == "/v1/models":
            return {"object": "list",
                    "data": [{"id": self.config.model, "object": "model", "created": self._created,
                              "owned_by": "fake"}]}
        return dict(self.stats)

    async def _health(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(self.simple_answer("/health"))

    async def _models(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(self.simple_answer("/v1/models"))

    async def _stats(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(self.simple_answer("/stats"))

    async def _reset(self, request: Any) -> Any:
        from aiohttp import web

        self.stats.clear()
        self._seen.clear()
        return web.json_response({"status": "reset"})

    def parse_request(self, raw: bytes) -> tuple[Any, ...]:
        """Count and check one chat request: (body, messages, model), or (status, error body)."""
        cfg = self.config
        self.stats["requests"] += 1
        try:
            body = json.loads(raw)
            messages = body["messages"]
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list")
        except (ValueError, KeyError, TypeError) as exc:
            self.stats["bad_request"] += 1
            return 400, _error_body(f"invalid request: {exc}", "invalid_request_error")
        model = body.get("model") or cfg.model
        if model != cfg.model:
            self.stats["unknown_model"] += 1
            return 404, _error_body(f"model {model!r} not found; this server has {cfg.model!r}",
                                    "invalid_request_error", "model_not_found")
        return body, messages, model

    async def _chat(self, request: Any) -> Any:
        from aiohttp import web

        cfg = self.config
        raw = await request.read()
        parsed = self.parse_request(raw)
        if isinstance(parsed[0], int):
            return web.Response(status=parsed[0], body=parsed[1], content_type="application/json")
        body, messages, model = parsed

        fault = None
        if self._track:
            key = hashlib.sha1(raw).hexdigest()
            attempt = self._seen.get(key, 0)
            self._seen[key] = attempt + 1
            fault = choose_fault(cfg, key, attempt)
        if fault is not None:
            self.stats[f"fault_{fault}"] += 1
            resp = await self._fault(request, fault)
            if resp is not None:
                return resp

        if cfg.latency_ms:
            await asyncio.sleep(cfg.latency_ms / 1000.0)

        rid = f"chatcmpl-fake-{self.stats['requests']}"
        if body.get("stream"):
            choices, usage = self.completion(body, messages)
            if fault == "empty":
                choices = []
            return await self._stream(request, rid, model, choices, usage, body)
        payload = self.completion_body(body, messages, model, rid, empty=fault == "empty")
        if fault == "truncated":
            payload = payload[: len(payload) // 2]
        self.stats["ok"] += 1
        if cfg.keep_bodies and fault is None:
            self.bodies.setdefault(raw, []).append(payload)
        return web.Response(body=payload, content_type="application/json")

    def completion(self, body: dict[str, Any], messages: list[Any]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The choices and usage of one chat request (deterministic; no I/O)."""
        cfg = self.config
        last = messages[-1].get("content", "") if isinstance(messages[-1], dict) else ""
        if not isinstance(last, str):
            last = json.dumps(last)
        n = int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        want_lp = bool(body.get("logprobs"))
        top_k = int(body.get("top_logprobs") or 0)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) + 3 for m in messages if isinstance(m, dict))
        choices = []
        completion_tokens = 0
        plain = cfg.reasoning == "off" and not body.get("tools") and not body.get("reasoning_effort")
        for i in range(n):
            words = answer_text(cfg, last, i).split()
            finish = "stop"
            if len(words) > max_tokens:
                words, finish = words[:max_tokens], "length"
            message: dict[str, Any] = {"role": "assistant", "content": " ".join(words)}
            if not plain:
                content, more, why = fake_message(message["content"], last, body, messages, cfg.reasoning, i)
                message = {"role": "assistant", "content": content, **(more or {})}
                if content != " ".join(words):
                    words, finish = (content or "").split(), why if finish == "stop" else finish
                completion_tokens += sum(len(v.split()) for k, v in message.items()
                                         if k not in ("role", "content") and isinstance(v, str))
            completion_tokens += len(words)
            choice: dict[str, Any] = {
                "index": i,
                "message": message,
                "finish_reason": finish,
                "logprobs": None,
            }
            if want_lp:
                choice["logprobs"] = {"content": _logprob_content(words, top_k, zlib.crc32(last.encode()) + i)}
            choices.append(choice)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return choices, usage

    def completion_body(self, body: dict[str, Any], messages: list[Any], model: str, rid: str,
                        empty: bool = False) -> bytes:
        """The encoded (non-streaming) chat.completion answer to one request."""
        choices, usage = self.completion(body, messages)
        return json.dumps({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                           "choices": [] if empty else choices, "usage": usage}).encode()

    async def _fault(self, request: Any, fault: str) -> Any:
        """Answer a fault now, or return None to let the normal path finish it (truncated, empty)."""
        from aiohttp import web

        cfg = self.config
        if fault in ("429", "503"):
            await asyncio.sleep(min(cfg.latency_ms / 1000.0, 0.01))
            msg = "Rate limit reached; retry after the Retry-After delay" if fault == "429" else "Overloaded"
            return web.Response(status=int(fault), body=_error_body(msg, "rate_limit_error" if fault == "429"
                                                                    else "server_error"),
                                content_type="application/json",
                                headers={"Retry-After": f"{cfg.retry_after_s:g}"})
        if fault == "500":
            return web.Response(status=500, body=_error_body("Internal server error (injected)", "server_error"),
                                content_type="application/json")
        if fault == "400":
            return web.Response(status=400, body=_error_body("Bad request (injected)", "invalid_request_error"),
                                content_type="application/json")
        if fault == "timeout":
            await asyncio.sleep(cfg.hang_s)
            return None
        if fault == "drop":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never reaches the client: the connection is gone
        return None

    async def _stream(self, request: Any, rid: str, model: str, choices: list[dict[str, Any]],
                      usage: dict[str, int], body: dict[str, Any]) -> Any:
        from aiohttp import web

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        created = int(time.time())

        def chunk(delta: dict[str, Any], index: int, finish: str | None, lp: Any = None) -> bytes:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}]}
            return b"data: " + json.dumps(c).encode() + b"\n\n"

        for ch in choices:
            i = ch["index"]
            await resp.write(chunk({"role": "assistant", "content": ""}, i, None))
            msg = ch["message"]
            for name in ("reasoning_content", "reasoning"):
                if msg.get(name):
                    await resp.write(chunk({name: msg[name]}, i, None))
            if msg.get("tool_calls"):
                await resp.write(chunk({"tool_calls": [{"index": k, **c} for k, c in enumerate(msg["tool_calls"])]},
                                       i, None))
            words = msg["content"].split(" ") if msg["content"] else []
            lps = (ch.get("logprobs") or {}).get("content")
            for j, w in enumerate(words):
                piece = w if j == len(words) - 1 else w + " "
                lp = {"content": [lps[j]]} if lps else None
                await resp.write(chunk({"content": piece}, i, None, lp))
                if self.config.stream_chunk_delay_ms:
                    await asyncio.sleep(self.config.stream_chunk_delay_ms / 1000.0)
            await resp.write(chunk({}, i, ch["finish_reason"]))
        if (body.get("stream_options") or {}).get("include_usage"):
            u = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [], "usage": usage}
            await resp.write(b"data: " + json.dumps(u).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        self.stats["ok"] += 1
        return resp


ENGINES = ("aiohttp", "raw")

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            411: b"Length Required", 413: b"Payload Too Large", 431: b"Request Header Fields Too Large"}
_MAX_HEAD = 64 * 1024
_MAX_BODY = 64 * 1024 * 1024


class RawHTTPProtocol(asyncio.Protocol):
    """The fake on a bare asyncio.Protocol: HTTP/1.1 keep-alive, Content-Length bodies, no framework.

    Made for throughput benchmarks, where the fake must cost the client's machine as little as
    possible: one ``data_received`` parses the request line and Content-Length by hand, the
    latency is a ``loop.call_later`` (no task, no coroutine), and the answer goes out in one
    ``write``. It serves ``POST /v1/chat/completions`` (non-streaming), ``GET /v1/models``,
    ``/health``, ``/stats`` and ``POST /stats/reset``, with the same bodies as the aiohttp
    engine; streaming and fault injection need ``engine="aiohttp"``. Pipelined requests on one
    connection are answered in order.
    """

    def __init__(self, fake: FakeServer, loop: asyncio.AbstractEventLoop):
        self.fake = fake
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.pending: list[list[Any]] = []  # [response bytes or None, keep-alive], in request order
        self.delay = fake.config.latency_ms / 1000.0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while buf:
            he = buf.find(b"\r\n\r\n")
            if he < 0:
                if len(buf) > _MAX_HEAD:
                    self._fail(431, "request head over 64 KiB")
                    return
                break
            head = buf[:he]
            low = head.lower()
            cl = 0
            i = low.find(b"\r\ncontent-length:")
            if i >= 0:
                j = low.find(b"\r\n", i + 17)
                try:
                    cl = int(low[i + 17:j if j >= 0 else len(low)])
                except ValueError:
                    self._fail(400, "bad Content-Length")
                    return
                if cl < 0 or cl > _MAX_BODY:
                    self._fail(413, f"Content-Length {cl} out of range")
                    return
            elif low.find(b"\r\ntransfer-encoding:") >= 0:
                self._fail(411, "chunked request bodies are not served by the raw engine; send Content-Length")
                return
            end = he + 4 + cl
            if len(buf) < end:
                break
            eol = head.find(b"\r\n")
            parts = (head if eol < 0 else head[:eol]).split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                self._fail(400, "bad request line")
                return
            method, target, version = parts
            if version == b"HTTP/1.1":
                keep = low.find(b"\r\nconnection: close") < 0
            else:
                keep = low.find(b"\r\nconnection: keep-alive") >= 0
            self._handle(method, target.split(b"?", 1)[0], buf[he + 4:end], keep)
            buf = buf[end:]
        self.buf = buf

    def _handle(self, method: bytes, path: bytes, body: bytes, keep: bool) -> None:
        slot: list[Any] = [None, keep]
        self.pending.append(slot)
        fake = self.fake
        if path == b"/v1/chat/completions":
            if method != b"POST":
                self._ready(slot, 405, _error_body("use POST", "invalid_request_error"))
                return
            parsed = fake.parse_request(body)
            if isinstance(parsed[0], int):
                self._ready(slot, parsed[0], parsed[1])
                return
            req, messages, model = parsed
            if req.get("stream"):
                fake.stats["bad_request"] += 1
                self._ready(slot, 400, _error_body("stream=true needs the aiohttp engine (--engine aiohttp)",
                                                   "invalid_request_error"))
                return
            payload = fake.completion_body(req, messages, model, f"chatcmpl-fake-{fake.stats['requests']}")
            fake.stats["ok"] += 1
            if self.delay:
                self.loop.call_later(self.delay, self._ready, slot, 200, payload)
            else:
                self._ready(slot, 200, payload)
            return
        if method == b"GET" and path in (b"/v1/models", b"/health", b"/stats"):
            self._ready(slot, 200, json.dumps(fake.simple_answer(path.decode())).encode())
        elif method == b"POST" and path == b"/stats/reset":
            fake.stats.clear()
            fake._seen.clear()
            self._ready(slot, 200, b'{"status": "reset"}')
        else:
            self._ready(slot, 404, _error_body(f"no route {method.decode()} {path.decode()}", "not_found"))

    def _ready(self, slot: list[Any], status: int, payload: bytes) -> None:
        t = self.transport
        if t is None:
            return
        keep = slot[1]
        slot[0] = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
            status, _REASONS.get(status, b"OK"), len(payload), b"" if keep else b"Connection: close\r\n", payload)
        pending = self.pending
        if pending[0] is slot and len(pending) == 1:  # the common case: one request at a time
            pending.clear()
            t.write(slot[0])
            if not keep:
                t.close()
            return
        while pending and pending[0][0] is not None:
            out, k = pending.pop(0)
            t.write(out)
            if not k:
                t.close()
                pending.clear()
                return

    def _fail(self, status: int, why: str) -> None:
        """A request this engine cannot read: answer (after any earlier ones) and close."""
        self.buf = b""
        slot: list[Any] = [None, False]
        self.pending.append(slot)
        self._ready(slot, status, _error_body(why, "invalid_request_error"))


async def listen(fake: FakeServer, engine: str = "aiohttp", host: str = "127.0.0.1", port: int = 0,
                 reuse_port: bool = False) -> tuple[int, Callable[[], Awaitable[None]]]:
    """Serve ``fake`` on the running loop with ``engine``; returns (bound port, async close)."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose from {', '.join(ENGINES)}")
    if engine == "raw":
        cfg = fake.config
        if cfg.faults or cfg.permanent_faults or cfg.stream_chunk_delay_ms:
            raise ValueError("the raw engine serves no faults and no streaming; use engine='aiohttp' "
                             "(--engine aiohttp) for fault schedules")
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: RawHTTPProtocol(fake, loop), host, port, backlog=4096,
                                          reuse_port=reuse_port or None)

        async def close_raw() -> None:
            server.close()

        return server.sockets[0].getsockname()[1], close_raw
    from aiohttp import web

    runner = web.AppRunner(fake.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_port=reuse_port or None)
    await site.start()
    return site._server.sockets[0].getsockname()[1], runner.cleanup  # type: ignore[union-attr]


@dataclass
class RunningServer:
    """A fake server running on a background event loop in this process (for tests)."""

    server: FakeServer
    port: int
    host: str = "127.0.0.1"
    _stop: Any = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        """The API base, ending in /v1."""
        return f"http://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        """Shut the server down and join its thread."""
        if self._stop is not None:
            self._stop()
            self._stop = None

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(config: FakeServerConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                    engine: str = "aiohttp") -> RunningServer:
    """Start a fake server on a daemon thread with its own event loop; returns once it listens."""
    import threading

    fake = FakeServer(config)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def _start() -> None:
        box["port"], box["close"] = await listen(fake, engine, host, port)

    def _run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(_start())
        except BaseException as exc:  # surfaced to the caller below
            box["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.run_until_complete(box["close"]())
        loop.close()

    thread = threading.Thread(target=_run, name="fakeserver", daemon=True)
    thread.start()
    ready.wait(10)
    if "error" in box:
        raise RuntimeError(f"fake server failed to start: {box['error']}") from box["error"]
    if "port" not in box:
        raise RuntimeError("fake server did not start within 10 s")

    def _stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return RunningServer(fake, box["port"], host, _stop)


def serve(config: FakeServerConfig, host: str = "127.0.0.1", port: int = 8001, ready_file: str | None = None,
          reuse_port: bool = False, engine: str = "aiohttp") -> None:
    """Run the server in the foreground until interrupted (``reuse_port``: share the port with siblings)."""

    async def _main() -> None:
        bound, close = await listen(FakeServer(config), engine, host, port, reuse_port)
        print(f"fake OpenAI server on http://{host}:{bound}/v1 (model {config.model!r}, "
              f"latency {config.latency_ms:g} ms, engine {engine})", flush=True)
        if ready_file:
            from stillhouse.config import atomic_write_text

            atomic_write_text(ready_file, str(bound))
        try:
            await asyncio.Event().wait()
        finally:
            await close()

    factory = None
    if os.environ.get("STILLHOUSE_LOOP", "auto") != "asyncio":
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_main())
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> None:
    """``python -m stillhouse.testing.fakeserver --help``."""
    p = argparse.ArgumentParser(prog="python -m stillhouse.testing.fakeserver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001, help="0 picks a free port (see --ready-file)")
    p.add_argument("--latency-ms", type=float, default=50.0, help="fixed latency of every answer")
    p.add_argument("--model", default="fake-model")
    p.add_argument("--faults", default="", help="transient faults, e.g. 429=0.1,500=0.05,timeout=0.02")
    p.add_argument("--permanent-faults", default="", help="faults that hit every attempt of a body")
    p.add_argument("--fault-attempts", type=int, default=2, help="transient faults hit only the first N attempts")
    p.add_argument("--retry-after", type=float, default=0.2, help="Retry-After seconds on 429/503")
    p.add_argument("--hang-s", type=float, default=30.0, help="how long a 'timeout' fault holds the answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reasoning", choices=REASONING_FORMS, default="off",
                   help="answers carry a chain of thought in this field, or inline (think)")
    p.add_argument("--ready-file", default=None, help="write the bound port here once listening")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes sharing the port (SO_REUSEPORT); needs a fixed --port")
    p.add_argument("--engine", choices=ENGINES, default="aiohttp",
                   help="aiohttp: everything (faults, streaming); raw: a bare asyncio.Protocol HTTP/1.1 "
                        "responder for throughput benchmarks (no faults, no streaming)")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.workers < 1 or (a.workers > 1 and a.port == 0):
        p.error("--workers N needs N >= 1 and, above 1, a fixed --port")
    try:
        cfg = FakeServerConfig(latency_ms=a.latency_ms, model=a.model, faults=parse_faults(a.faults),
                               permanent_faults=parse_faults(a.permanent_faults), fault_attempts=a.fault_attempts,
                               retry_after_s=a.retry_after, hang_s=a.hang_s, seed=a.seed, reasoning=a.reasoning)
    except ValueError as exc:
        p.error(str(exc))
    siblings = []
    if a.workers > 1:
        import subprocess
        import sys

        args = _drop_opt(_drop_opt(list(argv if argv is not None else sys.argv[1:]), "--workers"), "--ready-file")
        for _ in range(a.workers - 1):
            siblings.append(subprocess.Popen([sys.executable, "-m", "stillhouse.testing.fakeserver", *args,
                                              "--reuse-port"],
                                             stdout=subprocess.DEVNULL))
    try:
        serve(cfg, a.host, a.port, a.ready_file, reuse_port=a.reuse_port or a.workers > 1, engine=a.engine)
    finally:
        for s in siblings:
            s.terminate()


def _drop_opt(args: list[str], name: str) -> list[str]:
    """``args`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for x in args:
        if skip:
            skip = False
            continue
        if x == name:
            skip = True
            continue
        if x.startswith(name + "="):
            continue
        out.append(x)
    return out


if __name__ == "__main__":
    main()
