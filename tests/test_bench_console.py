"""`stillhouse bench console` end to end on a small SQLite log: the fill writes rows the guard's own store
reads back (every column the store has today), and every console page answers 200 when measured."""

from __future__ import annotations

from pathlib import Path

from stillhouse.bench.console import BenchConsoleConfig, run_backend
from stillhouse.guard.store import open_store


def test_bench_console_fills_a_log_the_store_reads_and_measures_every_page(tmp_path: Path) -> None:
    cfg = BenchConsoleConfig(records=2000, accounts=20, requests_per_page=5, warmup=1, backends=("sqlite",))
    result = run_backend("sqlite", cfg, tmp_path, log=lambda *_: None)
    pages = result["pages"]
    assert {"accounts (by score)", "account (busiest)"} <= set(pages)
    assert all(p["n"] == 5 and 0 < p["p50_ms"] <= p["p95_ms"] <= p["max_ms"] for p in pages.values())
    assert result["worst_p95_ms"] == max(p["p95_ms"] for p in pages.values())
    store = open_store(f"sqlite:///{tmp_path}/console-bench.db")
    try:
        records = store.read_records()
    finally:
        store.close()
    assert len(records) == 2000
    assert len({r.account_id for r in records}) <= 20
    assert all(r.watermark_key_id == "" for r in records)  # a column the fill does not name keeps its default
