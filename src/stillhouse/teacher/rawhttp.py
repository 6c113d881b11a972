"""A lean HTTP/1.1 client for plain-http endpoints: a keep-alive pool on bare asyncio.Protocol.

:class:`stillhouse.teacher.openai.OpenAITeacher` uses it for ``http://`` URLs (``client="auto"``),
aiohttp for ``https://``. Why: the harvester's throughput at high concurrency is bounded by the
client's CPU per request, and aiohttp's client costs several times what this one does (measured
with ``stillhouse bench harvest``; figures in docs/benchmarks.md).

    transport = RawHTTPTransport(max_connections=64)
    status, headers, body = await transport("POST", "http://127.0.0.1:8000/v1/chat/completions",
                                            b'{"model": ...}', {"Content-Type": "application/json"}, 30.0)
    await transport.aclose()

It matches :data:`stillhouse.teacher.openai.Transport`. What it speaks: HTTP/1.1 over TCP with
no TLS, one request at a time per connection, connections kept alive and reused (LIFO; dropped
when the server closes them or after ``idle_timeout_s``), at most ``max_connections`` open
(callers beyond that wait for one). Answers framed by Content-Length, chunked transfer coding
or the connection's end; gzip/deflate bodies are decoded; 1xx interim answers are skipped.
Headers are returned (names as sent) for answers other than 200 — the caller reads Retry-After
there; a 200 gets an empty dict. Requests are never resent: a failure is the caller's to retry.

Failures, from :mod:`stillhouse.teacher.base`::

    TeacherConnectionError   refused, reset, or closed before any of the answer arrived
    TeacherTimeout           no complete answer within timeout_s (that connection is dropped)
    TeacherResponseError     an answer that is not HTTP/1.x, or a body cut off (.raw: what came)
"""

from __future__ import annotations

import asyncio
import collections
import socket
import zlib
from typing import Any
from urllib.parse import urlsplit

from stillhouse.teacher.base import TeacherConnectionError, TeacherResponseError, TeacherTimeout

_MAX_HEAD = 64 * 1024
_NO_HEADERS: dict[str, str] = {}

# Framing of the body being read.
_LENGTH, _CHUNKED, _UNTIL_CLOSE = 0, 1, 2


class _Conn(asyncio.Protocol):
    """One keep-alive connection; reads one answer at a time into ``waiter``."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.waiter: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self.lost = False
        self.keep_alive = True
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.buf = b""
        self.status = -1  # -1: still reading the head
        self.headers: dict[str, str] = _NO_HEADERS
        self.framing = _LENGTH
        self.body_end = 0  # _LENGTH: index in buf where the body ends
        self.body_start = 0
        self.chunks: list[bytes] = []  # _CHUNKED: decoded so far
        self.encoding = b""

    # -- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.keep_alive = False
        w = self.waiter
        if w is None or w.done():
            return
        if self.status >= 0 and self.framing == _UNTIL_CLOSE:
            try:
                self._finish(self.buf[self.body_start:])
            except TeacherResponseError as err:
                w.set_exception(err)
        elif self.status >= 0:
            raw = self.buf.decode("utf-8", "replace")
            w.set_exception(TeacherResponseError(f"the connection closed mid-body ({exc or 'EOF'})", raw))
        else:
            why = f": {exc}" if exc else ""
            w.set_exception(TeacherConnectionError(f"the server closed the connection before answering{why}"))

    def data_received(self, data: bytes) -> None:
        w = self.waiter
        if w is None or w.done():  # unasked-for bytes (or after a timeout): this connection is unusable
            self.keep_alive = False
            self.transport.close()
            return
        buf = self.buf + data if self.buf else data
        try:
            while self.status < 0:
                he = buf.find(b"\r\n\r\n")
                if he < 0:
                    if len(buf) > _MAX_HEAD:
                        raise TeacherResponseError("answer head over 64 KiB", buf[:2000].decode("latin-1"))
                    self.buf = buf
                    return
                if not self._head(buf, he):  # a 1xx interim answer: skip it
                    buf = buf[he + 4:]
            if self.framing == _LENGTH:
                if len(buf) >= self.body_end:
                    self.buf = b""
                    self._finish(buf[self.body_start:self.body_end])
                    return
                self.buf = buf
            elif self.framing == _CHUNKED:
                self.buf = buf
                self._chunked()
            else:
                self.buf = buf
        except TeacherResponseError as exc:
            self.keep_alive = False
            self.transport.close()
            if not w.done():
                w.set_exception(exc)

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost finishes an until-close body

    # -- parsing --------------------------------------------------------------------------------
    def _head(self, buf: bytes, he: int) -> bool:
        """Parse the head ending at ``he``; False for a 1xx interim answer."""
        head = buf[:he]
        eol = head.find(b"\r\n")
        line = head if eol < 0 else head[:eol]
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise TeacherResponseError(f"not an HTTP/1.x answer: {line[:100]!r}", buf[:2000].decode("latin-1"))
        status = int(parts[1])
        if 100 <= status < 200 and status != 101:
            return False
        low = head.lower()
        if parts[0] == b"HTTP/1.1":
            self.keep_alive = low.find(b"\r\nconnection: close") < 0
        else:
            self.keep_alive = low.find(b"\r\nconnection: keep-alive") >= 0
        if status != 200:
            self.headers = {}
            for hl in head[eol + 2:].split(b"\r\n") if eol >= 0 else ():
                k, sep, v = hl.partition(b":")
                if sep:
                    self.headers[k.strip().decode("latin-1")] = v.strip().decode("latin-1")
        i = low.find(b"\r\ncontent-encoding:")
        if i >= 0:
            j = low.find(b"\r\n", i + 19)
            self.encoding = low[i + 19:j if j >= 0 else len(low)].strip()
        self.body_start = he + 4
        if status in (204, 304):
            self.framing, self.body_end = _LENGTH, he + 4
        elif low.find(b"\r\ntransfer-encoding:") >= 0 and low.find(b"chunked") >= 0:
            self.framing = _CHUNKED
            self.chunk_pos = he + 4
        else:
            i = low.find(b"\r\ncontent-length:")
            if i >= 0:
                j = low.find(b"\r\n", i + 17)
                try:
                    n = int(low[i + 17:j if j >= 0 else len(low)])
                except ValueError:
                    raise TeacherResponseError("bad Content-Length in the answer", head.decode("latin-1")) from None
                self.framing, self.body_end = _LENGTH, he + 4 + n
            else:
                self.framing, self.keep_alive = _UNTIL_CLOSE, False
        self.status = status
        return True

    def _chunked(self) -> None:
        buf, pos = self.buf, self.chunk_pos
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size_s = buf[pos:eol].split(b";", 1)[0].strip()
            try:
                size = int(size_s, 16)
            except ValueError:
                raise TeacherResponseError(f"bad chunk size {size_s[:20]!r}", buf.decode("latin-1")) from None
            if size == 0:
                if buf.find(b"\r\n\r\n", eol) < 0:  # the trailers (if any) end with an empty line
                    break
                self.buf = b""
                self._finish(b"".join(self.chunks))
                return
            if len(buf) < eol + 2 + size + 2:
                break
            self.chunks.append(buf[eol + 2:eol + 2 + size])
            pos = eol + 2 + size + 2
        self.chunk_pos = pos

    def _finish(self, body: bytes) -> None:
        if self.encoding and self.encoding != b"identity":
            try:
                if self.encoding in (b"gzip", b"x-gzip"):
                    body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
                elif self.encoding == b"deflate":
                    try:
                        body = zlib.decompress(body)
                    except zlib.error:
                        body = zlib.decompress(body, -zlib.MAX_WBITS)
                else:
                    raise TeacherResponseError(f"unsupported Content-Encoding {self.encoding.decode()!r}", "")
            except zlib.error as exc:
                raise TeacherResponseError(f"cannot decode the {self.encoding.decode()} body: {exc}", "") from exc
        w, status, headers = self.waiter, self.status, self.headers
        self.waiter = None
        self._reset()
        if w is not None and not w.done():
            w.set_result((status, headers, body))


class RawHTTPTransport:
    """A pooled HTTP/1.1 client; ``await transport(method, url, body, headers, timeout_s)``."""

    def __init__(self, max_connections: int = 1024, idle_timeout_s: float = 15.0):
        if max_connections < 1:
            raise ValueError(f"max_connections={max_connections}: must be >= 1")
        if idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s={idle_timeout_s}: must be > 0")
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._open = 0  # connections open or being opened (slots taken)
        self._waiters: collections.deque[tuple[tuple[str, int], asyncio.Future[_Conn | None]]] = collections.deque()
        self._urls: dict[str, tuple[str, int, bytes]] = {}
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

    def _split(self, url: str) -> tuple[str, int, bytes]:
        got = self._urls.get(url)
        if got is None:
            u = urlsplit(url)
            if u.scheme != "http" or not u.hostname:
                raise ValueError(f"{url!r}: the raw client speaks plain http:// only (https goes through aiohttp)")
            port = u.port or 80
            target = (u.path or "/") + (f"?{u.query}" if u.query else "")
            host_header = u.hostname if port == 80 else f"{u.hostname}:{port}"
            if ":" in u.hostname and port == 80:
                host_header = f"[{u.hostname}]"
            elif ":" in u.hostname:
                host_header = f"[{u.hostname}]:{port}"
            prefix = f" {target} HTTP/1.1\r\nHost: {host_header}\r\n".encode("latin-1")
            got = (u.hostname, port, prefix)
            if len(self._urls) < 1024:
                self._urls[url] = got
        return got

    async def __call__(self, method: str, url: str, body: bytes | None, headers: dict[str, str],
                       timeout_s: float) -> tuple[int, dict[str, str], bytes]:
        if self._closed:
            raise TeacherConnectionError("the HTTP client is closed")
        host, port, prefix = self._split(url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        conn = await self._acquire(loop, (host, port), deadline, method, url, timeout_s)
        fut: asyncio.Future[tuple[int, dict[str, str], bytes]] = loop.create_future()
        conn.waiter = fut
        hdr = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if body is not None:
            hdr += f"Content-Length: {len(body)}\r\n"
        timer = loop.call_at(deadline, _expire, fut, method, url, timeout_s)
        try:
            conn.transport.write(b"".join((method.encode("latin-1"), prefix, hdr.encode("latin-1"), b"\r\n",
                                           body or b"")))
            result = await fut
        except BaseException:
            conn.keep_alive = False
            conn.waiter = None
            conn.transport.close()
            self._release((host, port), None)
            raise
        finally:
            timer.cancel()
        self._release((host, port), conn if conn.keep_alive and not conn.lost else None)
        return result

    async def _acquire(self, loop: asyncio.AbstractEventLoop, key: tuple[str, int], deadline: float,
                       method: str, url: str, timeout_s: float) -> _Conn:
        idle = self._idle.get(key)
        while True:
            while idle:
                c = idle.pop()
                if not c.lost and loop.time() - c.idle_since < self.idle_timeout_s:
                    return c
                c.transport.close()
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
                raise TeacherTimeout(f"{method} {url}: no free connection within {timeout_s:g} s") from None
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
            got.transport.close()  # handed over but died meanwhile: its slot is ours
            break
        try:
            async with asyncio.timeout_at(deadline):
                _, conn = await loop.create_connection(_Conn, key[0], key[1])
        except TimeoutError:
            self._release(key, None)
            raise TeacherTimeout(f"{method} {url}: no connection within {timeout_s:g} s") from None
        except OSError as exc:
            self._release(key, None)
            raise TeacherConnectionError(f"{method} {url}: {exc}") from exc
        except BaseException:
            self._release(key, None)
            raise
        return conn

    def _release(self, key: tuple[str, int], conn: _Conn | None) -> None:
        """Give a connection back (None: its slot, the connection being gone)."""
        while self._waiters:
            wkey, w = self._waiters.popleft()
            if w.done():
                continue
            if conn is not None and (wkey != key or conn.lost):  # not for this waiter: free its slot instead
                conn.transport.close()
                conn = None
            w.set_result(conn)
            return
        if conn is None:
            self._open -= 1
            return
        if self._closed:
            conn.transport.close()
            self._open -= 1
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(key, []).append(conn)

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their request ends."""
        self._closed = True
        for conns in self._idle.values():
            for c in conns:
                c.transport.close()
                self._open -= 1
        self._idle.clear()
        while self._waiters:
            _, w = self._waiters.popleft()
            if not w.done():
                w.set_exception(TeacherConnectionError("the HTTP client was closed"))


def _expire(fut: asyncio.Future[Any], method: str, url: str, timeout_s: float) -> None:
    if not fut.done():
        fut.set_exception(TeacherTimeout(f"{method} {url}: no answer within {timeout_s:g} s"))
