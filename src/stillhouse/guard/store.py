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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stillhouse.guard.events import AccountInfo, TrafficRecord


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
        watermark_key_id TEXT NOT NULL DEFAULT '')""",
    "CREATE INDEX IF NOT EXISTS traffic_account_ts ON traffic (account_id, ts)",
]

_TRAFFIC_COLS = ("request_id", "ts", "account_id", "key_id", "client_ip", "user_agent", "header_fingerprint",
                 "model", "params", "messages", "response_text", "prompt_tokens", "completion_tokens",
                 "latency_ms", "status", "decision", "decision_reason", "session_id", "watermark_key_id")
_DECISION_COLS = ("decision_id", "scope", "target", "action", "reason", "source", "created_at", "created_by",
                  "signals", "shadow", "cleared_at", "cleared_by")


def _record_row(r: TrafficRecord) -> tuple[Any, ...]:
    return (r.request_id, r.ts, r.account_id, r.key_id, r.client_ip, r.user_agent, r.header_fingerprint,
            r.model, json.dumps(r.params), json.dumps(r.messages), r.response_text, int(r.prompt_tokens),
            int(r.completion_tokens), float(r.latency_ms), int(r.status), r.decision, r.decision_reason,
            r.session_id, r.watermark_key_id)


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
        """Create the tables if they do not exist (idempotent; safe for several replicas)."""
        def go(cur: Any) -> None:
            for stmt in _SCHEMA:
                cur.execute(stmt)
            self._migrate(cur)
        self._run(go)

    def _columns(self, cur: Any, table: str) -> set[str]:
        raise NotImplementedError

    def _migrate(self, cur: Any) -> None:
        """Add columns that newer versions of the schema have (a log written by an older guard)."""
        if "watermark_key_id" not in self._columns(cur, "traffic"):
            cur.execute("ALTER TABLE traffic ADD COLUMN watermark_key_id TEXT NOT NULL DEFAULT ''")

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
        self._run(lambda cur: cur.execute(sql, row))

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
    def write_records(self, records: list[TrafficRecord]) -> None:
        """Append records in one transaction; a request_id already stored is skipped (replay-safe)."""
        if not records:
            return
        sql = self._sql(f"INSERT INTO traffic ({', '.join(_TRAFFIC_COLS)}) VALUES "
                        f"({','.join('?' * len(_TRAFFIC_COLS))}) ON CONFLICT (request_id) DO NOTHING")
        rows = [_record_row(r) for r in records]
        self._run(lambda cur: cur.executemany(sql, rows))

    def read_records(self, account_id: str | None = None, since: float | None = None,
                     limit: int | None = None, newest: bool = False) -> list[TrafficRecord]:
        """Traffic in arrival order, optionally for one account / after a time / at most ``limit``
        (the first ones, or with ``newest`` the last ones, still returned oldest first)."""
        where, args = _where([("account_id = ?", account_id), ("ts >= ?", since)])
        sql = f"SELECT {', '.join(_TRAFFIC_COLS)} FROM traffic" + where
        sql += " ORDER BY ts DESC, request_id DESC" if newest else " ORDER BY ts, request_id"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = [_row_record(r) for r in self._run(lambda cur: cur.execute(self._sql(sql), args).fetchall())]
        return rows[::-1] if newest else rows

    def watermark_key_usage(self) -> list[tuple[str, str, int]]:
        """``(watermark key id, account id, requests)`` for every pair in the log with a key id."""
        sql = ("SELECT watermark_key_id, account_id, COUNT(*) FROM traffic WHERE watermark_key_id <> '' "
               "GROUP BY watermark_key_id, account_id ORDER BY watermark_key_id, account_id")
        return [(str(a), str(b), int(n)) for a, b, n in self._run(lambda cur: cur.execute(sql).fetchall())]

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
