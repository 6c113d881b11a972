"""Both store backends behind one interface (SQLite and a real throwaway PostgreSQL), two guard
replicas sharing one PostgreSQL log, and the log store going down: fail-closed answers 503,
fail-open serves and spools, and the spool is replayed with no record lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from pg import PgCluster, skip_reason
from stillhouse.guard.events import AccountInfo, TrafficRecord
from stillhouse.guard.spool import LogWriter, Spool
from stillhouse.guard.store import (
    AccountLimits,
    DecisionRow,
    KeyRow,
    NotFound,
    SqliteStore,
    StoreUnavailable,
    open_store,
)
from stillhouse.testing.fakeserver import FakeServerConfig
from stillhouse.testing.fakeserver import start_in_thread as start_fake
from test_guard import chat_body, make_config, start_guard

PG_SKIP = skip_reason()


@pytest.fixture(scope="module")
def pg():
    if PG_SKIP:
        pytest.skip(PG_SKIP)
    with PgCluster() as cluster:
        yield cluster


_db_counter = [0]


@pytest.fixture
def pg_url(pg):
    """A fresh database in the shared throwaway cluster."""
    import psycopg

    _db_counter[0] += 1
    name = f"t{_db_counter[0]}_{int(time.time() * 1000) % 100000}"
    with psycopg.connect(pg.url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return pg.url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    return request.getfixturevalue("pg_url")


def _rec(i: int, account: str = "a1", ts: float = 100.0) -> TrafficRecord:
    return TrafficRecord(f"r{i:05d}", ts + i, account, "k1", "10.0.0.1", "ua", "fp", "m",
                         {"max_tokens": 5, "stream": False}, [{"role": "user", "content": f"q{i} é"}],
                         f"answer {i}", 3, 4, 12.5, 200, "allow", "", "")


def test_store_contract(store_url):
    s = open_store(store_url)
    s.init()  # idempotent
    s.put_account(AccountInfo("a1", "org", "web", "FR", "f" * 64, 1.0), AccountLimits(requests_per_min=5))
    s.put_account(AccountInfo("a1", "org2", "web", "FR", "f" * 64, 1.0), AccountLimits(requests_per_min=6))
    info, lim = s.get_account("a1")
    assert info.org == "org2" and lim.requests_per_min == 6 and lim.tokens_per_min is None
    with pytest.raises(NotFound):
        s.get_account("nobody")

    s.add_key(KeyRow("k1", "a1", "h" * 64, 10.0, None, 10.0))
    s.add_key(KeyRow("k2", "a1", "g" * 64, 11.0, None, 11.0))
    assert [k.key_id for k in s.list_keys("a1")] == ["k1", "k2"]
    assert s.revoke_key("k1", 20.0).revoked_at == 20.0
    assert s.revoke_key("k1", 30.0).revoked_at == 20.0   # idempotent
    assert [k.key_id for k in s.list_keys(updated_since=15.0)] == ["k1"]
    with pytest.raises(NotFound):
        s.revoke_key("nope", 1.0)

    recs = [_rec(i) for i in range(50)]
    s.write_records(recs[:30])
    s.write_records(recs[20:])                            # overlap: replay-safe
    assert s.count_records() == 50
    back = s.read_records("a1", since=110.0, limit=5)
    assert [r.request_id for r in back] == [f"r{i:05d}" for i in range(10, 15)]
    assert back[0] == recs[10]                            # every field round-trips, JSON and unicode included

    d = DecisionRow("d1", "account", "a1", "block", "why", "manual", 5.0, "admin", [["x", 1.0]])
    s.add_decision(d)
    s.put_decisions([d])                                  # replay of the same row changes nothing
    assert s.list_decisions("a1", active_only=True)[0].signals == [["x", 1.0]]
    cleared = s.clear_decision("d1", 9.0, "bob")
    assert cleared.cleared_at == 9.0 and cleared.cleared_by == "bob"
    assert s.clear_decision("d1", 12.0, "eve").cleared_by == "bob"
    assert s.list_decisions("a1", active_only=True) == []
    assert [x.decision_id for x in s.list_decisions(updated_since=8.0)] == ["d1"]
    s.close()
    s2 = open_store(store_url)                            # state survives a reconnect
    assert s2.count_records() == 50 and s2.get_key("k1").revoked_at == 20.0
    s2.close()


@pytest.mark.postgres
def test_two_replicas_share_one_postgres_log(tmp_path, pg_url):
    with start_fake(FakeServerConfig(latency_ms=1)) as fake:
        up = f"http://127.0.0.1:{fake.port}"
        a = start_guard(make_config(tmp_path / "a", up, db_url=pg_url, key_refresh_s=0.2))
        b = start_guard(make_config(tmp_path / "b", up, db_url=pg_url, key_refresh_s=0.2))
        try:
            key = a.account_with_key("shared")           # issued on replica A
            deadline = time.monotonic() + 5
            while b.chat(key)[0] != 200:                  # B picks it up on its next refresh
                assert time.monotonic() < deadline, "replica B never learned the key"
                time.sleep(0.1)
            for g in (a, b, a, b):
                assert g.chat(key)[0] == 200
            kid = a.admin("GET", "/admin/accounts/shared/keys")[1]["data"][0]["key_id"]
            a.admin("POST", f"/admin/keys/{kid}/revoke")
            assert a.chat(key)[0] == 401                  # immediately on A
            time.sleep(0.8)
            assert b.chat(key)[0] == 401                  # within key_refresh_s on B
            # A decision set on A reaches B on its next refresh, and so does its reversal.
            key2 = a.admin("POST", "/admin/accounts/shared/keys")[1]["key"]
            did = a.admin("POST", "/admin/decisions", {"target": "shared", "action": "block"})[1]["decision_id"]
            time.sleep(0.8)
            assert b.chat(key2)[0] == 403
            a.admin("POST", f"/admin/decisions/{did}/clear")
            time.sleep(0.8)
            assert b.chat(key2)[0] == 200
            from_b = b.records("shared")                  # flushes B's writer
            recs = a.records("shared")                    # flushes A's, reads the same table
            assert {r.status for r in recs} >= {200, 401} and len(recs) >= 7
            assert {r.request_id for r in from_b} <= {r.request_id for r in recs}  # one log
            assert any(r.key_id == kid and r.status == 401 for r in recs)  # revoked-key use still attributed
        finally:
            a.stop()
            b.stop()


# -- the log store going down -------------------------------------------------------------
class FlakyStore(SqliteStore):
    """SQLite with switches: ``down`` fails every call as if the database were gone, ``hang_s``
    makes every call stall that long first (a database that stopped answering)."""

    down = False
    hang_s = 0.0

    def _run(self, fn: Any) -> Any:
        if self.hang_s:
            time.sleep(self.hang_s)
        if self.down:
            raise StoreUnavailable("simulated outage")
        return super()._run(fn)


def _run_outage(tmp_path: Any, mode: str) -> None:
    with start_fake(FakeServerConfig(latency_ms=1)) as fake:
        cfg = make_config(tmp_path, f"http://127.0.0.1:{fake.port}", on_store_failure=mode, store_retry_s=0.1)
        store = FlakyStore(cfg.db_url)
        store.init()
        g = start_guard(cfg, store=store)
        try:
            key = g.account_with_key("ula")
            assert [g.chat(key, chat_body(f"q{i}"))[0] for i in range(5)] == [200] * 5
            store.down = True
            statuses = []
            for i in range(20):
                statuses.append(g.chat(key, chat_body(f"down {i}"))[0])
                time.sleep(0.02)
            if mode == "closed":
                assert statuses.count(503) >= 15, statuses   # after the writer notices, it refuses
            else:
                assert statuses == [200] * 20
            time.sleep(0.2)
            spooled = Spool(cfg.spool_dir).pending_records()
            assert spooled >= 1 and not any(p.name.startswith(".") for p in Path(cfg.spool_dir).iterdir())
            store.down = False
            deadline = time.monotonic() + 5
            # The writer empties the spool in its thread, then marks the store up on the event loop:
            # wait for both (a request between the two is still refused in fail-closed mode).
            while Spool(cfg.spool_dir).files() or not g.app.writer.store_ok:
                assert time.monotonic() < deadline, "spool never replayed"
                time.sleep(0.05)
            assert g.chat(key)[0] == 200
            recs = g.records("ula")
            assert len(recs) == 5 + 20 + 1, "a log record was lost"
            assert sum(r.status == 503 for r in recs) == statuses.count(503)
        finally:
            g.stop()


def test_fail_closed_answers_503_and_loses_no_record(tmp_path):
    _run_outage(tmp_path, "closed")


def test_fail_open_serves_spools_and_replays(tmp_path):
    _run_outage(tmp_path, "open")


@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["closed", "open"])
def test_real_postgres_outage(tmp_path, pg, pg_url, mode):
    """Stop the real PostgreSQL server under a running guard, then bring it back."""
    with start_fake(FakeServerConfig(latency_ms=1)) as fake:
        cfg = make_config(tmp_path, f"http://127.0.0.1:{fake.port}", db_url=pg_url, on_store_failure=mode,
                          store_retry_s=0.2)
        g = start_guard(cfg)
        try:
            key = g.account_with_key("vic")
            assert g.chat(key)[0] == 200
            pg.stop()
            statuses = []
            for i in range(10):
                statuses.append(g.chat(key, chat_body(f"down {i}"))[0])
                time.sleep(0.05)
            if mode == "closed":
                assert statuses.count(503) >= 7, statuses
            else:
                assert statuses == [200] * 10
            pg.start()
            deadline = time.monotonic() + 10
            while Spool(cfg.spool_dir).files() or not g.app.writer.store_ok:
                assert time.monotonic() < deadline, f"spool never replayed after PostgreSQL came back: {g.app.writer.stats()}"
                time.sleep(0.1)
            assert len(g.records("vic")) == 11
        finally:
            if not pg.running:
                pg.start()
            g.stop()


def test_a_hung_store_counts_as_down(tmp_path):
    """Writes that hang trip fail-closed within store_timeout_s; nothing is lost once it answers again."""
    with start_fake(FakeServerConfig(latency_ms=1)) as fake:
        cfg = make_config(tmp_path, f"http://127.0.0.1:{fake.port}", on_store_failure="closed",
                          store_timeout_s=0.3, store_retry_s=0.1)
        store = FlakyStore(cfg.db_url)
        store.init()
        g = start_guard(cfg, store=store)
        try:
            key = g.account_with_key("hugo")
            assert g.chat(key)[0] == 200
            store.hang_s = 2.0
            statuses = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.5:
                statuses.append(g.chat(key, chat_body(f"h{len(statuses)}"))[0])
                time.sleep(0.05)
            assert statuses[-1] == 503 and statuses.count(503) >= len(statuses) // 2, statuses
            store.hang_s = 0.0
            deadline = time.monotonic() + 10
            while Spool(cfg.spool_dir).files() or not g.app.writer.store_ok:
                assert time.monotonic() < deadline, f"never recovered: {g.app.writer.stats()}"
                time.sleep(0.1)
            assert len(g.records("hugo")) == 1 + len(statuses)
        finally:
            g.stop()


def test_spool_left_by_a_crash_is_replayed_on_start(tmp_path):
    url = f"sqlite:///{tmp_path}/c.db"
    sp = Spool(tmp_path / "spool")
    sp.append([_rec(i) for i in range(7)], [DecisionRow("d9", "account", "a1", "block", "r", "manual", 1.0)])
    with start_fake(FakeServerConfig(latency_ms=1)) as fake:
        g = start_guard(make_config(tmp_path, f"http://127.0.0.1:{fake.port}", db_url=url,
                                    spool_dir=str(tmp_path / "spool")))
        try:
            assert not sp.files()
            assert len(g.records("a1")) == 7
            assert g.admin("GET", "/admin/decisions?target=a1")[1]["data"][0]["decision_id"] == "d9"
        finally:
            g.stop()


def test_writer_holds_records_in_memory_when_even_the_spool_fails(tmp_path):
    store = FlakyStore(f"sqlite:///{tmp_path}/w.db")
    store.init()
    store.down = True
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")                               # the spool dir path is a file: appends fail
    from concurrent.futures import ThreadPoolExecutor

    async def go() -> LogWriter:
        w = LogWriter(store, Spool(blocker), ThreadPoolExecutor(1), 0.01, 10, 0.01)
        for i in range(25):
            w.put(_rec(i))
        await w.flush()
        assert w.pending == 25 and w.spooled == 0          # kept, not dropped
        store.down = False
        w.store_ok = True
        await w.flush()
        return w

    w = asyncio.run(go())
    assert w.pending == 0 and store.count_records() == 25
