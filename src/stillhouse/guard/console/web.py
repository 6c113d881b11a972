"""The console's pages and forms: a starlette app the guard mounts at ``/console``.

Pages (server-rendered Jinja2, autoescaped): overview, accounts (search, sort, filter, keyset
pages), one account, clusters, one cluster (a graph), the review queue, the audit trail; plus
``labels.jsonl`` (the reviewed accounts as labels) and ``static/`` (CSS, the page script and the
vendored uPlot chart library, all shipped in the package).

Security, in one place:

- login: a form posting the admin token (never in a URL) and the analyst's name; failures are
  limited per client address (``LOGIN_FAILURES`` per ``LOGIN_WINDOW_S``);
- the session is a signed HttpOnly, SameSite=Strict cookie that expires (see ``session.py``);
- every POST needs a live session, its CSRF token in the form, and no cross-site Origin;
  otherwise it is refused with 403 and changes nothing;
- every response carries a strict Content-Security-Policy (scripts and styles from /console/static
  only, no inline script), ``X-Frame-Options: DENY`` and ``nosniff``; pages are ``no-store``;
- log content is text everywhere: autoescaping, and invisible format characters (bidi overrides,
  zero-width characters) are shown as visible ``<U+202E>`` marks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup, escape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from stillhouse.guard.console import queries as q
from stillhouse.guard.console.actions import ACCOUNT_ACTIONS, VERDICTS, ActionError, act, label_json, review
from stillhouse.guard.console.graph import layout
from stillhouse.guard.console.session import COOKIE, LOGIN_COOKIE, Session, SessionSigner, cookie_header
from stillhouse.guard.events import ACTIONS, AccountInfo
from stillhouse.guard.store import StoreUnavailable, open_store

if TYPE_CHECKING:
    from stillhouse.guard.app import GuardApp, Receive, Scope, Send

LOGIN_FAILURES = 10
LOGIN_WINDOW_S = 300.0
MAX_FORM_BYTES = 65536
_ID = re.compile(r"^[A-Za-z0-9_.@:\-]{1,160}$")
_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin")]
STATIC = Path(__file__).parent / "static"
SHOW_LIMIT = 2000


# -- template filters ----------------------------------------------------------------------
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e"
    "\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ud800-\uf8ff\ufeff\ufff9-\ufffb\U000110bd"
    "\U000110cd\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
    "\U000e0020-\U000e007f\U000f0000-\U000ffffd\U00100000-\U0010fffd]")
"""Control, format (bidi overrides, zero-width), separator, surrogate and private-use characters
(Unicode 14 categories Cc Cf Zl Zp Cs Co, newline and tab excepted); tests/test_console.py checks
the class against ``unicodedata``."""


def show(text: Any, limit: int = SHOW_LIMIT) -> Markup:
    """Log text as inert HTML: escaped, cut at ``limit`` characters (saying how many more there were), with
    invisible characters (bidi overrides, zero-width spaces, controls) shown as visible ``<U+XXXX>`` marks."""
    s = "" if text is None else str(text)
    more = len(s) - limit
    if more > 0:
        s = s[:limit]
    html = str(escape(s))  # escaping never introduces an invisible character, so marking them afterwards is safe
    html = _INVISIBLE.sub(lambda m: f'<span class="cf" title="invisible character">&lt;U+{ord(m.group()):04X}&gt;'
                                    "</span>", html)
    if more > 0:
        html += f'<span class="cut"> … {more:,} more characters</span>'
    return Markup(html)


def fmt_ts(ts: Any) -> str:
    if ts is None or ts == 0:
        return "—"
    return dt.datetime.fromtimestamp(float(ts), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def fmt_num(n: Any) -> str:
    return f"{int(n or 0):,}"


def make_env() -> Environment:
    env = Environment(loader=PackageLoader("stillhouse.guard.console", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(show=show, ts=fmt_ts, num=fmt_num)
    return env


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ConsoleApp:
    """The console for one GuardApp (built on the first request to /console)."""

    def __init__(self, app: GuardApp):
        self.app = app
        self.config = app.config
        self.signer = SessionSigner(app.config.console_session_s)
        self.env = make_env()
        self.store = open_store(app.config.db_url, init=False)
        """A connection of its own: console reads never queue behind the log writer."""
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="console-read")
        self._failures: dict[str, list[float]] = {}
        self._orgs: tuple[float, list[str]] = (-1e9, [])
        self.router = Starlette(routes=[
            Route("/console", lambda r: RedirectResponse("/console/", 303)),
            Route("/console/", self.overview),
            Route("/console/login", self.login_page, methods=["GET"]),
            Route("/console/login", self.login, methods=["POST"]),
            Route("/console/logout", self.logout, methods=["POST"]),
            Route("/console/accounts", self.accounts),
            Route("/console/accounts/{account_id}", self.account),
            Route("/console/accounts/{account_id}/act", self.account_action, methods=["POST"]),
            Route("/console/clusters", self.clusters),
            Route("/console/clusters/{cluster_id}", self.cluster),
            Route("/console/review", self.review_page),
            Route("/console/review/{decision_id}", self.review_action, methods=["POST"]),
            Route("/console/audit", self.audit),
            Route("/console/labels.jsonl", self.labels),
            Mount("/console/static", StaticFiles(directory=str(STATIC)), name="static"),
        ])

    def close(self) -> None:
        """Close the console's own store connection (the guard's stop calls it)."""
        self.executor.submit(self.store.close).result(timeout=10)
        self.executor.shutdown(wait=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        static = scope["path"].startswith("/console/static/")

        async def send_secure(msg: Any) -> None:
            if msg["type"] == "http.response.start":
                extra = SECURITY_HEADERS if static else [*SECURITY_HEADERS, (b"cache-control", b"no-store")]
                msg = {**msg, "headers": [*msg.get("headers", []), *extra]}
            await send(msg)
        await self.router(scope, receive, send_secure)

    # -- plumbing -------------------------------------------------------------------------
    async def read(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, self.store, *args)

    def session(self, request: Request) -> Session | None:
        return self.signer.read(request.cookies.get(COOKIE))

    def render(self, request: Request, name: str, session: Session | None, status: int = 200,
               headers: dict[str, str] | None = None, **ctx: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(session=session, path=request.url.path, shadow=self.config.shadow,
                                                  detector=self.app.detector is not None, **ctx)
        return HTMLResponse(html, status, headers=headers)

    def error(self, request: Request, session: Session | None, status: int, message: str) -> HTMLResponse:
        return self.render(request, "error.html", session, status, message=message, code=status)

    def login_redirect(self, request: Request) -> RedirectResponse:
        nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/console/login?" + urlencode({"next": nxt}), 303)

    async def form(self, request: Request) -> dict[str, str]:
        size = 0
        chunks = []
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_FORM_BYTES:
                raise _Refused(413, f"form larger than {MAX_FORM_BYTES} bytes")
            chunks.append(chunk)
        try:
            parsed = parse_qs(b"".join(chunks).decode("utf-8"), keep_blank_values=True, max_num_fields=50)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Refused(400, f"the form could not be read: {exc}") from exc
        return {k: v[-1] for k, v in parsed.items()}

    @staticmethod
    def same_origin(request: Request) -> bool:
        """False for a request a browser marks as cross-site (Origin of another host, or Sec-Fetch-Site)."""
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is None:
            return True
        return origin != "null" and urlsplit(origin).netloc == request.headers.get("host", "")

    async def checked_post(self, request: Request) -> tuple[Session, dict[str, str]]:
        """The session and form of a state-changing POST, or _Refused (403: nothing changes)."""
        s = self.session(request)
        if s is None:
            raise _Refused(403, "no console session (missing or expired): log in again; nothing was changed")
        if not self.same_origin(request):
            raise _Refused(403, "cross-site request refused; nothing was changed")
        form = await self.form(request)
        if not self.signer.check_csrf(s, form.get("csrf")):
            raise _Refused(403, "the form's CSRF token is missing or wrong (reload the page); nothing was changed")
        return s, form

    @staticmethod
    def safe_next(target: str | None, default: str) -> str:
        """A redirect target inside the console only (never another site)."""
        if target and target.startswith("/console/") and "//" not in target and "\\" not in target:
            return target
        return default

    # -- login ----------------------------------------------------------------------------
    async def login_page(self, request: Request) -> Response:
        if self.session(request) is not None:
            return RedirectResponse(self.safe_next(request.query_params.get("next"), "/console/"), 303)
        return self._login_form(request, 200, "")

    def _login_form(self, request: Request, status: int, error: str) -> Response:
        import secrets

        token = secrets.token_urlsafe(24)
        resp = self.render(request, "login.html", None, status, login_csrf=token, error=error,
                           next=self.safe_next(request.query_params.get("next"), "/console/"))
        resp.headers.append("set-cookie", cookie_header(LOGIN_COOKIE, token, 600, self.config.console_secure_cookie))
        return resp

    async def login(self, request: Request) -> Response:
        import hmac

        ip = request.client.host if request.client else ""
        now = time.monotonic()
        recent = [t for t in self._failures.get(ip, []) if now - t < LOGIN_WINDOW_S]
        self._failures[ip] = recent
        if len(recent) >= LOGIN_FAILURES:
            return self.error(request, None, 429, f"too many failed logins from {ip}; wait "
                                                  f"{int(LOGIN_WINDOW_S / 60)} minutes")
        try:
            form = await self.form(request)
        except _Refused as exc:
            return self.error(request, None, exc.status, str(exc))
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        if not self.same_origin(request) or not cookie or not hmac.compare_digest(cookie.encode(),
                                                                                   form.get("csrf", "").encode()):
            return self._login_form(request, 403, "the login form expired; try again")
        name = form.get("name", "").strip()
        if not _NAME.match(name):
            return self._login_form(request, 400, "give your name (1-64 characters): it is kept with every action")
        if not self.config.check_admin_token(form.get("token", "")):
            self._failures[ip].append(now)
            return self._login_form(request, 401, "wrong admin token")
        _, value = self.signer.issue(name)
        resp = RedirectResponse(self.safe_next(form.get("next"), "/console/"), 303)
        resp.headers.append("set-cookie", cookie_header(COOKIE, value, self.config.console_session_s,
                                                        self.config.console_secure_cookie))
        resp.headers.append("set-cookie", cookie_header(LOGIN_COOKIE, "", 0, self.config.console_secure_cookie))
        return resp

    async def logout(self, request: Request) -> Response:
        try:
            s, _ = await self.checked_post(request)
        except _Refused as exc:
            return self.error(request, None, exc.status, str(exc))
        self.signer.revoke(s)
        resp = RedirectResponse("/console/login", 303)
        resp.headers.append("set-cookie", cookie_header(COOKIE, "", 0, self.config.console_secure_cookie))
        return resp

    # -- pages ----------------------------------------------------------------------------
    async def _page(self, request: Request, build: Any) -> Response:
        s = self.session(request)
        if s is None:
            return self.login_redirect(request)
        try:
            return await build(s)
        except _Refused as exc:
            return self.error(request, s, exc.status, str(exc))
        except StoreUnavailable as exc:
            return self.error(request, s, 503, f"the store is unavailable: {exc}")

    async def overview(self, request: Request) -> Response:
        async def build(s: Session) -> Response:
            data = await self.read(q.overview)
            hours = data["hours"]
            x = [h["hour"] for h in hours]
            dec = data["decisions"]
            charts = {
                "chart-requests": {"x": x, "series": [
                    {"label": "requests", "colour": "#2c7be5", "values": [h["requests"] for h in hours]},
                    {"label": "errors (5xx)", "colour": "#d9534f", "values": [h["errors"] for h in hours]},
                    {"label": "refused (4xx)", "colour": "#f0ad4e", "values": [h["refused"] for h in hours]}]},
                "chart-tokens": {"x": x, "series": [
                    {"label": "prompt tokens", "colour": "#6c757d", "values": [h["prompt_tokens"] for h in hours]},
                    {"label": "completion tokens", "colour": "#00a37a",
                     "values": [h["completion_tokens"] for h in hours]}]},
                "chart-tiers": {"x": x, "series": [
                    *({"label": f"requests {t}", "colour": c, "values": [h[t] for h in hours]}
                      for t, c in zip(ACTIONS, ("#2c7be5", "#f0ad4e", "#9b59b6", "#d9534f"))),
                    {"label": "decisions taken", "colour": "#000000",
                     "values": [sum(dec.get(h["hour"], {}).values()) for h in hours]}]},
            }
            stats = self.app.writer.stats()
            active = self.app.policy.active()
            return self.render(request, "overview.html", s, data=data, charts=charts, log=stats,
                               active={t: sum(1 for r in active if r.action == t) for t in ACTIONS},
                               tier_of=self.tier_of)
        return await self._page(request, build)

    def tier_of(self, account_id: str) -> str:
        acct = self.app.accounts.get(account_id)
        return self.app.policy.decide(acct[0] if acct else AccountInfo(account_id)).action

    def tiers(self) -> dict[str, list[str]]:
        """Account ids per enforced tier other than allow, from the policy in memory.

        Only accounts with an active decision (their own, or their cluster's) can be in one, plus those a
        metadata rule matches: so this visits the active decisions, not every account, unless the config
        has metadata rules."""
        policy = self.app.policy
        cand: set[str] = set()
        if any(r.field != "score" for r in policy.rules):
            cand = set(self.app.accounts)
        else:
            clusters: set[str] = set()
            for row in policy.active():
                (cand.add if row.scope == "account" else clusters.add)(row.target)
            if clusters:
                cand |= {a for a, c in list(policy._cluster_of.items()) if c in clusters}
        out: dict[str, list[str]] = {t: [] for t in ACTIONS if t != "allow"}
        for aid in cand:
            t = self.tier_of(aid)
            if t != "allow":
                out[t].append(aid)
        return out

    async def accounts(self, request: Request) -> Response:
        async def build(s: Session) -> Response:
            p = request.query_params
            sort = p.get("sort", "score")
            if sort not in q.SORTS:
                raise _Refused(400, f"unknown sort {sort!r}; use one of {list(q.SORTS)}")
            tier = p.get("tier", "")
            if tier and tier not in ACTIONS:
                raise _Refused(400, f"unknown tier {tier!r}; use one of {list(ACTIONS)}")
            try:
                min_score = float(p["min_score"]) if p.get("min_score") else None
            except ValueError as exc:
                raise _Refused(400, "min_score must be a number") from exc
            f = q.AccountFilter(q=p.get("q", "")[:100], org=p.get("org", "")[:200], cluster=p.get("cluster", "")[:200],
                                min_score=min_score, sort=sort, after=p.get("after", "")[:400])
            if tier:
                sets = self.tiers()
                if tier == "allow":
                    f.exclude = [a for ids in sets.values() for a in ids]
                else:
                    f.ids = sets[tier]
            try:
                rows, nxt = await self.read(q.accounts_page, f)
            except ValueError as exc:
                raise _Refused(400, f"bad page cursor: {exc}") from exc
            params = {k: v for k, v in {"q": f.q, "org": f.org, "cluster": f.cluster, "tier": tier,
                                        "min_score": p.get("min_score", ""), "sort": sort}.items() if v}
            orgs = await self.orgs()
            return self.render(request, "accounts.html", s, rows=rows, filters=params, tiers=ACTIONS,
                               sorts=list(q.SORTS), orgs=orgs, tier_of=self.tier_of,
                               next_url=("/console/accounts?" + urlencode({**params, "after": nxt})) if nxt else None,
                               first_url="/console/accounts?" + urlencode(params) if f.after else None,
                               sort_url=lambda k: "/console/accounts?" + urlencode({**params, "sort": k}))
        return await self._page(request, build)

    async def orgs(self) -> list[str]:
        """The org filter's suggestions, re-read at most once a minute."""
        now = time.monotonic()
        if now - self._orgs[0] > 60.0:
            self._orgs = (now, await self.read(q.orgs))
        return self._orgs[1]

    async def account(self, request: Request) -> Response:
        aid = request.path_params["account_id"]

        async def build(s: Session) -> Response:
            if not _ID.match(aid):
                raise _Refused(404, "no such account")
            try:
                d = await self.read(q.account_detail, aid, request.query_params.get("before", "")[:400])
            except ValueError as exc:
                raise _Refused(400, f"bad page cursor: {exc}") from exc
            if d is None:
                raise _Refused(404, f"no account {aid!r}")
            acct = self.app.accounts.get(aid)
            explain = self.app.policy.explain(acct[0] if acct else AccountInfo(aid))
            hours = d["hours"]
            charts = {"chart-account": {"x": [h["hour"] for h in hours], "series": [
                {"label": "requests", "colour": "#2c7be5", "values": [h["requests"] for h in hours]},
                {"label": "refused", "colour": "#f0ad4e", "values": [h["refused"] for h in hours]},
                {"label": "max score", "colour": "#d9534f", "scale": "score",
                 "values": [h["max_score"] for h in hours]}]}}
            from stillhouse.guard.detect.account import FEATURE_HELP

            signals = [(name, value, explain_signal(name, FEATURE_HELP)) for name, value in d["stats"]["reasons"]]
            return self.render(request, "account.html", s, aid=aid, d=d, explain=explain, charts=charts,
                               signals=signals, actions=ACCOUNT_ACTIONS, ok=request.query_params.get("ok", ""),
                               redact=self.config.redact)
        return await self._page(request, build)

    async def clusters(self, request: Request) -> Response:
        async def build(s: Session) -> Response:
            return self.render(request, "clusters.html", s, rows=await self.read(q.clusters))
        return await self._page(request, build)

    async def cluster(self, request: Request) -> Response:
        cid = request.path_params["cluster_id"]

        async def build(s: Session) -> Response:
            if not _ID.match(cid):
                raise _Refused(404, "no such cluster")
            d = await self.read(q.cluster_detail, cid)
            if d is None:
                raise _Refused(404, f"no cluster {cid!r}")
            return self.render(request, "cluster.html", s, d=d, graph=layout(d["members"], d["hubs"]),
                               tier_of=self.tier_of)
        return await self._page(request, build)

    async def review_page(self, request: Request) -> Response:
        async def build(s: Session) -> Response:
            try:
                items, nxt, total = await self.read(q.review_queue, request.query_params.get("after", "")[:400])
            except ValueError as exc:
                raise _Refused(400, f"bad page cursor: {exc}") from exc
            done = await self.read(q.recent_reviews)
            return self.render(request, "review.html", s, items=items, total=total, done=done,
                               next_url=f"/console/review?{urlencode({'after': nxt})}" if nxt else None,
                               ok=request.query_params.get("ok", ""), tier_of=self.tier_of)
        return await self._page(request, build)

    async def audit(self, request: Request) -> Response:
        async def build(s: Session) -> Response:
            try:
                rows, nxt = await self.read(q.audit_page, request.query_params.get("after", "")[:400])
            except ValueError as exc:
                raise _Refused(400, f"bad page cursor: {exc}") from exc
            return self.render(request, "audit.html", s, rows=rows,
                               next_url=f"/console/audit?{urlencode({'after': nxt})}" if nxt else None)
        return await self._page(request, build)

    async def labels(self, request: Request) -> Response:
        if self.session(request) is None:
            return self.login_redirect(request)
        rows = await self.app.db(self.app.store.labels)
        body = "".join(json.dumps(label_json(r)) + "\n" for r in rows)
        return Response(body, 200, media_type="application/x-ndjson",
                        headers={"content-disposition": 'attachment; filename="labels.jsonl"'})

    # -- actions --------------------------------------------------------------------------
    async def account_action(self, request: Request) -> Response:
        aid = request.path_params["account_id"]
        s = None
        try:
            s, form = await self.checked_post(request)
            if not _ID.match(aid):
                raise _Refused(404, "no such account")
            op = form.get("op", "")
            await act(self.app, s.name, aid, op, form.get("reason", ""))
        except (_Refused, ActionError, StoreUnavailable) as exc:
            return self.error(request, s, *_refusal(exc))
        return RedirectResponse(f"/console/accounts/{aid}?ok={op}", 303)

    async def review_action(self, request: Request) -> Response:
        did = request.path_params["decision_id"]
        s = None
        try:
            s, form = await self.checked_post(request)
            if not _ID.match(did):
                raise _Refused(404, "no such decision")
            op = form.get("op", "")
            if op in VERDICTS:
                await review(self.app, s.name, did, op, form.get("reason", ""))
            elif op in ACCOUNT_ACTIONS:
                d = await self.app.db(self.app.store.get_decision, did)
                await act(self.app, s.name, d.target, op, form.get("reason", ""))
            else:
                raise _Refused(400, f"unknown action {op!r}")
        except (_Refused, ActionError, StoreUnavailable) as exc:
            return self.error(request, s, *_refusal(exc))
        target = self.safe_next(form.get("next"), "/console/review").split("?", 1)[0]
        return RedirectResponse(f"{target}?ok={op}", 303)


def _refusal(exc: Exception) -> tuple[int, str]:
    """The status and message a refused console action answers with (nothing was changed)."""
    if isinstance(exc, StoreUnavailable):
        return 503, f"the store is unavailable, nothing was changed: {exc}"
    return exc.status, str(exc)  # type: ignore[attr-defined]  # _Refused and ActionError carry a status

def explain_signal(name: str, help_: dict[str, str]) -> str:
    """What a verdict's reason means, in words (``cluster:x`` and ``link:x`` reasons included)."""
    if name.startswith("link:"):
        return f"the cluster's members share {name[5:]} (weight summed over linked pairs)"
    base = name.split(":", 1)[1] if name.startswith("cluster:") else name
    text = help_.get(base, "")
    if name.startswith("cluster:"):
        return f"pooled over the account's cluster: {text}" if text else "pooled over the account's cluster"
    if name.endswith("_count"):
        return f"count evidence: {help_.get(name[:-6], name)}"
    return text or "detector signal"
