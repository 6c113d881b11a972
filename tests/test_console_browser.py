"""The operator console in a real browser: Playwright for Python driving Debian's chromium.

One guard (fake upstream, a stand-in detector in shadow mode, simulated time spread over three days)
serves every test. The tests log in through the form, open an account, block it and see its next API
request refused, clear it and see it served, confirm a proposed decision from the review queue, and
show that a POST with no session, with a bad CSRF token or from another site changes nothing. Hostile
log content (``<script>``, an ``onerror=`` attribute, a 1 MB line, bidi overrides and zero-width
characters) renders as inert text: no dialog opens, no injected element or global appears.

Screenshots of each page go to ``$STILLHOUSE_SCREENSHOTS`` (e.g. docs/console) when it is set.
Skips, saying why, when chromium or playwright is missing (``bash scripts/ensure-chromium.sh``).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from stillhouse.guard.events import AccountInfo, TrafficRecord, Verdict
from test_guard import ADMIN, chat_body, http, make_config, start_guard

pytestmark = pytest.mark.browser
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = os.environ.get("STILLHOUSE_SCREENSHOTS", "")
HOSTILE = ('<script>window.__pwned = 1; alert("xss")</script><img src=x onerror="window.__pwned = 2; alert(2)">'
           ' \u202eevil-rtl\u200bzero\u200dwidth')


def _skip_reason() -> str | None:
    if not Path(CHROMIUM).exists():
        return "chromium not found: install it with `bash scripts/ensure-chromium.sh` (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright missing: pip install playwright (the test extra)"
    return None


if _skip_reason():
    pytest.skip(_skip_reason() or "", allow_module_level=True)


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


class CampaignSpotter:
    """A stand-in detector: accounts named camp_* score by volume and share cluster c-camp; others score low."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}

    def observe(self, record: TrafficRecord, account: AccountInfo | None = None) -> None:
        if record.status < 400:
            self.n[record.account_id] = self.n.get(record.account_id, 0) + 1

    def verdict(self, account_id: str) -> Verdict | None:
        n = self.n.get(account_id, 0)
        if not n:
            return None
        camp = account_id.startswith("camp")
        score = (8.0 + n * 1.5) if camp else 2.0 + (n % 5) * 0.4
        action = "block" if score > 30 else "throttle" if score > 15 else "allow"
        reasons = [("cot", 6.2), ("template", 5.1), ("link:ip", 3.0), ("volume", 2.2)] if camp \
            else [("volume", 1.1), ("around_clock", 0.7)]
        return Verdict(account_id, score=score, flagged=action != "allow", suggested=action,  # type: ignore[arg-type]
                       cluster_id="c-camp" if camp else None, reasons=reasons,
                       fpr_at_threshold=1e-3 if action == "block" else 1e-2 if action == "throttle" else None)


class World:
    """The guard the browser talks to, with three days of simulated traffic already logged."""

    def __init__(self, tmp: Path):
        from stillhouse.testing.fakeserver import FakeServerConfig
        from stillhouse.testing.fakeserver import start_in_thread as start_fake

        self.fake_cm = start_fake(FakeServerConfig(latency_ms=1, stream_chunk_delay_ms=0))
        fake = self.fake_cm.__enter__()
        self.clock = Clock(1_790_000_000.0)
        cfg = make_config(tmp, f"http://127.0.0.1:{fake.port}", shadow=True, trust_forwarded_for=True,
                          max_body_bytes=3_000_000, requests_per_min=0, tokens_per_min=0)
        self.g = start_guard(cfg, clock=self.clock, detector=CampaignSpotter())
        self.keys: dict[str, str] = {}
        people = [("alice", "acme", "NL"), ("bob", "globex", "US"), ("carol", "initech", "DE"),
                  ("dan", "acme", "NL"), ("hostile", HOSTILE, "\u202eXX")]
        camps = [(f"camp_{i}", f"shell-{i} ltd", "SC") for i in range(1, 5)]
        for aid, org, country in people + camps:
            self.keys[aid] = self.g.account_with_key(aid, org=org, country=country, signup_path="web")
        topics = ["What is 17 * 23?", "Summarise this paragraph about tides.", "Write a haiku about rain.",
                  "How do I reverse a list in Python?", "Plan a 3-day trip to Lisbon."]
        for step in range(72):                 # three simulated days, one round an hour
            self.clock.t += 3600
            for i, (aid, _, _) in enumerate(people[:4]):
                if (step + i) % 3 == 0:
                    self.chat(aid, topics[(step + i) % len(topics)], ip=f"198.51.{i}.{10 + i}")
            if step >= 24:
                for aid, _, _ in camps:
                    self.chat(aid, "Think step by step and show your full internal reasoning: "
                                   f"problem {step}", ip="203.0.113.7")
        self.clock.t += 60
        self.chat("hostile", HOSTILE + " " + "A" * 1_000_000, ip="192.0.2.66")
        self.chat("hostile", HOSTILE, ip="192.0.2.66")
        time.sleep(0.3)  # one log flush

    def chat(self, aid: str, text: str, ip: str) -> int:
        return int(http("POST", self.g.url + "/v1/chat/completions", chat_body(text), token=self.keys[aid],
                        headers={"X-Forwarded-For": ip})[0])

    def close(self) -> None:
        self.g.stop()
        self.fake_cm.__exit__(None, None, None)


@pytest.fixture(scope="module")
def world(tmp_path_factory: Any) -> Any:
    w = World(tmp_path_factory.mktemp("console-browser"))
    yield w
    w.close()


@pytest.fixture(scope="module")
def browser() -> Any:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Any:
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = ctx.new_page()
    pg.dialogs = []  # type: ignore[attr-defined]
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))  # type: ignore[attr-defined]
    yield pg
    ctx.close()


def shot(page: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def login(page: Any, world: World, name: str = "ann") -> None:
    page.goto(world.g.url + "/console/")
    assert "/console/login" in page.url
    page.fill("#name", name)
    page.fill("#token", ADMIN)
    page.click("button[type=submit]")
    page.wait_for_selector("header .brand")


def api_status(world: World, aid: str) -> int:
    return world.chat(aid, "one more question", ip="198.51.100.1")


def test_login_open_account_block_then_clear(page: Any, world: World) -> None:
    page.goto(world.g.url + "/console/login")
    shot(page, "login")
    page.fill("#name", "ann")
    page.fill("#token", "not-the-token")
    page.click("button[type=submit]")
    assert "wrong admin token" in page.inner_text("#error")
    login(page, world)
    assert "Overview" in page.inner_text("main h1")
    page.wait_for_selector("[data-chart=chart-requests] .u-over")
    shot(page, "overview")
    page.click("header a[href='/console/accounts']")
    page.wait_for_selector("#accounts")
    shot(page, "accounts")
    page.click("#accounts a[href='/console/accounts/alice']")
    page.wait_for_selector("#decision")
    assert page.inner_text("h1").startswith("Account alice")
    shot(page, "account")
    assert api_status(world, "alice") == 200
    page.fill("input[name=reason]", "resells answers (ticket 4411)")
    page.click("button[value=block]")
    assert "Done: block" in page.inner_text("#flash")
    status = api_status(world, "alice")
    assert status == 403, status                       # the policy answers a block with 403
    assert "block" in page.inner_text("#decision")
    page.fill("input[name=reason]", "appeal upheld")
    page.click("button[value=clear]")
    assert "Done: clear" in page.inner_text("#flash")
    assert api_status(world, "alice") == 200
    page.click("header a[href='/console/audit']")
    rows = page.inner_text("#audit")
    assert "resells answers" in rows and "appeal upheld" in rows and "ann" in rows
    shot(page, "audit")
    assert page.dialogs == []  # type: ignore[attr-defined]


def test_review_queue_confirm_enforces_a_shadow_proposal(page: Any, world: World) -> None:
    login(page, world)
    page.click("header a[href='/console/review']")
    page.wait_for_selector("#queue")
    shot(page, "review")
    row = page.locator("#queue tr", has_text="camp_1").first
    assert "proposed" in row.inner_text()
    assert api_status(world, "camp_1") == 200          # shadow mode: proposed, not enforced
    row.locator("input[name=reason]").fill("same template as camp_2, datacenter IP")
    row.locator("button[value=confirm]").click()
    assert "Done: confirm" in page.inner_text("#flash")
    assert api_status(world, "camp_1") == 403
    assert "camp_1" not in page.inner_text("#queue")
    page.goto(world.g.url + "/console/clusters")
    page.click("#clusters a[href='/console/clusters/c-camp']")
    page.wait_for_selector("#graph circle")
    assert page.locator("#graph circle").count() == 4
    assert "203.0.113.7" in page.inner_text("#links")
    shot(page, "cluster")
    page.goto(world.g.url + "/console/clusters")
    shot(page, "clusters")


def test_post_without_session_bad_csrf_or_cross_site_changes_nothing(page: Any, browser: Any, world: World) -> None:
    url = world.g.url
    before = http("GET", url + "/admin/decisions?target=bob&active=true", token=ADMIN)[2]["data"]
    # No session: the browser context has no cookie.
    resp = page.request.post(url + "/console/accounts/bob/act", form={"op": "block", "reason": "x", "csrf": "x"})
    assert resp.status == 403
    # A session, but a tampered CSRF token in the form.
    login(page, world)
    page.goto(url + "/console/accounts/bob")
    page.locator("form.act input[name=csrf]").evaluate("e => e.value = 'tampered'")
    page.fill("form.act input[name=reason]", "should not apply")
    page.click("form.act button[value=block]")
    assert "CSRF" in page.inner_text("#error")
    # Another site posting a form at the console while the analyst is logged in.
    evil = _serve_evil_page(url + "/console/accounts/bob/act")
    try:
        page.goto(f"http://localhost:{evil.server_address[1]}/")
        with page.expect_response(lambda r: r.url.endswith("/console/accounts/bob/act")) as info:
            page.click("#go")
        assert info.value.status == 403     # no cookie crosses sites (SameSite=Strict), and the Origin is foreign
    finally:
        evil.shutdown()
    after = http("GET", url + "/admin/decisions?target=bob&active=true", token=ADMIN)[2]["data"]
    assert after == before == []
    assert api_status(world, "bob") == 200


def _serve_evil_page(target: str) -> HTTPServer:
    html = (f'<html><body><form id="f" method="post" action="{target}"><input name="op" value="block">'
            '<input name="reason" value="csrf"><input name="csrf" value="guess"><button id="go">win a prize'
            '</button></form></body></html>').encode()

    class H(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(html)))
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *a: Any) -> None:
            pass

    srv = HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_hostile_log_content_renders_inert(page: Any, world: World) -> None:
    login(page, world, name='<img src=x onerror="window.__pwned = 3">ann')
    for path in ("/console/", "/console/accounts", "/console/accounts/hostile", "/console/audit",
                 "/console/review", "/console/accounts?q=%3Cscript%3E"):
        page.goto(world.g.url + path)
        page.wait_for_load_state("load")
        assert page.evaluate("() => window.__pwned") is None, path
        assert page.locator("img[src=x]").count() == 0, path
        assert page.locator("main script:not([type='application/json'])").count() == 0, path
    page.goto(world.g.url + "/console/accounts/hostile")
    samples = page.inner_text("#samples")
    assert '<script>window.__pwned = 1; alert("xss")</script>' in samples   # shown as text
    assert "<U+202E>" in samples and "<U+200B>" in samples and "<U+200D>" in samples
    assert "more characters" in samples                                     # the 1 MB line, cut
    assert '<img src=x onerror=' in page.inner_text("h1 ~ .grid2 dl")       # the org, as text
    assert page.dialogs == []  # type: ignore[attr-defined]
    shot(page, "hostile")
