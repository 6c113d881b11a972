"""A teacher behind any OpenAI-compatible chat-completions endpoint.

vLLM, llama.cpp's server, Ollama, ``stillhouse serve``, the guard gateway, hosted APIs: any
server that answers ``POST {base}/chat/completions``. The HTTP client (``client=``):

- ``"auto"`` (default): the lean keep-alive client of :mod:`stillhouse.http.client` for
  ``http://`` URLs, aiohttp for ``https://`` (and for every URL when httptools, a core
  dependency, was left out by a ``--no-deps`` install);
- ``"raw"`` / ``"aiohttp"``: force one (raw cannot do TLS).

Why not httpx (which the official SDK uses): measured here at 50 ms latency, httpx's
AsyncClient collapsed to 108 req/s at concurrency 64, aiohttp held 1,167 req/s (see
../shared/DESIGN.md). Why raw over aiohttp for plain http: about a fifth of aiohttp's client
CPU per request, which is what bounds a harvest at high concurrency (docs/benchmarks.md).

    teacher = OpenAITeacher("http://127.0.0.1:8000/v1")           # model = first id of /v1/models
    result = await teacher.chat(messages, SamplingParams(logprobs=True, top_logprobs=5))
    await teacher.aclose()

The API key comes from ``api_key=`` or $STILLHOUSE_API_KEY or $OPENAI_API_KEY. One pooled
client serves every request; pass ``session=`` (an ``aiohttp.ClientSession``) to share yours, or
``transport=`` (an async callable, see :data:`Transport`) to run with no network at all.
There are no retries here: the caller (the harvester) decides, from the exception type.

Failures map into the tree of :mod:`stillhouse.teacher.base`::

    TeacherError
    ├── TeacherConnectionError   connection refused/reset, server disconnected
    ├── TeacherTimeout           no complete answer within timeout_s
    ├── TeacherHTTPError
    │   ├── RateLimited          429, .retry_after from Retry-After / retry-after-ms
    │   ├── ServerError          5xx, .retry_after on 503 when sent
    │   └── BadRequest           other 4xx (404 unknown model, 400 bad body, 401 key)
    └── TeacherResponseError     2xx but truncated JSON, no choices, no message; .raw keeps the body
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from stillhouse.http.client import RawHTTPTransport, raw_client_available
from stillhouse.http.errors import BadResponse, ClientError, ConnectFailed, TimedOut
from stillhouse.teacher.base import (
    BadRequest,
    ChatResult,
    Completion,
    Message,
    RateLimited,
    SamplingParams,
    ServerError,
    TeacherConnectionError,
    TeacherError,
    TeacherHTTPError,
    TeacherResponseError,
    TeacherTimeout,
    TokenLogprobs,
)

Transport = Callable[[str, str, bytes | None, dict[str, str], float], Awaitable[tuple[int, dict[str, str], bytes]]]
"""``await transport(method, url, body, headers, timeout_s) -> (status, headers, body)``.

A transport raises :class:`TeacherConnectionError` / :class:`TeacherTimeout` for network
failures; everything else (status codes, bodies) is interpreted by the teacher.
"""


_NO_HEADERS: dict[str, str] = {}
CLIENTS = ("auto", "raw", "aiohttp")


def parse_retry_after(headers: dict[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    low = {k.lower(): v for k, v in headers.items()}
    ms = low.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = low.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


def raise_for_status(status: int, headers: dict[str, str], body: bytes) -> None:
    """Map a non-2xx answer to the exception tree."""
    if 200 <= status < 300:
        return
    text = body.decode("utf-8", "replace")
    msg = _error_message(body)
    if status == 429:
        raise RateLimited(status, msg, text, parse_retry_after(headers))
    if status >= 500:
        raise ServerError(status, msg, text, parse_retry_after(headers))
    if 400 <= status < 500:
        raise BadRequest(status, msg, text)
    raise TeacherHTTPError(status, f"unexpected status: {msg}", text)


def teacher_error(exc: ClientError) -> TeacherError:
    """The teacher-tree twin of an HTTP client failure (the message and any raw body kept)."""
    if isinstance(exc, TimedOut):
        return TeacherTimeout(str(exc))
    if isinstance(exc, BadResponse):
        return TeacherResponseError(str(exc), exc.raw)
    if isinstance(exc, ConnectFailed):
        return TeacherConnectionError(str(exc))
    return TeacherError(str(exc))


def parse_logprobs(block: Any) -> TokenLogprobs | None:
    """OpenAI ``choice.logprobs`` (``{"content": [{token, logprob, top_logprobs: [...]}, ...]}``)."""
    if not isinstance(block, dict):
        return None
    content = block.get("content")
    if not isinstance(content, list):
        return None
    tokens, lps, top_tokens, top_lps = [], [], [], []
    for entry in content:
        tokens.append(str(entry["token"]))
        lps.append(float(entry["logprob"]))
        tops = entry.get("top_logprobs") or []
        top_tokens.append([str(t["token"]) for t in tops])
        top_lps.append([float(t["logprob"]) for t in tops])
    has_top = any(top_tokens)
    return TokenLogprobs(tokens=tokens, logprobs=lps, top_tokens=top_tokens if has_top else [],
                         top_logprobs=top_lps if has_top else [])


def message_extra(msg: dict[str, Any]) -> dict[str, Any] | None:
    """An answer's message fields besides role and content that carry something (reasoning_content or
    reasoning, tool_calls, refusal, ...), as sent; ``"content": None`` marks a null content. None if none."""
    out = {k: v for k, v in msg.items() if k not in ("role", "content") and v is not None and v != [] and v != ""}
    if msg.get("content") is None:
        out["content"] = None
    return out or None


def parse_chat_response(raw: bytes, n: int = 1) -> tuple[list[Completion], str, dict[str, Any]]:
    """Parse a chat-completions body into completions; TeacherResponseError keeps ``raw``."""

    def fail(msg: str) -> TeacherResponseError:
        return TeacherResponseError(msg, raw.decode("utf-8", "replace"))

    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise fail(f"response is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise fail("response is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise fail("response has no choices")
    usage = data.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    total_completion = int(usage.get("completion_tokens") or 0)
    if len(choices) > 1:
        choices = sorted(choices, key=lambda c: c.get("index", 0))
    completions = []
    try:
        for ch in choices:
            msg = ch.get("message")
            if not isinstance(msg, dict):
                raise fail("a choice has no message")
            content = msg.get("content")
            extra = message_extra(msg) if len(msg) > 2 or content is None else None
            if content is None:
                content = ""
            lp = parse_logprobs(ch.get("logprobs")) if ch.get("logprobs") else None
            if lp is not None:
                ctoks = len(lp.tokens)
            elif len(choices) == 1:
                ctoks = total_completion
            else:
                ctoks = total_completion // len(choices)
            completions.append(Completion(
                text=str(content),
                finish_reason=ch.get("finish_reason") or "stop",
                prompt_tokens=prompt_tokens,
                completion_tokens=ctoks,
                logprobs=lp,
                message=extra,
            ))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise fail(f"malformed choice: {exc!r}") from exc
    return completions, str(data.get("model") or ""), data


class OpenAITeacher:
    """An OpenAI-compatible endpoint as a Teacher. Safe to call from many tasks at once."""

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_connections: int = 1024,
        session: Any = None,
        transport: Transport | None = None,
        headers: dict[str, str] | None = None,
        client: str = "auto",
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url={base_url!r}: give the API base, e.g. http://127.0.0.1:8000/v1")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0")
        if max_connections < 1:
            raise ValueError(f"max_connections={max_connections}: must be >= 1")
        if session is not None and transport is not None:
            raise ValueError("pass session= or transport=, not both")
        if client not in CLIENTS:
            raise ValueError(f"client={client!r}: choose from {', '.join(CLIENTS)}")
        if client == "raw" and not base_url.startswith("http://"):
            raise ValueError(f"client='raw' speaks plain http:// only; {base_url!r} needs client='aiohttp' or 'auto'")
        self.base_url = base_url.rstrip("/")
        self._model = model
        self._revision: str | None = None
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        key = api_key if api_key is not None else (
            os.environ.get("STILLHOUSE_API_KEY") or os.environ.get("OPENAI_API_KEY"))
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": "stillhouse-harvest/0.1"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        if headers:
            self._headers.update(headers)
        self._session = session
        self._owns_session = session is None and transport is None
        self._raw: RawHTTPTransport | None = None
        if transport is None and session is None and (
                client == "raw" or (client == "auto" and base_url.startswith("http://") and raw_client_available())):
            self._raw = transport = RawHTTPTransport(max_connections=max_connections)
        self.client = "transport" if transport is not None and self._raw is None else (
            "raw" if self._raw is not None else "aiohttp")
        self._transport = transport
        self._resolve_lock: asyncio.Lock | None = None
        self._timeout: Any = None  # one aiohttp.ClientTimeout for every request, built on first use
        self._chat_url = self.base_url + "/chat/completions"
        self._head = b""
        self._tails: dict[SamplingParams, bytes] = {}

    # -- identity ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The model name; before :meth:`resolve` with no model given this is ''."""
        return self._model or ""

    @property
    def revision(self) -> str:
        """What /v1/models says about the model (its 'root' or 'revision'), else 'served:<model>'."""
        return self._revision or f"served:{self.name}"

    async def resolve(self) -> str:
        """Fix the model name (first id of /v1/models when none was given) and the revision."""
        if self._resolve_lock is None:
            self._resolve_lock = asyncio.Lock()
        async with self._resolve_lock:
            if self._model is not None and self._revision is not None:
                return self._model
            try:
                entries = await self.models()
            except TeacherError:
                if self._model is not None:  # a server without /v1/models is fine when the model is named
                    self._revision = f"served:{self._model}"
                    return self._model
                raise
            if self._model is None:
                if not entries:
                    raise TeacherResponseError(f"{self.base_url}/models lists no models; name one with "
                                               "'URL#MODEL'", "")
                self._model = str(entries[0]["id"])
            entry = next((e for e in entries if e.get("id") == self._model), {})
            rev = entry.get("revision") or entry.get("root")
            self._revision = str(rev) if rev else f"served:{self._model}"
            return self._model

    async def models(self) -> list[dict[str, Any]]:
        """The entries of GET /v1/models."""
        status, headers, body = await self._request("GET", self.base_url + "/models", None)
        raise_for_status(status, headers, body)
        try:
            data = json.loads(body)
            return [e for e in data["data"] if isinstance(e, dict) and "id" in e]
        except (ValueError, KeyError, TypeError) as exc:
            raise TeacherResponseError(f"{self.base_url}/models answered an unexpected body",
                                       body.decode("utf-8", "replace")) from exc

    # -- requests ------------------------------------------------------------------------------
    def request_body(self, messages: list[Message], params: SamplingParams) -> dict[str, Any]:
        """The JSON body a chat call sends."""
        return {"model": self._model, "messages": messages, **params.to_openai()}

    async def chat(self, messages: list[Message], params: SamplingParams) -> ChatResult:
        return await self.chat_json(json.dumps(messages, ensure_ascii=False), params)

    async def chat_json(self, messages_json: str, params: SamplingParams) -> ChatResult:
        """:meth:`chat` with the messages already JSON-encoded (the harvester holds them so)."""
        if self._model is None:
            await self.resolve()
        payload = self.chat_body(messages_json, params)
        t0 = time.perf_counter()
        status, headers, body = await self._request("POST", self._chat_url, payload)
        latency = time.perf_counter() - t0
        if status != 200:
            raise_for_status(status, headers, body)
        completions, model, data = parse_chat_response(body, params.n)
        return ChatResult(completions=completions, model=model or self.name, latency_s=latency, raw=data)

    def chat_body(self, messages_json: str, params: SamplingParams) -> bytes:
        """The exact bytes :meth:`chat_json` POSTs (the model must be known)."""
        try:
            tail = self._tails.get(params)
        except TypeError:  # unhashable params (a list where a tuple belongs): no caching
            tail = None
        if tail is None:
            tail = self._tail(params)
        return b"".join((self._head, messages_json.encode(), tail))

    def _tail(self, params: SamplingParams) -> bytes:
        """The encoded body after the messages; cached per params (the model is fixed by then)."""
        fields = params.to_openai()
        tail = b"".join(b', "%s": %s' % (k.encode(), json.dumps(v).encode()) for k, v in fields.items()) + b"}"
        self._head = b'{"model": %s, "messages": ' % json.dumps(self._model).encode()
        if len(self._tails) < 256:
            try:
                self._tails[params] = tail
            except TypeError:
                pass
        return tail

    async def _request(self, method: str, url: str, body: bytes | None) -> tuple[int, dict[str, str], bytes]:
        if self._transport is not None:
            try:
                return await self._transport(method, url, body, self._headers, self.timeout_s)
            except ClientError as exc:
                raise teacher_error(exc) from exc
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                               keepalive_timeout=30, enable_cleanup_closed=False),
                timeout=aiohttp.ClientTimeout(total=None),
                skip_auto_headers=("User-Agent",),
            )
        if self._timeout is None:
            self._timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self._session.request(method, url, data=body, headers=self._headers,
                                             timeout=self._timeout) as resp:
                data = await resp.read()
                # Headers are only read on errors (Retry-After); skip copying them on success.
                return resp.status, (_NO_HEADERS if resp.status == 200 else dict(resp.headers)), data
        except TimeoutError as exc:
            raise TeacherTimeout(f"{method} {url}: no answer within {self.timeout_s:g} s") from exc
        except aiohttp.ClientPayloadError as exc:
            raise TeacherResponseError(f"{method} {url}: the body was cut off ({exc})", "") from exc
        except (aiohttp.ClientConnectionError, OSError) as exc:
            raise TeacherConnectionError(f"{method} {url}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise TeacherConnectionError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        if self._raw is not None:
            await self._raw.aclose()
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> OpenAITeacher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

