"""``GET /health`` on the guard: no key needed, answered from memory, never reaches the
upstream, never shows credentials; it reports the log store as down while it is down."""

from __future__ import annotations

import time

import pytest

from stillhouse.guard.openapi import openapi_schema
from stillhouse.guard.request import public_url
from stillhouse.testing.fakeserver import FakeServerConfig
from stillhouse.testing.fakeserver import start_in_thread as start_fake
from test_guard import ADMIN, http, make_config, start_guard
from test_guard_store import FlakyStore


@pytest.mark.parametrize(("url", "shown"), [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    ("https://user:hunter2@api.example.com/v1?api_key=sk-live-123#frag", "https://api.example.com/v1"),
    ("http://:tok@[::1]:9000/base", "http://[::1]:9000/base"),
    ("http://host:notaport", ""),
])
def test_public_url_drops_credentials_query_and_fragment(url: str, shown: str) -> None:
    assert public_url(url) == shown


def test_health_needs_no_key_never_calls_upstream_and_tracks_the_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with start_fake(FakeServerConfig(latency_ms=1)) as fake:
        # Credentials in the upstream URL must not come back on an unauthenticated endpoint.
        upstream = f"http://svc:s3cret-pass@127.0.0.1:{fake.port}"
        cfg = make_config(tmp_path, upstream, store_retry_s=0.1)
        store = FlakyStore(cfg.db_url)
        store.init()
        g = start_guard(cfg, store=store)
        try:
            key = g.account_with_key("hal")
            before = g.app.upstream_calls
            for _ in range(5):
                status, headers, body = http("GET", g.url + "/health")
                assert status == 200 and headers["content-type"] == "application/json"
                assert body == {"status": "ok", "store": "up", "upstream": f"http://127.0.0.1:{fake.port}"}
            # A wrong key, or a key at all, changes nothing: it is not an authenticated route.
            assert http("GET", g.url + "/health", token="sk-sh-wrong")[0] == 200
            assert http("GET", g.url + "/health", token=key)[2]["store"] == "up"
            assert g.app.upstream_calls == before
            assert http("GET", f"http://127.0.0.1:{fake.port}/stats")[2].get("requests", 0) == 0
            raw = http("GET", g.url + "/health")[2]
            text = str(raw)
            for secret in ("s3cret", "svc", key, ADMIN, cfg.admin_token_sha256):
                assert secret not in text, secret
            assert http("POST", g.url + "/health", body={})[0] == 405

            # The store goes down: /health still answers 200 (the guard is alive) and says so.
            store.down = True
            assert g.chat(key)[0] in (200, 503)  # a record to write: the writer notices on its next flush
            deadline = time.monotonic() + 5
            while http("GET", g.url + "/health")[2]["store"] != "down":
                assert time.monotonic() < deadline, "health never reported the store down"
                time.sleep(0.05)
            assert http("GET", g.url + "/health")[0] == 200
            store.down = False
            while http("GET", g.url + "/health")[2]["store"] != "up":
                assert time.monotonic() < deadline + 5, "health never reported the store back up"
                time.sleep(0.05)
        finally:
            g.stop()


def test_health_is_in_the_openapi_schema_without_security() -> None:
    op = openapi_schema()["paths"]["/health"]["get"]
    assert op["security"] == []
    schema = openapi_schema()["components"]["schemas"]["Health"]
    assert set(schema["required"]) == {"status", "store", "upstream"}
