"""The one lean HTTP/1.1 client of stillhouse: a keep-alive pool on asyncio.Protocol + httptools.

Two callers, one pool:

- :class:`RawHTTPTransport` — whole-body requests, the :data:`stillhouse.teacher.openai.Transport`
  signature; :class:`~stillhouse.teacher.openai.OpenAITeacher` uses it for ``http://`` URLs
  (the harvester), aiohttp for ``https://``::

      transport = RawHTTPTransport(max_connections=64)
      status, headers, body = await transport("POST", "http://127.0.0.1:8000/v1/chat/completions",
                                              b'{"model": ...}', {"Content-Type": "application/json"}, 30.0)
      await transport.aclose()

- :class:`HTTP1Pool` + :class:`HTTP1Response` — status and headers first, then the body whole
  (``read``) or as it arrives (``chunks``, no re-chunking, reading pauses when more than 256 KiB
  wait unread); the guard's upstream (``guard/upstream.py`` ``Http1Upstream``) streams SSE with it.

Why not aiohttp: at high concurrency the harvester and the guard are bounded by the client's CPU
per request, and aiohttp's client costs several times what this one does (``stillhouse bench
harvest`` and ``stillhouse bench guard --compare-clients``; figures in docs/benchmarks.md).

What it speaks: HTTP/1.1 (TLS when the pool is given an SSL context), one request at a time per
connection, connections kept alive and reused LIFO (dropped when the server closes them, after
``idle_timeout_s`` idle, or when unasked-for bytes arrive), at most ``max_connections`` open
(callers beyond that wait for one). Answers framed by Content-Length, chunked transfer coding or
the connection's end, parsed by httptools; 1xx interim answers are skipped; ``read(decode=True)``
decodes gzip/deflate. Timeouts: an absolute ``deadline`` for the whole exchange and/or a
``read_timeout_s`` of silence (not counted while we paused reading). Requests are never resent.

Failures, from :mod:`stillhouse.http.errors` (the teacher maps them into its tree, the guard to 502/504)::

    ConnectFailed   refused, reset, no connection within connect_timeout_s, or closed
                    before any of the answer arrived
    TimedOut        the deadline passed, or read_timeout_s of silence (connection dropped)
    BadResponse     an answer that is not HTTP/1.x, or a body cut off (.raw: what came)
"""

from __future__ import annotations

import asyncio
import collections
import socket
import zlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from stillhouse.http.errors import BadResponse, ConnectFailed, TimedOut

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_NO_HEADERS: dict[str, str] = {}

Key = tuple[str, int]


def raw_client_available() -> bool:
    """Whether httptools (a core dependency, absent only after a --no-deps install) can be imported."""
    import importlib.util

    return importlib.util.find_spec("httptools") is not None


def _need_httptools() -> None:
    if not raw_client_available():
        raise ModuleNotFoundError("the raw HTTP/1.1 client needs httptools, a core dependency of stillhouse: "
                                  "pip install httptools", name="httptools")


class _Conn(asyncio.Protocol):
    """One keep-alive connection and the answer being read on it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import httptools

        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None
        self.lost = False
        self.idle_since = 0.0
        self.busy = False
        self.read_timeout_s = 0.0
        self.requests = 0
        """Requests started on this connection (more than 0 before a start: a kept-alive one, reused)."""
        self._reset()

    def _reset(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.head_done = False
        self.interim = False
        self.complete = False
        self.keep_alive = False
        self.failure: Exception | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.last_data = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.deadline_timer: asyncio.TimerHandle | None = None
        self.received = b""
        self.encoding = b""

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete or self.failure is not None:  # unasked-for bytes: unusable
            self.close()
            return
        if self.read_timeout_s:
            self.last_data = self.loop.time()
        if not self.head_done and len(self.received) < 2000:  # kept for the error's .raw
            self.received = self.received + data if self.received else data
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # noqa: BLE001 - httptools.HttpParserError and friends
            if not self.complete:
                raw = self.received[:2000].decode("latin-1")
                self._fail(BadResponse(f"malformed HTTP answer: {exc}", raw))
            self.close()  # complete: bytes after the answer (see on_header); drop the connection

    def eof_received(self) -> bool | None:
        return False  # close; connection_lost finishes a close-delimited body

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.busy or self.complete:
            self._cancel_timers()
            return
        if self.head_done and self.failure is None and exc is None and not any(
                k.lower() in (b"content-length", b"transfer-encoding") for k, _ in self.headers):
            self.on_message_complete()  # a close-delimited body ends at EOF
        elif self.head_done:
            self._fail(BadResponse(f"the connection closed mid-body ({exc or 'EOF'})",
                                            self.received[:2000].decode("latin-1", "replace")))
        else:
            why = f": {exc}" if exc else ""
            self._fail(ConnectFailed(f"the server closed the connection before answering{why}"))
        self._cancel_timers()

    # -- httptools callbacks ------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:  # a second answer in the same read: nobody asked for it
            raise ConnectionError("unasked-for bytes after the answer")
        self.headers.append((name, value))
        if len(name) == 16 and name.lower() == b"content-encoding":
            self.encoding = value

    def on_headers_complete(self) -> None:
        if self.complete:
            raise ConnectionError("unasked-for bytes after the answer")
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # an interim answer: skip it
            self.interim = True
            self.headers = []
            return
        self.status = status
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        # llhttp answers should_keep_alive() for the current message only inside its callbacks.
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        self._cancel_timers()
        self._wake()

    # -- plumbing -----------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, failure: Exception) -> None:
        if self.failure is None:
            self.failure = failure
        self._cancel_timers()
        self._wake()

    def _cancel_timers(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None

    def _on_read_timer(self) -> None:
        self.timer = None
        if self.complete or self.failure is not None:
            return
        idle = 0.0 if self.paused else self.loop.time() - self.last_data  # paused: our reader is slow
        if idle < self.read_timeout_s:  # data came since the timer was set: wait for the rest
            self.timer = self.loop.call_later(self.read_timeout_s - idle, self._on_read_timer)
            return
        self._fail(TimedOut(f"no byte for {self.read_timeout_s:g} s"))
        self.close()

    def _on_deadline(self, what: str, timeout_s: float) -> None:
        self.deadline_timer = None
        if not self.complete and self.failure is None:
            self._fail(TimedOut(f"{what}: no answer within {timeout_s:g} s"))
            self.close()

    def start(self, data: bytes, deadline: float | None, read_timeout_s: float | None, what: str,
              timeout_s: float = 0.0) -> None:
        """Send one request (head and body in one write) and arm the timers."""
        self._reset()
        self.busy = True
        self.requests += 1
        self.read_timeout_s = read_timeout_s or 0.0
        if read_timeout_s:
            self.last_data = self.loop.time()
            self.timer = self.loop.call_later(read_timeout_s, self._on_read_timer)
        if deadline is not None:
            self.deadline_timer = self.loop.call_at(deadline, self._on_deadline, what, timeout_s)
        self.transport.write(data)

    async def wait(self) -> None:
        """Until something new happened (head, body, end, failure)."""
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self) -> bytes:
        data = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks = []
        self.buffered = 0
        if self.paused and not self.lost:
            self.paused = False
            self.last_data = self.loop.time()  # the read timer restarts when we read again
            self.transport.resume_reading()
        return data

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self.failure is None and not self.lost

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()  # drop it now: the server sees the disconnect and stops


def decode_body(body: bytes, encoding: bytes) -> bytes:
    """``body`` decoded from its Content-Encoding (gzip, deflate or identity)."""
    encoding = encoding.strip().lower()
    if not encoding or encoding == b"identity":
        return body
    try:
        if encoding in (b"gzip", b"x-gzip"):
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if encoding == b"deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise BadResponse(f"cannot decode the {encoding.decode()} body: {exc}", "") from exc
    raise BadResponse(f"unsupported Content-Encoding {encoding.decode('latin-1')!r}", "")


class HTTP1Response:
    """An answer: ``status`` and ``headers`` (names as sent) now, the body as it arrives."""

    def __init__(self, conn: _Conn, pool: HTTP1Pool, key: Key, url: str = ""):
        self._conn = conn
        self._pool = pool
        self._key = key
        self._done = False
        self.url = url
        self.status: int = conn.status
        self.headers: list[tuple[bytes, bytes]] = conn.headers

    def header(self, name: bytes) -> bytes | None:
        """The first header called ``name`` (lower case), or None."""
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    async def read(self, decode: bool = False) -> bytes:
        """The whole body (``decode``: undo gzip/deflate); the connection goes back to the pool."""
        conn = self._conn
        parts: list[bytes] = []
        try:
            while not conn.complete:
                if conn.failure is not None:
                    raise self._error(conn.failure, "response")
                if conn.buffered > _LOW_WATER:
                    parts.append(conn.take())  # resumes a paused transport
                await conn.wait()
            parts.append(conn.take())
        finally:
            self.release()
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        if decode and conn.encoding:
            body = decode_body(body, conn.encoding)
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive from the socket (decoded from chunked transfer coding)."""
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.complete:
                return
            if conn.failure is not None:
                raise self._error(conn.failure, "stream")
            await conn.wait()

    def _error(self, failure: Exception, what: str) -> Exception:
        """The exception to raise for ``failure`` while reading the ``what`` ("response" or
        "stream"); subclasses map it into their caller's tree (with ``__cause__`` set)."""
        return failure

    def close(self) -> None:
        """Drop the connection (the reader went away: the server sees the disconnect)."""
        if not self._done:
            self._done = True
            self._conn.close()
            self._pool._release(self._key, None)

    def release(self) -> None:
        """Done: a complete keep-alive connection goes back to the pool, anything else is dropped."""
        if not self._done:
            self._done = True
            conn = self._conn
            conn.busy = False
            conn._cancel_timers()
            if conn.reusable():
                self._pool._release(self._key, conn)
            else:
                conn.close()
                self._pool._release(self._key, None)


class HTTP1Pool:
    """Keep-alive HTTP/1.1 connections per (host, port); at most ``max_connections`` open in all."""

    def __init__(self, max_connections: int = 1024, idle_timeout_s: float = 15.0, ssl: Any = None):
        if max_connections < 1:
            raise ValueError(f"max_connections={max_connections}: must be >= 1")
        if idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s={idle_timeout_s}: must be > 0")
        _need_httptools()  # here, not in the first connection's protocol factory
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.ssl = ssl
        self.connections_opened = 0
        self._idle: dict[Key, list[_Conn]] = {}
        self._open = 0  # connections open or being opened (slots taken)
        self._waiters: collections.deque[tuple[Key, asyncio.Future[_Conn | None]]] = collections.deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections open now (idle ones the server has closed are dropped first)."""
        for conns in self._idle.values():
            dead = [c for c in conns if c.lost]
            for c in dead:
                conns.remove(c)
                self._open -= 1
        return self._open

    async def send(self, key: Key, data: bytes, what: str, *, deadline: float | None = None,
                   connect_timeout_s: float | None = None, read_timeout_s: float | None = None,
                   url: str = "", response_class: type[HTTP1Response] | None = None,
                   timeout_s: float | None = None) -> Any:
        """Write ``data`` (a whole request) on a pooled connection; returns once the answer's head is in.

        ``what`` names the request in errors ("POST http://..."). ``deadline`` (loop time) bounds
        the whole exchange, the body included; ``read_timeout_s`` bounds each silence. The answer
        is a ``response_class`` (default :class:`HTTP1Response`; a subclass maps body errors)."""
        if self._closed:
            raise ConnectFailed("the HTTP client is closed")
        loop = asyncio.get_running_loop()
        if timeout_s is None:  # for messages only
            timeout_s = deadline - loop.time() if deadline is not None else 0.0
        conn = None
        idle = self._idle.get(key)
        while idle:  # the common case, without a coroutine: a kept-alive connection is free
            c = idle.pop()
            if not c.lost and loop.time() - c.idle_since < self.idle_timeout_s:
                conn = c
                break
            c.close()
            self._open -= 1
        for retry in (False, True):
            if conn is None:
                conn = await self._acquire(loop, key, deadline, connect_timeout_s, what, timeout_s)
            reused = conn.requests > 0
            try:
                conn.start(data, deadline, read_timeout_s, what, timeout_s)
                while not conn.head_done:
                    if conn.failure is not None:
                        raise conn.failure
                    await conn.wait()
            except BaseException as exc:
                conn.busy = False
                conn.close()
                self._release(key, None)
                if isinstance(exc, ConnectFailed) and reused and not conn.received and not retry:
                    # A kept-alive connection the server had closed while idle (uvicorn closes after 5 s; a
                    # client whose event loop was stopped, as between training steps, never saw the FIN):
                    # nothing was answered, so the request goes once more on a new connection.
                    self._drop_idle(key)  # kept alive as long as this one: as likely closed
                    conn = None
                    continue
                raise
            return (response_class or HTTP1Response)(conn, self, key, url)
        raise AssertionError("unreachable: the second try returns or raises")

    async def _acquire(self, loop: asyncio.AbstractEventLoop, key: Key, deadline: float | None,
                       connect_timeout_s: float | None, what: str, timeout_s: float) -> _Conn:
        idle = self._idle.get(key)
        while True:
            while idle:
                c = idle.pop()
                if not c.lost and loop.time() - c.idle_since < self.idle_timeout_s:
                    return c
                c.close()
                self._open -= 1
            if self._open < self.max_connections:
                self._open += 1
                break
            w: asyncio.Future[_Conn | None] = loop.create_future()
            entry = (key, w)
            self._waiters.append(entry)
            try:
                async with asyncio.timeout_at(deadline):
                    got = await w
            except TimeoutError:
                raise TimedOut(f"{what}: no free connection within {timeout_s:g} s") from None
            except BaseException:
                if w.done() and not w.cancelled() and w.exception() is None:
                    self._release(key, w.result())  # handed to us as we were cancelled: pass it on
                else:
                    try:
                        self._waiters.remove(entry)
                    except ValueError:
                        pass
                raise
            if got is None:  # a slot was freed for us: open a new connection in it
                break
            if not got.lost:
                return got
            got.close()  # handed over but died meanwhile: its slot is ours
            break
        limit = deadline
        if connect_timeout_s is not None:
            limit = loop.time() + connect_timeout_s if deadline is None else min(deadline, loop.time() + connect_timeout_s)
        try:
            async with asyncio.timeout_at(limit):
                _, conn = await loop.create_connection(
                    lambda: _Conn(loop), key[0], key[1], ssl=self.ssl,
                    server_hostname=key[0] if self.ssl is not None else None)
        except TimeoutError:
            self._release(key, None)
            if deadline is not None and limit == deadline:
                raise TimedOut(f"{what}: no connection within {timeout_s:g} s") from None
            raise ConnectFailed(f"{what}: no connection within {connect_timeout_s:g} s") from None
        except OSError as exc:
            self._release(key, None)
            raise ConnectFailed(f"{what}: {exc}") from exc
        except BaseException:
            self._release(key, None)
            raise
        self.connections_opened += 1
        return conn

    def _drop_idle(self, key: Key) -> None:
        """Close the idle connections to ``key`` (their slots freed)."""
        for c in self._idle.pop(key, []):
            c.close()
            self._open -= 1

    def _release(self, key: Key, conn: _Conn | None) -> None:
        """Give a connection back (None: its slot, the connection being gone)."""
        while self._waiters:
            wkey, w = self._waiters.popleft()
            if w.done():
                continue
            if conn is not None and (wkey != key or conn.lost):  # not for this waiter: free its slot instead
                conn.close()
                conn = None
            w.set_result(conn)
            return
        if conn is None:
            self._open -= 1
            return
        if self._closed:
            conn.close()
            self._open -= 1
            return
        conn.idle_since = conn.loop.time()
        self._idle.setdefault(key, []).append(conn)

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their request ends."""
        self._closed = True
        for conns in self._idle.values():
            for c in conns:
                c.close()
                self._open -= 1
        self._idle.clear()
        while self._waiters:
            _, w = self._waiters.popleft()
            if not w.done():
                w.set_exception(ConnectFailed("the HTTP client was closed"))


class RawHTTPTransport:
    """A pooled whole-body client; ``await transport(method, url, body, headers, timeout_s)``.

    Returns ``(status, headers, body)``; headers (names as sent) only for answers other than
    200 — the caller reads Retry-After there; a 200 gets an empty dict."""

    def __init__(self, max_connections: int = 1024, idle_timeout_s: float = 15.0):
        self.pool = HTTP1Pool(max_connections, idle_timeout_s)
        self._urls: dict[str, tuple[Key, bytes]] = {}

    @property
    def open_connections(self) -> int:
        return self.pool.open_connections

    def _split(self, url: str) -> tuple[Key, bytes]:
        got = self._urls.get(url)
        if got is None:
            u = urlsplit(url)
            if u.scheme != "http" or not u.hostname:
                raise ValueError(f"{url!r}: the raw client speaks plain http:// only (https goes through aiohttp)")
            port = u.port or 80
            target = (u.path or "/") + (f"?{u.query}" if u.query else "")
            host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
            host_header = host if port == 80 else f"{host}:{port}"
            prefix = f" {target} HTTP/1.1\r\nHost: {host_header}\r\n".encode("latin-1")
            got = ((u.hostname, port), prefix)
            if len(self._urls) < 1024:
                self._urls[url] = got
        return got

    async def __call__(self, method: str, url: str, body: bytes | None, headers: dict[str, str],
                       timeout_s: float) -> tuple[int, dict[str, str], bytes]:
        key, prefix = self._split(url)
        hdr = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if body is not None:
            hdr += f"Content-Length: {len(body)}\r\n"
        data = b"".join((method.encode("latin-1"), prefix, hdr.encode("latin-1"), b"\r\n", body or b""))
        deadline = asyncio.get_running_loop().time() + timeout_s
        resp = await self.pool.send(key, data, f"{method} {url}", deadline=deadline, timeout_s=timeout_s)
        try:
            out = await resp.read(decode=True)
        except BaseException:
            resp.close()
            raise
        if resp.status == 200:
            return 200, _NO_HEADERS, out
        return resp.status, {k.decode("latin-1"): v.decode("latin-1") for k, v in resp.headers}, out

    async def aclose(self) -> None:
        await self.pool.aclose()
