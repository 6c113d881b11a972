"""The traffic-log writer and its disk spool: no log record is silently lost.

The gateway never writes the log on its request path. ``LogWriter.put`` appends the
record to memory; a background task flushes batches every ``log_flush_interval_s`` in
the store's single worker thread. When a write fails the store is marked down and:

- the failed batch (and every later one while the store is down) is appended to a JSONL
  file under ``spool_dir`` and fsynced (in a thread of its own, so a hung store cannot block it);
- a write that takes longer than ``store_timeout_s`` counts as a failure too: a hung
  database is treated as down. If the hung write completes later, the replay of the same
  batch is a no-op (writes are idempotent);
- ``store_ok`` turns False, which the gateway reads to answer 503 in fail-closed mode
  (in fail-open mode it keeps serving);
- a probe pings the store every ``store_retry_s``; once it answers, the spool files are
  replayed in order (writes are idempotent on request_id / decision_id) and deleted.

If even the spool cannot be written (disk full), the batch stays in memory, is retried,
and the error is logged loudly with its size. On shutdown ``close()`` flushes everything
to the store or, failing that, to the spool. Spool files left by a crash are replayed
on the next start. The one window left: a SIGKILL or power loss drops what was still in
memory, i.e. at most one flush interval of traffic (50 ms by default); a graceful stop
(SIGTERM) loses nothing.

Run ``python -m stillhouse.guard.spool SPOOL_DIR DB_URL`` to replay a spool by hand.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from stillhouse.guard.events import TrafficRecord
from stillhouse.guard.store import DecisionRow, SqlStore

log = logging.getLogger("stillhouse.guard")


class Spool:
    """A directory of JSONL batch files waiting to be written to the store."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def files(self) -> list[Path]:
        if not self.dir.exists():
            return []
        return sorted(self.dir.glob("spool-*.jsonl"))

    def append(self, records: list[TrafficRecord], decisions: list[DecisionRow]) -> Path:
        """Write one batch as a new file, fsynced before returning."""
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"spool-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps({"kind": "traffic", "data": asdict(r)}) + "\n" for r in records)
            f.writelines(json.dumps({"kind": "decision", "data": asdict(d)}) + "\n" for d in decisions)
            f.flush()
            os.fsync(f.fileno())
        path = self.dir / name
        os.replace(tmp, path)
        return path

    @staticmethod
    def read(path: Path) -> tuple[list[TrafficRecord], list[DecisionRow]]:
        records, decisions = [], []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["kind"] == "traffic":
                records.append(TrafficRecord(**item["data"]))
            elif item["kind"] == "decision":
                decisions.append(DecisionRow(**item["data"]))
        return records, decisions

    def replay(self, store: SqlStore) -> int:
        """Write every spooled batch to the store, oldest first, deleting each once written."""
        n = 0
        for path in self.files():
            records, decisions = self.read(path)
            store.write_records(records)
            store.put_decisions(decisions)
            path.unlink()
            n += len(records)
        return n

    def pending_records(self) -> int:
        return sum(sum(1 for ln in p.read_text().splitlines() if '"kind": "traffic"' in ln) for p in self.files())


class LogWriter:
    """Batches traffic records and decisions to the store; spools them when it is down."""

    def __init__(self, store: SqlStore, spool: Spool, executor: ThreadPoolExecutor,
                 flush_interval_s: float = 0.05, batch_size: int = 1000, retry_s: float = 0.5,
                 timeout_s: float = 5.0):
        self.store = store
        self.spool = spool
        self.executor = executor
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self._spool_executor = ThreadPoolExecutor(1, thread_name_prefix="guard-spool")
        self.store_ok = True
        self.last_error = ""
        self.written = 0
        self.spooled = 0
        self.replayed = 0
        self._records: list[TrafficRecord] = []
        self._decisions: list[DecisionRow] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wake = asyncio.Event()
        self._spool_dirty = True
        """The spool may hold files (set when a batch is spooled; cleared once a write replayed them)."""
        self._scores: dict[str, tuple[str, float, float, str, Any]] = {}
        """account -> its latest detector verdict, for the console (derived data: kept in memory while the
        store is down, never spooled; the next verdict replaces it)."""
        self.last_flush = time.monotonic()
        """When the writer last had nothing left to write (the log-writer lag is measured from it)."""

    def put(self, record: TrafficRecord) -> None:
        self._records.append(record)
        if len(self._records) >= self.batch_size:
            self._wake.set()

    def put_decision(self, row: DecisionRow) -> None:
        self._decisions.append(row)
        self._wake.set()

    def put_score(self, account_id: str, ts: float, score: float, cluster_id: str, reasons: Any) -> None:
        """The detector's latest verdict on an account, ``reasons`` its [(signal, value), ...] (written with the
        next flush; see SqlStore.put_scores)."""
        self._scores[account_id] = (account_id, ts, score, cluster_id, reasons)

    @property
    def pending(self) -> int:
        return len(self._records) + len(self._decisions)

    def lag_s(self) -> float:
        """Seconds the oldest unwritten record may have waited (0 when nothing waits)."""
        return time.monotonic() - self.last_flush if (self._records or self._decisions) else 0.0

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="guard-log-writer")

    async def _loop(self) -> None:
        next_probe = 0.0
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            if not self.store_ok and time.monotonic() >= next_probe:
                next_probe = time.monotonic() + self.retry_s
                await self._probe()
            await self.flush()

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            n = await asyncio.wait_for(asyncio.shield(loop.run_in_executor(self.executor, self._ping_and_replay)),
                                       self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - still down (or hung); stay in spool mode
            self.last_error = f"{type(exc).__name__}: {exc}"
            return
        self.replayed += n
        self.store_ok = True
        log.warning("guard: log store is back; replayed %d spooled records", n)

    def _ping_and_replay(self) -> int:
        self.store.ping()
        return self.spool.replay(self.store)

    def _write_scores(self, scores: list[tuple[str, float, float, str, Any]]) -> None:
        self.store.put_scores([(a, ts, s, c, json.dumps(list(r)[:8])) for a, ts, s, c, r in scores])

    def _write(self, records: list[TrafficRecord], decisions: list[DecisionRow]) -> None:
        # Anything spooled earlier goes first, so replay order follows arrival order. The directory
        # is looked at once after start and after each spooling, not on every flush.
        if self._spool_dirty:
            if self.spool.files():
                self.replayed += self.spool.replay(self.store)
            self._spool_dirty = False
        self.store.write_records(records, first_write=True)  # a failed batch is spooled and replayed with lookup
        self.store.put_decisions(decisions)

    async def flush(self) -> None:
        """Write (or spool) everything pending now."""
        await self._flush_log()
        self.last_flush = time.monotonic()
        if self._scores and self.store_ok:
            scores, self._scores = self._scores, {}
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.get_running_loop().run_in_executor(
                    self.executor, self._write_scores, list(scores.values()))), self.timeout_s)
            except Exception as exc:  # noqa: BLE001 - keep them for the next flush (newer verdicts win)
                self._scores = {**scores, **self._scores}
                log.warning("guard: writing detector scores failed (%s); kept for the next flush", exc)

    async def _flush_log(self) -> None:
        while self._records or self._decisions:
            records, self._records = self._records[:self.batch_size], self._records[self.batch_size:]
            decisions, self._decisions = self._decisions, []
            loop = asyncio.get_running_loop()
            if self.store_ok:
                try:
                    # shield: on timeout the write keeps running in its thread; a late success is harmless.
                    await asyncio.wait_for(asyncio.shield(
                        loop.run_in_executor(self.executor, self._write, records, decisions)), self.timeout_s)
                    self.written += len(records)
                    continue
                except Exception as exc:  # noqa: BLE001 - any failure: spool, never drop
                    self.store_ok = False
                    self.last_error = (f"write took longer than {self.timeout_s:g}s"
                                       if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}")
                    log.error("guard: log store write failed (%s); spooling to %s", self.last_error,
                              self.spool.dir)
            try:
                self._spool_dirty = True
                await loop.run_in_executor(self._spool_executor, self.spool.append, records, decisions)
                self.spooled += len(records)
            except Exception as exc:  # noqa: BLE001
                # Keep them in memory and retry: losing them silently is the one thing we must not do.
                self._records[:0] = records
                self._decisions[:0] = decisions
                log.critical("guard: cannot spool %d log records to %s (%s); holding them in memory",
                             len(records), self.spool.dir, exc)
                await asyncio.sleep(self.retry_s)
                return

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:
                log.exception("guard: log writer loop failed")
        await self.flush()
        self._spool_executor.shutdown(wait=True)

    def stats(self) -> dict[str, Any]:
        return {"store_ok": self.store_ok, "last_error": self.last_error, "written": self.written,
                "lag_s": round(self.lag_s(), 3),
                "spooled": self.spooled, "replayed": self.replayed, "pending": self.pending,
                "spool_files": len(self.spool.files())}


if __name__ == "__main__":  # pragma: no cover
    import sys

    from stillhouse.guard.store import open_store

    spool_dir, url = sys.argv[1], sys.argv[2]
    print(f"replayed {Spool(spool_dir).replay(open_store(url))} records from {spool_dir} into {url}")
