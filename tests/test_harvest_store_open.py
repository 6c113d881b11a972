"""Several processes open one new harvest store at once (a sharded harvest: `harvest --shard i/n` jobs into one
--out), and every one of them gets it. SQLite answers one of two processes that switch a new database to WAL or
create its schema together "database is locked" at once, without waiting (its deadlock avoidance): before the
retry in ``HarvestStore._init_writable`` 7 of 40 six-process openings had a failure, and so did a sharded run of
scripts/exp_ceiling.py in the suite."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

from stillhouse.distill.store import HarvestStore


def _open(run_dir: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        with HarvestStore(run_dir) as store:
            store.set_meta("opened", "yes")
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - the failure itself is what the test reports
        results.put(f"{type(exc).__name__}: {exc}")


def test_six_processes_open_one_new_store_together(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    for trial in range(15):
        run_dir = tmp_path / f"run-{trial}"
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(str(run_dir), barrier, results)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=60)
        got = [results.get(timeout=5) for _ in procs]
        assert got == ["ok"] * 6, (trial, [g for g in got if g != "ok"])
        with HarvestStore(run_dir, readonly=True) as store:
            assert store.get_meta("opened") == "yes"
