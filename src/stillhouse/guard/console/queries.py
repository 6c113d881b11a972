"""The console's read queries: every page reads indexed rows or the pre-aggregated counters.

Nothing here scans the traffic log: the overview reads ``traffic_hourly``, lists read
``account_stats`` (indexed on score, requests and last seen), an account's timeline reads
``account_hourly`` by its primary key, and its sample requests read ``traffic`` through the
``(account_id, ts)`` index with a LIMIT. Lists page with keyset cursors (``after=value|id``),
never OFFSET, so page 1,000 costs what page 1 costs. ``stillhouse bench console`` measures
each page over a log of a million records on SQLite and PostgreSQL.

All functions take a ``SqlStore`` (the console opens its own connection, so reads never wait
behind the log writer) and return plain dicts and lists for the templates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from stillhouse.guard.policy import is_floor
from stillhouse.guard.store import SqlStore

PAGE = 50
TEXT_LIMIT = 4000
"""Characters of a sample request's prompt and answer read from the log (the rest is counted, not read)."""
TIMELINE_HOURS = 24 * 14
SORTS = {
    "score": "s.score",
    "requests": "s.requests",
    "last_seen": "s.last_ts",
    "account": "s.account_id",
}
"""Sort keys of the account list (each has an index with account_id as its tie-breaker)."""
_ACCOUNT_COLS = ("account_id", "requests", "prompt_tokens", "completion_tokens", "errors", "refused", "first_ts",
                 "last_ts", "score", "max_score", "cluster_id", "reasons", "org", "country", "signup_path")


def _account_row(row: tuple[Any, ...]) -> dict[str, Any]:
    d = dict(zip(_ACCOUNT_COLS, row, strict=True))
    d["reasons"] = _json(d["reasons"], [])
    d["org"] = d["org"] or ""
    d["country"] = d["country"] or ""
    d["signup_path"] = d["signup_path"] or ""
    return d


def _json(text: Any, default: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else default
    except ValueError:
        return default


_SELECT_ACCOUNTS = ("SELECT s.account_id, s.requests, s.prompt_tokens, s.completion_tokens, s.errors, s.refused, "
                    "s.first_ts, s.last_ts, s.score, s.max_score, s.cluster_id, s.reasons, a.org, a.country, "
                    "a.signup_path FROM account_stats s LEFT JOIN accounts a ON a.account_id = s.account_id")


# -- overview --------------------------------------------------------------------------------
def overview(store: SqlStore, days: float = 7.0) -> dict[str, Any]:
    """Hourly series over the last ``days`` of the log, all-time totals, top accounts, decisions per hour."""
    latest = store.fetch("SELECT MAX(hour) FROM traffic_hourly")[0][0]
    out: dict[str, Any] = {"hours": [], "totals": {}, "top_score": [], "top_volume": [], "decisions": {}}
    t = store.fetch("SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(prompt_tokens), 0), "
                    "COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(errors), 0), COALESCE(SUM(refused), 0), "
                    "COALESCE(SUM(n_throttle), 0), COALESCE(SUM(n_degrade), 0), COALESCE(SUM(n_block), 0) "
                    "FROM traffic_hourly")[0]
    out["totals"] = dict(zip(("requests", "prompt_tokens", "completion_tokens", "errors", "refused", "throttled",
                              "degraded", "blocked"), map(int, t)))
    out["accounts"] = int(store.fetch("SELECT COUNT(*) FROM account_stats")[0][0])
    if latest is not None:
        start = float(latest) - days * 86400.0
        rows = store.fetch("SELECT hour, requests, prompt_tokens, completion_tokens, errors, refused, n_allow, "
                           "n_throttle, n_degrade, n_block FROM traffic_hourly WHERE hour > ? ORDER BY hour", (start,))
        out["hours"] = [dict(zip(("hour", "requests", "prompt_tokens", "completion_tokens", "errors", "refused",
                                  "allow", "throttle", "degrade", "block"), (float(r[0]), *map(int, r[1:]))))
                        for r in rows]
        per: dict[float, dict[str, int]] = {}
        for created, action in store.fetch("SELECT created_at, action FROM decisions WHERE created_at > ? "
                                           "AND cleared_by NOT LIKE ?", (start, "detector: superseded%")):
            h = float(int(created // 3600) * 3600)
            per.setdefault(h, {}).setdefault(action, 0)
            per[h][action] += 1
        out["decisions"] = per
    out["top_score"] = [_account_row(r) for r in store.fetch(
        _SELECT_ACCOUNTS + " ORDER BY s.score DESC, s.account_id DESC LIMIT 10")]
    out["top_volume"] = [_account_row(r) for r in store.fetch(
        _SELECT_ACCOUNTS + " ORDER BY s.requests DESC, s.account_id DESC LIMIT 10")]
    return out


# -- accounts --------------------------------------------------------------------------------
@dataclass
class AccountFilter:
    """What the account list shows; every field comes from the page's query string."""

    q: str = ""
    """Substring of the account id or org (case-insensitive)."""
    org: str = ""
    cluster: str = ""
    min_score: float | None = None
    sort: str = "score"
    after: str = ""
    """Keyset cursor: ``<sort value>|<account id>`` of the last row of the previous page."""
    ids: list[str] | None = None
    """Only these accounts (the tier filter, resolved by the caller from the policy in memory)."""
    exclude: list[str] = field(default_factory=list)
    """Never these accounts (the tier filter for 'allow')."""


def _like(text: str) -> str:
    return "%" + text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def accounts_page(store: SqlStore, f: AccountFilter, page: int = PAGE) -> tuple[list[dict[str, Any]], str | None]:
    """One page of accounts and the cursor of the next page (None on the last)."""
    col = SORTS[f.sort]
    where: list[str] = []
    args: list[Any] = []
    if f.q:
        where.append("(LOWER(s.account_id) LIKE ? ESCAPE '\\' OR LOWER(a.org) LIKE ? ESCAPE '\\')")
        args += [_like(f.q), _like(f.q)]
    if f.org:
        where.append("a.org = ?")
        args.append(f.org)
    if f.cluster:
        where.append("s.cluster_id = ?")
        args.append(f.cluster)
    if f.min_score is not None:
        where.append("s.score >= ?")
        args.append(f.min_score)
    if f.ids is not None:
        if not f.ids:
            return [], None
        where.append(f"s.account_id IN ({','.join('?' * len(f.ids))})")
        args += f.ids
    if f.exclude:
        where.append(f"s.account_id NOT IN ({','.join('?' * len(f.exclude))})")
        args += f.exclude
    desc = f.sort != "account"
    if f.after:
        value, _, aid = f.after.rpartition("|")
        if f.sort == "account":
            where.append("s.account_id > ?")
            args.append(aid)
        else:
            v = float(value)
            # the leading ``<=`` bounds the index range (an OR alone makes SQLite scan)
            where.append(f"{col} <= ? AND ({col} < ? OR s.account_id < ?)")
            args += [v, v, aid]
    sql = _SELECT_ACCOUNTS + (" WHERE " + " AND ".join(where) if where else "")
    sql += f" ORDER BY {col} DESC, s.account_id DESC" if desc else " ORDER BY s.account_id"
    rows = [_account_row(r) for r in store.fetch(sql + f" LIMIT {int(page) + 1}", args)]
    nxt = None
    if len(rows) > page:
        rows = rows[:page]
        last = rows[-1]
        key = {"score": last["score"], "requests": last["requests"], "last_seen": last["last_ts"],
               "account": ""}[f.sort]
        nxt = f"{key!r}|{last['account_id']}" if f.sort != "account" else f"|{last['account_id']}"
    return rows, nxt


def orgs(store: SqlStore, limit: int = 200) -> list[str]:
    """The most common orgs (the filter's suggestions)."""
    return [r[0] for r in store.fetch("SELECT org FROM accounts WHERE org <> '' GROUP BY org "
                                      f"ORDER BY COUNT(*) DESC, org LIMIT {int(limit)}")]


# -- one account -----------------------------------------------------------------------------
def _sample(row: tuple[Any, ...]) -> dict[str, Any]:
    (request_id, ts, key_id, ip, ua, model, params, messages, mlen, response, rlen, pt, ct, latency, status,
     decision, reason) = row
    return {"request_id": request_id, "ts": ts, "key_id": key_id, "client_ip": ip, "user_agent": ua, "model": model,
            "params": _json(params, {}), "prompt": prompt_text(messages), "prompt_chars": int(mlen),
            "response": response, "response_chars": int(rlen), "prompt_tokens": pt, "completion_tokens": ct,
            "latency_ms": latency, "status": status, "decision": decision, "decision_reason": reason}


def prompt_text(messages_json: str) -> str:
    """The prompt as ``role: text`` lines from the stored messages JSON (or its first characters as stored,
    when it was cut at ``TEXT_LIMIT`` and is no longer valid JSON)."""
    msgs = _json(messages_json, None)
    if not isinstance(msgs, list):
        return messages_json
    lines = []
    for m in msgs:
        if not isinstance(m, dict):
            lines.append(json.dumps(m))
            continue
        c = m.get("content")
        if isinstance(c, list):
            c = " ".join(p.get("text", "") for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
        lines.append(f"{m.get('role', '?')}: {c if isinstance(c, str) else json.dumps(c)}")
    return "\n".join(lines)


def account_detail(store: SqlStore, account_id: str, before: str = "") -> dict[str, Any] | None:
    """Everything the account page shows, or None for an unknown account."""
    rows = store.fetch(_SELECT_ACCOUNTS + " WHERE s.account_id = ?", (account_id,))
    info = store.fetch("SELECT org, signup_path, country, payment_fingerprint, created_at, limits FROM accounts "
                       "WHERE account_id = ?", (account_id,))
    if not rows and not info:
        return None
    stats = _account_row(rows[0]) if rows else _account_row((account_id, 0, 0, 0, 0, 0, None, 0, 0.0, 0.0, "",
                                                             "[]", None, None, None))
    out: dict[str, Any] = {"stats": stats, "info": None, "limits": {}}
    if info:
        org, signup, country, payment, created, limits = info[0]
        out["info"] = {"org": org, "signup_path": signup, "country": country, "payment_fingerprint": payment,
                       "created_at": created}
        out["limits"] = _json(limits, {})
    hourly = store.fetch("SELECT hour, requests, tokens, errors, refused, max_score FROM account_hourly "
                         f"WHERE account_id = ? ORDER BY hour DESC LIMIT {TIMELINE_HOURS}", (account_id,))
    out["hours"] = [dict(zip(("hour", "requests", "tokens", "errors", "refused", "max_score"), r))
                    for r in reversed(hourly)]
    out["keys"] = [dict(zip(("key_id", "created_at", "revoked_at"), r)) for r in store.fetch(
        "SELECT key_id, created_at, revoked_at FROM api_keys WHERE account_id = ? ORDER BY created_at DESC",
        (account_id,))]
    targets = [account_id] + ([stats["cluster_id"]] if stats["cluster_id"] else [])
    out["decisions"] = [dict(zip(("decision_id", "scope", "target", "action", "reason", "source", "created_at",
                                  "created_by", "signals", "shadow", "cleared_at", "cleared_by"), r))
                        for r in store.fetch(
        "SELECT decision_id, scope, target, action, reason, source, created_at, created_by, signals, shadow, "
        f"cleared_at, cleared_by FROM decisions WHERE target IN ({','.join('?' * len(targets))}) "
        "ORDER BY created_at DESC, decision_id DESC LIMIT 50", targets)]
    for d in out["decisions"]:
        d["signals"] = _json(d["signals"], [])
        d["floor"] = d["source"] == "manual" and is_floor(d["signals"])
    out["reviews"] = reviews_for(store, account_id)
    out["audit"] = [_audit_row(r) for r in store.fetch(
        "SELECT audit_id, ts, actor, action, target, reason, before_state, after_state FROM audit WHERE target = ? "
        "ORDER BY ts DESC, audit_id DESC LIMIT 20", (account_id,))]
    where = "account_id = ?"
    args: list[Any] = [account_id]
    if before:
        ts, _, rid = before.rpartition("|")
        where += " AND ts <= ? AND (ts < ? OR request_id < ?)"
        args += [float(ts), float(ts), rid]
    samples = store.fetch(
        f"SELECT request_id, ts, key_id, client_ip, user_agent, model, params, substr(messages, 1, {TEXT_LIMIT}), "
        f"length(messages), substr(response_text, 1, {TEXT_LIMIT}), length(response_text), prompt_tokens, "
        "completion_tokens, latency_ms, status, decision, decision_reason FROM traffic "
        f"WHERE {where} ORDER BY ts DESC, request_id DESC LIMIT 21", args)
    out["samples"] = [_sample(r) for r in samples[:20]]
    out["older"] = (f"{out['samples'][-1]['ts']!r}|{out['samples'][-1]['request_id']}"
                    if len(samples) > 20 else None)
    return out


def reviews_for(store: SqlStore, account_id: str) -> list[dict[str, Any]]:
    return [dict(zip(("review_id", "decision_id", "account_id", "verdict", "label", "reason", "actor",
                      "created_at"), r)) for r in store.fetch(
        "SELECT review_id, decision_id, account_id, verdict, label, reason, actor, created_at FROM reviews "
        "WHERE account_id = ? ORDER BY created_at DESC LIMIT 20", (account_id,))]


# -- clusters --------------------------------------------------------------------------------
def clusters(store: SqlStore, limit: int = 200) -> list[dict[str, Any]]:
    """Detector clusters (accounts sharing a ``cluster_id``), highest score first."""
    rows = store.fetch("SELECT cluster_id, COUNT(*), SUM(requests), MAX(score), MAX(max_score) FROM account_stats "
                       "WHERE cluster_id <> '' GROUP BY cluster_id ORDER BY MAX(score) DESC, cluster_id "
                       f"LIMIT {int(limit)}")
    return [dict(zip(("cluster_id", "members", "requests", "score", "max_score"), r)) for r in rows]


def cluster_detail(store: SqlStore, cluster_id: str, max_members: int = 300) -> dict[str, Any] | None:
    """A cluster's members, the infrastructure they share (what each link rests on) and the detector's reasons."""
    members = [_account_row(r) for r in store.fetch(
        _SELECT_ACCOUNTS + f" WHERE s.cluster_id = ? ORDER BY s.score DESC, s.account_id LIMIT {int(max_members)}",
        (cluster_id,))]
    if not members:
        return None
    ids = [m["account_id"] for m in members]
    marks = ",".join("?" * len(ids))
    shared: dict[tuple[str, str], set[str]] = {}
    for aid, kind, value in store.fetch(f"SELECT account_id, kind, value FROM account_links WHERE account_id IN "
                                        f"({marks})", ids):
        shared.setdefault((kind, value), set()).add(aid)
    for aid, payment in store.fetch(f"SELECT account_id, payment_fingerprint FROM accounts WHERE account_id IN "
                                    f"({marks}) AND payment_fingerprint <> ''", ids):
        shared.setdefault(("payment", payment[:16]), set()).add(aid)
    hubs = sorted(((k, v, sorted(accts)) for (k, v), accts in shared.items() if len(accts) >= 2),
                  key=lambda h: (-len(h[2]), h[0], h[1]))
    reasons: dict[str, float] = {}
    for m in members:
        for name, value in m["reasons"]:
            if isinstance(name, str) and name.startswith(("cluster:", "link:")):
                reasons[name] = max(reasons.get(name, 0.0), float(value))
    total = int(store.fetch("SELECT COUNT(*) FROM account_stats WHERE cluster_id = ?", (cluster_id,))[0][0])
    return {"cluster_id": cluster_id, "members": members, "total_members": total, "hubs": hubs,
            "reasons": sorted(reasons.items(), key=lambda kv: -kv[1])}


# -- review queue and audit ------------------------------------------------------------------
_DEC = ("decision_id", "scope", "target", "action", "reason", "source", "created_at", "created_by", "signals",
        "shadow")


def review_queue(store: SqlStore, after: str = "", page: int = PAGE) -> tuple[list[dict[str, Any]], str | None, int]:
    """Automatic decisions in force or proposed (shadow) that nobody has reviewed yet, newest first:
    (rows, next cursor, how many are pending in all)."""
    pending = ("d.source IN ('detector', 'rule') AND d.cleared_at IS NULL AND NOT EXISTS "
               "(SELECT 1 FROM reviews r WHERE r.decision_id = d.decision_id)")
    args: list[Any] = []
    cond = ""
    if after:
        ts, _, did = after.rpartition("|")
        cond = " AND d.created_at <= ? AND (d.created_at < ? OR d.decision_id < ?)"
        args = [float(ts), float(ts), did]
    rows = store.fetch("SELECT d." + ", d.".join(_DEC) + ", s.score, s.requests, s.cluster_id FROM decisions d "
                       "LEFT JOIN account_stats s ON s.account_id = d.target WHERE " + pending + cond
                       + f" ORDER BY d.created_at DESC, d.decision_id DESC LIMIT {int(page) + 1}", args)
    items = []
    for r in rows[:page]:
        d = dict(zip((*_DEC, "score", "requests", "cluster_id"), r))
        d["signals"] = _json(d["signals"], [])
        d["shadow"] = bool(d["shadow"])
        items.append(d)
    nxt = f"{items[-1]['created_at']!r}|{items[-1]['decision_id']}" if len(rows) > page else None
    total = int(store.fetch("SELECT COUNT(*) FROM decisions d WHERE " + pending)[0][0])
    return items, nxt, total


def recent_reviews(store: SqlStore, limit: int = 50) -> list[dict[str, Any]]:
    return [dict(zip(("review_id", "decision_id", "account_id", "verdict", "label", "reason", "actor",
                      "created_at"), r)) for r in store.fetch(
        "SELECT review_id, decision_id, account_id, verdict, label, reason, actor, created_at FROM reviews "
        f"ORDER BY created_at DESC, review_id DESC LIMIT {int(limit)}")]


def _audit_row(r: tuple[Any, ...]) -> dict[str, Any]:
    d = dict(zip(("audit_id", "ts", "actor", "action", "target", "reason", "before", "after"), r))
    d["before"] = _json(d["before"], {})
    d["after"] = _json(d["after"], {})
    return d


def audit_page(store: SqlStore, after: str = "", page: int = PAGE) -> tuple[list[dict[str, Any]], str | None]:
    args: list[Any] = []
    cond = ""
    if after:
        ts, _, aid = after.rpartition("|")
        cond = " WHERE ts <= ? AND (ts < ? OR audit_id < ?)"
        args = [float(ts), float(ts), aid]
    rows = [_audit_row(r) for r in store.fetch(
        "SELECT audit_id, ts, actor, action, target, reason, before_state, after_state FROM audit" + cond
        + f" ORDER BY ts DESC, audit_id DESC LIMIT {int(page) + 1}", args)]
    nxt = f"{rows[page - 1]['ts']!r}|{rows[page - 1]['audit_id']}" if len(rows) > page else None
    return rows[:page], nxt
