"""The arena's calibration, the way an operator calibrates: a shadow log, fit on one window, check on the next.

:func:`calibrate_as_operator` is step 1 of ``run_arena``:

1. the benign calibration population is sent through a guard in **shadow mode** (no detector yet: nothing is
   enforced, everything is logged), and after it, in the span that follows, the benign **check population**
   (another seed, ``ArenaConfig.check_accounts`` accounts, over as many days): one traffic log, two windows;
2. the detector is fitted on the calibration window of that log with the library function
   ``stillhouse detect --fit --log DB --since T0 --until T1`` calls (``detect.calibrate.fit_window`` on
   ``detect.logwindow.read_window``: the same time-range read, the same exclusions, none of which fire here
   because a shadow log without a detector holds no decisions);
3. it is checked on the check window with the function ``stillhouse detect check`` calls
   (``detect.check.check_window``): each tier's realized share of benign accounts over its threshold against
   its stated FPR, with Wilson intervals; the report goes to ``run/detector/check.json`` and ``metrics.json``.

Why a second population rather than a second week of the same one: the calibration window stays exactly what
it was (the fit, its thresholds and every figure downstream are unchanged), and the check population is one
the fit never saw, drawn (for ``--population real``) from the evaluation pool of ShareGPT conversations, whose
texts the fit never saw either. Its cost is its traffic and one replay: half the calibration population by
default (``check_accounts``).

4. when the check fails, the operator does what ``stillhouse detect check`` tells them: **refit on the longer
   window** (the fit and check windows together: ``detect --fit --since T0 --until T2``), which sets the
   thresholds on half again as many benign accounts, and enforce that (``refit_on_failed_check``; off: enforce
   the failed model, as the arena did before). The refit is not checked again (there is no third shadow
   window); the evaluation, a population neither window holds, is its check. Both models' thresholds and the
   check of the first are reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stillhouse.arena.traffic import SimAccount, Turn

if TYPE_CHECKING:
    from stillhouse.guard.detect.detector import WindowDetector

DAY = 86400.0


def _day_after(ts: float) -> float:
    """The first midnight (UTC) after ``ts``."""
    return (math.floor(ts / DAY) + 1) * DAY


def shift(turns: list[Turn], by: float) -> list[Turn]:
    """The turns ``by`` seconds later."""
    return [replace(t, ts=t.ts + by) for t in turns]


def calibrate_as_operator(detect_config: Any, calib: tuple[list[SimAccount], list[Turn]],
                          check: tuple[list[SimAccount], list[Turn]],
                          send_shadow: Callable[[list[SimAccount], list[Turn], str], str | None], model_dir: Path,
                          progress: Any = None, timings: dict[str, float] | None = None,
                          refit_on_failed_check: bool = True) -> tuple[Any, dict[str, Any]]:
    """Fit a detector on the calibration window of a shadow guard's log and check it on the next window.

    ``send_shadow(accounts, turns, label)`` sends traffic through a shadow-mode guard and returns its log (a DB
    URL, or a .jsonl path for the direct gateway). Returns the fitted detector (reset, saved in ``model_dir``)
    and the operator figures for ``metrics.json``: the fit window, the check window and the check's tiers."""
    from stillhouse.config import atomic_write_text
    from stillhouse.guard.detect.calibrate import fit_window
    from stillhouse.guard.detect.check import check_window

    timings = timings if timings is not None else {}
    calib_accounts, calib_turns = calib
    check_accounts, check_turns = check
    if not calib_turns:
        raise ValueError("calibrate_as_operator: the calibration population sent nothing")
    # whole (UTC) days, as an operator names windows: the calibration window [t0, t1), the check window [t1, t2)
    t0 = math.floor(min(t.ts for t in calib_turns) / DAY) * DAY
    t1 = _day_after(max(t.ts for t in calib_turns))
    t2 = None
    if check_turns:
        c0 = math.floor(min(t.ts for t in check_turns) / DAY) * DAY
        check_turns = shift(check_turns, t1 - c0)  # the check population's days follow the calibration's
        t2 = _day_after(max(t.ts for t in check_turns))

    t = time.perf_counter()
    log = send_shadow(calib_accounts + check_accounts, calib_turns + check_turns,
                      "calibration traffic (benign, shadow guard)" + (" + check window" if check_turns else ""))
    timings["calibration_traffic_s"] = time.perf_counter() - t
    if log is None:
        raise RuntimeError("the shadow guard wrote no traffic log")

    infos = {a.info.account_id: a.info for a in calib_accounts + check_accounts}
    t = time.perf_counter()
    fit_win = _window(log, t0, t1, infos)
    detector = fit_window(detect_config, fit_win, progress=progress)
    detector.save(model_dir)
    timings["fit_s"] = time.perf_counter() - t
    out: dict[str, Any] = {"log": fit_win.source, "fit_window": fit_win.describe(), "fit_summary": fit_win.summary()}

    if t2 is not None:
        t = time.perf_counter()
        check_win = _window(log, t1, t2, infos)
        report = check_window(detector, check_win, model=str(model_dir))
        atomic_write_text(model_dir / "check.json", _json(report.to_dict()))
        timings["check_s"] = time.perf_counter() - t
        out.update(check_summary=check_win.summary(), check={k: v for k, v in report.to_dict().items()
                                                                if k != "reference_scores"},
                   check_lines=report.lines())
        if refit_on_failed_check and not report.passed:
            t = time.perf_counter()
            first = _thresholds(detector)
            long_win = _window(log, t0, t2, infos)
            detector = fit_window(detect_config, long_win, progress=progress)
            detector.save(model_dir)  # check.json stays: the check of the first model, as run
            timings["refit_s"] = time.perf_counter() - t
            out["refit"] = {"window": long_win.describe(), "summary": long_win.summary(), "first_thresholds": first,
                            "thresholds": _thresholds(detector)}
    else:
        out["check"] = None
    return detector, out


def _thresholds(detector: WindowDetector) -> dict[str, float]:
    """A copy of a fitted detector's thresholds (NotFittedError, not a TypeError from dict(None), if none)."""
    from stillhouse.guard.detect.detector import NotFittedError

    if detector.thresholds_ is None:
        raise NotFittedError("the detector has no thresholds: fit() it before reading them")
    return dict(detector.thresholds_)


def _window(log: str, since: float, until: float, infos: dict[str, Any]) -> Any:
    """``read_window(log, since, until)`` with its accounts: a .jsonl log (the direct gateway) holds none, so they
    come from ``infos``, as ``--accounts`` gives them to the CLI."""
    from stillhouse.guard.detect.logwindow import read_window

    window = read_window(log, since, until)
    if not window.accounts:
        seen = {r.account_id for r in window.records}
        window.accounts = {a: i for a, i in infos.items() if a in seen}
    return window


def _json(data: Any) -> str:
    import json

    return json.dumps(data, indent=1) + "\n"
