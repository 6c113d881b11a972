"""The operator console over real HTTP (no browser): login, sessions, CSRF, actions that apply on the next
request and land in the audit trail, the review queue and its labels, keyset pages, hostile text, and the
counter tables behind the pages (kept by the log writer, replay-safe, backfilled for an old database)
on SQLite and PostgreSQL. The browser tests are in test_console_browser.py."""

from __future__ import annotations

import json
import re
import sqlite3
import time
import unicodedata
import urllib.request
from typing import Any

import pytest

from console_client import ConsoleClient
from stillhouse.guard.console.session import SessionSigner
from stillhouse.guard.console.web import _INVISIBLE, show
from stillhouse.guard.events import AccountInfo, TrafficRecord
from stillhouse.guard.store import open_store
from test_guard import ADMIN, FlagEveryone, chat_body, http, make_config, start_guard
from test_guard_store import pg, pg_url, store_url  # noqa: F401 - fixtures

# -- sessions and text ----------------------------------------------------------------------


def test_session_cookie_is_signed_expires_and_revokes():
    now = [1000.0]
    signer = SessionSigner(60, clock=lambda: now[0])
    s, cookie = signer.issue("ann")
    assert signer.read(cookie) == s
    body, sig = cookie.rsplit(".", 1)
    assert signer.read(body + "." + sig[:-2] + ("AA" if not sig.endswith("AA") else "BB")) is None  # forged
    other = SessionSigner(60, clock=lambda: now[0])
    assert other.read(cookie) is None                 # another process's key (a restart) ends the session
    assert SessionSigner.check_csrf(s, s.csrf) and not SessionSigner.check_csrf(s, "x") \
        and not SessionSigner.check_csrf(s, None)
    now[0] += 61
    assert signer.read(cookie) is None                # expired
    now[0] = 1000.0
    signer.revoke(s)
    assert signer.read(cookie) is None                # logged out


def test_invisible_character_class_matches_unicodedata():
    cats = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co"}
    for cp in range(0x110000):
        ch = chr(cp)
        expect = unicodedata.category(ch) in cats and ch not in "\n\t"
        assert bool(_INVISIBLE.fullmatch(ch)) == expect, hex(cp)
    out = show("<b onerror=x>\u202eab\u200b" + "z" * 50, 20)
    assert "<b" not in out and "&lt;b onerror=x&gt;" in out
    assert "&lt;U+202E&gt;" in out and "&lt;U+200B&gt;" in out and "more characters" in out


# -- the console over HTTP --------------------------------------------------------------------
@pytest.fixture
def fake():
    from stillhouse.testing.fakeserver import FakeServerConfig
    from stillhouse.testing.fakeserver import start_in_thread as start_fake

    with start_fake(FakeServerConfig(latency_ms=1, stream_chunk_delay_ms=0)) as s:
        yield s


def _decisions(g: Any, target: str) -> list[dict[str, Any]]:
    return g.admin("GET", f"/admin/decisions?target={target}&active=true")[1]["data"]


def test_login_sessions_and_csrf_protect_every_action(tmp_path, fake):
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}"))
    try:
        key = g.account_with_key("acct_a", org="acme")
        assert g.chat(key)[0] == 200
        anon = ConsoleClient(g.url, follow=False)
        status, _ = anon.get("/console/accounts")
        assert status == 303 and anon.last_headers["location"].startswith("/console/login")
        c = ConsoleClient(g.url)
        status, html = c.login("ann", "wrong-token")
        assert status == 401 and "wrong admin token" in html and c.cookie("sh_console") is None
        status, html = c.login("ann", ADMIN)
        assert status == 200 and "Overview" in html
        assert c.cookie("sh_console")
        assert ADMIN not in json.dumps(c.last_headers) and ADMIN not in html
        # The cookie's attributes, from the login response itself.
        c2 = ConsoleClient(g.url, follow=False)
        c2.get("/console/login")
        status, _ = c2.post("/console/login", {"name": "bo", "token": ADMIN})
        assert status == 303
        cookie = next(v for v in c2.set_cookies if v.startswith("sh_console="))
        for attr in ("HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age=900"):
            assert attr in cookie, cookie
        assert "default-src 'none'" in c.last_headers["content-security-policy"]
        assert c.last_headers["x-frame-options"] == "DENY"

        # A POST without a session, with a bad CSRF token, or cross-site: 403, and nothing changes.
        status, html = anon.post("/console/accounts/acct_a/act", {"op": "block", "reason": "x", "csrf": "x"})
        assert status == 403 and "nothing was changed" in html
        status, html = c.post("/console/accounts/acct_a/act", {"op": "block", "reason": "x", "csrf": "forged"})
        assert status == 403 and "CSRF" in html
        status, _ = c.post("/console/accounts/acct_a/act", {"op": "block", "reason": "x"},
                           headers={"Origin": "http://evil.example"})
        assert status == 403
        assert _decisions(g, "acct_a") == [] and g.chat(key)[0] == 200

        # With the session and its token: applies from the next request, and is audited.
        status, html = c.post("/console/accounts/acct_a/act", {"op": "block", "reason": "resale of outputs"})
        assert status == 200 and 'id="flash"' in html
        status, _, out = g.chat(key)
        assert status == 403 and out["error"]["code"] == "account_blocked"
        status, html = c.post("/console/accounts/acct_a/act", {"op": "clear", "reason": "appeal upheld"})
        assert status == 200 and g.chat(key)[0] == 200
        status, html = c.post("/console/accounts/acct_a/act", {"op": "throttle", "reason": ""})
        assert status == 400 and "reason" in html
        status, html = c.post("/console/accounts/acct_nope/act", {"op": "block", "reason": "x"})
        assert status == 404
        store = open_store(g.config.db_url, init=False)
        rows = store.fetch("SELECT actor, action, target, reason, before_state, after_state FROM audit ORDER BY ts")
        assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("ann", "block", "acct_a", "resale of outputs"),
                                                             ("ann", "clear", "acct_a", "appeal upheld")]
        assert json.loads(rows[0][4])["action"] == "allow" and json.loads(rows[0][5])["action"] == "block"
        assert json.loads(rows[1][5])["action"] == "allow"
        # Logging out ends the session: its cookie no longer works.
        old = c.cookie("sh_console")
        assert c.post("/console/logout", {})[0] == 200
        req = urllib.request.Request(g.url + "/console/accounts/acct_a/act", method="POST",
                                     data=b"op=block&reason=x&csrf=" + c.csrf.encode(),
                                     headers={"Cookie": f"sh_console={old}"})
        try:
            urllib.request.urlopen(req, timeout=10)
            code = 200
        except urllib.error.HTTPError as exc:
            code = exc.code
        assert code == 403 and _decisions(g, "acct_a") == []
    finally:
        g.stop()


def test_review_queue_confirm_dismiss_evaluator_and_labels(tmp_path, fake):
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}", shadow=True),
                    detector=FlagEveryone(after=2))
    try:
        keys = {a: g.account_with_key(a) for a in ("camp_1", "fp_1", "eval_1")}
        for k in keys.values():
            assert [g.chat(k)[0] for _ in range(3)] == [200, 200, 200]   # shadow: proposed, not enforced
        time.sleep(0.2)
        c = ConsoleClient(g.url)
        c.login("ann", ADMIN)
        status, html = c.get("/console/review")
        assert status == 200 and "3 pending" in html and html.count(">proposed<") == 3
        did = {d["target"]: d["decision_id"] for d in g.admin("GET", "/admin/decisions?active=true")[1]["data"]}
        assert c.post(f"/console/review/{did['camp_1']}", {"op": "confirm", "reason": "template harvest",
                                                           "next": "/console/review"})[0] == 200
        assert c.post(f"/console/review/{did['fp_1']}", {"op": "dismiss", "reason": "a student"})[0] == 200
        assert c.post(f"/console/review/{did['eval_1']}", {"op": "evaluator", "reason": "lab benchmark"})[0] == 200
        status, html = c.get("/console/review")
        assert "0 pending" in html
        # Confirming a shadow proposal enforces it from the next request; the others stay served.
        assert g.chat(keys["camp_1"])[0] == 403
        assert g.chat(keys["fp_1"])[0] == 200 and g.chat(keys["eval_1"])[0] == 200
        # the confirmation is stored as a floor (the detector may still escalate past it), the others exact
        manual = {d["target"]: d for d in g.admin("GET", "/admin/decisions?active=true")[1]["data"]
                  if d["source"] == "manual"}
        assert manual["camp_1"]["signals"] == [["floor", did["camp_1"]]]
        assert manual["fp_1"]["signals"] == [] and manual["eval_1"]["signals"] == []
        status, body = c.get("/console/labels.jsonl")
        labels = {d["account_id"]: d for d in map(json.loads, body.splitlines())}
        assert {a: (d["label"], d["verdict"], d["actor"]) for a, d in labels.items()} == {
            "camp_1": (1, "confirmed", "ann"), "fp_1": (0, "dismissed", "ann"), "eval_1": (0, "evaluator", "ann")}
        assert g.admin("GET", "/admin/labels")[1]["data"] == list(labels.values()) or \
            {d["account_id"] for d in g.admin("GET", "/admin/labels")[1]["data"]} == set(labels)
        status, html = c.get("/console/audit")
        assert html.count("review:") == 3
        status, html = c.get("/console/accounts/camp_1")
        assert "template harvest" in html and "confirmed" in html and ">at least</span>" in html
        status, html = c.get("/console/clusters/c1")                      # FlagEveryone puts all in c1
        assert status == 200 and "camp_1" in html and "<svg" in html
        assert c.post(f"/console/review/{did['camp_1']}", {"op": "nonsense", "reason": "x"})[0] == 400
    finally:
        g.stop()


class _BlockThenThrottle(FlagEveryone):
    """Says block after an account's 2nd request, throttle from its 4th (its score fell)."""

    def verdict(self, account_id: str) -> Any:
        v = super().verdict(account_id)
        if v is not None and self.seen[account_id] >= 4:
            v.suggested = "throttle"
        return v


def test_confirming_a_lower_decision_keeps_the_account_blocked(tmp_path, fake):
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}"), detector=_BlockThenThrottle(after=2))
    try:
        key = g.account_with_key("rex")
        assert [g.chat(key)[0] for _ in range(3)] == [200, 200, 403]
        c = ConsoleClient(g.url)
        c.login("ann", ADMIN)

        def confirm_pending() -> str:
            time.sleep(0.2)
            (d,) = [d for d in _decisions(g, "rex") if d["source"] == "detector"]
            assert c.post(f"/console/review/{d['decision_id']}", {"op": "confirm", "reason": "harvest"})[0] == 200
            return str(d["action"])

        assert confirm_pending() == "block"
        assert g.chat(key)[0] == 403                    # the 4th request: the detector now says throttle
        # confirming the detector's throttle records the label and keeps the confirmed block
        assert confirm_pending() == "throttle"
        assert [g.chat(key)[0] for _ in range(2)] == [403, 403]
        manual = [d for d in _decisions(g, "rex") if d["source"] == "manual"]
        assert [d["action"] for d in manual] == ["block"]
        status, body = c.get("/console/labels.jsonl")
        assert [json.loads(x)["verdict"] for x in body.splitlines()] == ["confirmed"]
    finally:
        g.stop()


def test_account_list_pages_by_keyset_and_filters(tmp_path, fake):
    cfg = make_config(tmp_path, f"http://127.0.0.1:{fake.port}")
    store = open_store(cfg.db_url)
    for i in range(130):
        store.put_account(AccountInfo(f"acct_{i:03d}", org="big" if i % 3 == 0 else "small", country="NL"))
    store.write_records([TrafficRecord(f"r{i}-{j}", 3600.0 * 100 + i, f"acct_{i:03d}", "k", status=200,
                                       prompt_tokens=5, completion_tokens=7) for i in range(130) for j in range(i % 7)])
    store.put_scores([(f"acct_{i:03d}", 1.0, float(i % 17), "", "[]") for i in range(130)])
    store.close()
    g = start_guard(cfg)
    try:
        assert g.admin("POST", "/admin/decisions", {"target": "acct_005", "action": "block", "reason": "r"})[0] == 201
        c = ConsoleClient(g.url)
        c.login("ann", ADMIN)
        for sort in ("score", "requests", "last_seen", "account"):
            seen: list[str] = []
            url = f"/console/accounts?sort={sort}"
            pages = 0
            while url:
                status, html = c.get(url)
                assert status == 200, html
                seen += re.findall(r'<td><a class="id" href="/console/accounts/(acct_\d+)"', html)
                m = re.search(r'<a id="next" href="([^"]+)"', html)
                url = m.group(1).replace("&amp;", "&") if m else ""
                pages += 1
            assert sorted(seen) == [f"acct_{i:03d}" for i in range(130)] and pages == 3, sort
        status, html = c.get("/console/accounts?org=big&min_score=10")
        got = set(re.findall(r'href="/console/accounts/(acct_\d+)"', html))
        assert got == {f"acct_{i:03d}" for i in range(0, 130, 3) if i % 17 >= 10}
        status, html = c.get("/console/accounts?tier=block")
        assert set(re.findall(r'href="/console/accounts/(acct_\d+)"', html)) == {"acct_005"}
        status, html = c.get("/console/accounts?q=ACCT_12")
        assert set(re.findall(r'href="/console/accounts/(acct_\d+)"', html)) == {f"acct_{i}" for i in range(120, 130)}
        assert c.get("/console/accounts?sort=bogus")[0] == 400
        assert c.get("/console/accounts?after=notanumber|x")[0] == 400
        assert c.get("/console/accounts/acct_%3Cscript%3E")[0] == 404
    finally:
        g.stop()


def test_hostile_log_content_is_escaped_in_every_page(tmp_path, fake):
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}", max_body_bytes=3_000_000))
    try:
        key = g.account_with_key("acct_h", org='<script>alert("org")</script>')
        hostile = '<script>alert(1)</script><img src=x onerror=alert(2)> \u202eevil\u200b'
        assert g.chat(key, chat_body(hostile + "x" * 1_000_000))[0] == 200
        assert g.chat(key, chat_body(hostile))[0] == 200
        time.sleep(0.2)
        c = ConsoleClient(g.url)
        c.login('<img src=x onerror=alert("name")>', ADMIN)
        for path in ("/console/", "/console/accounts", "/console/accounts/acct_h", "/console/audit"):
            status, html = c.get(path)
            assert status == 200
            assert "<script>alert" not in html and "<img src=x" not in html, path
        status, html = c.get("/console/accounts/acct_h")
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;U+202E&gt;" in html
    finally:
        g.stop()


def test_metrics_endpoint_counts_requests_and_can_require_a_token(tmp_path, fake):
    from stillhouse.guard.config import sha256_hex

    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}"), detector=FlagEveryone(after=3))
    try:
        key = g.account_with_key("m1")
        codes = [g.chat(key)[0] for _ in range(4)] + [g.chat(None)[0]]
        assert codes == [200, 200, 200, 403, 401]
        status, hdrs, text = http("GET", g.url + "/metrics")
        assert status == 200 and hdrs["content-type"].startswith("text/plain")
        assert 'stillhouse_guard_requests_total{status="200",tier="allow"} 3.0' in text
        assert 'stillhouse_guard_requests_total{status="403",tier="block"} 1.0' in text
        assert 'stillhouse_guard_requests_total{status="401",tier="allow"} 1.0' in text
        assert 'stillhouse_guard_decisions_total{shadow="false",source="detector",tier="block"} 1.0' in text
        assert 'stillhouse_guard_active_decisions{source="detector",tier="block"} 1.0' in text
        assert "stillhouse_guard_added_latency_seconds_count 3.0" in text
        assert "stillhouse_guard_upstream_latency_seconds_count 3.0" in text
        for name in ("log_lag_seconds", "log_pending_records", "spool_files", "spool_records",
                     "detector_queue_depth", "store_up 1.0", 'tokens_total{kind="completion",status="200"'):
            assert "stillhouse_guard_" + name in text, name
        assert "m1" not in text   # no account ids in metrics
        # Every series the Grafana dashboard plots is one this endpoint exports.
        from pathlib import Path

        dash = (Path(__file__).parent.parent / "docs" / "grafana" / "stillhouse-guard.json").read_text()
        used = set(re.findall(r"stillhouse_guard_\w+", dash))
        exported = set(re.findall(r"^(stillhouse_guard_\w+)", text, re.MULTILINE))
        assert used and used <= exported, used - exported
    finally:
        g.stop()
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}", metrics_token_sha256=sha256_hex("scrape")))
    try:
        assert http("GET", g.url + "/metrics")[0] == 401
        assert http("GET", g.url + "/metrics", token=ADMIN)[0] == 401
        assert http("GET", g.url + "/metrics", token="scrape")[0] == 200
    finally:
        g.stop()


# -- the counter tables ----------------------------------------------------------------------
def _naive(store: Any) -> dict[str, Any]:
    hour = "floor(ts / 3600) * 3600.0" if store.url.startswith("postgres") else "CAST(ts / 3600 AS INTEGER) * 3600.0"
    return {
        "hourly": sorted(store.fetch(f"SELECT {hour}, COUNT(*), SUM(prompt_tokens), SUM(CASE WHEN status >= 400 AND "
                                     f"status < 500 THEN 1 ELSE 0 END), SUM(CASE WHEN decision = 'block' THEN 1 ELSE 0 "
                                     f"END) FROM traffic GROUP BY {hour}")),
        "accounts": sorted(store.fetch("SELECT account_id, COUNT(*), SUM(completion_tokens), MIN(ts), MAX(ts) "
                                       "FROM traffic WHERE account_id <> '' GROUP BY account_id")),
    }


def _counters(store: Any) -> dict[str, Any]:
    return {
        "hourly": sorted(store.fetch("SELECT hour, requests, prompt_tokens, refused, n_block FROM traffic_hourly")),
        "accounts": sorted(store.fetch("SELECT account_id, requests, completion_tokens, first_ts, last_ts "
                                       "FROM account_stats WHERE requests > 0")),
    }


def _records(n: int, seed: int = 0) -> list[TrafficRecord]:
    import random

    rng = random.Random(seed)
    return [TrafficRecord(f"q{seed}-{i}", 7200.0 + rng.random() * 20000, rng.choice(["a", "b", "c", ""]), "k",
                          client_ip=rng.choice(["10.0.0.1", "10.0.0.2", "10.0.1.9", "::1"]), user_agent="ua",
                          status=rng.choice([200, 200, 403, 429, 502]), prompt_tokens=rng.randrange(9),
                          completion_tokens=rng.randrange(9), decision=rng.choice(["allow", "block", "throttle"]))
            for i in range(n)]


def test_counters_equal_a_naive_aggregate_survive_replays_and_backfill(store_url):  # noqa: F811
    store = open_store(store_url)
    recs = _records(300)
    store.write_records(recs[:200])
    store.write_records(recs[100:])          # half of it a replay: counted once
    store.write_records(recs[:50])
    assert store.count_records() == 300
    assert _counters(store) == _naive(store)
    links = store.fetch("SELECT account_id, kind, value FROM account_links WHERE account_id = 'a' ORDER BY 2, 3")
    kinds = {k for _, k, _ in links}
    assert kinds == {"ip", "subnet", "ua"} and ("a", "subnet", "10.0.0.0/24") in links
    # A database from before the counters: wipe them and the version mark; init backfills once.
    store.put_scores([("a", 7300.0, 4.5, "c-a", '[["cot", 4.5]]')])
    store.fetch("SELECT 1")
    store._run(lambda cur: [cur.execute(f"DELETE FROM {t}") for t in ("traffic_hourly", "account_links",
                                                                       "schema_meta")])
    store._run(lambda cur: cur.execute("UPDATE account_stats SET requests = 0"))
    assert store.migrate() is True and store.migrate() is False
    assert _counters(store) == _naive(store)
    assert store.fetch("SELECT score, cluster_id FROM account_stats WHERE account_id = 'a'") == [(4.5, "c-a")]
    assert store.fetch("SELECT COUNT(*) FROM account_links")[0][0] == len(
        store.fetch("SELECT DISTINCT account_id, kind, value FROM account_links"))
    store.close()


def test_an_old_sqlite_database_is_migrated_on_open(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("""CREATE TABLE traffic (
        request_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, account_id TEXT NOT NULL, key_id TEXT NOT NULL,
        client_ip TEXT NOT NULL, user_agent TEXT NOT NULL, header_fingerprint TEXT NOT NULL, model TEXT NOT NULL,
        params TEXT NOT NULL, messages TEXT NOT NULL, response_text TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL, latency_ms DOUBLE PRECISION NOT NULL, status INTEGER NOT NULL,
        decision TEXT NOT NULL, decision_reason TEXT NOT NULL, session_id TEXT NOT NULL)""")
    con.execute("""CREATE TABLE accounts (account_id TEXT PRIMARY KEY, org TEXT NOT NULL, signup_path TEXT NOT NULL,
        country TEXT NOT NULL, payment_fingerprint TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
        limits TEXT NOT NULL)""")
    con.executemany("INSERT INTO traffic VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [(f"r{i}", 3600.0 * (i % 5), "old", "k", "1.2.3.4", "ua", "fp", "m", "{}", "[]", "", 3, 4, 1.0, 200,
                      "allow", "", "") for i in range(40)])
    con.execute("INSERT INTO accounts VALUES ('quiet', '', '', '', '', 0, '{}')")
    con.commit()
    con.close()
    store = open_store(f"sqlite:///{path}")
    assert store.fetch("SELECT account_id, requests, prompt_tokens FROM account_stats ORDER BY 1") == [
        ("old", 40, 120), ("quiet", 0, 0)]
    assert store.fetch("SELECT COUNT(*), SUM(requests) FROM traffic_hourly") == [(5, 40)]
    store.close()


@pytest.mark.postgres
def test_console_pages_and_actions_on_postgres(tmp_path, fake, pg_url):  # noqa: F811
    g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}", db_url=pg_url),
                    detector=FlagEveryone(after=2))
    try:
        key = g.account_with_key("pg_a", org="acme")
        assert [g.chat(key)[0] for _ in range(3)] == [200, 200, 403]
        time.sleep(0.2)
        c = ConsoleClient(g.url)
        c.login("ann", ADMIN)
        for path in ("/console/", "/console/accounts", "/console/accounts?tier=block", "/console/accounts/pg_a",
                     "/console/clusters", "/console/clusters/c1", "/console/review", "/console/audit"):
            status, html = c.get(path)
            assert status == 200, (path, html[-500:])
        did = _decisions(g, "pg_a")[0]["decision_id"]
        assert c.post(f"/console/review/{did}", {"op": "dismiss", "reason": "false positive"})[0] == 200
        assert g.chat(key)[0] == 200
        status, html = c.get("/console/accounts/pg_a")
        assert "false positive" in html and "3" in html
    finally:
        g.stop()
