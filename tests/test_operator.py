"""The operator path for the detector: windows of the guard's own log, exclusions (SQLite and PostgreSQL),
the check before enforcing (its arithmetic and exit codes), the drift statistic against a naive reference,
atomic promotion under kill -9, and the watch (one period through the CLI)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pg import skip_reason
from stillhouse.guard.detect import DetectConfig, WindowDetector
from stillhouse.guard.detect.check import CheckConfig, TierCheck, check_window, sci, wilson
from stillhouse.guard.detect.drift import bin_shares, psi, psi_from_quantiles, quantile_edges
from stillhouse.guard.detect.load import load_detector
from stillhouse.guard.detect.logwindow import (
    WindowError,
    parse_duration,
    parse_time,
    read_window,
    resolve_window,
)
from stillhouse.guard.detect.promote import (
    adopt,
    current_version,
    new_version,
    promote,
    prune,
    repair,
    versions_dir,
)
from stillhouse.guard.detect.watch import WatchConfig, watch_once
from stillhouse.guard.events import AccountInfo, TrafficRecord
from stillhouse.guard.store import DecisionRow, ReviewRow, open_store
from test_detect import T0, _benign, _campaign

DAY = 86400.0
PG_SKIP = skip_reason()


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from stillhouse.cli import app

    return CliRunner().invoke(app, list(args))


def _population(n: int, seed: int, start: float) -> tuple[list[TrafficRecord], dict[str, AccountInfo]]:
    """``_benign``'s accounts over three days from ``start``, with request ids unique across seeds."""
    records, infos = _benign(n, seed)
    return [replace(r, request_id=f"s{seed}-{r.request_id}", ts=r.ts - T0 + start) for r in records], infos


def _store(url: str, records: list[TrafficRecord], infos: dict[str, AccountInfo]) -> Any:
    store = open_store(url)
    for info in infos.values():
        store.put_account(info)
    store.write_records(sorted(records, key=lambda r: (r.ts, r.request_id)))
    return store


# ------------------------------------------------------------------ times and windows
def test_durations_and_times_in_every_form() -> None:
    assert parse_duration("90s") == 90 and parse_duration("30m") == 1800 and parse_duration("24h") == DAY
    assert parse_duration("7d") == 7 * DAY and parse_duration("2w") == 14 * DAY and parse_duration("1.5d") == 1.5 * DAY
    for bad in ("", "7", "7x", "-1d", "d"):
        with pytest.raises(WindowError, match="--window=.*duration like"):
            parse_duration(bad, "--window")
    with pytest.raises(WindowError, match="longer than 0"):
        parse_duration("0d")
    now = 1_800_000_000.0
    assert parse_time("2026-03-01", now) == datetime(2026, 3, 1, tzinfo=UTC).timestamp()   # a date is UTC midnight
    assert parse_time("2026-03-01T12:00:00+01:00", now) == datetime(2026, 3, 1, 11, tzinfo=UTC).timestamp()
    assert parse_time("2026-03-01T12:00Z", now) == datetime(2026, 3, 1, 12, tzinfo=UTC).timestamp()
    assert parse_time("1772323200", now) == 1772323200.0 and parse_time("0", now) == 0.0
    assert parse_time("7d", now) == now - 7 * DAY
    with pytest.raises(WindowError, match="--since='yesterday'.*ISO date"):
        parse_time("yesterday", now, "--since")


def test_window_edges_count_back_from_until_then_now() -> None:
    now = 1_800_000_000.0
    assert resolve_window("", "", now) == (None, None)
    assert resolve_window("7d", "", now) == (now - 7 * DAY, None)             # no until: back from now
    assert resolve_window("7d", "1d", now) == (now - 8 * DAY, now - DAY)      # since counts back from until
    assert resolve_window("100", "200", now) == (100.0, 200.0)
    assert resolve_window("", "2026-03-08", now) == (None, datetime(2026, 3, 8, tzinfo=UTC).timestamp())
    with pytest.raises(WindowError, match="not before --until"):
        resolve_window("2026-03-08", "2026-03-01", now)
    with pytest.raises(ValueError, match=r"CheckConfig.since='soon'"):
        CheckConfig(since="soon")
    with pytest.raises(ValueError, match="WatchConfig.window='7'"):
        WatchConfig(window="7")
    with pytest.raises(ValueError, match="WatchConfig.keep"):
        WatchConfig(keep=1)


def _ex_world(url: str) -> tuple[Any, float, float]:
    """Eight accounts, two records each inside [100, 200) and one outside; decisions and reviews of every kind."""
    since, until = 100.0, 200.0
    recs: list[TrafficRecord] = []
    infos = {}
    for k, aid in enumerate("abcdefgh"):
        infos[aid] = AccountInfo(aid, payment_fingerprint=f"card-{aid}")
        for j, ts in enumerate((50.0 + k, 120.0 + k, 150.0 + k, 250.0 + k)):
            recs.append(TrafficRecord(f"{aid}{j}", ts, aid, f"k{aid}", messages=[{"role": "user", "content": aid}]))
    store = _store(url, recs, infos)

    def dec(did: str, target: str, action: str, source: str, created: float, cleared: float | None = None,
            scope: str = "account", shadow: bool = False) -> DecisionRow:
        return DecisionRow(did, scope, target, action, "why", source, created, "t", [], shadow, cleared,
                           "t" if cleared else "")

    store.put_decisions([
        dec("d-a", "a", "block", "detector", 150.0),                   # made in the window
        dec("d-b", "b", "throttle", "manual", 10.0),                   # active at its end, made before it
        dec("d-c", "c", "block", "manual", 10.0, cleared=90.0),        # over before the window: kept
        dec("d-d", "d", "block", "detector", 250.0),                   # made after it: kept
        dec("d-f", "f", "throttle", "detector", 130.0, shadow=True),   # flagged in shadow, reviewed benign: kept
        dec("d-g", "g", "allow", "manual", 10.0),                      # a manual allow is no suspicion: kept
        dec("d-h", "clu-1", "block", "manual", 10.0, cleared=110.0, scope="cluster"),  # cleared during it
    ])
    store.put_scores([("h", 120.0, 3.0, "clu-1", "[]")])
    store.add_review(ReviewRow("r-e", "", "e", "confirmed", 1, "campaign", "ann", 160.0))
    store.add_review(ReviewRow("r-f", "d-f", "f", "dismissed", 0, "a student", "ann", 170.0))
    return store, since, until


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/g.db"
    if PG_SKIP:
        pytest.skip(PG_SKIP)
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="module")
def pg():  # type: ignore[no-untyped-def]
    from pg import PgCluster

    if PG_SKIP:
        pytest.skip(PG_SKIP)
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg) -> str:  # type: ignore[no-untyped-def]
    import psycopg

    name = f"w{int(time.time() * 1e6) % 10**9}"
    with psycopg.connect(pg.url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    return str(pg.url.rsplit("/", 1)[0] + "/" + name)


def test_a_window_leaves_out_decided_and_labelled_accounts(store_url: str) -> None:
    store, since, until = _ex_world(store_url)
    store.close()
    w = read_window(store_url, since, until)
    assert w.exclusions.reasons == {"a": "detector decision", "b": "manual decision", "e": "labelled campaign",
                                    "h": "cluster decision"}
    assert w.exclusions.kept_reviewed == ["f"]
    assert sorted({r.account_id for r in w.records}) == ["c", "d", "f", "g"]
    assert all(since <= r.ts < until for r in w.records) and len(w.records) == 8 and w.excluded_records == 8
    assert [(r.ts, r.request_id) for r in w.records] == sorted((r.ts, r.request_id) for r in w.records)
    assert set(w.accounts) == {"c", "d", "f", "g"} and w.accounts["c"].payment_fingerprint == "card-c"
    d = w.describe()
    assert d["excluded_by_reason"] == {"cluster decision": 1, "detector decision": 1, "labelled campaign": 1,
                                       "manual decision": 1} and d["kept_reviewed_benign"] == 1
    line = w.summary()
    assert "excluded 4 accounts (8 records)" in line and "1 labelled campaign" in line and "kept 1" in line
    everyone = read_window(store_url, since, until, exclude=False)
    assert len(everyone.records) == 16 and not everyone.exclusions.reasons
    assert len(read_window(store_url, None, None, exclude=False).records) == 32


def test_the_time_range_read_pages_by_keyset(store_url: str) -> None:
    url = store_url
    recs = [TrafficRecord(f"id{i:03d}", float(i // 3), f"a{i % 4}", "k") for i in range(40)]  # ties in ts
    store = _store(url, recs, {})
    whole = store.read_records(since=2.0, until=11.0)
    assert [r.request_id for r in whole] == sorted(r.request_id for r in recs if 2.0 <= r.ts < 11.0)
    for page in (1, 2, 3, 5, 100):
        assert [r.request_id for r in store.iter_records(2.0, 11.0, page=page)] == [r.request_id for r in whole]
    assert len(list(store.iter_records(None, None, page=7))) == 40
    assert [r.request_id for r in store.iter_records(5.0, None, page=4)] == [r.request_id for r in whole][9:] + \
        sorted(r.request_id for r in recs if r.ts >= 11.0)
    if url.startswith("sqlite"):
        for sql, args in (("ts >= ? AND ts < ?", (2.0, 11.0)), ("(ts, request_id) > (?, ?) AND ts < ?", (2.0, "x", 9.0))):
            plan = " ".join(str(row) for row in store.fetch(f"EXPLAIN QUERY PLAN SELECT request_id FROM traffic WHERE "
                                                            f"{sql} ORDER BY ts, request_id LIMIT 5", args))
            assert "traffic_ts" in plan and "TEMP B-TREE" not in plan   # the index, not a scan and a sort
    store.close()


def test_a_jsonl_window_filters_by_time_and_says_nothing_was_excluded(tmp_path: Path) -> None:
    from stillhouse.guard.detect.offline import records_to_jsonl

    recs = [TrafficRecord(f"x{i}", float(i), "a", "k") for i in range(10)]
    records_to_jsonl(recs, tmp_path / "l.jsonl")
    w = read_window(str(tmp_path / "l.jsonl"), 3.0, 7.0)
    assert [r.ts for r in w.records] == [3.0, 4.0, 5.0, 6.0] and "nothing excluded" in w.summary()


# ------------------------------------------------------------------ the check
def test_wilson_matches_the_reference_and_the_tier_arithmetic() -> None:
    from stillhouse.distill.metrics import wilson_interval

    for k, n in ((0, 10), (2, 2050), (5, 5), (17, 400), (0, 0)):
        assert wilson(k, n) == pytest.approx(wilson_interval(k, n), abs=1e-12)
    t = TierCheck("block", 30.0, 1e-3, 2, 2050, 2.0)
    lo, hi = wilson_interval(2, 2050)
    assert t.ok and t.resolvable
    assert t.line() == f"block tier (score > 30): 2/2,050 = {sci(2 / 2050)} [{sci(lo)}, {sci(hi)}] vs stated 1e-3: OK"
    assert sci(2 / 2050) == "9.8e-4" and sci(1e-2) == "1e-2"
    # the boundary: exactly factor x stated passes, one more account fails
    assert TierCheck("block", 1, 1e-3, 4, 2000, 2.0).ok
    bad = TierCheck("block", 1, 1e-3, 5, 2000, 2.0)
    assert not bad.ok and "TOO HIGH (2.5x > 2x)" in bad.line() and "--block-fpr" in bad.line()
    small = TierCheck("block", 1, 1e-3, 0, 300, 2.0)
    assert small.ok and not small.resolvable and "cannot resolve" in small.line()
    assert "NO ACCOUNTS" in TierCheck("throttle", 1, 1e-2, 0, 0, 2.0).line()


@pytest.fixture(scope="module")
def fitted_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A detector fitted through the CLI on the first window of a SQLite log; the log has a second window."""
    work = tmp_path_factory.mktemp("op")
    url = f"sqlite:///{work}/g.db"
    first, infos = _population(160, 1, T0)
    second, more = _population(120, 2, T0 + 4 * DAY)
    _store(url, first + second, {**infos, **more}).close()
    res = _cli("detect", "--fit", "--log", url, "--since", str(T0), "--until", str(T0 + 4 * DAY),
               "--model", str(work / "det"), "--cluster-every", "200")
    assert res.exit_code == 0, res.output
    assert "excluded none" in res.output and "fitted on" in res.output
    return work / "det", url


def test_fit_on_a_window_records_it_and_check_counts_as_a_naive_count_does(fitted_dir: tuple[Path, str]) -> None:
    model, url = fitted_dir
    det = load_detector(model)
    win = det.calibration_["window"]
    assert win["since"] == T0 and win["until"] == T0 + 4 * DAY and win["accounts"] == 160
    check_win = read_window(url, T0 + 4 * DAY, None)
    report = check_window(det, check_win, factor=2.0)
    # naive: own requests per account, and each counted account's maximum score from an offline replay
    from stillhouse.guard.detect.offline import replay

    n_req: dict[str, int] = {}
    for r in check_win.records:
        n_req[r.account_id] = n_req.get(r.account_id, 0) + 1
    counted = [a for a, n in n_req.items() if n >= det.config.min_requests]
    fresh = load_detector(model)
    replay(fresh, check_win.records, check_win.accounts)
    maxima = [fresh.max_score_.get(a, 0.0) for a in counted]
    assert report.eligible == len(counted) and report.accounts == len(n_req) == 120
    for t in report.tiers:
        assert t.k == sum(m > det.thresholds_[t.tier] for m in maxima)
    assert report.scores == sorted(maxima) and not report.overlaps_fit
    assert check_window(det, check_win).to_dict()["tiers"] == report.to_dict()["tiers"]   # the detector was reset


def test_check_cli_passes_fails_with_exit_1_and_records_the_reference(fitted_dir: tuple[Path, str],
                                                                     tmp_path: Path) -> None:
    import shutil

    model, url = fitted_dir
    res = _cli("detect", "check", "--log", url, "--model", str(model), "--since", str(T0 + 4 * DAY))
    assert "counted: the" in res.output and "throttle tier (score >" in res.output
    recorded = json.loads((model / "check.json").read_text())
    assert recorded["passed"] == (res.exit_code == 0) and len(recorded["reference_scores"]) == recorded["eligible"]
    # the same model with thresholds below every benign score: every counted account is over, exit 1
    low = tmp_path / "low"
    shutil.copytree(model, low)
    meta = json.loads((low / "detector.json").read_text())
    meta["thresholds"] = {"throttle": -1.0, "block": -1.0}
    (low / "detector.json").write_text(json.dumps(meta))
    res = _cli("detect", "check", "--log", url, "--model", str(low), "--since", str(T0 + 4 * DAY), "--show", "3")
    assert res.exit_code == 1, res.output
    assert "TOO HIGH" in res.output and "check: FAIL (throttle, block)" in res.output
    assert res.output.count(" max score ") == 3 and "/console/review" in res.output
    # overlapping the fit window is called out; a bad time is a one-line usage error
    res = _cli("detect", "check", "--log", url, "--model", str(model), "--since", str(T0), "--until",
               str(T0 + 5 * DAY), "--no-record")
    assert "overlaps the fit window" in res.output
    res = _cli("detect", "check", "--log", url, "--model", str(model), "--since", "last tuesday")
    assert res.exit_code == 2 and "--since" in res.output and "ISO date" in res.output
    res = _cli("detect", "check", "--log", url, "--model", str(model), "--factor", "0.5")
    assert res.exit_code == 2 and "--factor" in res.output
    res = _cli("detect", "--fit", "--log", url, "--since", str(T0 + 90 * DAY), "--model", str(tmp_path / "x"))
    assert res.exit_code == 2 and "holds no traffic records" in res.output


# ------------------------------------------------------------------ drift
def _psi_naive(reference: list[float], current: list[float], bins: int = 10, eps: float = 1e-4) -> float:
    ref = sorted(reference)
    edges: list[float] = []
    for i in range(1, bins):
        q = float(np.quantile(np.array(ref), i / bins))
        if not edges or q != edges[-1]:
            edges.append(q)

    def share(xs: list[float]) -> list[float]:
        counts = [0] * (len(edges) + 1)
        for x in xs:
            j = 0
            while j < len(edges) and x > edges[j]:   # bins (e_{j-1}, e_j]
                j += 1
            counts[j] += 1
        return [c / len(xs) for c in counts]

    e, a = share(reference), share(current)
    return sum((max(ai, eps) - max(ei, eps)) * math.log(max(ai, eps) / max(ei, eps)) for ai, ei in zip(a, e))


def test_psi_equals_a_naive_reference_and_reads_as_a_shift() -> None:
    rng = np.random.default_rng(7)
    ref = rng.gamma(2.0, 3.0, 800).tolist()
    same = rng.gamma(2.0, 3.0, 900).tolist()
    shifted = (rng.gamma(2.0, 3.0, 900) * 1.6 + 2.0).tolist()
    tied = [0.0] * 300 + rng.gamma(2.0, 3.0, 500).tolist()      # many equal scores: merged edges
    for cur in (same, shifted, tied, ref):
        assert psi(ref, cur) == pytest.approx(_psi_naive(ref, cur), rel=1e-12, abs=1e-12)
    assert psi(tied, shifted) == pytest.approx(_psi_naive(tied, shifted), rel=1e-12)
    assert psi(ref, ref) == 0.0
    assert psi(ref, same) < 0.1 and psi(ref, shifted) > 0.25
    assert quantile_edges(tied).size < 9 and bin_shares(tied, quantile_edges(tied)).sum() == pytest.approx(1.0)


def test_psi_from_stored_quantiles_uses_their_levels_as_shares() -> None:
    rng = np.random.default_rng(3)
    cur = rng.gamma(2.0, 3.0, 1000)
    q = {"0.5": 5.0, "0.9": 11.0, "0.99": 20.0, "1.0": 30.0}
    a = [np.mean(cur <= 5), np.mean((cur > 5) & (cur <= 11)), np.mean((cur > 11) & (cur <= 20)),
         np.mean((cur > 20) & (cur <= 30)), np.mean(cur > 30)]
    e = [0.5, 0.4, 0.09, 0.01, 0.0]
    want = sum((max(x, 1e-4) - max(y, 1e-4)) * math.log(max(x, 1e-4) / max(y, 1e-4)) for x, y in zip(a, e))
    assert psi_from_quantiles(q, cur) == pytest.approx(want, rel=1e-12)
    # a tie merges a level into the bin below: (-inf, 0] holds 0.9 of the reference, (0, 10] the other 0.1
    assert psi_from_quantiles({0.5: 0.0, 0.9: 0.0, 1.0: 10.0}, [0.0] * 9 + [5.0]) == pytest.approx(0.0, abs=1e-12)
    assert psi_from_quantiles({0.5: 0.0, 0.9: 0.0, 1.0: 10.0}, [0.0] * 5 + [5.0] * 5) == pytest.approx(
        (0.5 - 0.9) * math.log(0.5 / 0.9) + (0.5 - 0.1) * math.log(0.5 / 0.1), rel=1e-12)


# ------------------------------------------------------------------ promotion
def _fake_model(d: Path, tag: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "detector.json").write_text(json.dumps({"tag": tag}))
    (d / "detector.npz").write_bytes(os.urandom(64))
    return d


def test_adopt_promote_prune_and_repair(tmp_path: Path) -> None:
    model = _fake_model(tmp_path / "det", "v0")
    first = adopt(model)
    assert model.is_symlink() and current_version(model) == first and first.parent == versions_dir(model).resolve()
    assert json.loads((model / "detector.json").read_text())["tag"] == "v0"
    assert not os.path.isabs(os.readlink(model))   # relative: the tree can move
    for i in range(1, 6):
        v = _fake_model(new_version(model), f"v{i}")
        assert promote(model, v) is not None
        assert json.loads((model / "detector.json").read_text())["tag"] == f"v{i}"
    removed = prune(model, keep=3)
    assert len(removed) == 3 and current_version(model) in set(versions_dir(model).iterdir()) | {current_version(model)}
    assert len([d for d in versions_dir(model).iterdir() if d.is_dir()]) == 3
    # a crash between adopt's two renames: the model path is missing; repair puts the link back
    plain = _fake_model(tmp_path / "d2", "plain")
    target = new_version(plain)
    target.rmdir()
    (versions_dir(plain) / "CURRENT").write_text(target.name + "\n")
    os.rename(plain, target)
    assert not plain.exists() and repair(plain) and json.loads((plain / "detector.json").read_text())["tag"] == "plain"
    with pytest.raises(Exception, match="not a fitted detector"):
        promote(model, new_version(model))


_PROMOTER = """
import json, os, shutil, sys
from pathlib import Path
from stillhouse.guard.detect.promote import new_version, promote
model = Path(sys.argv[1])
src = [Path(p) for p in sys.argv[2:]]
i = 0
while True:
    v = new_version(model)
    for f in src[i % len(src)].iterdir():
        shutil.copyfile(f, v / f.name)
    promote(model, v)
    i += 1
"""


def test_kill_9_mid_promotion_leaves_a_whole_model(fitted_dir: tuple[Path, str], tmp_path: Path) -> None:
    """A process promoting in a loop is killed at random moments: the model always loads, whole, as one of the two."""
    import shutil

    model_src, _ = fitted_dir
    a = tmp_path / "a"
    shutil.copytree(model_src, a, ignore=shutil.ignore_patterns("check.json"))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    meta = json.loads((b / "detector.json").read_text())
    meta["thresholds"] = {k: v + 1.0 for k, v in meta["thresholds"].items()}
    (b / "detector.json").write_text(json.dumps(meta))
    want = {json.dumps(json.loads((d / "detector.json").read_text())["thresholds"], sort_keys=True) for d in (a, b)}
    model = tmp_path / "live"
    shutil.copytree(a, model)
    adopt(model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    rng = np.random.default_rng(0)
    promotions = 0
    for _ in range(8):
        before = len(list(versions_dir(model).iterdir()))
        proc = subprocess.Popen([sys.executable, "-c", _PROMOTER, str(model), str(a), str(b)], env=env)
        deadline = time.monotonic() + 60
        while len(list(versions_dir(model).iterdir())) == before:   # it has started promoting
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        time.sleep(float(rng.uniform(0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        promotions += len(list(versions_dir(model).iterdir())) - before
        det = load_detector(model)      # never half-written, never missing
        assert json.dumps(det.thresholds_, sort_keys=True) in want
    assert promotions >= 8   # the kills did land among promotions


# ------------------------------------------------------------------ the watch
def test_watch_promotes_a_checked_candidate_and_alarms_on_drift(tmp_path: Path) -> None:
    """Three 3-day windows: the live model from the first, a candidate from the second checked on the third."""
    url = f"sqlite:///{tmp_path}/g.db"
    w = 4 * DAY
    recs: list[TrafficRecord] = []
    infos: dict[str, AccountInfo] = {}
    for k, seed in enumerate((11, 12, 13)):
        r, i = _population(130, seed, T0 + k * w)
        recs += r
        infos |= i
    _store(url, recs, infos).close()
    model = tmp_path / "det"
    res = _cli("detect", "--fit", "--log", url, "--until", str(T0 + w), "--model", str(model), "--cluster-every", "200")
    assert res.exit_code == 0, res.output
    now = T0 + 3 * w
    status = watch_once(WatchConfig(window="4d", keep=3), url, model, now)
    assert status["fit_window"]["since"] == now - 2 * w and status["check_window"]["until"] == now
    assert status["fit_window"]["accounts"] == 130 and status["check_window"]["accounts"] == 130
    assert status["drift"]["psi"] is not None and "calibration quantiles" in status["drift"]["method"]
    cand = status["candidate"]
    assert cand["promoted"] == cand["check"]["passed"]
    if cand["promoted"]:
        assert current_version(model) == Path(cand["version"]).resolve()
        assert load_detector(model).calibration_["window"]["since"] == now - 2 * w
    saved = json.loads((tmp_path / "det.watch.json").read_text())
    assert saved["candidate"]["version"] == cand["version"] and saved["alarm"] == bool(saved["alarms"])

    # campaigns in the newest window: the live model's score distribution moves, and the watch says so (exit 1)
    camp = [replace(r, request_id=f"c{k}-{r.request_id}", account_id=f"evil{k}", ts=r.ts - T0 - 1000 + now + DAY)
            for k in range(60) for r in _campaign(0)[:12]]
    store = open_store(url)
    store.write_records(camp)
    store.close()
    res = _cli("detect", "watch", "--log", url, "--model", str(model), "--window", "4d", "--once",
               "--now", str(now + 2 * DAY))
    assert res.exit_code == 1, res.output
    assert "ALARM: benign score drift: PSI" in res.output or "ALARM: live model" in res.output
    saved = json.loads((tmp_path / "det.watch.json").read_text())
    assert saved["alarm"] and saved["drift"]["psi"] > 0.25
    res = _cli("detect", "watch", "--log", url, "--model", str(model), "--now", str(now))
    assert res.exit_code == 2 and "--once" in res.output


def test_detector_fit_unchanged_by_the_window_path(tmp_path: Path) -> None:
    """`detect --fit --log DB` (no window) fits on exactly what fit() on the whole log gives."""
    url = f"sqlite:///{tmp_path}/g.db"
    recs, infos = _population(100, 5, T0)
    _store(url, recs, infos).close()
    res = _cli("detect", "--fit", "--log", url, "--model", str(tmp_path / "d"), "--cluster-every", "200")
    assert res.exit_code == 0, res.output
    direct = WindowDetector(DetectConfig(cluster_every=200)).fit(recs, infos)
    assert load_detector(tmp_path / "d").thresholds_ == pytest.approx(direct.thresholds_)


def test_check_and_watch_settings_are_documented_options() -> None:
    import dataclasses

    import typer

    from stillhouse.cli import app
    from stillhouse.cli_config import undocumented_fields

    detect = typer.main.get_command(app).commands["detect"]  # type: ignore[attr-defined]
    for verb, cls in (("check", CheckConfig), ("watch", WatchConfig)):
        assert undocumented_fields(cls) == []
        params = {p.name for p in detect.commands[verb].params}
        assert {f.name for f in dataclasses.fields(cls)} <= params, (verb, params)
    res = _cli("detect")
    assert res.exit_code == 2 and "missing --log" in res.output
