"""Refit on a schedule, alarm on drift, promote a checked candidate: ``stillhouse detect watch``.

Each period, at time ``now``, with ``W`` the window length (``WatchConfig.window``):

1. the **check window** ``[now - W, now)`` and the **fit window** ``[now - 2W, now - W)`` are read from the log,
   the accounts under a decision or labelled campaign left out (:mod:`.logwindow`);
2. **drift**: the live model (what ``--model`` points to) is replayed over the check window
   (:func:`.check.check_window`); its per-account maximum scores are compared with the distribution it was
   checked on (its ``check.json``; else its calibration's stored quantiles) by the population stability index
   (:mod:`.drift`). An alarm line is printed when the PSI exceeds ``psi_alarm``, or when the live model's
   realized share over a tier exceeds ``factor`` times its stated FPR;
3. **refit**: a candidate is fitted on the fit window with the live model's config, saved as a new version
   (:mod:`.promote`) and checked on the check window: later than its fit window and disjoint from it, as an
   operator checks a model before enforcing it. It is promoted (one atomic rename) only if its check passes;
4. the **status** JSON (``WatchConfig.status``; default ``MODEL.watch.json`` beside the model) is rewritten
   atomically: windows, drift, both checks, the promotion, the alarms. The guard's ``/metrics`` exports it
   as gauges (``stillhouse_guard_detector_drift_psi`` ...), and a guard told to (``--guard URL``, or polling
   with ``GuardConfig.detector_reload_s``) reloads the promoted model without a restart.

Fitting on the older window and checking on the newer means a promoted model's data ends one window before
its promotion: the price of checking every model on traffic it never saw before it enforces anything.

Run: ``stillhouse detect watch --log DB_URL --model DIR --every 24h --window 7d [--once]``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stillhouse.guard.detect.logwindow import WindowError, fmt_time, parse_duration, parse_time


@dataclass(frozen=True)
class WatchConfig:
    """``stillhouse detect watch``: the schedule, the windows and the alarm thresholds."""

    every: str = "24h"
    """How often to run a period (a duration: 30m, 24h, 7d)."""
    window: str = "7d"
    """Window length W: candidates fit on [now-2W, now-W) and are checked on [now-W, now), where drift is measured
    too. Use the detector's own window (DetectConfig.window_s, 7 days) so the rates compare with its stated FPRs."""
    factor: float = 2.0
    """A tier fails a check when its realized share exceeds this many times its stated FPR."""
    psi_alarm: float = 0.25
    """Alarm when the benign score distribution's PSI against the live model's reference exceeds this (0.1-0.25:
    a moderate shift; above 0.25: a significant one)."""
    keep: int = 5
    """Model versions kept beside the model (at least 2: the previous one stays for a rollback)."""
    now: str = ""
    """'' = the wall clock; a fixed time (ISO or unix seconds) runs one period as of then (with --once), e.g. over a
    past or simulated log."""
    status: str = ""
    """Where to write the status JSON ('' = MODEL.watch.json beside the model)."""

    def __post_init__(self) -> None:
        for name in ("every", "window"):
            try:
                parse_duration(getattr(self, name), f"WatchConfig.{name}")
            except WindowError as exc:
                raise ValueError(str(exc)) from None
        if not self.factor >= 1.0:
            raise ValueError(f"WatchConfig.factor={self.factor}: must be >= 1")
        if not self.psi_alarm > 0:
            raise ValueError(f"WatchConfig.psi_alarm={self.psi_alarm}: must be > 0 (0.25 is the usual alarm)")
        if self.keep < 2:
            raise ValueError(f"WatchConfig.keep={self.keep}: must be >= 2 (the previous model stays for a rollback)")
        if self.now.strip():
            try:
                parse_time(self.now, 0.0, "WatchConfig.now")
            except WindowError as exc:
                raise ValueError(str(exc)) from None

    @property
    def every_s(self) -> float:
        return parse_duration(self.every, "every")

    @property
    def window_s(self) -> float:
        return parse_duration(self.window, "window")


def default_status_path(model: str | Path) -> Path:
    """``MODEL.watch.json`` beside the model link (where the guard's /metrics looks for it)."""
    m = Path(model)
    return m.with_name(m.name + ".watch.json")


def status_path(cfg: WatchConfig, model: str | Path) -> Path:
    return Path(cfg.status) if cfg.status else default_status_path(model)


def read_status(path: str | Path) -> dict[str, Any] | None:
    """A watch status JSON, or None when missing or unreadable (the guard's metrics read it at scrape time)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def drift_of(model_dir: Path, report: Any, calibration: dict[str, Any]) -> dict[str, Any]:
    """PSI of a check's scores against the model's reference (its check.json, else its calibration quantiles)."""
    from stillhouse.guard.detect.drift import psi, psi_from_quantiles, quantiles

    ref_file = model_dir / "check.json"
    ref = None
    if ref_file.is_file():
        try:
            ref = json.loads(ref_file.read_text()).get("reference_scores") or None
        except ValueError:
            ref = None
    if ref and report.scores:
        return {"psi": psi(ref, report.scores), "method": "the model's check window (check.json)",
                "reference_quantiles": quantiles(ref), "current_quantiles": quantiles(report.scores),
                "reference_accounts": len(ref), "current_accounts": len(report.scores)}
    q = calibration.get("benign_max_score_quantiles")
    if q and report.all_max_scores:
        return {"psi": psi_from_quantiles(q, report.all_max_scores),
                "method": "the model's calibration quantiles (no check.json: approximate)",
                "reference_quantiles": {f"{float(k):g}": float(v) for k, v in q.items()},
                "current_quantiles": quantiles(report.all_max_scores), "current_accounts": len(report.all_max_scores)}
    return {"psi": None, "method": "no reference and no scores to compare"}


def watch_once(cfg: WatchConfig, log: str, model: str | Path, now: float, progress: Any = None,
               on_promote: Callable[[Path], str] | None = None) -> dict[str, Any]:
    """One period (see the module docstring); returns the status (also written to :func:`status_path`)."""
    from stillhouse.config import atomic_write_text
    from stillhouse.guard.detect.calibrate import fit_window
    from stillhouse.guard.detect.check import check_window
    from stillhouse.guard.detect.load import load_detector
    from stillhouse.guard.detect.logwindow import read_window
    from stillhouse.guard.detect.promote import adopt, current_version, new_version, promote, prune

    m = Path(model)
    live_dir = adopt(m)
    live = load_detector(live_dir)
    w = cfg.window_s
    t0 = time.perf_counter()
    check_win = read_window(log, now - w, now)
    fit_win = read_window(log, now - 2 * w, now - w)
    status: dict[str, Any] = {"ts": now, "ts_iso": fmt_time(now), "model": str(m), "log": check_win.source,
                              "live_version": str(live_dir), "fit_window": fit_win.describe(),
                              "check_window": check_win.describe(), "alarms": [], "lines": []}
    lines: list[str] = status["lines"]
    alarms: list[str] = status["alarms"]
    lines.append(f"watch {fmt_time(now)}: live model {live_dir.name}")
    lines.append("fit   " + fit_win.summary())
    lines.append("check " + check_win.summary())

    # drift and the live model's realized rates on the newest window
    if check_win.records:
        live_report = check_window(live, check_win, cfg.factor, model=str(live_dir))
        status["live_check"] = {k: v for k, v in live_report.to_dict().items()
                                if k not in ("reference_scores", "flagged")}
        drift = drift_of(live_dir, live_report, live.calibration_)
        status["drift"] = {**drift, "alarm_at": cfg.psi_alarm,
                           "alarm": drift["psi"] is not None and drift["psi"] > cfg.psi_alarm}
        if drift["psi"] is not None:
            lines.append(f"drift: PSI {drift['psi']:.3f} of the live model's benign max scores vs {drift['method']} "
                         f"(alarm at {cfg.psi_alarm:g})")
            if drift["psi"] > cfg.psi_alarm:
                alarms.append(f"benign score drift: PSI {drift['psi']:.3f} > {cfg.psi_alarm:g} on "
                              f"{fmt_time(now - w)} .. {fmt_time(now)}")
        for t in live_report.tiers:
            lines.append("live  " + t.line())
            if not t.ok:
                alarms.append(f"live model: {t.tier} tier {t.k}/{t.n} over its threshold, "
                              f"{t.rate / t.stated:.1f}x its stated FPR {t.stated:g}")
    else:
        status["drift"] = {"psi": None, "method": "the check window is empty", "alarm": False}
        alarms.append(f"the check window {fmt_time(now - w)} .. {fmt_time(now)} holds no traffic")

    # the candidate: fit on the older window, check on the newer one, promote if it passes
    cand: dict[str, Any] = {"promoted": False}
    status["candidate"] = cand
    try:
        det = fit_window(live.config, fit_win, progress=progress)
    except ValueError as exc:
        cand["reason"] = f"not fitted: {exc}"
        lines.append(f"candidate: {cand['reason']}")
    else:
        version = new_version(m, now if now > 1e9 else None)
        det.save(version)
        cand["version"] = str(version)
        cand["thresholds"] = det.thresholds_
        if check_win.records:
            report = check_window(det, check_win, cfg.factor, model=str(version))
            atomic_write_text(version / "check.json", json.dumps(report.to_dict(), indent=1) + "\n")
            cand["check"] = {k: v for k, v in report.to_dict().items() if k not in ("reference_scores",)}
            lines += ["cand  " + t.line() for t in report.tiers]
            if report.passed:
                previous = promote(m, version)
                cand.update(promoted=True, replaced=str(previous) if previous else None,
                            reason="its check passed")
                lines.append(f"promoted {version.name} (thresholds {det.thresholds_}); previous {previous}")
                if on_promote is not None:
                    cand["reload"] = on_promote(version)
                    lines.append(f"guard: {cand['reload']}")
            else:
                cand["reason"] = "its check failed: the live model stays"
                lines.append(f"candidate {version.name} not promoted: {cand['reason']}")
        else:
            cand["reason"] = "no check window traffic to check it on: the live model stays"
            lines.append(f"candidate {version.name} not promoted: {cand['reason']}")
    cand["pruned"] = [str(p) for p in prune(m, cfg.keep)]
    status["live_version_after"] = str(current_version(m) or live_dir)
    status["alarm"] = bool(alarms)
    status["seconds"] = time.perf_counter() - t0
    lines += [f"ALARM: {a}" for a in alarms]
    atomic_write_text(status_path(cfg, m), json.dumps(status, indent=1, default=str) + "\n")
    return status


def watch_loop(cfg: WatchConfig, log: str, model: str | Path, once: bool = False,
               clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
               emit: Callable[[dict[str, Any]], None] | None = None, progress: Any = None,
               on_promote: Callable[[Path], str] | None = None) -> dict[str, Any]:
    """Run periods every ``cfg.every`` until interrupted (or one with ``once``); returns the last status."""
    fixed = parse_time(cfg.now, clock(), "--now") if cfg.now.strip() else None
    if fixed is not None and not once:
        raise ValueError("WatchConfig.now fixes the time of one period: give --once with --now")
    while True:
        started = clock()
        status = watch_once(cfg, log, model, fixed if fixed is not None else started, progress=progress,
                            on_promote=on_promote)
        if emit is not None:
            emit(status)
        if once:
            return status
        sleep(max(0.0, cfg.every_s - (clock() - started)))
