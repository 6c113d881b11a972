"""The harvest store: one run directory, one SQLite database (WAL), one config.json.

Layout of a run directory::

    RUN_DIR/
      config.json       the HarvestConfig that produced it (``stillhouse harvest --config`` replays it)
      harvest.sqlite    one row per (prompt, teacher, sampling params, sample index)

Each row is keyed by :func:`record_key`, a SHA-256 of the canonical JSON of (messages,
teacher, sampling params, sample index), so a rerun skips finished work and any changed
parameter makes a new key. The params include the request's further fields when it has any
(``extra``: tools, tool_choice, response_format, reasoning_effort, ...: the JSON text exactly as sent,
keys in their order), so they are keyed too. A row is either ``ok`` or ``error``; an ``error`` row is retried
by the next run and replaced when it succeeds, an ``ok`` row is never overwritten. Rows are
written in committed batches, so a kill -9 loses at most the uncommitted batch, which the
next run redoes (never twice: the key is the primary key).

Reading (what curate, export and eval use)::

    from stillhouse.distill.store import HarvestStore
    with HarvestStore("runs/h1", readonly=True) as store:
        print(store.counts())                      # {'ok': 998, 'error': 2}
        for rec in store.records(status="ok"):     # HarvestRecord, arrays decoded
            rec.messages, rec.text, rec.finish_reason, rec.sample_index, rec.meta
            rec.logprobs        # np.float32 [T] or None
            rec.top_logprobs    # np.float32 [T, k] (stored as float16) or None
            rec.top_ids         # np.int32 [T, k] when the teacher knows token ids (local)
            rec.top_tokens      # list[list[str]] when it only knows strings (HTTP)
            rec.chat()          # messages + the assistant turn, OpenAI chat form
            rec.reasoning       # the chain of thought (reasoning_content / reasoning / <think>) or None
            rec.answer          # the text without a leading <think> block
            rec.tool_calls      # OpenAI tool_calls or None; rec.tools: the tools the request sent
            rec.turn            # turn k of a conversation harvested turn by turn (0 otherwise)

What a reasoning server sends is kept byte for byte: ``text`` is the content exactly as it came
(a ``<think>`` block in it included), ``message`` the assistant message's other fields that carry
something (``reasoning_content`` or ``reasoning``, ``tool_calls`` with their ``arguments`` strings,
``"content": null`` for a null content), stored as ASCII-escaped JSON in the server's key order, so
every string survives and ``rec.assistant()`` re-encodes to the very bytes of the server's message.

Compact storage: per-token logprobs as float32, top-k logprobs as float16 and ids as
int32 (k=20 ≈ 120 bytes per token), token strings as zlib-compressed JSON. ``raw`` keeps
the response body when it could not be parsed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stillhouse.teacher.base import Completion, Message
from stillhouse.teacher.message import answer_of, assistant_message, reasoning_of

DB_NAME = "harvest.sqlite"
CONFIG_NAME = "config.json"
SCHEMA_VERSION = 2
"""2 added ``turn`` and ``message``; a version-1 store is upgraded in place when opened for writing
(the columns added, nothing else touched) and read as it is when opened read-only."""
Status = Literal["ok", "error"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,
    prompt_id TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    messages TEXT NOT NULL,
    teacher TEXT NOT NULL,
    model TEXT NOT NULL,
    revision TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    text TEXT,
    finish_reason TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    token_ids BLOB,
    tokens BLOB,
    logprobs BLOB,
    top_k INTEGER NOT NULL DEFAULT 0,
    top_ids BLOB,
    top_tokens BLOB,
    top_logprobs BLOB,
    latency_s REAL,
    cost REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    raw TEXT,
    meta TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    turn INTEGER NOT NULL DEFAULT 0,
    message TEXT
);
-- No secondary indexes: each costs every insert, and every read here scans in rowid order anyway.
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
"""

_COLUMNS = (
    "key", "prompt_id", "prompt_hash", "sample_index", "messages", "teacher", "model", "revision", "params",
    "status", "text", "finish_reason", "prompt_tokens", "completion_tokens", "token_ids", "tokens", "logprobs",
    "top_k", "top_ids", "top_tokens", "top_logprobs", "latency_s", "cost", "attempts", "error", "raw", "meta",
    "created_at", "updated_at", "turn", "message",
)
_ADDED_IN_2 = {"turn": "0", "message": "NULL"}
"""Columns schema 2 added, and what a version-1 store reads as in their place."""
# A row tuple holds created_at once for both time columns (?28 twice): 30 items, not 31. CPython builds a
# tuple display of more than 30 items through a list (its STACK_USE_GUIDELINE), which measured 826 against
# 477 ns here, and completion_row runs once per record.
_PARAMS = [f"?{i}" for i in range(1, 29)] + ["?28"] + [f"?{i}" for i in range(29, len(_COLUMNS))]
# An ok row is final; an error row is replaced by whatever comes next. Attempts accumulate.
_UPSERT = (
    f"INSERT INTO records ({', '.join(_COLUMNS)}) VALUES ({', '.join(_PARAMS)}) "
    "ON CONFLICT(key) DO UPDATE SET "
    + ", ".join(f"{c}=excluded.{c}" for c in _COLUMNS if c not in ("key", "created_at", "attempts"))
    + ", attempts=records.attempts+excluded.attempts WHERE records.status != 'ok'"
)


class StoreError(RuntimeError):
    """The run directory or its database is unusable; the message says why and what to do."""


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# One encoder, built once: json.dumps(obj, sort_keys=True, separators=..., ensure_ascii=False) builds an
# equal JSONEncoder on every call (measured: about a third of a short message list's encoding time).
_encode = _CANONICAL.encode
KEY_HEAD = b'{"m":'
"""The bytes every record key's hashed text starts with; see :func:`record_key`."""


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, UTF-8: the form every hash here is taken over."""
    return _encode(obj)


_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def compact_json(obj: Any) -> str:
    """No spaces, UTF-8, keys in their given order: request fields as they are sent (the order of a
    tool's parameters is what a server shows its model, so it is kept, and keyed)."""
    return _compact(obj)


def prompt_hash(messages: list[Message], messages_json: str | None = None) -> str:
    """SHA-256 (hex) of the messages alone; export splits train/held-out by it."""
    mj = canonical_json(messages) if messages_json is None else messages_json
    return hashlib.sha256(mj.encode()).hexdigest()


def record_key(messages: list[Message], teacher: str, params: dict[str, Any], sample_index: int) -> str:
    """The content hash that identifies one record: (messages, teacher, sampling params, sample index).

    It is SHA-256 of ``canonical_json({"m": messages, "p": params, "s": sample_index, "t": teacher})``.
    This is the reference form: the harvester computes the same value from parts it already holds
    (:func:`record_key_tail`), and ``tests/test_harvest_keys.py`` checks that they agree.
    """
    return hashlib.sha256(
        canonical_json({"m": messages, "p": params, "s": int(sample_index), "t": teacher}).encode()).hexdigest()


def record_key_tail(teacher: str, params_json: str, sample_index: int) -> bytes:
    """What follows the messages in a record key's hashed text (``,"p":...,"s":N,"t":"..."}``).

    With it, ``sha256(KEY_HEAD + canonical messages JSON + tail)`` is :func:`record_key`: keys sorted
    m < p < s < t, so the canonical JSON of the whole dict is these parts joined. A run computes the
    tail once per sample index and hashes each prompt's messages JSON between head and tail.
    """
    return f',"p":{params_json},"s":{int(sample_index)},"t":{canonical_json(teacher)}}}'.encode()


def record_key_from_json(messages_json: str, teacher: str, params_json: str, sample_index: int) -> str:
    """:func:`record_key` from already canonical JSON of the messages and params (same result, less work)."""
    h = hashlib.sha256(KEY_HEAD)
    h.update(messages_json.encode())
    h.update(record_key_tail(teacher, params_json, sample_index))
    return h.hexdigest()


# -- array codecs (plain functions) ---------------------------------------------------------------

def pack_f32(values: list[float] | None) -> bytes | None:
    return None if values is None else np.asarray(values, dtype=np.float32).tobytes()


def pack_i32(values: Any) -> bytes | None:
    return None if values is None else np.asarray(values, dtype=np.int32).tobytes()


def pack_f16_matrix(rows: list[list[float]], k: int) -> bytes:
    """[T][<=k] float rows → float16 [T, k], short rows padded with -inf."""
    out = np.full((len(rows), k), -np.inf, dtype=np.float16)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r[:k]
    return out.tobytes()


def pack_i32_matrix(rows: list[list[int]], k: int) -> bytes:
    """[T][<=k] int rows → int32 [T, k], short rows padded with -1."""
    out = np.full((len(rows), k), -1, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r[:k]
    return out.tobytes()


def pack_strings(obj: Any) -> bytes | None:
    return None if obj is None else zlib.compress(canonical_json(obj).encode(), 6)


def unpack_strings(blob: bytes | None) -> Any:
    return None if blob is None else json.loads(zlib.decompress(blob))


@dataclass
class HarvestRecord:
    """One stored record, arrays decoded. ``status`` is 'ok' or 'error'."""

    key: str
    prompt_id: str
    prompt_hash: str
    sample_index: int
    messages: list[Message]
    teacher: str
    """The teacher spec string the run used."""
    model: str
    revision: str
    params: dict[str, Any]
    """Sampling params as sent (SamplingParams fields)."""
    status: str
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    token_ids: np.ndarray | None = None
    tokens: list[str] | None = None
    logprobs: np.ndarray | None = None
    top_k: int = 0
    top_ids: np.ndarray | None = None
    top_tokens: list[list[str]] | None = None
    top_logprobs: np.ndarray | None = None
    latency_s: float | None = None
    cost: float = 0.0
    attempts: int = 0
    error: str | None = None
    raw: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    """What the prompt carried besides its messages (task, reference answer, tests...)."""
    created_at: float = 0.0
    updated_at: float = 0.0
    turn: int = 0
    """Turn k of a conversation harvested turn by turn; its messages hold the teacher's answers to 0..k-1."""
    message: dict[str, Any] | None = None
    """The answer's message fields besides role and content, exactly as sent (Completion.message)."""

    @property
    def reasoning(self) -> str | None:
        """The chain of thought: a reasoning field, else a ``<think>`` block leading the text; None if none."""
        return reasoning_of(self.text, self.message)

    @property
    def answer(self) -> str:
        """The answer without its chain of thought (the text less a leading ``<think>`` block)."""
        return answer_of(self.text, self.message)

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        """The OpenAI tool calls of the answer, or None."""
        return (self.message or {}).get("tool_calls") or None

    @property
    def request_extra(self) -> dict[str, Any]:
        """The request's further fields (tools, tool_choice, reasoning_effort...) as sent; {} when none."""
        extra = self.params.get("extra")
        return json.loads(extra) if isinstance(extra, str) and extra else {}

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        """The tools the request offered, as sent, or None."""
        return self.request_extra.get("tools") or None

    def assistant(self) -> Message:
        """The teacher's answer as an OpenAI assistant message, every field as sent."""
        return assistant_message(self.text or "", self.message)

    def chat(self) -> list[Message]:
        """The conversation in OpenAI chat form, ending with the teacher's answer (all its fields)."""
        return [*self.messages, self.assistant()]


def completion_row(
    *,
    key: str,
    prompt_id: str,
    messages: list[Message],
    teacher: str,
    model: str,
    revision: str,
    params: dict[str, Any],
    sample_index: int,
    completion: Completion | None,
    latency_s: float | None,
    cost: float,
    attempts: int,
    error: str | None = None,
    raw: str | None = None,
    meta: dict[str, Any] | None = None,
    messages_json: str | None = None,
    prompt_hash_hex: str | None = None,
    params_json: str | None = None,
    meta_json: str | None = None,
    turn: int = 0,
) -> tuple[Any, ...]:
    """The database row for one finished attempt (a completion, or an error).

    ``messages_json``/``prompt_hash_hex``/``params_json``/``meta_json`` may be passed precomputed (the
    harvester does, once per prompt) to save encoding them per record.
    """
    now = time.time()
    c = completion
    token_ids = tokens = logprobs = top_ids = top_tokens = top_lp = None
    top_k = 0
    if c is not None:
        if c.token_ids is not None:
            token_ids = pack_i32(c.token_ids)
        lp = c.logprobs
        if lp is not None:
            logprobs = pack_f32(lp.logprobs)
            if lp.token_ids is not None:
                if token_ids is None:
                    token_ids = pack_i32(lp.token_ids)
            else:
                tokens = pack_strings(lp.tokens)
            if lp.top_logprobs:
                top_k = max((len(r) for r in lp.top_logprobs), default=0)
                top_lp = pack_f16_matrix(lp.top_logprobs, top_k)
                if lp.top_ids is not None:
                    top_ids = pack_i32_matrix(lp.top_ids, top_k)
                else:
                    top_tokens = pack_strings(lp.top_tokens)
    mj = messages_json if messages_json is not None else canonical_json(messages)
    ph = prompt_hash_hex if prompt_hash_hex is not None else prompt_hash(messages)
    return (
        key, prompt_id, ph, sample_index, mj, teacher, model, revision,
        params_json if params_json is not None else canonical_json(params),
        "ok" if c is not None and error is None else "error",
        None if c is None else c.text, None if c is None else c.finish_reason,
        None if c is None else c.prompt_tokens, None if c is None else c.completion_tokens,
        token_ids, tokens, logprobs, top_k, top_ids, top_tokens, top_lp,
        latency_s, cost, attempts, error, raw, meta_json if meta_json is not None else canonical_json(meta or {}),
        now, turn, None if c is None or c.message is None else encode_message(c.message),
    )


_ASCII = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def encode_message(message: dict[str, Any]) -> str:
    """The ``message`` column: JSON in the server's own key order with every non-ASCII character escaped,
    so any string the server sent (a lone surrogate included) is stored and read back exactly."""
    return _ASCII(message)


class HarvestStore:
    """A run directory's SQLite store. Not thread-safe: use it from one thread at a time."""

    def __init__(self, run_dir: str | os.PathLike[str], readonly: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / DB_NAME
        if readonly:
            if not self.path.is_file():
                raise StoreError(f"{self.run_dir} is not a harvest run directory (no {DB_NAME}); "
                                 "run `stillhouse harvest --out DIR` first")
            self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False, timeout=10.0)
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
            self._init_writable()
        try:
            row = self._db.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a harvest database: {exc}") from exc
        version = None if row is None else int(row[0])
        self._select = f"SELECT {', '.join(_COLUMNS)} FROM records"
        if version == 1:
            if readonly:  # read as it is: the new columns read as their defaults
                cols = (f"{_ADDED_IN_2[c]} AS {c}" if c in _ADDED_IN_2 else c for c in _COLUMNS)
                self._select = f"SELECT {', '.join(cols)} FROM records"
            else:
                self._upgrade_from_1()
            version = SCHEMA_VERSION
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version} is not {SCHEMA_VERSION}; "
                             "harvest into a new --out directory")

    def _init_writable(self, patience_s: float = 30.0) -> None:
        """WAL, the schema and its version row, all idempotent. Several processes open one new store at once in a
        sharded harvest, and SQLite answers one of them "database is locked" at once, without waiting out the busy
        timeout, when both try to switch the journal mode or create the schema together (its deadlock avoidance:
        1 in 6 six-process openings failed here), so these first steps are retried for up to ``patience_s``."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                # NORMAL under WAL: a committed transaction survives a process kill (not a power cut).
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                time.sleep(0.02 + 0.08 * random.random())

    def _upgrade_from_1(self) -> None:
        """Add schema 2's columns to a version-1 store (one transaction)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            have = {r[1] for r in self._db.execute("PRAGMA table_info(records)")}
            if "turn" not in have:
                self._db.execute("ALTER TABLE records ADD COLUMN turn INTEGER NOT NULL DEFAULT 0")
            if "message" not in have:
                self._db.execute("ALTER TABLE records ADD COLUMN message TEXT")
            self._db.execute("UPDATE meta SET v=? WHERE k='schema_version'", (str(SCHEMA_VERSION),))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- writing -------------------------------------------------------------------------------
    def put_rows(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Write rows from :func:`completion_row` in one committed transaction."""
        rows = list(rows)
        if not rows:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(_UPSERT, rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v", (key, value))

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    # -- reading -------------------------------------------------------------------------------
    def keys(self, status: Status | None = "ok") -> set[str]:
        """Keys of the records with this status (all records when None)."""
        if status is None:
            return {r[0] for r in self._db.execute("SELECT key FROM records")}
        return {r[0] for r in self._db.execute("SELECT key FROM records WHERE status=?", (status,))}

    def counts(self) -> dict[str, int]:
        """Records per status."""
        return dict(self._db.execute("SELECT status, COUNT(*) FROM records GROUP BY status").fetchall())

    def totals(self) -> dict[str, float]:
        """Sums over the store: requests (attempts), prompt and completion tokens, cost."""
        row = self._db.execute(
            "SELECT COALESCE(SUM(attempts),0), COALESCE(SUM(prompt_tokens),0), "
            "COALESCE(SUM(completion_tokens),0), COALESCE(SUM(cost),0) FROM records").fetchone()
        return {"attempts": row[0], "prompt_tokens": row[1], "completion_tokens": row[2], "cost": row[3]}

    def get(self, key: str) -> HarvestRecord | None:
        """The record stored under ``key``, or None."""
        row = self._db.execute(f"{self._select} WHERE key=?", (key,)).fetchone()
        return None if row is None else _decode(dict(zip(_COLUMNS, row)))

    def max_turn(self) -> int:
        """The highest turn stored (0 when no conversation was harvested turn by turn)."""
        return int(self._db.execute(f"SELECT COALESCE(MAX(turn), 0) FROM ({self._select})").fetchone()[0])

    def records(self, status: Status | None = "ok", prompt_id: str | None = None) -> Iterator[HarvestRecord]:
        """Records in insertion order, decoded; ``status=None`` yields ok and error rows alike."""
        where: list[str] = []
        args: list[str] = []
        if status is not None:
            where.append("status=?")
            args.append(status)
        if prompt_id is not None:
            where.append("prompt_id=?")
            args.append(prompt_id)
        sql = self._select
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY rowid"
        cur = self._db.execute(sql, args)
        while True:
            batch = cur.fetchmany(512)
            if not batch:
                return
            for row in batch:
                yield _decode(dict(zip(_COLUMNS, row)))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> HarvestStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(r: dict[str, Any]) -> HarvestRecord:
    k = r["top_k"] or 0
    top_lp = top_ids = None
    if r["top_logprobs"] is not None and k:
        top_lp = np.frombuffer(r["top_logprobs"], dtype=np.float16).reshape(-1, k).astype(np.float32)
    if r["top_ids"] is not None and k:
        top_ids = np.frombuffer(r["top_ids"], dtype=np.int32).reshape(-1, k)
    rec = HarvestRecord(
        key=r["key"], prompt_id=r["prompt_id"], prompt_hash=r["prompt_hash"], sample_index=r["sample_index"],
        messages=json.loads(r["messages"]), teacher=r["teacher"], model=r["model"], revision=r["revision"],
        params=json.loads(r["params"]), status=r["status"], text=r["text"], finish_reason=r["finish_reason"],
        prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"],
        token_ids=None if r["token_ids"] is None else np.frombuffer(r["token_ids"], dtype=np.int32),
        tokens=unpack_strings(r["tokens"]),
        logprobs=None if r["logprobs"] is None else np.frombuffer(r["logprobs"], dtype=np.float32),
        top_k=k, top_ids=top_ids, top_tokens=unpack_strings(r["top_tokens"]), top_logprobs=top_lp,
        latency_s=r["latency_s"], cost=r["cost"], attempts=r["attempts"], error=r["error"], raw=r["raw"],
        meta=json.loads(r["meta"]) if r["meta"] else {}, created_at=r["created_at"], updated_at=r["updated_at"],
    )
    # set after: a call with more than 30 arguments is compiled through a dict (CPython's STACK_USE_GUIDELINE)
    rec.turn = r["turn"] or 0
    rec.message = json.loads(r["message"]) if r["message"] else None
    return rec
