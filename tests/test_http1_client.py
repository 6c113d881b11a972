"""The one lean HTTP/1.1 client (teacher/rawhttp.py) against real loopback servers, through both callers.

The guard's ``Http1Upstream`` (guard/upstream.py: streamed bodies, errors mapped to 502/504) and
the harvester's ``RawHTTPTransport`` (whole bodies, teacher errors) share one pool. Each test starts
a raw asyncio TCP server that answers with exactly the bytes under test (keep-alive, chunked,
close-delimited, 1xx, gzip, truncated, stalled, closed while idle, unasked-for bytes), so what
the client does with each framing and failure is checked on the wire, not through a mock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from stillhouse.guard.upstream import Http1Upstream, UpstreamTimeout, UpstreamUnavailable
from stillhouse.http.client import HTTP1Pool, RawHTTPTransport
from stillhouse.http.errors import BadResponse, ConnectFailed, TimedOut

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """(head, body) of one request; (b"", b"") at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b"", b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length) if length else b""


async def serve(handler: Handler) -> tuple[asyncio.Server, int, dict[str, Any]]:
    state: dict[str, Any] = {"connections": 0, "requests": [], "lost": 0}

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state["connections"] += 1
        try:
            await handler(reader, writer, state)
        except (ConnectionError, asyncio.IncompleteReadError):
            state["lost"] += 1
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], state


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)


async def keepalive_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
    while True:
        head, body = await read_request(reader)
        if not head:
            return
        state["requests"].append((head, body))
        await asyncio.sleep(0.01)
        writer.write(ok(b'{"echo": ' + str(len(body)).encode() + b"}",
                        b"X-RateLimit-Remaining: 7\r\nRetry-After: 3\r\nX-Other: no\r\n"))
        await writer.drain()


def test_keep_alive_reuses_connections_and_the_pool_bounds_them() -> None:
    async def main() -> None:
        server, port, state = await serve(keepalive_echo)
        up = Http1Upstream(f"http://127.0.0.1:{port}/base", api_key="sk-up", pool_size=2)
        await up.start()

        async def one(i: int) -> bytes:
            r = await up.send("POST", "/v1/chat/completions", b"x" * i)
            assert r.status == 200 and r.content_type == "application/json"
            assert sorted(r.passthrough_headers) == [(b"retry-after", b"3"), (b"x-ratelimit-remaining", b"7")]
            return await r.read()

        assert await one(5) == b'{"echo": 5}'
        assert [await one(i) for i in range(4)] == [b'{"echo": %d}' % i for i in range(4)]
        assert state["connections"] == 1, "sequential requests must share one keep-alive connection"
        out = await asyncio.gather(*(one(i) for i in range(10)))
        assert out == [b'{"echo": %d}' % i for i in range(10)]
        assert state["connections"] == 2, "pool_size=2 allows two connections, no more"
        head, body = state["requests"][0]
        assert head.startswith(b"POST /base/v1/chat/completions HTTP/1.1\r\n")
        assert b"\r\nAuthorization: Bearer sk-up\r\n" in head and body == b"xxxxx"
        assert b"\r\nHost: 127.0.0.1:%d\r\n" % port in head
        await up.close()
        server.close()

    asyncio.run(main())


def test_chunked_stream_arrives_in_pieces_and_a_big_body_survives_flow_control() -> None:
    pieces = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
    big = bytes(range(256)) * 8192  # 2 MiB, past the 256 KiB pause mark

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for p in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(p), p))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        await read_request(reader)  # the same connection carries the next request
        writer.write(ok(big))
        await writer.drain()
        await read_request(reader)

    async def main() -> None:
        server, port, state = await serve(handler)
        up = Http1Upstream(f"http://127.0.0.1:{port}")
        r = await up.send("POST", "/v1/chat/completions", b"{}")
        assert r.content_type == "text/event-stream"
        got = [c async for c in r.chunks()]
        r.release()
        assert b"".join(got) == b"".join(pieces) and len(got) == 3, "each SSE chunk goes on as it arrives"
        r2 = await up.send("POST", "/v1/chat/completions", b"{}")
        await asyncio.sleep(0.2)  # let the server fill the buffer: reading pauses, then resumes on take()
        assert await r2.read() == big
        assert state["connections"] == 1
        await up.close()
        server.close()

    asyncio.run(main())


def test_close_delimited_body_ends_at_eof_and_the_connection_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"world")
        await writer.drain()

    async def main() -> None:
        server, port, state = await serve(handler)
        up = Http1Upstream(f"http://127.0.0.1:{port}")
        for _ in range(2):
            r = await up.send("GET", "/v1/models")
            assert await r.read() == b"hello world"
        assert state["connections"] == 2 and up.open_connections == 0
        server.close()

    asyncio.run(main())


def test_truncated_body_stall_and_silence_map_to_502_and_504() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        head, _ = await read_request(reader)
        kind = head.split(b" ")[1]
        if kind == b"/truncated":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly-part")
            await writer.drain()
            return  # the handler closes the connection
        if kind == b"/stall":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
            await writer.drain()
        await asyncio.sleep(2)  # /silent: never a byte; /stall: nothing after the first piece

    async def main() -> None:
        server, port, _ = await serve(handler)
        up = Http1Upstream(f"http://127.0.0.1:{port}", read_timeout_s=0.3)
        r = await up.send("GET", "/truncated")
        with pytest.raises(UpstreamUnavailable, match="broke the response"):
            await r.read()
        with pytest.raises(UpstreamTimeout, match="did not answer within 0.3s"):
            await up.send("GET", "/silent")
        r = await up.send("GET", "/stall")
        with pytest.raises(UpstreamTimeout, match="stopped answering"):
            await r.read()
        assert up.open_connections == 0, \
            "failed requests give back their pool slots and keep no broken connection"
        server.close()

    asyncio.run(main())


def test_refused_connection_is_502_and_an_idle_connection_closed_by_the_server_is_replaced() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(ok(b"{}"))
        await writer.drain()
        await asyncio.sleep(0.05)  # then close the keep-alive connection while the client holds it idle

    async def main() -> None:
        server, port, state = await serve(one_then_close)
        up = Http1Upstream(f"http://127.0.0.1:{port}")
        for _ in range(3):
            r = await up.send("POST", "/v1/chat/completions", b"{}")
            assert await r.read() == b"{}"
            await asyncio.sleep(0.2)
        assert state["connections"] == 3
        server.close()
        await server.wait_closed()
        with pytest.raises(UpstreamUnavailable, match="cannot reach upstream"):
            await up.send("POST", "/v1/chat/completions", b"{}")

    asyncio.run(main())


def test_a_kept_alive_connection_closed_while_the_client_loop_was_stopped_is_retried_once() -> None:
    """uvicorn closes an idle connection after 5 s; a client whose event loop is stopped meanwhile (between
    training steps) never sees the FIN, so its next request goes on a dead connection. Nothing was answered
    on it: the pool sends the request once more on a new connection. A fresh connection's failure is not
    retried."""
    import threading
    import time

    async def answer_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                  state: dict[str, Any]) -> None:
        head, body = await read_request(reader)
        state["requests"].append(head)
        writer.write(ok(b"{}"))
        await writer.drain()
        await asyncio.sleep(0.05)  # the keep-alive timeout, much shorter than uvicorn's 5 s

    server_loop = asyncio.new_event_loop()
    started = threading.Event()
    got: dict[str, Any] = {}

    def run_server() -> None:
        asyncio.set_event_loop(server_loop)
        got["server"], got["port"], got["state"] = server_loop.run_until_complete(serve(answer_then_hang_up))
        started.set()
        server_loop.run_forever()

    threading.Thread(target=run_server, daemon=True).start()
    assert started.wait(5)
    loop = asyncio.new_event_loop()
    pool = HTTP1Pool(max_connections=4)

    async def post() -> bytes:
        r = await pool.send(("127.0.0.1", got["port"]), b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
                            "POST /", deadline=asyncio.get_running_loop().time() + 5)
        return await r.read()

    try:
        for _ in range(3):
            assert loop.run_until_complete(post()) == b"{}"
            time.sleep(0.3)  # the client's loop is stopped: the server's hang-up is not seen
        assert len(got["state"]["requests"]) == 3 and got["state"]["connections"] == 3
        server_loop.call_soon_threadsafe(got["server"].close)
        time.sleep(0.2)
        with pytest.raises(ConnectFailed):  # the stale connection is retried once; the new one is refused
            loop.run_until_complete(post())
    finally:
        loop.run_until_complete(pool.aclose())
        loop.close()
        server_loop.call_soon_threadsafe(server_loop.stop)


def test_close_drops_the_connection_so_the_upstream_sees_the_disconnect() -> None:
    async def slow_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(50):
            writer.write(b"5\r\nchunk\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
        state["finished"] = True

    async def main() -> None:
        server, port, state = await serve(slow_stream)
        up = Http1Upstream(f"http://127.0.0.1:{port}")
        r = await up.send("POST", "/v1/chat/completions", b"{}")
        it = r.chunks()
        assert (await it.__anext__()).startswith(b"chunk")
        r.close()
        await asyncio.sleep(0.3)
        assert "finished" not in state and state["lost"] == 1
        assert up.open_connections == 0
        server.close()

    asyncio.run(main())


def test_bad_urls_and_keys_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="give http://host"):
        Http1Upstream("ftp://example.com")
    with pytest.raises(ValueError, match="line break"):
        Http1Upstream("http://127.0.0.1:1", api_key="a\r\nX-Evil: 1")


@pytest.mark.parametrize("client", ["http1", "aiohttp"])
def test_the_guard_proxies_json_and_sse_with_either_upstream_client(tmp_path, client) -> None:
    from stillhouse.testing.fakeserver import FakeServerConfig
    from stillhouse.testing.fakeserver import start_in_thread as start_fake
    from test_guard import chat_body, make_config, start_guard

    with start_fake(FakeServerConfig(latency_ms=2, stream_chunk_delay_ms=1)) as fake:
        g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}", upstream_client=client))
        try:
            key = g.account_with_key("alice")
            status, _, out = g.chat(key)
            assert status == 200 and out["choices"][0]["message"]["content"]
            status, hdrs, text = g.chat(key, chat_body(stream=True))
            assert status == 200 and hdrs["content-type"].startswith("text/event-stream")
            assert text.rstrip().endswith("data: [DONE]")
            assert isinstance(g.app.upstream, Http1Upstream) == (client == "http1")
            recs = g.records("alice")
            assert [r.status for r in recs] == [200, 200] and all(r.response_text for r in recs)
        finally:
            g.stop()


def test_guard_config_names_the_upstream_clients() -> None:
    from stillhouse.guard.config import GuardConfig, sha256_hex

    with pytest.raises(ValueError, match="upstream_client='curl'"):
        GuardConfig(upstream_url="http://127.0.0.1:1", admin_token_sha256=sha256_hex("x"), upstream_client="curl")


def test_x_forwarded_for_is_only_believed_when_the_config_trusts_it(tmp_path) -> None:
    """uvicorn's own proxy-header rewrite is off: a loopback client cannot pick its logged IP."""
    from stillhouse.testing.fakeserver import FakeServerConfig
    from stillhouse.testing.fakeserver import start_in_thread as start_fake
    from test_guard import make_config, start_guard

    with start_fake(FakeServerConfig(latency_ms=1)) as fake:
        for trust, expected in ((False, "127.0.0.1"), (True, "203.0.113.9")):
            g = start_guard(make_config(tmp_path / str(trust), f"http://127.0.0.1:{fake.port}",
                                        trust_forwarded_for=trust))
            try:
                key = g.account_with_key("alice")
                status, _, _ = g.chat(key, headers={"X-Forwarded-For": "203.0.113.9, 10.0.0.1"})
                assert status == 200
                assert [r.client_ip for r in g.records("alice")] == [expected]
            finally:
                g.stop()


def test_a_client_that_hangs_up_on_a_slow_non_streamed_answer_cancels_the_upstream_call(tmp_path) -> None:
    """The disconnect watcher starts lazily (WATCH_AFTER_S) but still catches a hang-up."""
    import time

    from stillhouse.testing.fakeserver import FakeServerConfig
    from stillhouse.testing.fakeserver import start_in_thread as start_fake
    from test_guard import chat_body, make_config, start_guard

    with start_fake(FakeServerConfig(latency_ms=3000)) as slow:
        g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{slow.port}"))
        try:
            key = g.account_with_key("kim")

            async def go() -> None:
                import aiohttp

                async with aiohttp.ClientSession() as s:
                    with pytest.raises(TimeoutError):
                        await s.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                     json=chat_body("slow please"), timeout=aiohttp.ClientTimeout(total=0.5))

            t0 = time.monotonic()
            asyncio.run(go())
            deadline = time.monotonic() + 2.0
            while not g.records("kim") and time.monotonic() < deadline:
                time.sleep(0.1)
            rec = g.records("kim")[0]
            assert rec.status == 499 and "upstream call cancelled" in rec.decision_reason
            assert time.monotonic() - t0 < 2.5 and rec.latency_ms < 1500, "the guard waited for the upstream"
        finally:
            g.stop()


# -- whole-body requests (RawHTTPTransport, the harvester's client) ------------------------------

async def _scripted_server(answers):
    """A loopback server that answers the k-th request it reads with answers[k] (bytes, or None to hang up)."""
    count = [0]

    async def handle(reader, writer):
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":")[1])
            await reader.readexactly(n)
            k = count[0]
            count[0] += 1
            ans = answers[k % len(answers)]
            if ans is None:
                break
            pieces = ans if isinstance(ans, list) else [ans]
            if pieces[-1] is None:  # answer, then hang up without having said so
                for piece in pieces[:-1]:
                    writer.write(piece)
                await writer.drain()
                break
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.01)
            if pieces[0].startswith(b"HTTP/1.0") or b"Connection: close" in pieces[0]:
                break
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], count


async def test_raw_client_framings_and_failures():
    ok = b'{"ok": 1}'
    gz = __import__("gzip").compress(ok)
    answers = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n" + ok,  # 1xx skipped
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"ok", b"\r\n5\r\n\": 1}\r\n0\r\n\r\n"],
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(gz) + gz,
        b"HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nContent-Length: 2\r\n\r\n{}",
        b"HTTP/1.0 200 OK\r\n\r\n" + ok,  # framed by the connection's end
    ]
    srv, port, count = await _scripted_server(answers)
    t = RawHTTPTransport(max_connections=1)
    url = f"http://127.0.0.1:{port}/v1/x"
    try:
        for _ in range(3):
            assert await t("POST", url, b"{}", {}, 5) == (200, {}, ok)
        status, headers, body = await t("POST", url, b"{}", {}, 5)
        assert (status, headers["Retry-After"], body) == (429, "3", b"{}")
        assert await t("GET", url, None, {}, 5) == (200, {}, ok)
        assert count[0] == 5
    finally:
        await t.aclose()
        srv.close()

    for answer, exc in ((None, ConnectFailed),
                        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nConnection: close\r\n\r\n{\"cut", BadResponse),
                        (b"SMTP ready\r\n\r\n", BadResponse)):
        srv, port, _ = await _scripted_server([answer])
        t = RawHTTPTransport()
        try:
            with pytest.raises(exc):
                await t("POST", f"http://127.0.0.1:{port}/", b"{}", {}, 5)
        finally:
            await t.aclose()
            srv.close()


async def test_raw_client_drops_a_keep_alive_connection_the_server_closed():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    srv, port, count = await _scripted_server([[ok, None]])
    t = RawHTTPTransport(max_connections=1)
    try:
        for _ in range(3):
            assert await t("POST", f"http://127.0.0.1:{port}/", b"{}", {}, 5) == (200, {}, b"{}")
            await asyncio.sleep(0.05)  # the hang-up arrives while the connection idles in the pool
        assert count[0] == 3 and t.open_connections == 0
    finally:
        await t.aclose()
        srv.close()


async def test_deflate_bodies_are_decoded_and_unknown_encodings_refused():
    import zlib

    ok = b'{"ok": 1}'
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflate = raw_deflate.compress(ok) + raw_deflate.flush()
    answers = [b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\nContent-Length: %d\r\n\r\n" % len(body) + body
               for body in (zlib.compress(ok), raw_deflate)]
    answers.append(b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}")
    srv, port, count = await _scripted_server(answers)
    t = RawHTTPTransport(max_connections=1)
    try:
        for _ in range(2):
            assert await t("POST", f"http://127.0.0.1:{port}/", b"{}", {}, 5) == (200, {}, ok)
        with pytest.raises(BadResponse, match="unsupported Content-Encoding 'br'"):
            await t("POST", f"http://127.0.0.1:{port}/", b"{}", {}, 5)
        assert count[0] == 3
    finally:
        await t.aclose()
        srv.close()


async def test_unasked_for_bytes_on_an_idle_connection_drop_it():
    # The server answers, then sends a second answer nobody asked for: that connection is unusable.
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    srv, port, count = await _scripted_server([[ok + ok]])
    t = RawHTTPTransport(max_connections=1)
    try:
        assert await t("POST", f"http://127.0.0.1:{port}/", b"{}", {}, 5) == (200, {}, b"{}")
        await asyncio.sleep(0.05)
        assert t.open_connections == 0
        assert await t("POST", f"http://127.0.0.1:{port}/", b"{}", {}, 5) == (200, {}, b"{}")
        assert count[0] == 2
    finally:
        await t.aclose()
        srv.close()


# -- the shared pool itself: streamed and whole bodies, neutral (teacher-layer) errors --------------

async def test_one_pool_serves_streamed_and_whole_bodies_and_raises_teacher_errors():
    chunked = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab\n\r\n", b"3\r\ncd\n\r\n0\r\n\r\n"]
    whole = b"HTTP/1.1 503 Busy\r\nRetry-After: 2\r\nContent-Length: 4\r\n\r\nbusy"
    cut = [b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab", None]
    srv, port, count = await _scripted_server([chunked, whole, cut])
    pool = HTTP1Pool(max_connections=1)
    req = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    try:
        r = await pool.send(("127.0.0.1", port), req, "POST /")
        got = [c async for c in r.chunks()]
        r.release()
        assert b"".join(got) == b"ab\ncd\n" and len(got) == 2
        r = await pool.send(("127.0.0.1", port), req, "POST /")
        assert (r.status, r.header(b"retry-after"), await r.read()) == (503, b"2", b"busy")
        assert pool.connections_opened == 1
        r = await pool.send(("127.0.0.1", port), req, "POST /")
        with pytest.raises(BadResponse, match="closed mid-body"):
            await r.read()
        assert pool.open_connections == 0 and count[0] == 3
        with pytest.raises(TimedOut):  # a silent server: the read timeout, not a deadline
            srv2 = await asyncio.start_server(lambda rd, wr: None, "127.0.0.1", 0)
            try:
                await pool.send(srv2.sockets[0].getsockname()[:2], req, "POST /", read_timeout_s=0.1)
            finally:
                srv2.close()
        assert pool.open_connections == 0
    finally:
        await pool.aclose()
        srv.close()
    with pytest.raises(ConnectFailed, match="closed"):
        await pool.send(("127.0.0.1", port), req, "POST /")


# -- stillhouse guard CLI: the upstream client and the detector lag as flags ------------------------

def test_guard_cli_sets_upstream_client_and_detect_max_lag(monkeypatch) -> None:
    import json

    from typer.testing import CliRunner

    from stillhouse.cli import app

    runner = CliRunner()
    args = ["guard", "--upstream", "http://127.0.0.1:9", "--print-config"]
    res = runner.invoke(app, args + ["--upstream-client", "aiohttp", "--detect-max-lag", "0"])
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output[res.output.index("{"):])
    assert (cfg["upstream_client"], cfg["detect_max_lag"]) == ("aiohttp", 0)
    res = runner.invoke(app, args + ["--upstream-client", "curl"])
    assert res.exit_code != 0 and "upstream_client='curl'" in res.output
    res = runner.invoke(app, ["guard", "--help"], terminal_width=200)
    assert "--upstream-client" in res.output and "--detect-max-lag" in res.output
