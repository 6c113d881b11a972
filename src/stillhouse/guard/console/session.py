"""Console sessions: a signed, short-lived cookie and a CSRF token bound to it.

A login (the admin token, typed into a form, never in a URL) yields a :class:`Session`: a random
id, the analyst's name, an expiry and a CSRF token. It travels as one cookie,
``base64url(JSON) "." base64url(HMAC-SHA256)``, set ``HttpOnly; SameSite=Strict; Path=/console``
(``Secure`` when configured). The signing key is random per guard process, so a restart or
another replica ends every session (log in again). Logging out revokes the id in memory until
it would have expired anyway.

Every state-changing form carries the session's CSRF token in a hidden field; the server
compares it in constant time (:meth:`SessionSigner.check_csrf`). The login form itself uses a
double-submit token: a random value in a short-lived cookie and in the form, which must agree.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

COOKIE = "sh_console"
LOGIN_COOKIE = "sh_login"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    """A logged-in analyst."""

    sid: str
    name: str
    """Who acts: the name typed at login (kept in the audit trail)."""
    expires: float
    csrf: str


class SessionSigner:
    """Issues and checks session cookies with a per-process key."""

    def __init__(self, lifetime_s: float, key: bytes | None = None, clock: object = time.time):
        self.lifetime_s = lifetime_s
        self._key = key or secrets.token_bytes(32)
        self._clock = clock
        self._revoked: dict[str, float] = {}

    def _now(self) -> float:
        return float(self._clock())  # type: ignore[operator]

    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self._key, payload, hashlib.sha256).digest())

    def issue(self, name: str) -> tuple[Session, str]:
        """A new session and its cookie value."""
        s = Session(secrets.token_urlsafe(16), name, self._now() + self.lifetime_s, secrets.token_urlsafe(24))
        payload = json.dumps({"i": s.sid, "n": s.name, "e": s.expires, "c": s.csrf}, separators=(",", ":")).encode()
        return s, f"{_b64(payload)}.{self._sign(payload)}"

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie holds, or None (missing, forged, expired or logged out)."""
        if not cookie or "." not in cookie or len(cookie) > 4096:
            return None
        body, sig = cookie.rsplit(".", 1)
        try:
            payload = _unb64(body)
            if not hmac.compare_digest(self._sign(payload), sig):
                return None
            d = json.loads(payload)
            s = Session(str(d["i"]), str(d["n"]), float(d["e"]), str(d["c"]))
        except (ValueError, KeyError, TypeError):
            return None
        if s.expires <= self._now() or s.sid in self._revoked:
            return None
        return s

    def revoke(self, s: Session) -> None:
        now = self._now()
        self._revoked = {k: v for k, v in self._revoked.items() if v > now}
        self._revoked[s.sid] = s.expires

    @staticmethod
    def check_csrf(s: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(s.csrf.encode(), (token or "").encode())


def cookie_header(name: str, value: str, max_age: float, secure: bool) -> str:
    """A Set-Cookie value for the console's cookies (``max_age`` 0 deletes it)."""
    parts = [f"{name}={value}", "Path=/console", f"Max-Age={int(max_age)}", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)
