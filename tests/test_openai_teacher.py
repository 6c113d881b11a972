"""OpenAITeacher: against the fake server on loopback, and with an injected transport."""

from __future__ import annotations

import json

import pytest

from stillhouse.teacher.base import (
    BadRequest,
    RateLimited,
    SamplingParams,
    ServerError,
    TeacherConnectionError,
    TeacherResponseError,
    TeacherTimeout,
)
from stillhouse.teacher.openai import OpenAITeacher, parse_retry_after
from stillhouse.teacher.spec import make_teacher
from stillhouse.testing.fakeserver import FakeServerConfig, choose_fault, parse_faults, start_in_thread

MSGS = [{"role": "user", "content": "What is 12 + 30? Reply with just the number."}]


@pytest.fixture(scope="module")
def server():
    with start_in_thread(FakeServerConfig(latency_ms=1, model="m1")) as s:
        yield s


async def test_chat_with_top_logprobs_and_model_from_models(server):
    t = make_teacher(server.base_url)
    assert isinstance(t, OpenAITeacher)
    try:
        res = await t.chat(MSGS, SamplingParams(logprobs=True, top_logprobs=4, max_tokens=50))
        assert t.name == "m1"
        assert res.model == "m1"
        (c,) = res.completions
        assert c.text.startswith("12 + 30 =")
        assert c.finish_reason == "stop"
        assert c.completion_tokens == len(c.text.split()) == len(c.logprobs.tokens)
        assert "".join(c.logprobs.tokens) == c.text
        assert all(len(row) == 4 for row in c.logprobs.top_logprobs)
        assert c.logprobs.top_tokens[0][0] == c.logprobs.tokens[0]
        assert c.logprobs.token_ids is None  # HTTP gives strings only
        assert res.latency_s > 0
    finally:
        await t.aclose()


async def test_n_and_max_tokens(server):
    async with OpenAITeacher(server.base_url, model="m1") as t:
        res = await t.chat([{"role": "user", "content": "tell me"}], SamplingParams(n=3, max_tokens=2))
    assert len(res.completions) == 3
    assert all(c.finish_reason == "length" and c.completion_tokens == 2 for c in res.completions)


async def test_unknown_model_is_bad_request(server):
    async with OpenAITeacher(server.base_url, model="nope") as t:
        with pytest.raises(BadRequest) as ei:
            await t.chat(MSGS, SamplingParams())
    assert ei.value.status == 404
    assert "nope" in str(ei.value)


async def test_connection_refused_maps_to_connection_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    async with OpenAITeacher(f"http://127.0.0.1:{port}/v1", model="m") as t:
        with pytest.raises(TeacherConnectionError):
            await t.chat(MSGS, SamplingParams())


async def test_timeout_maps_to_teacher_timeout():
    cfg = FakeServerConfig(latency_ms=0, faults=(("timeout", 1.0),), fault_attempts=5, hang_s=1)
    with start_in_thread(cfg) as s:
        async with OpenAITeacher(s.base_url, model="fake-model", timeout_s=0.2) as t:
            with pytest.raises(TeacherTimeout):
                await t.chat(MSGS, SamplingParams())


@pytest.mark.parametrize(
    ("kind", "exc", "retry_after"),
    [("429", RateLimited, 0.7), ("503", ServerError, 0.7), ("500", ServerError, None),
     ("truncated", TeacherResponseError, None), ("empty", TeacherResponseError, None)],
)
async def test_faults_map_into_the_tree(kind, exc, retry_after):
    cfg = FakeServerConfig(latency_ms=0, faults=((kind, 1.0),), fault_attempts=1, retry_after_s=0.7)
    with start_in_thread(cfg) as s:
        async with OpenAITeacher(s.base_url, model="fake-model") as t:
            with pytest.raises(exc) as ei:
                await t.chat(MSGS, SamplingParams())
            if retry_after is not None:
                assert ei.value.retry_after == pytest.approx(retry_after)
            if exc is TeacherResponseError:
                assert ei.value.raw  # the body is kept for the store
            # fault_attempts=1: the second sighting of the same body goes through
            res = await t.chat(MSGS, SamplingParams())
            assert res.completions[0].text


async def test_injected_transport_sees_request_and_key(monkeypatch):
    monkeypatch.setenv("STILLHOUSE_API_KEY", "sk-test")
    seen = []

    async def transport(method, url, body, headers, timeout_s):
        seen.append((method, url, json.loads(body) if body else None, headers, timeout_s))
        if url.endswith("/models"):
            return 200, {}, json.dumps({"data": [{"id": "first"}, {"id": "second"}]}).encode()
        answer = {"model": "first", "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"},
                                                 "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 9, "completion_tokens": 1}}
        return 200, {}, json.dumps(answer).encode()

    t = OpenAITeacher("http://example.invalid/v1", transport=transport, timeout_s=3)
    res = await t.chat(MSGS, SamplingParams(temperature=0.5, seed=3, stop=("\n",)))
    assert res.completions[0].text == "42" and res.completions[0].prompt_tokens == 9
    (m1, u1, _, _, _), (m2, u2, b2, h2, to2) = seen
    assert (m1, u1) == ("GET", "http://example.invalid/v1/models")
    assert (m2, u2, to2) == ("POST", "http://example.invalid/v1/chat/completions", 3)
    assert b2["model"] == "first" and b2["seed"] == 3 and b2["stop"] == ["\n"] and b2["temperature"] == 0.5
    assert h2["Authorization"] == "Bearer sk-test"


async def test_transport_garbage_and_statuses():
    answers = iter([
        (200, {}, b'{"choices": [{"index": 0, "mess'),
        (200, {}, b'{"choices": [{"index": 0}]}'),
        (429, {"Retry-After": "2"}, b'{"error": {"message": "slow down"}}'),
        (401, {}, b'{"error": {"message": "bad key"}}'),
    ])

    async def transport(method, url, body, headers, timeout_s):
        return next(answers)

    t = OpenAITeacher("http://x/v1", model="m", transport=transport)
    with pytest.raises(TeacherResponseError) as e1:
        await t.chat(MSGS, SamplingParams())
    assert e1.value.raw.startswith('{"choices"')
    with pytest.raises(TeacherResponseError, match="no message"):
        await t.chat(MSGS, SamplingParams())
    with pytest.raises(RateLimited) as e3:
        await t.chat(MSGS, SamplingParams())
    assert e3.value.retry_after == 2 and "slow down" in str(e3.value)
    with pytest.raises(BadRequest, match="bad key"):
        await t.chat(MSGS, SamplingParams())


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"Retry-After": "3"}) == 3
    assert parse_retry_after({}) is None
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past


def test_fault_schedule_is_a_pure_function_and_transient_faults_end():
    cfg = FakeServerConfig(faults=parse_faults("429=0.3,500=0.3"), fault_attempts=2,
                           permanent_faults=parse_faults("truncated=0.1"))
    keys = [f"k{i}" for i in range(400)]
    first = [choose_fault(cfg, k, 0) for k in keys]
    assert first == [choose_fault(cfg, k, 0) for k in keys]
    later = [choose_fault(cfg, k, 5) for k in keys]
    assert set(later) <= {None, "truncated"}
    perm = sum(x == "truncated" for x in later)
    assert 15 < perm < 70  # about 10% of 400
    assert {"429", "500"} <= set(first)
    with pytest.raises(ValueError, match="choose from"):
        parse_faults("418=0.1")


# -- the raw engine of the fake server and the raw HTTP client ------------------------------------
# (the client's framings and failures on the wire: tests/test_http1_client.py)

async def test_raw_client_limit_reuse_and_timeout():
    import asyncio

    from stillhouse.http.client import RawHTTPTransport
    from stillhouse.http.errors import TimedOut

    with start_in_thread(FakeServerConfig(latency_ms=20, model="m"), engine="raw") as s:
        t = RawHTTPTransport(max_connections=3)
        body = json.dumps({"model": "m", "messages": MSGS}).encode()
        res = await asyncio.gather(*[t("POST", s.base_url + "/chat/completions", body, {}, 5) for _ in range(12)])
        assert all(r[0] == 200 for r in res)
        assert t.open_connections == 3  # 12 requests through 3 kept-alive connections
        with pytest.raises(TimedOut):
            await t("POST", s.base_url + "/chat/completions", body, {}, 0.005)
        assert t.open_connections == 2  # the timed-out connection was dropped, not reused
        assert (await t("POST", s.base_url + "/chat/completions", body, {}, 5))[0] == 200
        await t.aclose()
        assert t.open_connections == 0
    with pytest.raises(ValueError, match="plain http"):
        OpenAITeacher("https://example.invalid/v1", client="raw")


async def test_raw_engine_keeps_alive_pipelines_in_order_and_refuses_what_it_cannot_do():
    import asyncio

    with start_in_thread(FakeServerConfig(latency_ms=5, model="m"), engine="raw") as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port)
        reqs = b""
        for a in (1, 2, 3):
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"What is {a} + 10?"}]})
            reqs += (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body.encode())
        writer.write(reqs + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")  # four pipelined requests, one write
        texts = []
        for _ in range(4):
            head = await reader.readuntil(b"\r\n\r\n")
            n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            texts.append((head.split(b" ")[1], json.loads(await reader.readexactly(n))))
        assert [t[1]["choices"][0]["message"]["content"].split(" =")[0] for t in texts[:3]] == [
            "1 + 10", "2 + 10", "3 + 10"]
        assert texts[3][0] == b"404"
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 411") and b"Connection: close" in head
        writer.close()
        async with OpenAITeacher(s.base_url, model="m") as t:
            assert t.client == "raw"
            status, _, body = await t._request("POST", s.base_url + "/chat/completions",
                                               json.dumps({"model": "m", "messages": MSGS, "stream": True}).encode())
            assert status == 400 and b"aiohttp engine" in body
    with pytest.raises(RuntimeError, match="no faults"):
        start_in_thread(FakeServerConfig(faults=(("429", 0.1),)), engine="raw")


@pytest.mark.parametrize("client", ["raw", "aiohttp"])
async def test_both_clients_agree_on_answers_and_errors(client):
    with start_in_thread(FakeServerConfig(latency_ms=1, model="m1")) as s:
        async with OpenAITeacher(s.base_url, client=client) as t:
            assert t.client == client
            res = await t.chat(MSGS, SamplingParams(logprobs=True, top_logprobs=3, max_tokens=50))
            assert res.completions[0].text.startswith("12 + 30 =")
            assert len(res.completions[0].logprobs.top_logprobs[0]) == 3
        async with OpenAITeacher(s.base_url, model="nope", client=client) as t:
            with pytest.raises(BadRequest) as ei:
                await t.chat(MSGS, SamplingParams())
            assert ei.value.status == 404 and "nope" in str(ei.value)


def test_chat_body_is_the_request_body_with_cached_params():
    t = OpenAITeacher("http://x/v1", model="m", transport=lambda *a: None)
    p = SamplingParams(temperature=0.5, seed=3, stop=("\n",), logprobs=True, top_logprobs=2)
    for msgs in (MSGS, [{"role": "system", "content": "é \"q\""}, {"role": "user", "content": "hi"}]):
        for _ in range(2):  # the second call uses the cached tail
            assert json.loads(t.chat_body(json.dumps(msgs), p)) == t.request_body(msgs, p)
    assert json.loads(t.chat_body(json.dumps(MSGS), SamplingParams())) == t.request_body(MSGS, SamplingParams())
