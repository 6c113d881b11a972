"""The guard benchmark's maths against numpy, and a tiny end-to-end run (no LiteLLM, ~10 s)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from stillhouse.bench.guard import GuardBenchConfig, format_markdown, percentile, run_bench, summarize


def test_percentile_matches_numpy():
    rng = random.Random(1)
    for n in (1, 2, 7, 100, 1001):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 1, 50, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) != percentile([], 50)  # NaN for no data


def test_summary_ratios():
    result = {
        "latency": {"direct": {"p50_ms": 50.0, "p99_ms": 60.0},
                    "guard": {"p50_ms": 51.0, "p99_ms": 64.0, "server_cpu_ms_per_request": 0.5}},
        "throughput": {"200": {"direct": {"achieved_rps": 200.0}, "guard": {"achieved_rps": 190.0}}},
        "lossless": {"requests": 10, "answered": 10, "client_errors": 0, "logged": 10, "still_in_spool": 0, "lost": 0},
        "config": {"latency_requests": 10, "latency_concurrency": 1, "latency_ms": 50.0, "duration_s": 1.0},
    }
    s = summarize(result)["guard"]
    assert s["added_p50_ms"] == 1.0 and s["added_p99_ms"] == 4.0
    assert s["throughput_ratio_at_200"] == 0.95 and s["log_records_lost"] == 0
    result["throughput"]["200"]["direct"].update(sent=200, ok=200, p50_ms=1, p99_ms=2)
    result["throughput"]["200"]["guard"].update(sent=200, ok=190, p50_ms=1, p99_ms=2)
    md = format_markdown(result)
    assert "| guard | 51.0 | 64.0 | +1.0 | +4.0 | 0.50 |" in md and "**0 lost**" in md


def test_bench_config_validation():
    with pytest.raises(ValueError, match="rates"):
        GuardBenchConfig(rates=())
    with pytest.raises(ValueError, match="latency_requests"):
        GuardBenchConfig(latency_requests=1)


def test_tiny_bench_run(tmp_path):
    # CPU time is read in clock ticks (10 ms): 400 requests at ~0.3 ms each span many ticks, 50 could span none.
    cfg = GuardBenchConfig(latency_ms=5, rates=(50.0,), duration_s=1.0, drain_s=2.0, latency_requests=400,
                           latency_concurrency=8, lossless_requests=300, lossless_concurrency=8, peers=False)
    r = run_bench(cfg, work=tmp_path)
    assert not r["errors"], r["errors"]
    assert r["lossless"]["lost"] == 0 and r["lossless"]["logged"] == 300
    assert r["summary"]["guard"]["throughput_ratio_at_50"] > 0.5
    assert r["latency"]["guard"]["server_cpu_ms_per_request"] > 0
    assert r["lossless_run"]["guard_cpu_ms_per_request"] > 0


def test_detector_arm_summary_and_validation(tmp_path):
    result = {
        "latency": {"direct": {"p50_ms": 50.0, "p99_ms": 60.0},
                    "guard": {"p50_ms": 50.8, "p99_ms": 62.0, "server_cpu_ms_per_request": 0.40},
                    "guard+detector": {"p50_ms": 51.0, "p99_ms": 63.5, "server_cpu_ms_per_request": 0.55}},
        "config": {"latency_requests": 10, "latency_concurrency": 1, "latency_ms": 50.0, "duration_s": 1.0,
                   "latency_rounds": 2},
    }
    s = summarize(result)
    assert s["detector"] == {"added_p50_ms": 0.2, "added_p99_ms": 1.5, "added_cpu_ms_per_request": 0.15}
    assert s["guard+detector"]["added_p50_ms"] == 1.0
    md = format_markdown(result)
    assert "p50 +0.20 ms, p99 +1.50 ms, CPU +0.150 ms/request" in md and "2 interleaved round(s)" in md
    with pytest.raises(ValueError, match="detector_inline needs detector_dir"):
        GuardBenchConfig(detector_inline=True)
    with pytest.raises(ValueError, match="stillhouse detect --fit"):
        GuardBenchConfig(detector_dir=str(tmp_path))
    with pytest.raises(ValueError, match="latency_rounds"):
        GuardBenchConfig(latency_requests=10, latency_rounds=11)
