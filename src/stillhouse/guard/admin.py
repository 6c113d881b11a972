"""The guard's admin API, under ``/admin/``, behind its own token (``Authorization: Bearer <admin token>``).

Endpoints (JSON in and out; ``stillhouse guard admin ...`` wraps each one):

    POST /admin/accounts                       create or update an account (org, signup_path, country,
                                               payment_fingerprint → stored as SHA-256, limits)
    GET  /admin/accounts                       list accounts
    GET  /admin/accounts/{id}                  one account, its keys and its current decision
    POST /admin/accounts/{id}/keys             issue a key (the only time the key is shown)
    GET  /admin/accounts/{id}/keys             list its keys (ids and times, never secrets or hashes)
    POST /admin/keys/{key_id}/revoke           revoke: the next request with it gets 401
    POST /admin/keys/{key_id}/rotate           revoke and issue a replacement
    GET  /admin/decisions?target=&active=      decisions with their reasons and signals
    POST /admin/decisions                      set a manual decision {scope, target, action, reason}
    POST /admin/decisions/{id}/clear           reverse a decision
    GET  /admin/traffic?account_id=&limit=     the latest traffic records as stored (redacted per config)
    GET  /admin/labels                         reviewed accounts as labels (the console's review verdicts)
    GET  /admin/stats                          log writer state (store up/down, spooled, replayed)
    GET  /admin/detector                       the loaded detector (directory, thresholds) and its reloads
    POST /admin/detector/reload                load the model GuardConfig.detector_dir points to now, its
                                               window rebuilt from the log (guard/reload.py); 409 without a
                                               detector or while one runs, 422 if it holds no fitted model

Admin changes are written to the store synchronously (503 while it is down) and take
effect in this replica immediately. Decisions set or cleared here land in the audit trail
(actor ``by`` or "admin-api", with the account's decision before and after), as the console's do.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from stillhouse.guard.config import sha256_hex
from stillhouse.guard.events import ACTIONS, AccountInfo
from stillhouse.guard.store import AccountLimits, NotFound, StoreUnavailable
from stillhouse.http.asgi import Receive, RequestError, Scope, Send, content_length, loads_strict, read_body

if TYPE_CHECKING:
    from stillhouse.guard.app import GuardApp

_ID = re.compile(r"^[A-Za-z0-9_.@:\-]{1,128}$")
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/admin/accounts$"), "create_account"),
    ("GET", re.compile(r"^/admin/accounts$"), "list_accounts"),
    ("GET", re.compile(r"^/admin/accounts/(?P<id>[^/]+)$"), "get_account"),
    ("POST", re.compile(r"^/admin/accounts/(?P<id>[^/]+)/keys$"), "issue_key"),
    ("GET", re.compile(r"^/admin/accounts/(?P<id>[^/]+)/keys$"), "list_keys"),
    ("POST", re.compile(r"^/admin/keys/(?P<id>[^/]+)/revoke$"), "revoke_key"),
    ("POST", re.compile(r"^/admin/keys/(?P<id>[^/]+)/rotate$"), "rotate_key"),
    ("GET", re.compile(r"^/admin/decisions$"), "list_decisions"),
    ("POST", re.compile(r"^/admin/decisions$"), "set_decision"),
    ("POST", re.compile(r"^/admin/decisions/(?P<id>[^/]+)/clear$"), "clear_decision"),
    ("GET", re.compile(r"^/admin/traffic$"), "traffic"),
    ("GET", re.compile(r"^/admin/labels$"), "labels"),
    ("GET", re.compile(r"^/admin/stats$"), "stats"),
    ("GET", re.compile(r"^/admin/detector$"), "detector"),
    ("POST", re.compile(r"^/admin/detector/reload$"), "reload_detector"),
]


class AdminError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def _account_json(info: AccountInfo, limits: AccountLimits) -> dict[str, Any]:
    return {**dataclasses.asdict(info), "limits": dataclasses.asdict(limits)}


def _opt_str(body: dict[str, Any], name: str) -> str:
    v = body.get(name, "")
    if v is None:
        return ""
    if not isinstance(v, str) or len(v) > 512:
        raise AdminError(400, f"'{name}' must be a string of at most 512 characters", "invalid_field", name)
    return v


class AdminAPI:
    """Handles ``/admin/*`` for one GuardApp."""

    def __init__(self, app: GuardApp):
        self.app = app

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        from stillhouse.guard.app import error_body, send_json

        try:
            token = b""
            for k, v in scope["headers"]:
                if k == b"authorization":
                    token = v
            tok = token[7:].strip().decode("latin-1") if token[:7].lower() == b"bearer " else ""
            if not tok or not self.app.config.check_admin_token(tok):
                raise AdminError(401, "admin token missing or wrong: send 'Authorization: Bearer <admin token>'",
                                 "invalid_admin_token")
            method, path = scope["method"], scope["path"]
            for m, pattern, name in _ROUTES:
                match = pattern.match(path)
                if match and m == method:
                    break
            else:
                if any(p.match(path) for _, p, _ in _ROUTES):
                    raise AdminError(405, f"{method} is not allowed on {path}", "method_not_allowed")
                raise AdminError(404, f"unknown admin path {path}", "not_found")
            body: dict[str, Any] = {}
            if method == "POST":
                try:
                    limit = self.app.config.max_body_bytes
                    raw = await read_body(receive, limit, content_length(scope["headers"]))
                    if raw.strip():
                        body = loads_strict(raw)
                except RequestError as exc:  # 413, 499, or 400: not JSON, NaN/Infinity, too deep
                    raise AdminError(exc.status, f"admin request: {exc.message}", exc.code,
                                     exc.param) from None
                if body is None:
                    body = {}
                if not isinstance(body, dict):
                    raise AdminError(400, "the body must be a JSON object", "invalid_json")
            query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
            ident = match.groupdict().get("id")
            if ident is not None and not _ID.match(ident):
                raise AdminError(400, f"bad id {ident!r}", "invalid_id")
            status, out = await getattr(self, name)(body, query, ident)
            await send_json(send, status, out)
        except AdminError as exc:
            await send_json(send, exc.status, error_body(str(exc), "invalid_request_error", exc.code, exc.param))
        except NotFound as exc:
            await send_json(send, 404, error_body(str(exc), "invalid_request_error", "not_found"))
        except StoreUnavailable as exc:
            await send_json(send, 503, error_body(f"the store is unavailable: {exc}", "server_error",
                                                  "store_unavailable"), [(b"retry-after", b"5")])

    # -- accounts -----------------------------------------------------------------------
    async def create_account(self, body: dict[str, Any], q: dict[str, str], _: str | None) -> tuple[int, Any]:
        aid = body.get("account_id") or f"acct_{secrets.token_hex(6)}"
        if not isinstance(aid, str) or not _ID.match(aid):
            raise AdminError(400, "'account_id' must be 1-128 characters of A-Z a-z 0-9 _ . @ : -",
                             "invalid_field", "account_id")
        fp = _opt_str(body, "payment_fingerprint")
        if fp and not re.fullmatch(r"[0-9a-f]{64}", fp):
            fp = sha256_hex(fp)  # never keep card-derived data as given
        lim_in = body.get("limits") or {}
        if not isinstance(lim_in, dict):
            raise AdminError(400, "'limits' must be an object", "invalid_field", "limits")
        known = {f.name for f in dataclasses.fields(AccountLimits)}
        if set(lim_in) - known:
            raise AdminError(400, f"unknown limits {sorted(set(lim_in) - known)}; known: {sorted(known)}",
                             "invalid_field", "limits")
        for k, v in lim_in.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise AdminError(400, f"limits.{k} must be an integer >= 0 or null", "invalid_field", f"limits.{k}")
        existing = self.app.accounts.get(aid)
        info = AccountInfo(aid, _opt_str(body, "org"), _opt_str(body, "signup_path"), _opt_str(body, "country"),
                           fp, existing[0].created_at if existing else self.app.clock())
        limits = AccountLimits(**lim_in)
        await self.app.db(self.app.store.put_account, info, limits)
        self.app.accounts[aid] = (info, limits)
        self.app._limits.clear()
        self.app.policy._cache.pop(aid, None)
        return (200 if existing else 201), _account_json(info, limits)

    async def list_accounts(self, body: dict[str, Any], q: dict[str, str], _: str | None) -> tuple[int, Any]:
        rows = await self.app.db(self.app.store.list_accounts)
        return 200, {"data": [_account_json(a, lim) for a, lim in rows]}

    async def get_account(self, body: dict[str, Any], q: dict[str, str], aid: str | None) -> tuple[int, Any]:
        info, limits = await self.app.db(self.app.store.get_account, aid)
        keys = await self.app.db(self.app.store.list_keys, aid)
        return 200, {**_account_json(info, limits), "keys": [self._key_json(k) for k in keys],
                     "decision": self.app.policy.explain(info)}

    # -- keys ---------------------------------------------------------------------------
    @staticmethod
    def _key_json(k: Any) -> dict[str, Any]:
        return {"key_id": k.key_id, "account_id": k.account_id, "created_at": k.created_at,
                "revoked_at": k.revoked_at, "live": k.revoked_at is None}

    async def issue_key(self, body: dict[str, Any], q: dict[str, str], aid: str | None) -> tuple[int, Any]:
        issued = await self.app.db(self.app.keys.issue, aid, self.app.clock())
        return 201, {"key_id": issued.key_id, "account_id": issued.account_id, "key": issued.key,
                     "note": "store this key now: the guard keeps only its hash"}

    async def list_keys(self, body: dict[str, Any], q: dict[str, str], aid: str | None) -> tuple[int, Any]:
        await self.app.db(self.app.store.get_account, aid)
        keys = await self.app.db(self.app.store.list_keys, aid)
        return 200, {"data": [self._key_json(k) for k in keys]}

    async def revoke_key(self, body: dict[str, Any], q: dict[str, str], kid: str | None) -> tuple[int, Any]:
        row = await self.app.db(self.app.keys.revoke, kid, self.app.clock())
        return 200, self._key_json(row)

    async def rotate_key(self, body: dict[str, Any], q: dict[str, str], kid: str | None) -> tuple[int, Any]:
        try:
            issued = await self.app.db(self.app.keys.rotate, kid, self.app.clock())
        except NotFound as exc:
            if "already revoked" in str(exc):
                raise AdminError(409, str(exc), "key_revoked") from exc
            raise
        return 201, {"key_id": issued.key_id, "account_id": issued.account_id, "key": issued.key,
                     "replaces": kid, "note": "store this key now: the guard keeps only its hash"}

    # -- decisions ----------------------------------------------------------------------
    async def list_decisions(self, body: dict[str, Any], q: dict[str, str], _: str | None) -> tuple[int, Any]:
        active = q.get("active", "").lower() in ("1", "true", "yes")
        rows = await self.app.db(self.app.store.list_decisions, q.get("target"), active)
        return 200, {"data": [dataclasses.asdict(r) for r in rows]}

    async def set_decision(self, body: dict[str, Any], q: dict[str, str], _: str | None) -> tuple[int, Any]:
        scope = body.get("scope", "account")
        action = body.get("action")
        target = body.get("target")
        if scope not in ("account", "cluster"):
            raise AdminError(400, "'scope' must be 'account' or 'cluster'", "invalid_field", "scope")
        if action not in ACTIONS:
            raise AdminError(400, f"'action' must be one of {list(ACTIONS)}", "invalid_field", "action")
        if not isinstance(target, str) or not _ID.match(target):
            raise AdminError(400, "'target' must be an account id or cluster id", "invalid_field", "target")
        if scope == "account" and target not in self.app.accounts:
            await self.app.db(self.app.store.get_account, target)  # NotFound → 404
        at_least = body.get("at_least", False)
        if not isinstance(at_least, bool):
            raise AdminError(400, "'at_least' must be true (at least this action: the detector and the rules may "
                                  "still go harsher) or false (exactly this action, the default)",
                             "invalid_field", "at_least")
        by = _opt_str(body, "by") or "admin-api"
        before = self._state(target) if scope == "account" else {}
        row = self.app.policy.manual(scope, target, action, _opt_str(body, "reason"), by, "" if at_least else None)
        await self.app.db(self.app.store.add_decision, row)
        self.app.policy.apply_row(row)
        self.app.metrics.decision(row)
        await self._audit(by, f"decision:{action}", target, row.reason, before)
        return 201, dataclasses.asdict(row)

    def _state(self, target: str) -> dict[str, Any]:
        from stillhouse.guard.console.actions import state

        return state(self.app, target)

    async def _audit(self, actor: str, action: str, target: str, reason: str, before: dict[str, Any]) -> None:
        import uuid

        from stillhouse.guard.store import AuditRow

        after = self._state(target) if before else {}
        await self.app.db(self.app.store.add_audit, AuditRow(uuid.uuid4().hex, self.app.clock(), actor, action,
                                                             target, reason, before, after))

    async def clear_decision(self, body: dict[str, Any], q: dict[str, str], did: str | None) -> tuple[int, Any]:
        by = _opt_str(body, "by") or "admin-api"
        old = await self.app.db(self.app.store.get_decision, did)
        before = self._state(old.target) if old.scope == "account" else {}
        row = await self.app.db(self.app.store.clear_decision, did, self.app.clock(), by)
        self.app.policy.apply_row(row)
        await self._audit(by, "decision:clear", row.target, f"cleared {did}", before)
        return 200, dataclasses.asdict(row)

    # -- traffic and state --------------------------------------------------------------
    async def traffic(self, body: dict[str, Any], q: dict[str, str], _: str | None) -> tuple[int, Any]:
        try:
            limit = int(q.get("limit", "100"))
        except ValueError as exc:
            raise AdminError(400, "'limit' must be an integer", "invalid_field", "limit") from exc
        limit = max(1, min(limit, 10000))
        await self.app.writer.flush()
        rows = await self.app.db(self.app.store.read_records, q.get("account_id"), None, limit, True)
        return 200, {"data": [dataclasses.asdict(r) for r in rows]}

    async def labels(self, body: dict[str, Any], q: dict[str, str], _: str | None) -> tuple[int, Any]:
        from stillhouse.guard.console.actions import label_json

        rows = await self.app.db(self.app.store.labels)
        return 200, {"data": [label_json(r) for r in rows]}

    async def detector(self, body: dict[str, Any], q: dict[str, str], _: str | None) -> tuple[int, Any]:
        return 200, self.app.reloader.state()

    async def reload_detector(self, body: dict[str, Any], q: dict[str, str], _: str | None) -> tuple[int, Any]:
        import uuid

        from stillhouse.guard.reload import ReloadError
        from stillhouse.guard.store import AuditRow

        before = self.app.reloader.state()["loaded"]
        try:
            out = await self.app.reloader.reload()
        except ReloadError as exc:
            raise AdminError(exc.status, str(exc), "detector_reload_conflict" if exc.status == 409
                             else "detector_reload_failed") from exc
        after = self.app.reloader.state()["loaded"]
        await self.app.db(self.app.store.add_audit, AuditRow(
            uuid.uuid4().hex, self.app.clock(), _opt_str(body, "by") or "admin-api", "detector:reload", "detector",
            f"reloaded from {out.get('directory')}", before, after))
        return 200, out

    async def stats(self, body: dict[str, Any], q: dict[str, str], _: str | None) -> tuple[int, Any]:
        return 200, {"log": self.app.writer.stats(), "accounts": len(self.app.accounts),
                     "live_keys": sum(1 for r in self.app.keys.rows() if r.revoked_at is None),
                     "active_decisions": len(self.app.policy.active()), "upstream_calls": self.app.upstream_calls}
