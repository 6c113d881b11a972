"""The guard's store: accounts, hashed API keys, decisions and the traffic log.

One interface, two backends, picked by the DB URL:

- ``sqlite:///path/guard.db`` — embedded default (WAL journal, one writer thread).
- ``postgresql://user@host:port/db`` — several guard replicas sharing one log (psycopg 3).

Both speak the same SQL (``?`` placeholders are rewritten to ``%s`` for psycopg) and the
same schema, so a test written for one runs unchanged on the other. All methods are
synchronous; the gateway calls them from one worker thread, never on its event loop.
Traffic-log writes are idempotent on ``request_id``, which is what lets the disk spool
be replayed without double-counting.

Open one with ``open_store(url)``; ``python -m stillhouse.guard.store URL`` prints counts.

Besides the log, the store keeps pre-aggregated counters (``traffic_hourly``, ``account_stats``,
``account_hourly``, ``account_links``; see :mod:`stillhouse.guard.rollup`) that ``write_records``
updates in the same transaction, and the operator console's ``reviews`` and ``audit`` tables.
``init`` migrates a database written before the counters existed: it creates the tables and
backfills them from the log once (recorded in ``schema_meta``).

Exception tree::

    StoreError
    ├── StoreUnavailable    the database cannot be reached or the connection broke (retry later)
    └── NotFound            an account, key or decision id that does not exist
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stillhouse.guard.events import AccountInfo, TrafficRecord
from stillhouse.guard.rollup import TIERS, batch_rollups


class StoreError(Exception):
    """Base of the store's errors."""


class StoreUnavailable(StoreError):
    """The database cannot be reached (down, connection lost, disk gone)."""


class NotFound(StoreError):
    """No row with that id."""


@dataclass
class AccountLimits:
    """Per-account overrides of the config's default limits (None = use the default)."""

    requests_per_min: int | None = None
    tokens_per_min: int | None = None
    max_concurrent_streams: int | None = None
    requests_per_day: int | None = None


@dataclass
class KeyRow:
    """An API key as stored: only its SHA-256, never the key itself."""

    key_id: str
    account_id: str
    key_hash: str
    created_at: float
    revoked_at: float | None = None
    updated_at: float = 0.0


@dataclass
class DecisionRow:
    """One policy decision, manual or automatic, with its explanation."""

    decision_id: str
    scope: str
    """"account" or "cluster"."""
    target: str
    """The account id or cluster id it applies to."""
    action: str
    reason: str
    source: str
    """"manual", "rule" or "detector"."""
    created_at: float
    created_by: str = ""
    signals: list[list[Any]] = field(default_factory=list)
    """[[signal name, value], ...]: the scores that led to it."""
    shadow: bool = False
    """Recorded in shadow mode: would have been enforced, was not."""
    cleared_at: float | None = None
    cleared_by: str = ""


@dataclass
class ReviewRow:
    """An analyst's verdict on an automatic decision: the label it gives the account."""

    review_id: str
    decision_id: str
    """The decision reviewed ("" for a label given on the account page without a decision)."""
    account_id: str
    verdict: str
    """"confirmed" (label 1: a campaign), "dismissed" or "evaluator" (label 0: benign; a known evaluator)."""
    label: int
    reason: str
    actor: str
    created_at: float


@dataclass
class AuditRow:
    """One action taken through the console or the admin API: who, when, on what, and the state before and after."""

    audit_id: str
    ts: float
    actor: str
    action: str
    target: str
    reason: str
    before: dict[str, Any]
    after: dict[str, Any]


_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS accounts (
        account_id TEXT PRIMARY KEY, org TEXT NOT NULL, signup_path TEXT NOT NULL, country TEXT NOT NULL,
        payment_fingerprint TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, limits TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
        created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION, updated_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS api_keys_updated ON api_keys (updated_at)",
    """CREATE TABLE IF NOT EXISTS decisions (
        decision_id TEXT PRIMARY KEY, scope TEXT NOT NULL, target TEXT NOT NULL, action TEXT NOT NULL,
        reason TEXT NOT NULL, source TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, created_by TEXT NOT NULL,
        signals TEXT NOT NULL, shadow INTEGER NOT NULL, cleared_at DOUBLE PRECISION, cleared_by TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS decisions_target ON decisions (target)",
    """CREATE TABLE IF NOT EXISTS traffic (
        request_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, account_id TEXT NOT NULL, key_id TEXT NOT NULL,
        client_ip TEXT NOT NULL, user_agent TEXT NOT NULL, header_fingerprint TEXT NOT NULL, model TEXT NOT NULL,
        params TEXT NOT NULL, messages TEXT NOT NULL, response_text TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL, latency_ms DOUBLE PRECISION NOT NULL, status INTEGER NOT NULL,
        decision TEXT NOT NULL, decision_reason TEXT NOT NULL, session_id TEXT NOT NULL,
        watermark_key_id TEXT NOT NULL DEFAULT '', watermark_scheme TEXT NOT NULL DEFAULT '')""",
    "CREATE INDEX IF NOT EXISTS traffic_account_ts ON traffic (account_id, ts)",
    # a window of the log in arrival order (detect/logwindow.py: fit, check, watch, detector reload)
    "CREATE INDEX IF NOT EXISTS traffic_ts ON traffic (ts, request_id)",
    # -- pre-aggregated counters (guard/rollup.py), kept by write_records --------------------
    """CREATE TABLE IF NOT EXISTS traffic_hourly (
        hour DOUBLE PRECISION PRIMARY KEY, requests BIGINT NOT NULL, prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL, errors BIGINT NOT NULL, refused BIGINT NOT NULL,
        n_allow BIGINT NOT NULL, n_throttle BIGINT NOT NULL, n_degrade BIGINT NOT NULL, n_block BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS account_stats (
        account_id TEXT PRIMARY KEY, requests BIGINT NOT NULL DEFAULT 0, prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0, errors BIGINT NOT NULL DEFAULT 0,
        refused BIGINT NOT NULL DEFAULT 0, first_ts DOUBLE PRECISION, last_ts DOUBLE PRECISION NOT NULL DEFAULT 0,
        score DOUBLE PRECISION NOT NULL DEFAULT 0, max_score DOUBLE PRECISION NOT NULL DEFAULT 0,
        cluster_id TEXT NOT NULL DEFAULT '', reasons TEXT NOT NULL DEFAULT '[]', scored_at DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS account_stats_score ON account_stats (score, account_id)",
    "CREATE INDEX IF NOT EXISTS account_stats_requests ON account_stats (requests, account_id)",
    "CREATE INDEX IF NOT EXISTS account_stats_last ON account_stats (last_ts, account_id)",
    "CREATE INDEX IF NOT EXISTS account_stats_cluster ON account_stats (cluster_id)",
    """CREATE TABLE IF NOT EXISTS account_hourly (
        account_id TEXT NOT NULL, hour DOUBLE PRECISION NOT NULL, requests BIGINT NOT NULL, tokens BIGINT NOT NULL,
        errors BIGINT NOT NULL, refused BIGINT NOT NULL, max_score DOUBLE PRECISION NOT NULL DEFAULT 0,
        PRIMARY KEY (account_id, hour))""",
    """CREATE TABLE IF NOT EXISTS account_links (
        account_id TEXT NOT NULL, kind TEXT NOT NULL, value TEXT NOT NULL, first_ts DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (account_id, kind, value))""",
    "CREATE INDEX IF NOT EXISTS account_links_value ON account_links (kind, value)",
    # -- the console's review labels and audit trail ------------------------------------------
    """CREATE TABLE IF NOT EXISTS reviews (
        review_id TEXT PRIMARY KEY, decision_id TEXT NOT NULL, account_id TEXT NOT NULL, verdict TEXT NOT NULL,
        label INTEGER NOT NULL, reason TEXT NOT NULL, actor TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS reviews_account ON reviews (account_id, created_at)",
    "CREATE INDEX IF NOT EXISTS reviews_decision ON reviews (decision_id)",
    "CREATE INDEX IF NOT EXISTS reviews_created ON reviews (created_at)",
    """CREATE TABLE IF NOT EXISTS audit (
        audit_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        target TEXT NOT NULL, reason TEXT NOT NULL, before_state TEXT NOT NULL, after_state TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts, audit_id)",
    "CREATE INDEX IF NOT EXISTS audit_target ON audit (target, ts)",
    "CREATE INDEX IF NOT EXISTS decisions_created ON decisions (created_at)",
    "CREATE INDEX IF NOT EXISTS api_keys_account ON api_keys (account_id)",
    "CREATE TABLE IF NOT EXISTS schema_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
]
ROLLUP_VERSION = "1"
"""Bump to rebuild the counter tables from the log on the next ``init`` (a change to what they count)."""

_TRAFFIC_COLS = ("request_id", "ts", "account_id", "key_id", "client_ip", "user_agent", "header_fingerprint",
                 "model", "params", "messages", "response_text", "prompt_tokens", "completion_tokens",
                 "latency_ms", "status", "decision", "decision_reason", "session_id", "watermark_key_id",
                 "watermark_scheme")
_ADDED_COLS = ("watermark_key_id", "watermark_scheme")
"""Traffic columns newer than the first schema: ``init`` adds them to an older log, and a reader that opened one
without ``init`` (a detector fit, the console, provenance) reads them as empty."""
_HOURLY_COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "errors", "refused",
                    *(f"n_{t}" for t in TIERS))
_ACCOUNT_COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "errors", "refused")
_DECISION_COLS = ("decision_id", "scope", "target", "action", "reason", "source", "created_at", "created_by",
                  "signals", "shadow", "cleared_at", "cleared_by")


def _record_row(r: TrafficRecord) -> tuple[Any, ...]:
    return (r.request_id, r.ts, r.account_id, r.key_id, r.client_ip, r.user_agent, r.header_fingerprint,
            r.model, json.dumps(r.params), json.dumps(r.messages), r.response_text, int(r.prompt_tokens),
            int(r.completion_tokens), float(r.latency_ms), int(r.status), r.decision, r.decision_reason,
            r.session_id, r.watermark_key_id, r.watermark_scheme)


def _row_record(row: tuple[Any, ...]) -> TrafficRecord:
    d = dict(zip(_TRAFFIC_COLS, row, strict=True))
    d["params"] = json.loads(d["params"])
    d["messages"] = json.loads(d["messages"])
    return TrafficRecord(**d)


def _where(conditions: list[tuple[str, Any]]) -> tuple[str, list[Any]]:
    """`` WHERE a AND b`` and its arguments from (clause, value) pairs, skipping pairs whose value is None.

    A clause with a ``?`` takes its value as the argument; one without (``cleared_at IS NULL``) takes none.
    """
    used = [(clause, value) for clause, value in conditions if value is not None]
    if not used:
        return "", []
    args = [value for clause, value in used if "?" in clause]
    return " WHERE " + " AND ".join(clause for clause, _ in used), args


def _row_decision(row: tuple[Any, ...]) -> DecisionRow:
    d = dict(zip(_DECISION_COLS, row, strict=True))
    d["signals"] = json.loads(d["signals"])
    d["shadow"] = bool(d["shadow"])
    return DecisionRow(**d)


class SqlStore:
    """Shared SQL of both backends. Subclasses provide ``_connect`` and the error mapping."""

    url: str
    _ph = "?"

    def __init__(self, url: str):
        self.url = url
        self._conn: Any = None
        self._lock = threading.RLock()
        self._missing: frozenset[str] | None = None  # _ADDED_COLS this log lacks (read once)

    # -- plumbing -----------------------------------------------------------------------
    def _connect(self) -> Any:
        raise NotImplementedError

    def _is_unavailable(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql if self._ph == "?" else sql.replace("?", "%s")

    def _run(self, fn: Any) -> Any:
        """Run ``fn(cursor)`` in one transaction; map connection failures to StoreUnavailable."""
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                cur = self._conn.cursor()
                try:
                    out = fn(cur)
                    self._conn.commit()
                    return out
                except BaseException:
                    try:
                        self._conn.rollback()
                    except Exception:  # noqa: BLE001 - the connection may be gone; reconnect next time
                        self._drop()
                    raise
                finally:
                    with contextlib.suppress(Exception):
                        cur.close()
            except StoreError:
                raise
            except Exception as exc:
                if self._is_unavailable(exc):
                    self._drop()
                    raise StoreUnavailable(f"{self.describe()}: {type(exc).__name__}: {exc}") from exc
                raise

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # already broken: nothing to close cleanly
                self._conn.close()
        self._conn = None

    def describe(self) -> str:
        """The URL without any password."""
        import re

        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", self.url)

    def init(self) -> None:
        """Create the tables if they do not exist and backfill the counters of an older database
        (idempotent; safe for several replicas)."""
        def go(cur: Any) -> None:
            for stmt in _SCHEMA:
                cur.execute(stmt)
            self._add_columns(cur)
        self._run(go)
        self._missing = None
        self.migrate()

    # -- migration ----------------------------------------------------------------------
    _hour_sql = "CAST(ts / 3600 AS INTEGER) * 3600.0"
    """The start of a record's hour in SQL (PostgreSQL rounds a CAST, so it uses floor)."""

    def _lock_migration(self, cur: Any) -> None:
        """Serialize migrations of several replicas (a transaction-scoped lock where the database has one)."""

    def migrate(self) -> bool:
        """Backfill the counter tables from the traffic log once (a database written before they
        existed, or by an older ``ROLLUP_VERSION``). Returns whether it ran."""
        sel = self._sql("SELECT value FROM schema_meta WHERE name = ?")
        if self._run(lambda cur: cur.execute(sel, ("rollup_version",)).fetchone()) == (ROLLUP_VERSION,):
            return False

        def go(cur: Any) -> bool:
            self._lock_migration(cur)
            if cur.execute(sel, ("rollup_version",)).fetchone() == (ROLLUP_VERSION,):
                return False  # another replica did it meanwhile
            self._backfill(cur)
            cur.execute(self._sql("INSERT INTO schema_meta VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
                                  "SET value = excluded.value"), ("rollup_version", ROLLUP_VERSION))
            return True
        return bool(self._run(go))

    def _backfill(self, cur: Any) -> None:
        """Rebuild every counter table from the traffic log (in the caller's transaction)."""
        from stillhouse.guard.rollup import subnet_key, ua_key

        hour = self._hour_sql
        tiers = ", ".join(f"SUM(CASE WHEN decision = '{t}' THEN 1 ELSE 0 END)" for t in TIERS)
        err = "SUM(CASE WHEN status >= 500 THEN 1 ELSE 0 END)"
        ref = "SUM(CASE WHEN status >= 400 AND status < 500 THEN 1 ELSE 0 END)"
        scores = {r[0]: r[1:] for r in cur.execute(
            "SELECT account_id, score, max_score, cluster_id, reasons, scored_at FROM account_stats").fetchall()}
        for table in ("traffic_hourly", "account_hourly", "account_links", "account_stats"):
            cur.execute(f"DELETE FROM {table}")
        cur.execute(f"INSERT INTO traffic_hourly SELECT {hour}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), "
                    f"{err}, {ref}, {tiers} FROM traffic GROUP BY {hour}")
        cur.execute(f"INSERT INTO account_hourly (account_id, hour, requests, tokens, errors, refused) "
                    f"SELECT account_id, {hour}, COUNT(*), SUM(prompt_tokens + completion_tokens), {err}, {ref} "
                    f"FROM traffic WHERE account_id <> '' GROUP BY account_id, {hour}")
        cur.execute(f"INSERT INTO account_stats (account_id, requests, prompt_tokens, completion_tokens, errors, "
                    f"refused, first_ts, last_ts) SELECT account_id, COUNT(*), SUM(prompt_tokens), "
                    f"SUM(completion_tokens), {err}, {ref}, MIN(ts), MAX(ts) FROM traffic WHERE account_id <> '' "
                    "GROUP BY account_id")
        cur.execute("INSERT INTO account_stats (account_id) SELECT account_id FROM accounts a WHERE NOT EXISTS "
                    "(SELECT 1 FROM account_stats s WHERE s.account_id = a.account_id)")
        if scores:  # keep what the detector said: it is not in the log
            cur.executemany(self._sql("UPDATE account_stats SET score = ?, max_score = ?, cluster_id = ?, "
                                      "reasons = ?, scored_at = ? WHERE account_id = ?"),
                            [(*v, k) for k, v in scores.items()])
        links: dict[tuple[str, str, str], float] = {}
        rows = cur.execute("SELECT account_id, client_ip, user_agent, header_fingerprint, MIN(ts) FROM traffic "
                           "WHERE account_id <> '' GROUP BY account_id, client_ip, user_agent, header_fingerprint")
        for aid, ip, ua, fp, ts in rows.fetchall():
            for kind, value in (("ip", ip), ("subnet", subnet_key(ip)), ("ua", ua_key(ua, fp))):
                if value:
                    key = (aid, kind, value[:300])
                    links[key] = min(ts, links.get(key, ts))
        if links:
            cur.executemany(self._sql("INSERT INTO account_links VALUES (?,?,?,?)"),
                            [(*k, v) for k, v in links.items()])

    def fetch(self, sql: str, args: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read query (``?`` placeholders on both backends). For read-only views such as the console."""
        q = self._sql(sql)
        return list(self._run(lambda cur: cur.execute(q, args).fetchall()))

    def _columns(self, cur: Any, table: str) -> set[str]:
        raise NotImplementedError

    def _add_columns(self, cur: Any) -> None:
        """Add columns that newer versions of the schema have (a log written by an older guard)."""
        have = self._columns(cur, "traffic")
        for col in _ADDED_COLS:
            if col not in have:
                cur.execute(f"ALTER TABLE traffic ADD COLUMN {col} TEXT NOT NULL DEFAULT ''")

    def _missing_cols(self) -> frozenset[str]:
        """The added traffic columns (``_ADDED_COLS``) that an older log, opened without ``init``, lacks."""
        if self._missing is None:
            have = self._run(lambda cur: self._columns(cur, "traffic"))
            self._missing = frozenset(c for c in _ADDED_COLS if have and c not in have)
        return self._missing

    def _traffic_select(self) -> str:
        """The select list of a traffic row: ``_TRAFFIC_COLS``, with ``'' AS col`` for a missing added column."""
        missing = self._missing_cols()
        return ", ".join(f"'' AS {c}" if c in missing else c for c in _TRAFFIC_COLS)

    def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        self._run(lambda cur: cur.execute("SELECT 1"))

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- accounts -----------------------------------------------------------------------
    def put_account(self, info: AccountInfo, limits: AccountLimits | None = None) -> None:
        """Insert or replace an account."""
        row = (info.account_id, info.org, info.signup_path, info.country, info.payment_fingerprint,
               info.created_at, json.dumps(asdict(limits or AccountLimits())))
        sql = self._sql("INSERT INTO accounts VALUES (?,?,?,?,?,?,?) ON CONFLICT (account_id) DO UPDATE SET "
                        "org=excluded.org, signup_path=excluded.signup_path, country=excluded.country, "
                        "payment_fingerprint=excluded.payment_fingerprint, limits=excluded.limits")
        stats = self._sql("INSERT INTO account_stats (account_id) VALUES (?) ON CONFLICT (account_id) DO NOTHING")

        def go(cur: Any) -> None:
            cur.execute(sql, row)
            cur.execute(stats, (info.account_id,))  # listed in the console before its first request
        self._run(go)

    def list_accounts(self) -> list[tuple[AccountInfo, AccountLimits]]:
        sql = "SELECT account_id, org, signup_path, country, payment_fingerprint, created_at, limits " \
              "FROM accounts ORDER BY created_at, account_id"
        rows = self._run(lambda cur: cur.execute(sql).fetchall())
        return [(AccountInfo(*r[:6]), AccountLimits(**json.loads(r[6]))) for r in rows]

    def get_account(self, account_id: str) -> tuple[AccountInfo, AccountLimits]:
        sql = self._sql("SELECT account_id, org, signup_path, country, payment_fingerprint, created_at, limits "
                        "FROM accounts WHERE account_id = ?")
        row = self._run(lambda cur: cur.execute(sql, (account_id,)).fetchone())
        if row is None:
            raise NotFound(f"no account {account_id!r}")
        return AccountInfo(*row[:6]), AccountLimits(**json.loads(row[6]))

    # -- keys ---------------------------------------------------------------------------
    def add_key(self, key: KeyRow) -> None:
        sql = self._sql("INSERT INTO api_keys VALUES (?,?,?,?,?,?)")
        self._run(lambda cur: cur.execute(sql, (key.key_id, key.account_id, key.key_hash, key.created_at,
                                                key.revoked_at, key.updated_at or key.created_at)))

    def revoke_key(self, key_id: str, ts: float) -> KeyRow:
        """Mark a key revoked (idempotent: a second revoke keeps the first time)."""
        sql = self._sql("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?), updated_at = ? WHERE key_id = ?")
        n = self._run(lambda cur: cur.execute(sql, (ts, ts, key_id)).rowcount)
        if not n:
            raise NotFound(f"no key {key_id!r}")
        return self.get_key(key_id)

    def get_key(self, key_id: str) -> KeyRow:
        sql = self._sql("SELECT key_id, account_id, key_hash, created_at, revoked_at, updated_at "
                        "FROM api_keys WHERE key_id = ?")
        row = self._run(lambda cur: cur.execute(sql, (key_id,)).fetchone())
        if row is None:
            raise NotFound(f"no key {key_id!r}")
        return KeyRow(*row)

    def list_keys(self, account_id: str | None = None, updated_since: float | None = None) -> list[KeyRow]:
        where, args = _where([("account_id = ?", account_id), ("updated_at >= ?", updated_since)])
        sql = self._sql("SELECT key_id, account_id, key_hash, created_at, revoked_at, updated_at FROM api_keys"
                        + where + " ORDER BY created_at")
        return [KeyRow(*r) for r in self._run(lambda cur: cur.execute(sql, args).fetchall())]

    # -- decisions ----------------------------------------------------------------------
    def put_decisions(self, rows: list[DecisionRow]) -> None:
        """Insert decisions, or update the cleared fields of ones already stored (replay-safe)."""
        if not rows:
            return
        sql = self._sql("INSERT INTO decisions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (decision_id) "
                        "DO UPDATE SET cleared_at = COALESCE(decisions.cleared_at, excluded.cleared_at), "
                        "cleared_by = CASE WHEN decisions.cleared_at IS NULL THEN excluded.cleared_by "
                        "ELSE decisions.cleared_by END, updated_at = excluded.updated_at")
        data = [(d.decision_id, d.scope, d.target, d.action, d.reason, d.source, d.created_at, d.created_by,
                 json.dumps(d.signals), int(d.shadow), d.cleared_at, d.cleared_by,
                 d.cleared_at if d.cleared_at is not None else d.created_at) for d in rows]
        self._run(lambda cur: cur.executemany(sql, data))

    def add_decision(self, d: DecisionRow) -> None:
        self.put_decisions([d])

    def clear_decision(self, decision_id: str, ts: float, by: str) -> DecisionRow:
        """Mark a decision cleared (reversed); idempotent."""
        sql = self._sql("UPDATE decisions SET cleared_at = COALESCE(cleared_at, ?), "
                        "cleared_by = CASE WHEN cleared_at IS NULL THEN ? ELSE cleared_by END, updated_at = ? "
                        "WHERE decision_id = ?")
        n = self._run(lambda cur: cur.execute(sql, (ts, by, ts, decision_id)).rowcount)
        if not n:
            raise NotFound(f"no decision {decision_id!r}")
        return self.get_decision(decision_id)

    def get_decision(self, decision_id: str) -> DecisionRow:
        sql = self._sql(f"SELECT {', '.join(_DECISION_COLS)} FROM decisions WHERE decision_id = ?")
        row = self._run(lambda cur: cur.execute(sql, (decision_id,)).fetchone())
        if row is None:
            raise NotFound(f"no decision {decision_id!r}")
        return _row_decision(row)

    def list_decisions(self, target: str | None = None, active_only: bool = False,
                       updated_since: float | None = None) -> list[DecisionRow]:
        where, args = _where([("target = ?", target), ("cleared_at IS NULL", True if active_only else None),
                              ("updated_at >= ?", updated_since)])
        sql = self._sql(f"SELECT {', '.join(_DECISION_COLS)} FROM decisions" + where
                        + " ORDER BY created_at, decision_id")
        return [_row_decision(r) for r in self._run(lambda cur: cur.execute(sql, args).fetchall())]

    # -- traffic log --------------------------------------------------------------------
    def write_records(self, records: list[TrafficRecord], first_write: bool = False) -> None:
        """Append records in one transaction; a request_id already stored is skipped (replay-safe), and
        counted once in the counter tables. ``first_write``: the caller guarantees none of these ids was
        written before (the log writer's own flush; a spool replay never says so), which saves the lookup."""
        if not records:
            return
        sql = self._sql(f"INSERT INTO traffic ({', '.join(_TRAFFIC_COLS)}) VALUES "
                        f"({','.join('?' * len(_TRAFFIC_COLS))}) ON CONFLICT (request_id) DO NOTHING")

        def go(cur: Any) -> None:
            fresh = records
            seen: set[str] = set()
            for i in range(0, 0 if first_write else len(records), 500):  # a replay must not count twice
                chunk = [r.request_id for r in records[i:i + 500]]
                q = self._sql(f"SELECT request_id FROM traffic WHERE request_id IN ({','.join('?' * len(chunk))})")
                seen.update(row[0] for row in cur.execute(q, chunk).fetchall())
            if seen:
                fresh = [r for r in records if r.request_id not in seen]
            if not fresh:
                return
            cur.executemany(sql, [_record_row(r) for r in fresh])
            self._add_rollups(cur, fresh)
        self._run(go)

    def _add_rollups(self, cur: Any, records: list[TrafficRecord]) -> None:
        """Add a batch's counters (see guard/rollup.py) in the caller's transaction."""
        ro = batch_rollups(records)
        cur.executemany(self._sql(
            "INSERT INTO traffic_hourly VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (hour) DO UPDATE SET "
            + ", ".join(f"{c} = traffic_hourly.{c} + excluded.{c}" for c in _HOURLY_COUNTERS)),
            [(h, *v) for h, v in ro.hourly.items()])
        if ro.accounts:
            cur.executemany(self._sql(
                "INSERT INTO account_stats (account_id, requests, prompt_tokens, completion_tokens, errors, refused, "
                "first_ts, last_ts) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (account_id) DO UPDATE SET "
                + ", ".join(f"{c} = account_stats.{c} + excluded.{c}" for c in _ACCOUNT_COUNTERS)
                + ", first_ts = CASE WHEN account_stats.first_ts IS NULL OR excluded.first_ts < account_stats.first_ts "
                  "THEN excluded.first_ts ELSE account_stats.first_ts END"
                + ", last_ts = CASE WHEN excluded.last_ts > account_stats.last_ts "
                  "THEN excluded.last_ts ELSE account_stats.last_ts END"),
                [(a, *v) for a, v in ro.accounts.items()])
            cur.executemany(self._sql(
                "INSERT INTO account_hourly (account_id, hour, requests, tokens, errors, refused) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT (account_id, hour) DO UPDATE SET "
                + ", ".join(f"{c} = account_hourly.{c} + excluded.{c}" for c in ("requests", "tokens", "errors",
                                                                                  "refused"))),
                [(a, h, *v) for (a, h), v in ro.account_hourly.items()])
        if ro.links:
            cur.executemany(self._sql("INSERT INTO account_links VALUES (?,?,?,?) "
                                      "ON CONFLICT (account_id, kind, value) DO NOTHING"),
                            [(*k, v) for k, v in ro.links.items()])

    def put_scores(self, scores: list[tuple[str, float, float, str, str]]) -> None:
        """Record the detector's latest verdicts: (account_id, ts, score, cluster_id, reasons JSON) each.

        Sets the account's current score, cluster and reasons, raises its maximum, and raises the
        maximum score of the hour holding ``ts`` (the console's timeline)."""
        if not scores:
            return
        from stillhouse.guard.rollup import hour_of

        def go(cur: Any) -> None:
            cur.executemany(self._sql(
                "INSERT INTO account_stats (account_id, score, max_score, cluster_id, reasons, scored_at) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT (account_id) DO UPDATE SET score = excluded.score, "
                "max_score = CASE WHEN excluded.score > account_stats.max_score THEN excluded.score "
                "ELSE account_stats.max_score END, cluster_id = excluded.cluster_id, reasons = excluded.reasons, "
                "scored_at = excluded.scored_at"),
                [(a, s, s, c, r, ts) for a, ts, s, c, r in scores])
            cur.executemany(self._sql(
                "INSERT INTO account_hourly VALUES (?,?,0,0,0,0,?) ON CONFLICT (account_id, hour) DO UPDATE SET "
                "max_score = CASE WHEN excluded.max_score > account_hourly.max_score THEN excluded.max_score "
                "ELSE account_hourly.max_score END"),
                [(a, hour_of(ts), s) for a, ts, s, _, _ in scores])
        self._run(go)

    # -- reviews and audit --------------------------------------------------------------
    def add_review(self, r: ReviewRow) -> None:
        sql = self._sql("INSERT INTO reviews VALUES (?,?,?,?,?,?,?,?)")
        self._run(lambda cur: cur.execute(sql, (r.review_id, r.decision_id, r.account_id, r.verdict, int(r.label),
                                                r.reason, r.actor, r.created_at)))

    def add_audit(self, a: AuditRow) -> None:
        sql = self._sql("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?)")
        self._run(lambda cur: cur.execute(sql, (a.audit_id, a.ts, a.actor, a.action, a.target, a.reason,
                                                json.dumps(a.before, default=str), json.dumps(a.after, default=str))))

    def labels(self) -> list[ReviewRow]:
        """The latest review of every reviewed account (the labels ``stillhouse detect --fit --labels`` reads)."""
        rows = self._run(lambda cur: cur.execute(
            "SELECT review_id, decision_id, account_id, verdict, label, reason, actor, created_at FROM reviews "
            "ORDER BY account_id, created_at, review_id").fetchall())
        latest: dict[str, ReviewRow] = {}
        for row in rows:
            latest[row[2]] = ReviewRow(*row)
        return list(latest.values())

    def read_records(self, account_id: str | None = None, since: float | None = None,
                     limit: int | None = None, newest: bool = False, until: float | None = None) -> list[TrafficRecord]:
        """Traffic in arrival order, optionally for one account / in ``[since, until)`` / at most ``limit``
        (the first ones, or with ``newest`` the last ones, still returned oldest first)."""
        where, args = _where([("account_id = ?", account_id), ("ts >= ?", since), ("ts < ?", until)])
        sql = f"SELECT {self._traffic_select()} FROM traffic" + where
        sql += " ORDER BY ts DESC, request_id DESC" if newest else " ORDER BY ts, request_id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = [_row_record(r) for r in self._run(lambda cur: cur.execute(self._sql(sql), args).fetchall())]
        return rows[::-1] if newest else rows

    def watermark_key_usage(self) -> list[tuple[str, str, int]]:
        """``(watermark key id, account id, requests)`` for every pair in the log with a key id (none in a log
        older than the column, opened without ``init``)."""
        if "watermark_key_id" in self._missing_cols():
            return []
        sql = ("SELECT watermark_key_id, account_id, COUNT(*) FROM traffic WHERE watermark_key_id <> '' "
               "GROUP BY watermark_key_id, account_id ORDER BY watermark_key_id, account_id")
        return [(str(a), str(b), int(n)) for a, b, n in self._run(lambda cur: cur.execute(sql).fetchall())]

    def iter_records(self, since: float | None = None, until: float | None = None,
                     page: int = 5000) -> Iterator[TrafficRecord]:
        """Traffic with ``since <= ts < until`` in arrival order (``ts, request_id``), read in pages of
        ``page`` rows by keyset on the ``traffic_ts`` index: memory stays bounded by one page and no
        transaction stays open between pages, however long the window."""
        if page < 1:
            raise ValueError(f"page={page}: must be >= 1")
        cols = self._traffic_select()
        tail = " ORDER BY ts, request_id LIMIT " + str(int(page))
        where, args = _where([("ts >= ?", since), ("ts < ?", until)])
        sql = self._sql(f"SELECT {cols} FROM traffic" + where + tail)
        # a row-value comparison: both SQLite and PostgreSQL seek the index to it (an OR of the two cases
        # made SQLite scan from the index's start on every page)
        after = self._sql(f"SELECT {cols} FROM traffic WHERE (ts, request_id) > (?, ?)"
                          + (" AND ts < ?" if until is not None else "") + tail)
        while True:
            rows = self._run(lambda cur, q=sql, a=args: cur.execute(q, a).fetchall())
            for row in rows:
                yield _row_record(row)
            if len(rows) < page:
                return
            last_id, last_ts = rows[-1][0], rows[-1][1]  # the next page starts after the last (ts, request_id)
            sql, args = after, [last_ts, last_id, *([until] if until is not None else [])]

    def decisions_between(self, since: float | None, until: float | None) -> list[DecisionRow]:
        """Decisions in force at some time in ``[since, until)``: created before ``until`` and not cleared
        by ``since`` (a decision created in the window, active at its end, or cleared during it)."""
        where, args = _where([("created_at < ?", until), ("(cleared_at IS NULL OR cleared_at > ?)", since)])
        sql = self._sql(f"SELECT {', '.join(_DECISION_COLS)} FROM decisions" + where
                        + " ORDER BY created_at, decision_id")
        return [_row_decision(r) for r in self._run(lambda cur: cur.execute(sql, args).fetchall())]

    def accounts_in_clusters(self, cluster_ids: list[str]) -> dict[str, str]:
        """account -> cluster for the accounts the detector last put in one of ``cluster_ids`` (``account_stats``)."""
        out: dict[str, str] = {}
        for i in range(0, len(cluster_ids), 500):
            chunk = cluster_ids[i:i + 500]
            sql = self._sql(f"SELECT account_id, cluster_id FROM account_stats WHERE cluster_id IN "
                            f"({','.join('?' * len(chunk))})")
            out.update(dict(self._run(lambda cur, q=sql, c=chunk: cur.execute(q, c).fetchall())))
        return out

    def count_records(self) -> int:
        return int(self._run(lambda cur: cur.execute("SELECT COUNT(*) FROM traffic").fetchone()[0]))


class SqliteStore(SqlStore):
    """SQLite in WAL mode: readers never block the writer."""

    def __init__(self, url: str):
        super().__init__(url)
        path = url[len("sqlite:///"):]
        if not path:
            raise ValueError(f"db_url={url!r}: give a file path, e.g. sqlite:///run/guard.db")
        self.path = Path(path)

    def _connect(self) -> Any:
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=10.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _is_unavailable(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not isinstance(
            exc, sqlite3.IntegrityError)

    def _columns(self, cur: Any, table: str) -> set[str]:
        return {str(r[1]) for r in cur.execute(f"PRAGMA table_info({table})").fetchall()}


class PostgresStore(SqlStore):
    """PostgreSQL through psycopg 3; several guard replicas can share one database."""

    _ph = "%s"

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise StoreError("PostgreSQL needs psycopg 3: pip install 'psycopg[binary]>=3.1' "
                             "(or pip install 'stillhouse[guard]')") from exc
        try:
            return psycopg.connect(self.url, connect_timeout=5)
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"{self.describe()}: {exc}") from exc

    def _is_unavailable(self, exc: BaseException) -> bool:
        import psycopg

        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)

    _hour_sql = "floor(ts / 3600) * 3600.0"

    def _lock_migration(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(7301)")  # released at commit

    def _columns(self, cur: Any, table: str) -> set[str]:
        cur.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,))
        return {str(r[0]) for r in cur.fetchall()}


def open_store(url: str, init: bool = True) -> SqlStore:
    """The store for a DB URL (``sqlite:///path`` or ``postgresql://...``), with its tables created."""
    store: SqlStore
    if url.startswith("sqlite:///"):
        store = SqliteStore(url)
    elif url.startswith(("postgresql://", "postgres://")):
        store = PostgresStore(url)
    else:
        raise ValueError(f"db_url={url!r}: use sqlite:///path/to/guard.db or postgresql://user@host:port/db")
    if init:
        store.init()
    return store


if __name__ == "__main__":  # pragma: no cover
    import sys

    s = open_store(sys.argv[1])
    print(f"{s.describe()}: {len(s.list_accounts())} accounts, {len(s.list_keys())} keys, "
          f"{len(s.list_decisions())} decisions, {s.count_records()} traffic records")
