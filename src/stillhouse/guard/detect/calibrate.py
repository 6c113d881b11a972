"""Calibration where the detector runs: fit on a window of the operator's own traffic log.

The operator path (README, "Operating the detector"):

1. run the guard in shadow mode (``stillhouse guard ... --shadow``): every request is logged, nothing the
   detector or the rules say is enforced;
2. fit on a window of that log: ``stillhouse detect --fit --log DB_URL --since T --until T --model DIR``
   (:func:`fit_window`; the accounts under a decision or labelled campaign are left out, see
   :mod:`.logwindow`);
3. check the fitted thresholds against a second, later window before enforcing:
   ``stillhouse detect check --model DIR --log DB_URL --since ... --until ...`` (:mod:`.check`);
4. enforce: ``stillhouse guard ... --detector DIR --enforce``;
5. refit on a schedule and alarm on drift: ``stillhouse detect watch ...`` (:mod:`.watch`), which promotes
   a checked candidate atomically (:mod:`.promote`); the guard reloads it without a restart
   (``POST /admin/detector/reload`` or ``GuardConfig.detector_reload_s``).

The arena (``stillhouse arena``) takes exactly these steps on its calibration traffic (``arena/operator.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from stillhouse.guard.detect.config import DetectConfig
from stillhouse.guard.detect.detector import WindowDetector
from stillhouse.guard.detect.logwindow import LogWindow, fmt_time
from stillhouse.guard.events import TrafficRecord


def fit_window(config: DetectConfig, window: LogWindow, progress: Any = None, labels: dict[str, int] | None = None,
               labelled: Iterable[TrafficRecord] | None = None) -> WindowDetector:
    """A detector fitted on a window's benign records (``WindowDetector.fit``), the window recorded in its
    calibration facts (``calibration_["window"]``: source, edges, counts, exclusions by reason).

    Raises ValueError naming the window when it holds no records (``fit``'s own when too few accounts)."""
    if not window.records:
        raise ValueError(f"the window {fmt_time(window.since)} .. {fmt_time(window.until)} of {window.source} holds "
                         "no benign records to fit on: widen --since/--until (the window is since <= ts < until)")
    det = WindowDetector(config).fit(window.records, window.accounts, progress=progress, labels=labels,
                                     labelled=labelled)
    det.calibration_["window"] = window.describe()
    return det
