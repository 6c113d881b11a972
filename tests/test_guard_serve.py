"""The guard in front of `stillhouse serve` (a tiny random Llama, slowed): when the guard
cancels the upstream call — its client went away, or the upstream timed out — serve frees
the slots and logs nothing. It used to print "_GatheringFuture exception was never
retrieved ... CancelledError" once per cancelled non-streamed request (the gather over the
n completions settles with a CancelledError after it is cancelled, and nobody read it).
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import time
from typing import Any

import pytest

from stillhouse.serve.app import ServeConfig, ServerThread, create_app
from test_guard import http, make_config, start_guard

HI = [{"role": "user", "content": "Tell me a story."}]


def _slow(teacher: Any, seconds: float = 0.01) -> None:
    def sleepy(input_ids: Any, scores: Any) -> Any:
        time.sleep(seconds)
        return scores
    teacher.logits_processors.append(sleepy)


def _serve_health(srv: ServerThread) -> dict[str, Any]:
    return http("GET", srv.base_url[:-3] + "/health")[2]  # type: ignore[no-any-return]


def _wait_idle(srv: ServerThread, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        h = _serve_health(srv)
        if h["active"] == 0 and h["pending"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"serve never freed the slots: {_serve_health(srv)}")


def _abandon(url: str, key: str, body: dict[str, Any], wait_s: float) -> None:
    """Send a request to the guard, wait a little, hang up without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {key}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(wait_s)


def test_cancelled_upstream_calls_leave_serve_quiet(tiny_teacher: Any, tmp_path: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    _slow(tiny_teacher)
    caplog.set_level(logging.DEBUG, logger="asyncio")
    with ServerThread(create_app(tiny_teacher, ServeConfig(teacher="hf:/tiny", max_tokens_limit=4000))) as srv:
        upstream = srv.base_url[:-3]
        model = http("GET", srv.base_url + "/models")[2]["data"][0]["id"]
        g = start_guard(make_config(tmp_path, upstream, upstream_timeout_s=0.5))
        try:
            key = g.account_with_key("leaver")
            long = {"model": model, "messages": HI, "max_tokens": 3000}
            for n in (1, 2):  # n > 1 is a gather over several completions
                _abandon(g.url, key, {**long, "n": n}, 0.3)       # the client hangs up
                _wait_idle(srv)
                _abandon(g.url, key, {**long, "n": n, "stream": True}, 0.3)
                _wait_idle(srv)
                status = g.chat(key, {**long, "n": n})[0]        # the guard gives up on the upstream
                assert status == 504
                _wait_idle(srv)
            assert g.chat(key, {"model": model, "messages": HI, "max_tokens": 2})[0] == 200  # still serving
            statuses = [r.status for r in g.records("leaver")]
            assert statuses.count(499) == 4 and statuses.count(504) == 2, statuses
        finally:
            g.stop()
    gc.collect()
    noise = [r.getMessage() for r in caplog.records
             if (r.name == "asyncio" and r.levelno >= logging.WARNING) or "never retrieved" in r.getMessage()]
    assert noise == [], noise
