"""`stillhouse serve` through a real uvicorn server on a free loopback port.

Fast tests use the fake teacher or a tiny random Llama; the acceptance tests point the
official `openai` SDK at the real bundled teacher.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from stillhouse.serve.app import ServeConfig, ServerThread, create_app
from stillhouse.teacher.base import SamplingParams
from stillhouse.teacher.fake import FakeTeacher
from stillhouse.teacher.local import LocalTeacher

HI = [{"role": "user", "content": "Say hi."}]


def post(base: str, body: Any, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + "/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def sse(base: str, body: dict) -> list[Any]:
    """POST a streamed request; the decoded `data:` payloads in order ('[DONE]' kept as a string)."""
    req = urllib.request.Request(base + "/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    out: list[Any] = []
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: "):
                payload = line[6:]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def health(srv: ServerThread) -> dict:
    return get(srv.base_url[:-3] + "/health")


@pytest.fixture(scope="module")
def fake_server():
    with ServerThread(create_app(FakeTeacher(seed=1), ServeConfig(teacher="fake:1", max_tokens_limit=100,
                                                                   max_n=4))) as srv:
        yield srv


@pytest.fixture
def tiny_server(tiny_teacher):
    with ServerThread(create_app(tiny_teacher, ServeConfig(teacher="hf:/tiny", max_context=2500))) as srv:
        yield srv


def test_models_health_and_json_404s(fake_server):
    models = get(fake_server.base_url + "/models")
    assert [m["id"] for m in models["data"]] == ["fake-teacher"]
    assert health(fake_server)["status"] == "ok"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(fake_server.base_url + "/nothing-here", timeout=10)
    assert err.value.code == 404 and "error" in json.loads(err.value.read())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(fake_server.base_url + "/chat/completions", timeout=10)  # GET
    assert err.value.code == 405 and json.loads(err.value.read())["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("body,param,fragment", [
    (b"{not json", None, "not valid JSON"),
    (b"\xff\xfe", None, "not valid JSON"),
    ([1, 2], None, "JSON object"),
    ({"messages": "hi"}, "messages", "non-empty array"),
    ({"messages": []}, "messages", "non-empty array"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ({"messages": HI, "temperature": "hot"}, "temperature", "number"),
    ({"messages": HI, "temperature": 3}, "temperature", "[0.0, 2.0]"),
    ({"messages": HI, "top_p": 0}, "top_p", "(0.0, 1.0]"),
    ({"messages": HI, "n": 9}, "n", "1 to 4"),
    ({"messages": HI, "n": True}, "n", "integer"),
    ({"messages": HI, "max_tokens": 101}, "max_tokens", "limit of 100"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens", "at least 1"),
    ({"messages": HI, "max_tokens": "10"}, "max_tokens", "integer"),
    ({"messages": HI, "stop": 3}, "stop", "string"),
    ({"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"messages": HI, "logprobs": "yes"}, "logprobs", "boolean"),
    ({"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs", "needs 'logprobs'"),
    ({"messages": HI, "stream": "yes"}, "stream", "boolean"),
    ({"messages": HI, "tools": [{"type": "function"}]}, "tools[0]", '"function": {"name"'),
    ({"messages": HI, "tools": {"type": "function"}}, "tools", "array of function tools"),
    ({"messages": HI, "tool_choice": "auto"}, "tool_choice", "needs 'tools'"),
    ({"messages": HI, "functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0]", "only an assistant"),
    ({"messages": HI, "model": 7}, "model", "string"),
])
def test_bad_input_gets_openai_400(fake_server, body, param, fragment):
    status, reply = post(fake_server.base_url, body)
    assert status == 400, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert fragment in err["message"]


HI_JSON = json.dumps(HI)


@pytest.mark.parametrize("raw,param,fragments", [
    (b'{"messages": %s, "temperature": NaN}' % HI_JSON.encode(), "temperature", ("NaN", "finite number")),
    (b'{"messages": %s, "top_p": Infinity}' % HI_JSON.encode(), "top_p", ("Infinity", "finite number")),
    (b'{"messages": %s, "temperature": -1e999}' % HI_JSON.encode(), "temperature", ("1e999", "finite number")),
    (b'{"messages": %s, "x": %s}' % (HI_JSON.encode(), b"[" * 100 + b"]" * 100), None, ("nested", "64 levels")),
    (b'{"messages": %s, "x": %s}' % (HI_JSON.encode(), b"[" * 100_000 + b"]" * 100_000), None,
     ("nested too deeply",)),
])
def test_nan_infinity_and_deep_nesting_get_400_naming_the_field(fake_server, raw, param, fragments):
    status, reply = post(fake_server.base_url, raw)
    assert status == 400, reply
    err = reply["error"]
    assert err["code"] == "invalid_json" and err["param"] == param and err["type"] == "invalid_request_error"
    assert all(f in err["message"] for f in fragments), err["message"]


def test_a_nan_passed_as_a_python_float_is_out_of_range_not_a_type_error():
    from stillhouse.serve.schema import APIError, parse_chat_request

    with pytest.raises(APIError, match=r"'temperature'=nan is out of range: it must be a finite number in \[0.0, 2.0\]"):
        parse_chat_request({"messages": HI, "temperature": float("nan")}, max_tokens_limit=10,
                           default_max_tokens=10, max_n=1)


def _raw_post(port: int, head_extra: bytes, chunks: list[bytes]) -> tuple[int, dict]:
    """POST /v1/chat/completions by hand: the head, then ``chunks`` as they are; the answer.

    Chunks go one at a time, and sending stops once the server has answered, as a client that reads
    while it sends does. Bytes the server had not read when it closed would make its kernel answer
    with a reset that discards the 413 before we read it, so each chunk gets a moment to be read.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\n" + head_extra + b"\r\n")
        try:
            for c in chunks:
                if select.select([sock], [], [], 0.05)[0]:
                    break  # the answer is here
                sock.sendall(c)
        except OSError:  # the server answered and closed while we were still sending: fine
            pass
        data = b""
        while got := sock.recv(65536):
            data += got
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_body_limit_413_before_reading_and_while_reading_chunks():
    cfg = ServeConfig(teacher="fake:1", max_body_bytes=10_000)
    with ServerThread(create_app(FakeTeacher(seed=1), cfg)) as srv:
        big = json.dumps({"messages": [{"role": "user", "content": "x" * 20_000}]}).encode()
        status, reply = post(srv.base_url, big)
        assert status == 413 and reply["error"]["code"] == "body_too_large" and "10000" in reply["error"]["message"]
        # Content-Length of 5 MB and not one byte of the body sent: the answer comes anyway.
        status, reply = _raw_post(srv.port, b"Content-Length: 5000000\r\n", [])
        assert status == 413 and "5000000" in reply["error"]["message"]
        # chunked: refused once what arrived passes the limit
        chunks = [b"%x\r\n%s\r\n" % (len(big[i:i + 4096]), big[i:i + 4096]) for i in range(0, len(big), 4096)]
        status, reply = _raw_post(srv.port, b"Transfer-Encoding: chunked\r\n", [*chunks, b"0\r\n\r\n"])
        assert status == 413 and reply["error"]["code"] == "body_too_large"
        small = json.dumps({"messages": HI, "max_tokens": 5}).encode()
        status, reply = _raw_post(srv.port, b"Transfer-Encoding: chunked\r\n",
                                  [b"%x\r\n%s\r\n" % (len(small), small), b"0\r\n\r\n"])
        assert status == 200 and reply["choices"][0]["message"]["content"]


def test_large_prompts_are_refused_or_tokenized_off_the_event_loop(tiny_teacher):
    """Over what the context could hold at the longest token: 400 without tokenizing; long: in a thread."""
    threads: list[str] = []
    encode = tiny_teacher.encode

    def spy(messages):
        threads.append(threading.current_thread().name)
        return encode(messages)

    tiny_teacher.encode = spy
    with ServerThread(create_app(tiny_teacher, ServeConfig(teacher="hf:/tiny", max_context=2500))) as srv:
        longest = max(map(len, tiny_teacher.tokenizer.get_vocab()))
        huge = "a" * (2500 * longest + 1)
        status, reply = post(srv.base_url, {"messages": [{"role": "user", "content": huge}], "max_tokens": 5})
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
        assert threads == []  # refused on its length alone
        assert post(srv.base_url, {"messages": HI, "max_tokens": 2})[0] == 200
        status, _ = post(srv.base_url, {"messages": [{"role": "user", "content": "hi " * 2000}], "max_tokens": 2})
        assert status == 200
    assert threads[0] == "stillhouse-server"  # a short prompt: on the loop (a few ms)
    assert threads[1] != "stillhouse-server"  # 6,000 characters: in a worker thread


def test_unknown_model_is_404_and_aliases_work(fake_server):
    status, reply = post(fake_server.base_url, {"model": "gpt-9", "messages": HI})
    assert status == 404 and reply["error"]["code"] == "model_not_found" and "fake-teacher" in reply["error"]["message"]
    for alias in ("fake-teacher", "fake:1", None):
        status, reply = post(fake_server.base_url, {"model": alias, "messages": HI, "max_tokens": 5})
        assert status == 200 and reply["object"] == "chat.completion"


def test_fake_teacher_streams_in_one_chunk(fake_server):
    events = sse(fake_server.base_url, {"messages": HI, "max_tokens": 20, "n": 2, "logprobs": True})
    assert events[-1] == "[DONE]"
    texts = ["", ""]
    for e in events[:-1]:
        for ch in e["choices"]:
            texts[ch["index"]] += ch["delta"].get("content", "")
    _, full = post(fake_server.base_url, {"messages": HI, "max_tokens": 20, "n": 2, "logprobs": True})
    assert texts == [c["message"]["content"] for c in full["choices"]]


def test_local_completion_matches_the_teacher(tiny_server, tiny_teacher):
    status, reply = post(tiny_server.base_url, {"model": "tiny", "messages": HI, "max_tokens": 8, "temperature": 0,
                                                "logprobs": True, "top_logprobs": 3})
    assert status == 200
    ref = tiny_teacher.generate([HI], SamplingParams(max_tokens=8, logprobs=True, top_logprobs=3))[0].completions[0]
    choice = reply["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ref.text}
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(ref.logprobs.logprobs, abs=1e-5)
    assert bytes(sum((c["bytes"] for c in content), [])).decode("utf-8", "replace") == ref.text
    assert all(len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["token"] == c["token"] for c in content)
    assert reply["usage"] == {"prompt_tokens": ref.prompt_tokens, "completion_tokens": 8,
                              "total_tokens": ref.prompt_tokens + 8}


def test_stream_carries_the_same_text_and_logprobs(tiny_server):
    body = {"messages": HI, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2,
            "stream_options": {"include_usage": True}}
    events = sse(tiny_server.base_url, body)
    _, full = post(tiny_server.base_url, body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == full["choices"][0]["message"]["content"]
    streamed = sum(((c["choices"][0]["logprobs"] or {}).get("content", []) for c in chunks[:-1]), [])
    assert streamed == full["choices"][0]["logprobs"]["content"]


def test_seeded_n_is_reproducible_over_http(tiny_server):
    body = {"messages": HI, "max_tokens": 6, "temperature": 1.0, "n": 3, "seed": 11}
    a, b = post(tiny_server.base_url, body)[1], post(tiny_server.base_url, body)[1]
    texts = [c["message"]["content"] for c in a["choices"]]
    assert texts == [c["message"]["content"] for c in b["choices"]] and len(set(texts)) == 3


def test_concurrent_requests_share_forward_passes(tiny_server):
    results: list[int] = []

    def one(i: int) -> None:
        status, reply = post(tiny_server.base_url, {"messages": [{"role": "user", "content": f"Q{i}"}],
                                                    "max_tokens": 40, "temperature": 0})
        results.append(reply["usage"]["completion_tokens"] if status == 200 else -1)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    h = health(tiny_server)
    assert results == [40] * 8
    assert h["max_batch_seen"] > 1 and h["decode_steps"] < sum(results)


def test_context_over_the_limit_is_400_naming_it(tiny_server):
    status, reply = post(tiny_server.base_url, {"messages": [{"role": "user", "content": "word " * 2600}],
                                                "max_tokens": 5})
    assert status == 400 and reply["error"]["code"] == "context_length_exceeded"
    assert "2500" in reply["error"]["message"]


def test_overload_gets_503_with_retry_after(tiny_teacher):
    with ServerThread(create_app(tiny_teacher, ServeConfig(teacher="hf:/tiny", max_pending=2))) as srv:
        status, reply = post(srv.base_url, {"messages": HI, "n": 3, "max_tokens": 2})
        assert status == 503 and reply["error"]["code"] == "overloaded"


def _slow(teacher: LocalTeacher, seconds: float = 0.01) -> None:
    def sleepy(input_ids, scores):
        time.sleep(seconds)
        return scores
    teacher.logits_processors.append(sleepy)


def _wait_idle(srv: ServerThread, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        h = health(srv)
        if h["active"] == 0 and h["pending"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"slot not freed: {health(srv)}")


def _raw_request(srv: ServerThread, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection((srv.host, srv.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_client_disconnect_mid_stream_frees_the_slot(tiny_server, tiny_teacher):
    _slow(tiny_teacher)
    sock = _raw_request(tiny_server, {"messages": HI, "max_tokens": 2000, "stream": True})
    got = b""
    while got.count(b"data: ") < 4:
        more = sock.recv(4096)
        assert more, f"the server closed the stream early: {got!r}"
        got += more
    assert got.startswith(b"HTTP/1.1 200"), got
    assert health(tiny_server)["active"] == 1
    sock.close()
    h = _wait_idle(tiny_server)
    steps = h["decode_steps"]
    time.sleep(0.3)
    assert health(tiny_server)["decode_steps"] == steps < 1000, "decoding must stop when the client leaves"


def test_client_disconnect_while_waiting_frees_the_slot(tiny_server, tiny_teacher):
    _slow(tiny_teacher)
    sock = _raw_request(tiny_server, {"messages": HI, "max_tokens": 2000})
    deadline = time.monotonic() + 10
    while health(tiny_server)["active"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    sock.close()
    assert _wait_idle(tiny_server)["decode_steps"] < 1000


def test_serve_config_validates_and_round_trips(tmp_path):
    from stillhouse.config import load_config, save_config

    for bad, fragment in [(dict(port=70000), "port"), (dict(max_batch=0), "max_batch"),
                          ({"max_body_bytes": 0}, "max_body_bytes"),
                          (dict(teacher="nonsense"), "unknown teacher spec"), (dict(max_context=1), "max_context"),
                          (dict(batch_window_ms=-1), "batch_window_ms"), (dict(dtype="int4"), "dtype")]:
        with pytest.raises(ValueError, match=fragment):
            ServeConfig(**bad)
    cfg = ServeConfig(teacher="fake:3", port=0, max_batch=4)
    save_config(cfg, tmp_path / "serve.json")
    assert load_config(ServeConfig, tmp_path / "serve.json") == cfg


def test_serve_verb_end_to_end(tmp_path):
    """`stillhouse serve --teacher fake --port 0` in a subprocess answers a chat request."""
    exe = Path(sys.executable).parent / "stillhouse"
    proc = subprocess.Popen([str(exe), "serve", "--teacher", "fake", "--port", "0",
                             "--save-config", str(tmp_path / "serve.json")],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base = None
        deadline = time.monotonic() + 60
        while base is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            if "listening on " in line:
                base = line.split("listening on ")[1].split()[0]
        assert base, "the server never said where it listens"
        status, reply = post(base, {"model": "fake", "messages": HI, "max_tokens": 5})
        assert status == 200 and reply["choices"][0]["message"]["content"]
        assert json.loads((tmp_path / "serve.json").read_text())["teacher"] == "fake"
    finally:
        proc.terminate()
        proc.wait(10)


def test_serve_help_teaches():
    from typer.testing import CliRunner

    from stillhouse.cli import app

    out = CliRunner().invoke(app, ["serve", "--help"]).output
    assert "--teacher" in out and "curl" in out and "--max-batch" in out


# -- acceptance: the official openai SDK against the real bundled teacher ----------------------

@pytest.fixture(scope="module")
def bundled_server(bundled_teacher):
    with ServerThread(create_app(bundled_teacher, ServeConfig(teacher="bundled"))) as srv:
        yield srv


def test_openai_sdk_gets_top_logprobs(bundled_server):
    import openai

    client = openai.OpenAI(base_url=bundled_server.base_url, api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model="bundled", messages=[{"role": "user", "content": "What is 2 + 3? Reply with just the number."}],
        max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert "5" in choice.message.content
    first = choice.logprobs.content[0]
    assert len(first.top_logprobs) == 3 and first.top_logprobs[0].token == first.token
    assert first.logprob <= 0 and r.usage.completion_tokens == len(choice.logprobs.content)
    assert r.model == "SmolLM2-135M-Instruct"


def test_openai_sdk_streams(bundled_server):
    import openai

    client = openai.OpenAI(base_url=bundled_server.base_url, api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Name one colour."}],
        max_tokens=12, temperature=0, stream=True)
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    full = client.chat.completions.create(
        model="bundled", messages=[{"role": "user", "content": "Name one colour."}], max_tokens=12, temperature=0)
    assert len(parts) > 2 and "".join(parts) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
