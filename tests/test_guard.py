"""The guard gateway end to end over real HTTP on loopback: guard (uvicorn) → fake upstream (aiohttp).

Auth cannot be bypassed, bad input gets OpenAI-style 4xx, limits answer 429 + Retry-After,
SSE passes through chunk by chunk and is logged in full, a client disconnect cancels the
upstream call, upstream faults map to 502/504, decisions persist across a restart, shadow
mode and degrade mode behave, keys never appear in plain text in the store.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stillhouse.guard.app import create_app
from stillhouse.guard.config import GuardConfig, sha256_hex
from stillhouse.guard.events import AccountInfo, TrafficRecord, Verdict
from stillhouse.guard.store import open_store
from stillhouse.http.server import ServerThread, start_in_thread
from stillhouse.testing.fakeserver import FakeServerConfig
from stillhouse.testing.fakeserver import start_in_thread as start_fake

ADMIN = "admin-secret-for-tests"
MODEL = "fake-model"


def http(method: str, url: str, body: Any = None, token: str | None = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    """(status, headers, decoded JSON or text) — 4xx/5xx included."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, payload = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, payload = exc.code, dict(exc.headers), exc.read()
    try:
        return status, {k.lower(): v for k, v in hdrs.items()}, json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, {k.lower(): v for k, v in hdrs.items()}, payload.decode("utf-8", "replace")


def chat_body(text: str = "What is 2 + 3?", **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **kw}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Guard:
    app: Any
    server: ServerThread
    config: GuardConfig

    @property
    def url(self) -> str:
        return self.server.url

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, _, out = http(method, self.url + path, body, token=ADMIN)
        return status, out

    def account_with_key(self, account_id: str, **fields: Any) -> str:
        status, out = self.admin("POST", "/admin/accounts", {"account_id": account_id, **fields})
        assert status in (200, 201), out
        status, out = self.admin("POST", f"/admin/accounts/{account_id}/keys")
        assert status == 201, out
        return str(out["key"])

    def chat(self, key: str | None, body: Any = None, **kw: Any) -> tuple[int, dict[str, str], Any]:
        return http("POST", self.url + "/v1/chat/completions", body if body is not None else chat_body(),
                    token=key, **kw)

    def records(self, account_id: str | None = None) -> list[TrafficRecord]:
        asyncio.run(asyncio.sleep(0))
        status, out = self.admin("GET", "/admin/traffic" + (f"?account_id={account_id}" if account_id else ""))
        assert status == 200, out
        return [TrafficRecord(**r) for r in out["data"]]

    def stop(self) -> None:
        self.server.stop()


def make_config(tmp_path: Path, upstream_url: str, **kw: Any) -> GuardConfig:
    base: dict[str, Any] = {"upstream_url": upstream_url, "admin_token_sha256": sha256_hex(ADMIN),
                                "db_url": f"sqlite:///{tmp_path}/guard.db", "spool_dir": str(tmp_path / "spool"),
                                "key_refresh_s": 0.0, "upstream_timeout_s": 5.0}
    base.update(kw)
    return GuardConfig(**base)


def start_guard(config: GuardConfig, clock: Any = time.time, detector: Any = None, store: Any = None) -> Guard:
    app = create_app(config, store or open_store(config.db_url), clock=clock, detector=detector)
    return Guard(app, start_in_thread(app), config)


@pytest.fixture
def fake():
    with start_fake(FakeServerConfig(latency_ms=2, stream_chunk_delay_ms=0)) as s:
        yield s


@pytest.fixture
def guard(tmp_path, fake):
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}"))
    yield g
    g.stop()


# -- auth ---------------------------------------------------------------------------------
def test_auth_cannot_be_bypassed_and_revocation_is_immediate(guard, fake):
    key = guard.account_with_key("alice")
    other_key = guard.account_with_key("bob")
    wrong = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    attempts = [
        (None, {}),
        ("", {}),
        (wrong, {}),
        ("sk-sh-000000000000-" + "x" * 43, {}),
        (ADMIN, {}),                                   # the admin token is not an API key
        ("not-a-key", {}),
        (None, {"Authorization": key}),                # no Bearer scheme
        (None, {"Authorization": f"Basic {key}"}),
        (None, {"X-Api-Key": key}),
    ]
    for token, headers in attempts:
        status, _, out = guard.chat(token, headers=headers)
        assert status == 401, (token, headers, out)
        assert out["error"]["code"] in ("missing_api_key", "invalid_api_key")
        assert set(out["error"]) == {"message", "type", "param", "code"}
    assert fake.server.stats["requests"] == 0, "an unauthenticated request reached the upstream"

    status, _, out = guard.chat(key)
    assert status == 200 and out["choices"][0]["message"]["content"]
    assert fake.server.stats["requests"] == 1

    key_id = next(k["key_id"] for k in guard.admin("GET", "/admin/accounts/alice/keys")[1]["data"])
    assert guard.admin("POST", f"/admin/keys/{key_id}/revoke")[0] == 200
    status, _, out = guard.chat(key)                   # the very next request
    assert status == 401 and out["error"]["code"] == "invalid_api_key"
    assert fake.server.stats["requests"] == 1
    assert guard.chat(other_key)[0] == 200             # revoking alice's key leaves bob alone

    # Rotation: the old key dies, the new one works.
    status, out = guard.admin("POST", "/admin/accounts/alice/keys")
    k2, k2_id = out["key"], out["key_id"]
    status, out = guard.admin("POST", f"/admin/keys/{k2_id}/rotate")
    assert status == 201 and out["replaces"] == k2_id
    assert guard.chat(k2)[0] == 401
    assert guard.chat(out["key"])[0] == 200
    assert guard.admin("POST", f"/admin/keys/{k2_id}/rotate")[0] == 409


def test_admin_api_needs_the_admin_token(guard):
    key = guard.account_with_key("carol")
    for token in (None, key, "wrong"):
        status, _, out = http("GET", guard.url + "/admin/accounts", token=token)
        assert status == 401 and out["error"]["code"] == "invalid_admin_token"
        status, _, out = http("POST", guard.url + "/admin/accounts", {"account_id": "mallory"}, token=token)
        assert status == 401
    assert [a["account_id"] for a in guard.admin("GET", "/admin/accounts")[1]["data"]] == ["carol"]


def test_keys_are_stored_hashed_and_never_logged(guard, tmp_path, caplog):
    key = guard.account_with_key("dave", payment_fingerprint="4111-1111-1111-1111|12/29")
    assert guard.chat(key)[0] == 200
    guard.records()  # flushes the log
    blob = b"".join(p.read_bytes() for p in tmp_path.glob("guard.db*"))
    secret = key.split("-", 3)[3]
    assert secret.encode() not in blob and key.encode() not in blob
    assert b"4111-1111" not in blob, "payment data must be stored hashed"
    assert key not in caplog.text
    acct = guard.admin("GET", "/admin/accounts/dave")[1]
    assert len(acct["payment_fingerprint"]) == 64 and "key" not in json.dumps(acct["keys"]).replace("key_id", "")


# -- bad input ----------------------------------------------------------------------------
def test_bad_input_gets_openai_style_4xx_and_never_reaches_upstream(tmp_path, fake):
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}", max_body_bytes=2000))
    try:
        key = g.account_with_key("erin")
        cases = [
            (b"{not json", 400, "invalid_json"),
            (b"[1, 2]", 400, "invalid_request"),
            (json.dumps({"model": MODEL}).encode(), 400, "invalid_request"),
            (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "invalid_request"),
            (json.dumps(chat_body(max_tokens="many")).encode(), 400, "invalid_request"),
            (json.dumps(chat_body(n=0)).encode(), 400, "invalid_request"),
            (json.dumps(chat_body(stream="yes")).encode(), 400, "invalid_request"),
            (json.dumps({"model": MODEL, "messages": ["hi"]}).encode(), 400, "invalid_request"),
            (json.dumps(chat_body("x" * 5000)).encode(), 413, "body_too_large"),
            (b"\xff\xfe\x00garbage", 400, "invalid_json"),
        ]
        for raw, status, code in cases:
            got, _, out = g.chat(key, raw=raw)
            assert got == status, (raw[:40], out)
            assert out["error"]["code"] == code and out["error"]["type"] == "invalid_request_error"
        assert http("GET", g.url + "/v1/chat/completions", token=key)[0] == 405
        assert http("GET", g.url + "/nope", token=key)[0] == 404
        assert fake.server.stats["requests"] == 0
        recs = g.records("erin")
        assert len(recs) == len(cases) and {r.status for r in recs} == {400, 413}
    finally:
        g.stop()


def test_nan_infinity_and_deep_nesting_get_400_and_never_reach_upstream(tmp_path, fake):
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}"))
    try:
        key = g.account_with_key("nina")
        msgs = json.dumps(chat_body())[:-1].encode()  # '{"model": ..., "messages": [...]' without the '}'
        cases = [
            (msgs + b', "temperature": NaN}', "temperature", "NaN"),
            (msgs + b', "top_p": Infinity}', "top_p", "Infinity"),
            (msgs + b', "temperature": -Infinity}', "temperature", "-Infinity"),
            (msgs + b', "max_tokens": 1e999}', "max_tokens", "1e999"),
            (msgs + b', "response_format": {"schema": [1, NaN]}}', "response_format.schema[1]", "NaN"),
            (msgs + b', "tools": ' + b"[" * 100 + b"]" * 100 + b"}", None, "64 levels"),
            (msgs + b', "tools": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, "nested too deeply"),
        ]
        for raw, param, fragment in cases:
            status, _, out = g.chat(key, raw=raw)
            assert status == 400, (raw[-60:], out)
            err = out["error"]
            assert err["code"] == "invalid_json" and err["param"] == param and fragment in err["message"], err
        assert g.chat(key)[0] == 200  # the account is fine: only those bodies were refused
        assert fake.server.stats["requests"] == 1
        assert [r.status for r in g.records("nina")] == [400] * len(cases) + [200]
        # the admin API reads its bodies the same way
        for raw, fragment in [(b'{"account_id": "x1", "limits": {"requests_per_min": NaN}}', "NaN"),
                              (b'{"account_id": "x2", "org": ' + b"[" * 200 + b"]" * 200 + b"}", "64 levels"),
                              (b"[" * 100_000 + b"]" * 100_000, "nested too deeply")]:
            status, _, out = http("POST", g.url + "/admin/accounts", raw=raw, token=ADMIN)
            assert status == 400 and out["error"]["code"] == "invalid_json" and fragment in out["error"]["message"]
        assert g.admin("GET", "/admin/accounts/x1")[0] == 404
    finally:
        g.stop()


# -- limits -------------------------------------------------------------------------------
def test_requests_per_minute_limit_with_retry_after(tmp_path, fake):
    clock = Clock()
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}"), clock=clock)
    try:
        key = g.account_with_key("frank", limits={"requests_per_min": 3})
        assert [g.chat(key)[0] for _ in range(3)] == [200, 200, 200]
        status, headers, out = g.chat(key)
        assert status == 429 and out["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(headers["retry-after"]) <= 20   # one request back after 60/3 s
        clock.t += int(headers["retry-after"])
        assert g.chat(key)[0] == 200
        assert g.chat(key)[0] == 429
        clock.t += 60
        assert [g.chat(key)[0] for _ in range(4)] == [200, 200, 200, 429]
        assert fake.server.stats["requests"] == 7
    finally:
        g.stop()


def test_tokens_per_minute_limit(tmp_path, fake):
    clock = Clock()
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}"), clock=clock)
    try:
        key = g.account_with_key("gina", limits={"tokens_per_min": 20})
        status = 200
        n = 0
        while status == 200 and n < 50:
            status, headers, out = g.chat(key, chat_body("tell me a long story " * 3))
            n += 1
        assert status == 429 and out["error"]["type"] == "tokens" and n >= 2
        recs = [r for r in g.records("gina") if r.status == 200]
        assert sum(r.prompt_tokens + r.completion_tokens for r in recs) >= 20
        clock.t += int(headers["retry-after"])
        assert g.chat(key)[0] == 200
    finally:
        g.stop()


def test_concurrent_stream_limit(tmp_path):
    with start_fake(FakeServerConfig(latency_ms=1, stream_chunk_delay_ms=100)) as slow:
        g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{slow.port}"))
        try:
            key = g.account_with_key("hank", limits={"max_concurrent_streams": 1})

            async def go() -> list[int]:
                import aiohttp

                async with aiohttp.ClientSession() as s:
                    hdr = {"Authorization": f"Bearer {key}"}
                    first = await s.post(g.url + "/v1/chat/completions", json=chat_body("hello", stream=True),
                                         headers=hdr)
                    await first.content.readline()
                    second = await s.post(g.url + "/v1/chat/completions", json=chat_body("x", stream=True),
                                          headers=hdr)
                    st2, ra = second.status, second.headers.get("Retry-After")
                    await second.read()
                    plain = await s.post(g.url + "/v1/chat/completions", json=chat_body("y"), headers=hdr)
                    await first.read()
                    third = await s.post(g.url + "/v1/chat/completions", json=chat_body("z", stream=True),
                                         headers=hdr)
                    await third.read()
                    assert ra == "1"
                    return [first.status, st2, plain.status, third.status]

            assert asyncio.run(go()) == [200, 429, 200, 200]
        finally:
            g.stop()


# -- streaming ----------------------------------------------------------------------------
def test_sse_passes_through_chunk_by_chunk_and_is_logged_in_full(tmp_path):
    with start_fake(FakeServerConfig(latency_ms=1, stream_chunk_delay_ms=150)) as slow:
        g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{slow.port}"))
        try:
            key = g.account_with_key("ivy")

            async def go() -> tuple[list[float], list[bytes], float]:
                import aiohttp

                async with aiohttp.ClientSession() as s:
                    t0 = time.perf_counter()
                    r = await s.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                     json=chat_body("say something", stream=True,
                                                    stream_options={"include_usage": True}))
                    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                    times, events = [], []
                    async for line in r.content:
                        if line.startswith(b"data:"):
                            times.append(time.perf_counter() - t0)
                            events.append(line)
                    return times, events, time.perf_counter() - t0

            times, events, total = asyncio.run(go())
            words = [json.loads(e[5:])["choices"][0]["delta"].get("content", "") for e in events
                     if e.strip() != b"data: [DONE]" and json.loads(e[5:])["choices"]]
            text = "".join(words)
            assert len(words) >= 4 and text
            # Chunk by chunk: the first content arrived long before the end (the fake waits 150 ms per word).
            assert times[1] < total - 0.3, (times, total)
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert gaps and max(gaps) > 0.1
            rec = g.records("ivy")[0]
            assert rec.status == 200 and rec.response_text == text
            assert rec.params["stream"] is True
            assert rec.completion_tokens == len(text.split()) and rec.prompt_tokens > 0   # from the usage chunk
            assert rec.latency_ms >= 1000 * (total - 0.2)
        finally:
            g.stop()


def test_client_disconnect_cancels_the_upstream_call(tmp_path):
    with start_fake(FakeServerConfig(latency_ms=1, stream_chunk_delay_ms=200)) as slow:
        g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{slow.port}"))
        try:
            key = g.account_with_key("jack")

            async def go() -> None:
                import aiohttp

                async with aiohttp.ClientSession() as s:
                    r = await s.post(g.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                     json=chat_body("a long answer please", stream=True))
                    await r.content.readline()
                    r.close()            # hang up after the first event
                await asyncio.sleep(3.0)  # the full answer would have taken ~2 s

            asyncio.run(go())
            assert slow.server.stats["requests"] == 1
            assert slow.server.stats["ok"] == 0, "the upstream finished the stream: it was not cancelled"
            rec = g.records("jack")[0]
            assert rec.status == 499 and "client disconnected" in rec.decision_reason
        finally:
            g.stop()


# -- upstream failures --------------------------------------------------------------------
def test_upstream_down_is_502_and_slow_is_504(tmp_path):
    from pg import free_port

    g = start_guard(make_config(tmp_path / "a", f"http://127.0.0.1:{free_port()}"))
    try:
        key = g.account_with_key("kim")
        status, _, out = g.chat(key)
        assert status == 502 and out["error"]["code"] == "upstream_unavailable"
        assert "cannot reach upstream" in out["error"]["message"]
        assert g.records("kim")[0].status == 502
    finally:
        g.stop()
    with start_fake(FakeServerConfig(latency_ms=1, faults=(("timeout", 1.0),), hang_s=5)) as hang:
        g = start_guard(make_config(tmp_path / "b", f"http://127.0.0.1:{hang.port}", upstream_timeout_s=0.5))
        try:
            key = g.account_with_key("kim")
            t0 = time.perf_counter()
            status, _, out = g.chat(key)
            assert status == 504 and out["error"]["code"] == "upstream_timeout"
            assert time.perf_counter() - t0 < 3
        finally:
            g.stop()


# -- policy -------------------------------------------------------------------------------
class FlagEveryone:
    """A stand-in detector: flags an account once it has sent ``after`` requests."""

    def __init__(self, after: int, action: str = "block"):
        self.after, self.action, self.seen = after, action, {}

    def observe(self, record: TrafficRecord, account: AccountInfo | None = None) -> None:
        self.seen[record.account_id] = self.seen.get(record.account_id, 0) + 1

    def verdict(self, account_id: str) -> Verdict | None:
        n = self.seen.get(account_id, 0)
        if not n:
            return None
        flagged = n >= self.after
        return Verdict(account_id, score=n / self.after, flagged=flagged, suggested=self.action if flagged else "allow",
                       cluster_id="c1", reasons=[("volume", float(n)), ("cot_elicitation", 0.9)],
                       fpr_at_threshold=0.01)


def test_decisions_persist_across_restart_and_are_reversible(tmp_path, fake):
    cfg = make_config(tmp_path, f"http://127.0.0.1:{fake.port}")
    g = start_guard(cfg, detector=FlagEveryone(after=2))
    key = g.account_with_key("lena")
    key2 = g.account_with_key("mo")
    assert [g.chat(key)[0] for _ in range(3)] == [200, 200, 403]   # the detector blocks after 2
    status, out = g.admin("POST", "/admin/decisions", {"scope": "account", "target": "mo", "action": "block",
                                                        "reason": "chargeback fraud"})
    assert status == 201
    assert g.chat(key2)[0] == 403
    g.stop()

    g = start_guard(cfg)  # a fresh process state, no detector: decisions come from the store
    try:
        status, _, out = g.chat(key)
        assert status == 403 and out["error"]["code"] == "account_blocked"
        assert g.chat(key2)[0] == 403
        explain = g.admin("GET", "/admin/accounts/lena")[1]["decision"]
        assert explain["action"] == "block" and explain["source"] == "detector"
        assert "detector score" in explain["reason"] and "cot_elicitation" in explain["reason"]
        assert ["volume", 2.0] in explain["signals"]
        # Reverse: a manual allow overrides the detector; clearing it hands control back.
        status, row = g.admin("POST", "/admin/decisions", {"target": "lena", "action": "allow",
                                                            "reason": "false positive"})
        assert g.chat(key)[0] == 200
        mo_rows = g.admin("GET", "/admin/decisions?target=mo&active=true")[1]["data"]
        assert len(mo_rows) == 1 and mo_rows[0]["reason"] == "chargeback fraud"
        assert g.admin("POST", f"/admin/decisions/{mo_rows[0]['decision_id']}/clear")[0] == 200
        assert g.chat(key2)[0] == 200
        assert g.admin("POST", f"/admin/decisions/{row['decision_id']}/clear")[0] == 200
        assert g.chat(key)[0] == 403
        recs = g.records("lena")
        assert recs[-1].decision == "block" and "detector" in recs[-1].decision_reason
    finally:
        g.stop()


def test_an_at_least_decision_lets_the_detector_go_harsher(tmp_path, fake):
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}"), detector=FlagEveryone(after=2))
    try:
        keys = {a: g.account_with_key(a) for a in ("ola", "pim")}
        for aid, at_least in (("ola", True), ("pim", False)):
            status, row = g.admin("POST", "/admin/decisions", {"target": aid, "action": "throttle",
                                                                "reason": "watch list", "at_least": at_least})
            assert status == 201 and (row["signals"] == [["floor", ""]]) is at_least
            assert g.admin("GET", f"/admin/accounts/{aid}")[1]["decision"]["action"] == "throttle"
        for aid, key in keys.items():
            for _ in range(3):
                g.chat(key)
        # the detector's block (after 2 requests) goes past ola's "at least throttle", not past pim's throttle
        ola, pim = (g.admin("GET", f"/admin/accounts/{a}")[1]["decision"] for a in ("ola", "pim"))
        assert (ola["action"], ola["source"]) == ("block", "detector") and g.chat(keys["ola"])[0] == 403
        assert (pim["action"], pim["source"]) == ("throttle", "manual")
        status, out = g.admin("POST", "/admin/decisions", {"target": "ola", "action": "block", "at_least": "yes"})
        assert status == 400 and "at_least" in out["error"]["message"]
    finally:
        g.stop()


def test_cluster_decision_applies_to_every_member(tmp_path, fake):
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}"), detector=FlagEveryone(after=100))
    try:
        keys = [g.account_with_key(f"n{i}") for i in range(3)]
        for k in keys:
            assert g.chat(k)[0] == 200           # the detector puts each in cluster c1
        assert g.admin("POST", "/admin/decisions", {"scope": "cluster", "target": "c1", "action": "block"})[0] == 201
        assert [g.chat(k)[0] for k in keys] == [403, 403, 403]
    finally:
        g.stop()


def test_shadow_mode_records_but_does_not_enforce(tmp_path, fake):
    rule = {"name": "embargo", "field": "country", "equals": "XX", "action": "block"}
    g = start_guard(make_config(tmp_path / "s", f"http://127.0.0.1:{fake.port}", shadow=True, rules=(rule,)))
    try:
        key = g.account_with_key("olga", country="XX")
        assert g.chat(key)[0] == 200
        rec = g.records("olga")[0]
        assert rec.decision == "allow" and rec.decision_reason.startswith("shadow: would block")
        rows = g.admin("GET", "/admin/decisions?target=olga")[1]["data"]
        assert rows and rows[0]["source"] == "rule" and rows[0]["shadow"] is True
    finally:
        g.stop()
    g = start_guard(make_config(tmp_path / "e", f"http://127.0.0.1:{fake.port}", rules=(rule,)))
    try:
        key = g.account_with_key("olga", country="XX")
        assert g.chat(key)[0] == 403
        assert g.chat(g.account_with_key("pat", country="YY"))[0] == 200
    finally:
        g.stop()


def test_degrade_caps_tokens_and_refuses_logprobs_and_n(tmp_path, fake):
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}", degrade_max_tokens=2))
    try:
        key = g.account_with_key("quinn")
        long_q = chat_body("say many words", max_tokens=100)
        full = g.chat(key, long_q)[2]["choices"][0]["message"]["content"]
        g.admin("POST", "/admin/decisions", {"target": "quinn", "action": "degrade"})
        status, _, out = g.chat(key, long_q)
        assert status == 200 and len(out["choices"][0]["message"]["content"].split()) <= 2 < len(full.split())
        status, _, out = g.chat(key, chat_body(logprobs=True, top_logprobs=2))
        assert status == 403 and out["error"]["code"] == "feature_unavailable"
        assert g.chat(key, chat_body(n=3))[0] == 403
        assert g.records("quinn")[-1].decision == "degrade"
    finally:
        g.stop()


@pytest.mark.parametrize("action", ["throttle", "degrade"])
def test_throttle_tightens_limits(tmp_path, fake, action: str):
    """Throttle tightens the limits, and so does degrade, which is harsher: an account whose score moves on from
    the throttle tier to a degrade must not get its full limits back."""
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}", requests_per_min=30,
                                throttle_factor=0.1), clock=Clock())
    try:
        key = g.account_with_key("ray")
        g.admin("POST", "/admin/decisions", {"target": "ray", "action": action})
        assert [g.chat(key)[0] for _ in range(4)] == [200, 200, 200, 429]
        other = g.account_with_key("sue")  # an account with no decision keeps the full limits
        assert [g.chat(other)[0] for _ in range(4)] == [200] * 4
    finally:
        g.stop()


def test_degrade_holds_a_paced_account_to_its_daily_cap(tmp_path, fake):
    """A degraded account sending one request an hour meets no per-minute limit; the daily cap answers it 429 with a
    Retry-After that says when, names the limit, and lets it back as the day's bucket refills. Throttled and allowed
    accounts keep no daily cap by default; an account's own requests_per_day applies whatever its action."""
    clock = Clock()
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}", degrade_requests_per_day=3), clock=clock)
    try:
        keys = {a: g.account_with_key(a) for a in ("dee", "tim", "al")}
        keys["pat"] = g.account_with_key("pat", limits={"requests_per_day": 2})  # its own daily limit, allowed
        g.admin("POST", "/admin/decisions", {"target": "dee", "action": "degrade"})
        g.admin("POST", "/admin/decisions", {"target": "tim", "action": "throttle"})
        got: dict[str, list[int]] = {a: [] for a in keys}
        for _ in range(6):
            clock.t += 3600.0
            for a, key in keys.items():
                got[a].append(g.chat(key)[0])
        assert got == {"dee": [200, 200, 200, 429, 429, 429], "tim": [200] * 6, "al": [200] * 6,
                       "pat": [200, 200, 429, 429, 429, 429]}
        status, headers, out = g.chat(keys["dee"])
        assert status == 429 and out["error"]["code"] == "rate_limit_exceeded"
        assert "3 requests/day" in out["error"]["message"]
        assert 0 < int(headers["retry-after"]) <= 8 * 3600
        clock.t += int(headers["retry-after"])
        assert g.chat(keys["dee"])[0] == 200
        assert [r.status for r in g.records("dee")][-2:] == [429, 200]   # refusals are logged
    finally:
        g.stop()


# -- the traffic log ----------------------------------------------------------------------
def test_traffic_record_fields_and_redaction(tmp_path, fake):
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}", redact="patterns"))
    try:
        key = g.account_with_key("sam")
        body = chat_body("mail me at sam@example.com, what is 2 + 3?", temperature=0.5, max_tokens=20)
        status, _, out = g.chat(key, body, headers={"User-Agent": "pytest-agent/1", "X-Session-Id": "sess-9"})
        assert status == 200
        rec = g.records("sam")[0]
        assert rec.account_id == "sam" and len(rec.key_id) == 12 and key not in json.dumps(rec.__dict__)
        assert rec.client_ip == "127.0.0.1" and rec.user_agent == "pytest-agent/1" and rec.session_id == "sess-9"
        assert len(rec.header_fingerprint) == 16
        assert rec.model == MODEL and rec.params == {"temperature": 0.5, "max_tokens": 20}
        assert "sam@example.com" not in rec.messages[0]["content"] and "[REDACTED]" in rec.messages[0]["content"]
        assert rec.response_text == out["choices"][0]["message"]["content"]
        assert rec.prompt_tokens == out["usage"]["prompt_tokens"]
        assert rec.completion_tokens == out["usage"]["completion_tokens"]
        assert rec.latency_ms > 0 and rec.status == 200 and rec.decision == "allow"
        # A different client (different header order/set) gets a different fingerprint.
        g.chat(key, body, headers={"Accept": "*/*", "User-Agent": "other"})
        fps = {r.header_fingerprint for r in g.records("sam")}
        assert len(fps) == 2
    finally:
        g.stop()


def test_openapi_schema_is_served(guard):
    status, _, schema = http("GET", guard.url + "/openapi.json")
    assert status == 200 and schema["openapi"].startswith("3.")
    assert "/v1/chat/completions" in schema["paths"] and "/admin/accounts" in schema["paths"]


# -- the command line ---------------------------------------------------------------------
def test_admin_cli_wraps_the_admin_api(guard):
    from typer.testing import CliRunner

    from stillhouse.cli import app

    runner = CliRunner()
    env = {"STILLHOUSE_GUARD_ADMIN_TOKEN": ADMIN, "STILLHOUSE_GUARD_URL": guard.url}

    def run(*args: str, **kw: Any) -> Any:
        res = runner.invoke(app, ["guard", "admin", *args], env=kw.get("env", env))
        return res

    res = run("create-account", "--account-id", "cli1", "--country", "FR", "--rpm", "5", "--rpd", "400",
              "--payment-fingerprint", "card-123")
    assert res.exit_code == 0, res.output
    acct = json.loads(res.stdout)
    assert acct["limits"]["requests_per_min"] == 5 and acct["payment_fingerprint"] == sha256_hex("card-123")
    assert acct["limits"]["requests_per_day"] == 400
    key = json.loads(run("issue-key", "cli1").stdout)["key"]
    assert guard.chat(key)[0] == 200
    did = json.loads(run("decide", "cli1", "block", "--reason", "cli test").stdout)["decision_id"]
    assert guard.chat(key)[0] == 403
    assert json.loads(run("account", "cli1").stdout)["decision"]["reason"].endswith("cli test")
    assert run("clear-decision", did).exit_code == 0
    assert guard.chat(key)[0] == 200
    watch = json.loads(run("decide", "cli1", "throttle", "--at-least", "--reason", "watch list").stdout)
    assert watch["signals"] == [["floor", ""]]
    assert run("clear-decision", watch["decision_id"]).exit_code == 0
    kid = json.loads(run("keys", "cli1").stdout)["data"][0]["key_id"]
    assert run("revoke-key", kid).exit_code == 0
    assert guard.chat(key)[0] == 401
    assert len(json.loads(run("traffic", "--account-id", "cli1").stdout)["data"]) == 4
    bad = run("accounts", env={**env, "STILLHOUSE_GUARD_ADMIN_TOKEN": "nope"})
    assert bad.exit_code == 2 and "401" in bad.output


def test_guard_cli_config_errors_are_loud(tmp_path):
    from typer.testing import CliRunner

    from stillhouse.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["guard", "--upstream", "http://127.0.0.1:9"], env={"STILLHOUSE_GUARD_ADMIN_TOKEN": ""})
    assert res.exit_code == 2 and "STILLHOUSE_GUARD_ADMIN_TOKEN" in res.output
    res = runner.invoke(app, ["guard", "--print-config", "--upstream", "http://127.0.0.1:9", "--rpm", "7"],
                        env={"STILLHOUSE_GUARD_ADMIN_TOKEN": "s3cr3t-T0K"})
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.stdout)
    assert cfg["requests_per_min"] == 7 and cfg["admin_token_sha256"] == sha256_hex("s3cr3t-T0K")
    assert "s3cr3t-T0K" not in res.stdout
    del cfg["spool_dir"]
    (tmp_path / "g.json").write_text(json.dumps(cfg))
    res = runner.invoke(app, ["guard", "--config", str(tmp_path / "g.json")])
    assert res.exit_code == 2 and "spool_dir" in res.output
    res = runner.invoke(app, ["guard", "--upstream", "nope"], env={"STILLHOUSE_GUARD_ADMIN_TOKEN": "tok"})
    assert res.exit_code == 2 and "upstream_url" in res.output


def _reasoning_upstream():
    """A minimal upstream that answers with reasoning fields and think blocks (JSON and SSE)."""
    import threading

    from aiohttp import web

    async def chat(request: Any) -> Any:
        body = await request.json()
        text = "<think>carry the one, then</think> The answer is 42."
        if not body.get("stream"):
            return web.json_response({"choices": [{"index": 0, "message": {
                "role": "assistant", "reasoning_content": "step by step...", "content": text}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 9}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ["<thi", "nk>carry the", " one, then</th", "ink> The answer", " is 42."]:
            ev = {"choices": [{"index": 0, "delta": {"content": piece, "reasoning_content": "hmm"}}]}
            await resp.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
            await asyncio.sleep(0.01)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    loop = asyncio.new_event_loop()
    box: dict[str, Any] = {}

    async def start() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        box["ready"] = True
        loop.run_forever()

    threading.Thread(target=run, daemon=True).start()
    while "ready" not in box:
        time.sleep(0.01)
    return box["port"], lambda: loop.call_soon_threadsafe(loop.stop)


def test_degrade_strips_reasoning_from_json_and_streams(tmp_path):
    port, stop = _reasoning_upstream()
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{port}"))
    try:
        key = g.account_with_key("rita")
        out = g.chat(key)[2]                                       # allowed: passed through untouched
        assert out["choices"][0]["message"]["reasoning_content"] == "step by step..."
        assert "<think>" in out["choices"][0]["message"]["content"]
        g.admin("POST", "/admin/decisions", {"target": "rita", "action": "degrade"})
        msg = g.chat(key)[2]["choices"][0]["message"]
        assert msg == {"role": "assistant", "content": "The answer is 42."}
        status, _, text = g.chat(key, chat_body(stream=True))
        assert status == 200 and "hmm" not in text and "think" not in text and "carry" not in text
        pieces = [json.loads(ln[6:])["choices"][0]["delta"].get("content", "")
                  for ln in text.split("\n") if ln.startswith("data: {")]
        assert "".join(pieces) == "The answer is 42." and text.rstrip().endswith("data: [DONE]")
        rec = g.records("rita")[-1]
        assert rec.decision == "degrade" and "carry the one" in rec.response_text   # the log keeps what upstream said
    finally:
        g.stop()
        stop()


def test_upstream_429_and_its_retry_after_pass_through(tmp_path):
    with start_fake(FakeServerConfig(latency_ms=1, faults=(("429", 1.0),), fault_attempts=1,
                                     retry_after_s=7)) as limited:
        g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{limited.port}"))
        try:
            key = g.account_with_key("uma")
            status, headers, out = g.chat(key)
            assert status == 429 and headers["retry-after"] == "7" and "error" in out
            assert g.chat(key)[0] == 200           # the fake only refuses the first attempt of a body
            assert [r.status for r in g.records("uma")] == [429, 200]
        finally:
            g.stop()


def test_demo_runs_against_the_fake_upstream(capsys):
    from stillhouse.guard.demo import run_demo

    rec = run_demo(fake=True, prompt="What is 2 + 2?")
    out = capsys.readouterr().out
    assert "without a key: 401" in out and "with the key:  200" in out
    assert rec["status"] == 200 and rec["account_id"] == "demo" and rec["completion_tokens"] > 0
