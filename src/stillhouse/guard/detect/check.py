"""Check a fitted detector against a second window of the log before enforcing it.

:func:`check_window` replays the window through the detector (the same ``observe``/``verdict`` code as the
guard, offline, from an empty state, as calibration replays its held-out half) and takes each account's
*maximum* score over the replay: the quantity the thresholds were set on. For the accounts with at least
``min_requests`` requests in the window (the detector flags no account before that), it reports per tier the
share over the tier's threshold with its Wilson 95% interval, against the FPR the tier was set for. A tier
fails when its realized share exceeds ``factor`` times its stated FPR (default 2x, issue 16's goal).

The check is meant for a **shadow** window: traffic the guard logged without enforcing, later than the fit
window and disjoint from it. In production that window holds campaigns too, so "over the threshold" means
"flagged", not "a false positive": review the accounts it lists (the console's account pages,
``/console/accounts/ID``, and its review queue, ``/console/review``, where a shadow detector's decisions wait),
label them, and read the rate of the benign ones. Accounts already under a decision or labelled campaign
are left out of the window (:mod:`.logwindow`).

``stillhouse detect check`` prints :meth:`CheckReport.lines` and exits 1 when a tier fails; the report is
also written to ``check.json`` in the model's directory, where ``stillhouse detect watch`` finds the
reference score distribution for its drift alarm (:mod:`.drift`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stillhouse.guard.detect.logwindow import LogWindow, WindowError, parse_time

TIERS = ("throttle", "block")
REFERENCE_MAX = 20_000
"""At most this many reference scores are kept in check.json (more are reduced to that many quantiles)."""
CONSOLE_REVIEW = "/console/review"


@dataclass(frozen=True)
class CheckConfig:
    """``stillhouse detect check``: the second window and what counts as a pass."""

    since: str = ""
    """Start of the check window: an ISO date or date-time (UTC unless it says), unix seconds, or a duration
    before --until (7d); '' = the start of the log. Take a window after the fit window, of the same length."""
    until: str = ""
    """End of the check window (exclusive), in the same forms (a duration counts back from now); '' = the end
    of the log."""
    factor: float = 2.0
    """A tier fails when its realized benign share exceeds this many times its stated FPR (issue 16: within 2x)."""
    min_requests: int | None = None
    """Count the accounts with at least this many requests in the window (None: the model's
    DetectConfig.min_requests, below which it flags no one)."""
    show: int = 10
    """List this many of the highest-scoring flagged accounts, to review."""

    def __post_init__(self) -> None:
        if not self.factor >= 1.0:
            raise ValueError(f"CheckConfig.factor={self.factor}: must be >= 1 (1 = no slack over the stated FPR)")
        if self.min_requests is not None and self.min_requests < 1:
            raise ValueError(f"CheckConfig.min_requests={self.min_requests}: must be >= 1 (or None: the model's)")
        if self.show < 0:
            raise ValueError(f"CheckConfig.show={self.show}: must be >= 0")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value.strip():
                try:
                    parse_time(value, 0.0, f"CheckConfig.{name}")
                except WindowError as exc:
                    raise ValueError(str(exc)) from None


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` (95% by default); (0, 1) when n is 0."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson: k={k}, n={n}: need 0 <= k <= n")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def sci(x: float) -> str:
    """A small rate as people write it: 9.8e-4 (not 9.8e-04), 1e-3 (not 1.0e-03); 0 as 0."""
    if x == 0:
        return "0"
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant.removesuffix('.0')}e{int(exp)}"


@dataclass
class TierCheck:
    """One tier: how many counted accounts went over its threshold, against the FPR it was set for."""

    tier: str
    threshold: float
    stated: float
    k: int
    n: int
    factor: float

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    @property
    def ok(self) -> bool:
        return self.rate <= self.factor * self.stated

    @property
    def resolvable(self) -> bool:
        """Whether one flagged account alone stays within ``factor`` x stated (else the window is too small)."""
        return self.n > 0 and 1.0 / self.n <= self.factor * self.stated

    def line(self) -> str:
        lo, hi = self.interval
        head = (f"{self.tier} tier (score > {self.threshold:.4g}): {self.k:,}/{self.n:,} = {sci(self.rate)} "
                f"[{sci(lo)}, {sci(hi)}] vs stated {sci(self.stated)}")
        if self.n == 0:
            return f"{head}: NO ACCOUNTS to count (widen the window or lower --min-requests)"
        if self.ok:
            return f"{head}: OK" + ("" if self.resolvable else
                                    f" (but {self.n:,} accounts cannot resolve it: one flagged account is "
                                    f"{sci(1 / self.n)}; widen the window)")
        over = self.rate / self.stated
        return (f"{head}: TOO HIGH ({over:.1f}x > {self.factor:g}x): review the flagged accounts (a shadow "
                f"window holds campaigns too), then refit on a longer window (more benign accounts) or lower "
                f"--{self.tier}-fpr and refit")

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.interval
        return {"tier": self.tier, "threshold": self.threshold, "stated_fpr": self.stated, "k": self.k, "n": self.n,
                "rate": self.rate, "lo": lo, "hi": hi, "factor": self.factor, "ok": self.ok,
                "resolvable": self.resolvable}


@dataclass
class CheckReport:
    """What :func:`check_window` found (``check.json``)."""

    window: dict[str, Any]
    """The check window (``LogWindow.describe``)."""
    min_requests: int
    accounts: int
    """Accounts with any request in the window (excluded ones left out)."""
    tiers: list[TierCheck]
    flagged: list[dict[str, Any]] = field(default_factory=list)
    """The highest-scoring accounts over the throttle threshold: id, score, tier, top reasons."""
    scores: list[float] = field(default_factory=list)
    """The counted accounts' maximum scores, sorted (the drift reference; at most REFERENCE_MAX quantiles)."""
    all_max_scores: list[float] = field(default_factory=list)
    """Every account's maximum score, sorted (comparable with the calibration's stored quantiles)."""
    fit_window: dict[str, Any] | None = None
    """The model's fit window, when it recorded one."""
    model: str = ""

    @property
    def eligible(self) -> int:
        return self.tiers[0].n if self.tiers else 0

    @property
    def passed(self) -> bool:
        return all(t.ok and t.n > 0 for t in self.tiers)

    @property
    def overlaps_fit(self) -> bool:
        """Whether the check window shares time with the fit window of the same log (the check is then not held out)."""
        fw, cw = self.fit_window, self.window
        if not fw or fw.get("source") != cw.get("source"):
            return False
        lo = max(_edge(fw.get("since"), -math.inf), _edge(cw.get("since"), -math.inf))
        hi = min(_edge(fw.get("until"), math.inf), _edge(cw.get("until"), math.inf))
        return lo < hi

    def lines(self) -> list[str]:
        w = self.window
        out = [f"check window {w['since_iso']} .. {w['until_iso']} of {w['source']}: {w['records']:,} records, "
               f"{self.accounts:,} accounts" + _excluded(w)]
        if self.fit_window:
            fw = self.fit_window
            out.append(f"model {self.model or '(in memory)'} fitted on {fw.get('since_iso')} .. {fw.get('until_iso')} "
                       f"({fw.get('accounts', 0):,} accounts, {fw.get('records', 0):,} records)")
        if self.overlaps_fit:
            out.append("warning: the check window overlaps the fit window, so the check is not held out: check "
                       "on a later window")
        out.append(f"counted: the {self.eligible:,} accounts with >= {self.min_requests} requests in the window")
        out += [t.line() for t in self.tiers]
        if self.flagged:
            out.append(f"flagged accounts to review (console {CONSOLE_REVIEW} and /console/accounts/ID), "
                       f"highest first:")
            for f in self.flagged:
                why = ", ".join(f"{n}={v:.1f}" for n, v in f["reasons"][:3])
                out.append(f"  {f['account_id']}  max score {f['score']:.2f} ({f['tier']})  {why}")
        if self.passed:
            out.append(f"check: PASS (every tier within {self.tiers[0].factor:g}x of its stated FPR)")
        else:
            bad = [t.tier for t in self.tiers if not (t.ok and t.n > 0)]
            out.append(f"check: FAIL ({', '.join(bad)}): do not enforce this model yet")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "window": self.window, "fit_window": self.fit_window, "model": self.model,
                "min_requests": self.min_requests, "accounts": self.accounts, "eligible": self.eligible,
                "overlaps_fit": self.overlaps_fit, "tiers": {t.tier: t.to_dict() for t in self.tiers},
                "flagged": self.flagged, "reference_scores": _reduce(self.scores),
                "all_max_score_quantiles": _quantiles(self.all_max_scores)}


def _edge(v: Any, default: float) -> float:
    return default if v is None else float(v)


def _excluded(w: dict[str, Any]) -> str:
    if w.get("note"):
        return f" ({w['note']})"
    by = w.get("excluded_by_reason") or {}
    if not by:
        return "; excluded none"
    return (f"; excluded {w['excluded_accounts']:,} accounts ({w['excluded_records']:,} records): "
            + ", ".join(f"{n:,} {why}" for why, n in by.items()))


def _reduce(scores: list[float]) -> list[float]:
    if len(scores) <= REFERENCE_MAX:
        return [float(x) for x in scores]
    return [float(x) for x in np.quantile(np.asarray(scores), np.linspace(0.0, 1.0, REFERENCE_MAX))]


def _quantiles(scores: list[float]) -> dict[str, float]:
    from stillhouse.guard.detect.drift import quantiles

    return quantiles(scores)


def check_window(detector: Any, window: LogWindow, factor: float = 2.0, min_requests: int | None = None,
                 show: int = 10, model: str = "") -> CheckReport:
    """Replay ``window`` through ``detector`` from an empty state and compare each tier's realized share with
    its stated FPR (see the module docstring). The detector is left reset (its calibration kept)."""
    if not detector.fitted:
        raise ValueError("check_window: the detector has no thresholds; fit it first")
    cfg = detector.config
    need = cfg.min_requests if min_requests is None else min_requests
    detector.reset()
    own: Counter[str] = Counter()
    for r in window.records:
        detector.observe(r, window.accounts.get(r.account_id))
        if r.status < 400:
            own[r.account_id] += 1
    maxima = {aid: float(detector.max_score_.get(aid, 0.0)) for aid in own}
    counted = sorted(aid for aid, n in own.items() if n >= need)
    scores = np.array([maxima[a] for a in counted], dtype=np.float64)
    thresholds = detector.thresholds_
    stated = {"throttle": cfg.throttle_fpr, "block": cfg.block_fpr}
    tiers = [TierCheck(t, float(thresholds[t]), stated[t], int((scores > thresholds[t]).sum()), len(counted), factor)
             for t in TIERS]
    over = sorted((a for a in counted if maxima[a] > thresholds["throttle"]), key=lambda a: (-maxima[a], a))
    flagged = []
    for aid in over[:show]:
        v = detector.verdict(aid)
        flagged.append({"account_id": aid, "score": maxima[aid],
                        "tier": "block" if maxima[aid] > thresholds["block"] else "throttle",
                        "reasons": [[n, float(s)] for n, s in (v.reasons if v is not None else [])][:6]})
    report = CheckReport(window=window.describe(), min_requests=need, accounts=len(own), tiers=tiers, flagged=flagged,
                         scores=sorted(scores.tolist()), all_max_scores=sorted(maxima.values()),
                         fit_window=detector.calibration_.get("window"), model=model)
    detector.reset()
    return report


def window_edges(cfg: CheckConfig, now: float) -> tuple[float | None, float | None]:
    """The check window's ``(since, until)`` in unix seconds (None = open)."""
    from stillhouse.guard.detect.logwindow import resolve_window

    return resolve_window(cfg.since, cfg.until, now)


__all__ = ["CheckConfig", "CheckReport", "TierCheck", "check_window", "sci", "wilson", "window_edges"]
