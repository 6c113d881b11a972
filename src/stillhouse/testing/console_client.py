"""A plain HTTP client for the operator console (cookies, forms, CSRF), for tests and `stillhouse bench console`.

    c = ConsoleClient(guard_url)
    c.login("alice", ADMIN)
    status, html = c.get("/console/accounts")
    status, html = c.post("/console/accounts/acct_1/act", {"op": "block", "reason": "campaign"})

``post`` adds the session's CSRF token (read from the last page that carried one) unless the form
already has a ``csrf`` field.
"""

from __future__ import annotations

import http.cookiejar
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:  # type: ignore[override]
        return None


class ConsoleClient:
    def __init__(self, base_url: str, follow: bool = True):
        self.base = base_url.rstrip("/")
        self.jar = http.cookiejar.CookieJar()
        handlers: list[Any] = [urllib.request.HTTPCookieProcessor(self.jar)]
        if not follow:
            handlers.append(_NoRedirect())
        self.opener = urllib.request.build_opener(*handlers)
        self.csrf = ""
        self.last_headers: dict[str, str] = {}
        self.set_cookies: list[str] = []

    def _open(self, req: urllib.request.Request) -> tuple[int, str]:
        try:
            with self.opener.open(req, timeout=30) as resp:
                status, body, headers = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            status, body, headers = exc.code, exc.read(), exc.headers
        self.last_headers = {k.lower(): v for k, v in headers.items()}
        self.set_cookies = headers.get_all("Set-Cookie") or []
        text = body.decode("utf-8", "replace")
        m = _CSRF.search(text)
        if m:
            self.csrf = m.group(1)
        return status, text

    def get(self, path: str) -> tuple[int, str]:
        return self._open(urllib.request.Request(self.base + path, method="GET"))

    def post(self, path: str, form: dict[str, str], headers: dict[str, str] | None = None) -> tuple[int, str]:
        data = dict(form)
        data.setdefault("csrf", self.csrf)
        req = urllib.request.Request(self.base + path, data=urllib.parse.urlencode(data).encode(), method="POST",
                                     headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})
        return self._open(req)

    def login(self, name: str, token: str) -> tuple[int, str]:
        self.get("/console/login")
        return self.post("/console/login", {"name": name, "token": token})

    def cookie(self, name: str) -> str | None:
        return next((c.value for c in self.jar if c.name == name), None)
