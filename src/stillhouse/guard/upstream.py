"""The pooled async clients the guard uses to reach its upstream (both have one API).

- :class:`Http1Upstream` (default, ``upstream_client="http1"``): the project's lean keep-alive
  HTTP/1.1 pool, :mod:`stillhouse.http.client` (asyncio protocol + httptools; chunks handed
  over as they arrive, reading paused past 256 KiB unread). Measured on this machine (2 cores,
  uvloop, a 5 ms fake upstream at concurrency 8) aiohttp's client spent 0.20-0.24 ms of CPU per
  request and this one 0.03-0.04 ms — the largest single share of the guard's own CPU
  (``stillhouse bench guard --compare-clients``).
- :class:`Upstream` (``upstream_client="aiohttp"``): one ``aiohttp.ClientSession`` with a bounded
  connector shared by every request of a replica; a custom session (another connector, a test
  transport) can be injected. For upstreams that need more than plain HTTP/1.1 keep-alive.

No retries: a request that fails is answered 502/504 (a POST is not safe to resend).

Exception tree (aiohttp's and the HTTP client's errors are mapped with ``raise ... from``)::

    UpstreamError                 the gateway answers 502 or 504, never a traceback
    ├── UpstreamUnavailable       refused/reset, no connection within connect_timeout_s, DNS,
    │                             malformed or broken answer → 502
    └── UpstreamTimeout           no byte within upstream_timeout_s → 504
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from stillhouse.http.client import HTTP1Pool, HTTP1Response
from stillhouse.http.errors import ClientError, TimedOut
from stillhouse.watermark.keys import APPLIED_HEADER, SCHEME_HEADER


class UpstreamError(Exception):
    """The upstream failed; ``status`` is what the gateway answers."""

    status = 502


class UpstreamUnavailable(UpstreamError):
    status = 502


class UpstreamTimeout(UpstreamError):
    status = 504


PASSTHROUGH_HEADERS = frozenset({"retry-after", "x-request-id", "openai-processing-ms"})
# The upstream's watermark key id and scheme (APPLIED_HEADER, SCHEME_HEADER) are kept for the log, never relayed.


class UpstreamResponse:
    """An open upstream response: status and headers now, the body as it arrives."""

    def __init__(self, resp: Any, url: str):
        self._resp = resp
        self.url = url
        self.status: int = resp.status
        self.content_type: str = resp.headers.get("Content-Type", "application/json")
        self.passthrough_headers: list[tuple[bytes, bytes]] = [
            (k.lower().encode("latin-1", "replace"), v.encode("latin-1", "replace"))
            for k, v in resp.headers.items() if k.lower() in PASSTHROUGH_HEADERS or k.lower().startswith("x-ratelimit-")]
        """Upstream headers a client needs to behave (Retry-After on 429/503, rate-limit state)."""
        self.watermark_key_id: str = resp.headers.get(APPLIED_HEADER, "")
        self.watermark_scheme: str = resp.headers.get(SCHEME_HEADER, "")

    async def read(self) -> bytes:
        import aiohttp

        try:
            return await self._resp.read()
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {self.url} stopped answering mid-body") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream {self.url} broke the response: {exc}") from exc
        finally:
            self._resp.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks exactly as they arrive from the socket (no re-chunking)."""
        import aiohttp

        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {self.url} stalled mid-stream") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"upstream {self.url} broke the stream: {exc}") from exc

    def close(self) -> None:
        """Drop the connection (used when the client went away: the upstream sees the disconnect)."""
        self._resp.close()

    def release(self) -> None:
        self._resp.release()


class Upstream:
    """A base URL plus one pooled session."""

    def __init__(self, base_url: str, api_key: str = "", pool_size: int = 512,
                 connect_timeout_s: float = 3.0, read_timeout_s: float = 120.0, session: Any = None):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._session = session
        self._own_session = session is None

    async def start(self) -> None:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=self.pool_size,
                                               keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s,
                                              sock_read=self.read_timeout_s),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )

    async def close(self) -> None:
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    async def send(self, method: str, path: str, body: bytes | None = None,
                   content_type: str = "application/json",
                   extra_headers: list[tuple[str, str]] | None = None) -> UpstreamResponse:
        """Send a request; returns once the status line and headers are in."""
        import aiohttp

        if self._session is None:
            await self.start()
        url = self.base_url + path
        headers = {"Content-Type": content_type} if body is not None else {}
        headers.update(extra_headers or ())
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            resp = await self._session.request(method, url, data=body, headers=headers)  # type: ignore[union-attr]
        except TimeoutError as exc:
            raise UpstreamTimeout(f"upstream {url} did not answer within {self.read_timeout_s:g}s "
                                  f"(connect limit {self.connect_timeout_s:g}s)") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"cannot reach upstream {url}: {exc}") from exc
        return UpstreamResponse(resp, url)


_APPLIED, _SCHEME = APPLIED_HEADER.encode(), SCHEME_HEADER.encode()


class Http1Response(HTTP1Response):
    """An upstream response from the lean pool; body failures mapped to 502/504."""

    def __init__(self, conn: Any, pool: HTTP1Pool, key: tuple[str, int], url: str):
        super().__init__(conn, pool, key, url)
        ctype = b"application/json"
        passthrough: list[tuple[bytes, bytes]] = []
        self.watermark_key_id: str = ""
        self.watermark_scheme: str = ""
        for k, v in self.headers:
            k = k.lower()
            if k == b"content-type":
                ctype = v
            elif k == _APPLIED:
                self.watermark_key_id = v.decode("latin-1")
            elif k == _SCHEME:
                self.watermark_scheme = v.decode("latin-1")
            elif k.startswith(b"x-ratelimit-") or k.decode("latin-1") in PASSTHROUGH_HEADERS:
                passthrough.append((k, v))
        self.content_type: str = ctype.decode("latin-1")
        self.passthrough_headers: list[tuple[bytes, bytes]] = passthrough

    def _error(self, failure: Exception, what: str) -> Exception:
        if isinstance(failure, TimedOut):
            err: UpstreamError = UpstreamTimeout(
                f"upstream {self.url} {'stopped answering mid-body' if what == 'response' else 'stalled mid-stream'}")
        else:
            err = UpstreamUnavailable(f"upstream {self.url} broke the {what}: {failure}")
        err.__cause__ = failure
        return err


class Http1Upstream:
    """A base URL plus the lean keep-alive pool (drop-in for :class:`Upstream`)."""

    def __init__(self, base_url: str, api_key: str = "", pool_size: int = 512,
                 connect_timeout_s: float = 3.0, read_timeout_s: float = 120.0):
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream url {base_url!r}: give http://host[:port][/prefix] or https://...")
        if any(c in api_key for c in "\r\n"):
            raise ValueError("the upstream API key contains a line break; check the environment variable")
        self.base_url = base_url.rstrip("/")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path
        default = (self.tls and self.port == 443) or (not self.tls and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = host if default else f"{host}:{self.port}"
        self.api_key = api_key
        self.pool_size = pool_size
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._pool: HTTP1Pool | None = None
        self._key = (self.host, self.port)
        self._heads: dict[tuple[str, str, int], bytes] = {}

    @property
    def open_connections(self) -> int:
        """Connections open now, idle or in use (a connection the upstream closed is not counted)."""
        return self._pool.open_connections if self._pool is not None else 0

    @property
    def connections_opened(self) -> int:
        return self._pool.connections_opened if self._pool is not None else 0

    async def start(self) -> None:
        if self._pool is None:
            ssl = None
            if self.tls:
                import ssl as _ssl

                ssl = _ssl.create_default_context()
            # The guard's keep-alive idles are bounded by the upstream, not by us.
            self._pool = HTTP1Pool(self.pool_size, idle_timeout_s=1e9, ssl=ssl)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None

    def _head(self, method: str, path: str, length: int, content_type: str) -> bytes:
        key = (method, path, length)
        head = self._heads.get(key)
        if head is None or content_type != "application/json":
            lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self._host_header}", "Accept: */*"]
            if length >= 0:
                lines += [f"Content-Type: {content_type}", f"Content-Length: {length}"]
            if self.api_key:
                lines.append(f"Authorization: Bearer {self.api_key}")
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            if content_type == "application/json" and len(self._heads) < 4096:
                self._heads[key] = head
        return head

    async def send(self, method: str, path: str, body: bytes | None = None,
                   content_type: str = "application/json",
                   extra_headers: list[tuple[str, str]] | None = None) -> Http1Response:
        """Send a request; returns once the status line and headers are in."""
        if self._pool is None:
            await self.start()
        url = self.base_url + path
        head = self._head(method, path, -1 if body is None else len(body), content_type)
        if extra_headers:
            if any(c in k + v for k, v in extra_headers for c in "\r\n"):
                raise UpstreamUnavailable("an extra upstream header contains a line break")
            head = head[:-2] + "".join(f"{k}: {v}\r\n" for k, v in extra_headers).encode("latin-1") + b"\r\n"
        try:
            resp = await self._pool.send(self._key, head + body if body else head, url,  # type: ignore[union-attr]
                                         connect_timeout_s=self.connect_timeout_s,
                                         read_timeout_s=self.read_timeout_s, url=url, response_class=Http1Response)
        except ClientError as exc:
            if isinstance(exc, TimedOut):
                raise UpstreamTimeout(f"upstream {url} did not answer within {self.read_timeout_s:g}s") from exc
            raise UpstreamUnavailable(f"cannot reach upstream {exc}") from exc  # exc starts with the url
        return resp  # type: ignore[no-any-return]
