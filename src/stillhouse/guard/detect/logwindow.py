"""A window of the operator's own traffic log: what a detector is fitted on, checked against and watched over.

Times (:func:`parse_time`, :func:`resolve_window`) are given as

- an ISO date or date-time (``2026-03-01``, ``2026-03-01T12:00``, ``2026-03-01T12:00:00+01:00``; no zone = UTC);
- unix seconds (``1772323200``; the arena's simulated logs start at 0);
- a duration before a reference: ``--until 1d`` is a day before now, ``--since 7d`` is seven days before
  ``--until`` (units s, m, h, d, w);
- empty: the start (``since``) or the end (``until``) of the log.

The window is ``since <= ts < until``. :func:`read_window` reads it from the guard's store with a time-range
query (the ``traffic_ts`` index, in pages: see ``SqlStore.iter_records``), or filters a ``.jsonl`` log, and
leaves out the accounts that are not benign calibration material (:func:`exclusions`):

- an account under a decision in force at some time in the window (created before ``until`` and not cleared
  by ``since``: made in the window, active at its end, or cleared during it) whose action is not ``allow``,
  from any source: manual, rule or detector, enforced or shadow (a manual ``allow`` is an override, not a
  suspicion); a cluster decision counts for the accounts the detector last put in that cluster;
- an account whose latest review labels it a campaign (label 1, "confirmed").

An account whose latest review labels it benign (label 0: "dismissed" or "evaluator") stays, decision or
not: an analyst looked at it. Unreviewed flagged accounts leave the window, so a refit on a window the
detector itself flagged loses that detector's benign top tail (at most its throttle FPR of the accounts):
review the queue before fitting (``/console/review``) to keep what was flagged wrongly.

Errors: ``WindowError(ValueError)`` — a time or duration that cannot be read, or an empty window; the
message names the option and the accepted forms.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stillhouse.guard.events import AccountInfo, TrafficRecord


class WindowError(ValueError):
    """A time, a duration or a window that cannot be used; the message names the option and the fix."""


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw])\s*")
DURATION_FORMS = "a duration like 90s, 30m, 24h, 7d or 2w"
TIME_FORMS = "an ISO date or date-time (2026-03-01, 2026-03-01T12:00Z), unix seconds, or a duration before it (7d)"


def parse_duration(text: str, what: str = "duration") -> float:
    """Seconds in a duration like ``90s``, ``30m``, ``24h``, ``7d`` or ``2w``; must be > 0."""
    m = _DURATION.fullmatch(text or "")
    if m is None:
        raise WindowError(f"{what}={text!r}: give {DURATION_FORMS}")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise WindowError(f"{what}={text!r}: must be longer than 0")
    return seconds


def is_duration(text: str) -> bool:
    return _DURATION.fullmatch(text or "") is not None


def parse_time(text: str, reference: float, what: str = "time") -> float:
    """Unix seconds of ``text`` (see the module docstring); a duration counts back from ``reference``."""
    t = (text or "").strip()
    if not t:
        raise WindowError(f"{what}: empty; give {TIME_FORMS}")
    if is_duration(t):
        return reference - parse_duration(t, what)
    try:
        return float(t)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise WindowError(f"{what}={text!r}: give {TIME_FORMS}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def resolve_window(since: str, until: str, now: float) -> tuple[float | None, float | None]:
    """``(since, until)`` in unix seconds; None = the start / the end of the log.

    ``until`` counts back from ``now``, ``since`` from ``until`` (or from ``now`` when ``until`` is empty).
    """
    t1 = parse_time(until, now, "--until") if (until or "").strip() else None
    t0 = parse_time(since, now if t1 is None else t1, "--since") if (since or "").strip() else None
    if t0 is not None and t1 is not None and not t0 < t1:
        raise WindowError(f"--since {since!r} ({fmt_time(t0)}) is not before --until {until!r} ({fmt_time(t1)}): "
                          "the window is since <= ts < until")
    return t0, t1


def fmt_time(t: float | None) -> str:
    """A window edge for people: ISO UTC for wall-clock times, plain seconds for simulated ones (before 2001)."""
    if t is None:
        return "(open)"
    if t < 1e9:
        return f"t={t:g}s"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Exclusions:
    """Accounts left out of a window, each with its reason, and the decided accounts kept after a benign review."""

    reasons: dict[str, str] = field(default_factory=dict)
    """account -> why: "detector decision", "manual decision", "rule decision", "cluster decision",
    "labelled campaign"."""
    kept_reviewed: list[str] = field(default_factory=list)
    """Accounts under a decision that an analyst reviewed as benign (label 0): kept."""

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.reasons.values()).items()))


@dataclass
class LogWindow:
    """The benign material of one window of a log."""

    source: str
    """The log (a DB URL without its password, or a file path)."""
    since: float | None
    until: float | None
    records: list[TrafficRecord]
    """The window's records in arrival order, the excluded accounts' left out."""
    accounts: dict[str, AccountInfo]
    """AccountInfo of the accounts in ``records`` (when the source has them)."""
    exclusions: Exclusions
    excluded_records: int = 0
    """Records of the excluded accounts (read and dropped)."""
    note: str = ""
    """Why nothing could be excluded, when the source has no decisions or reviews."""

    @property
    def n_accounts(self) -> int:
        return len({r.account_id for r in self.records})

    def describe(self) -> dict[str, Any]:
        """Where the window came from and what left it (saved with a fitted detector and a check)."""
        return {"source": self.source, "since": self.since, "until": self.until,
                "since_iso": fmt_time(self.since), "until_iso": fmt_time(self.until),
                "records": len(self.records), "accounts": self.n_accounts,
                "excluded_accounts": len(self.exclusions.reasons), "excluded_records": self.excluded_records,
                "excluded_by_reason": self.exclusions.counts(),
                "kept_reviewed_benign": len(self.exclusions.kept_reviewed), **({"note": self.note} if self.note else {})}

    def summary(self) -> str:
        """One line: the window, what it holds and what was excluded and why."""
        head = (f"window {fmt_time(self.since)} .. {fmt_time(self.until)} of {self.source}: "
                f"{len(self.records):,} records, {self.n_accounts:,} accounts")
        if self.note:
            return f"{head}; {self.note}"
        counts = self.exclusions.counts()
        if not counts:
            out = f"{head}; excluded none (no decision in force in the window, no account labelled campaign)"
        else:
            why = ", ".join(f"{n:,} {reason}" for reason, n in counts.items())
            out = (f"{head}; excluded {len(self.exclusions.reasons):,} accounts ({self.excluded_records:,} records): "
                   f"{why}")
        if self.exclusions.kept_reviewed:
            out += (f"; kept {len(self.exclusions.kept_reviewed):,} decided accounts that analysts reviewed as "
                    "benign")
        return out


def exclusions(store: Any, since: float | None, until: float | None) -> Exclusions:
    """The accounts of a store to leave out of ``[since, until)`` (see the module docstring)."""
    out = Exclusions()
    labels = {r.account_id: int(r.label) for r in store.labels()}
    decided: dict[str, str] = {}
    clusters: dict[str, str] = {}
    for d in store.decisions_between(since, until):
        if d.action == "allow":
            continue
        if d.scope == "cluster":
            clusters[d.target] = "cluster decision"
        else:
            decided.setdefault(d.target, f"{d.source} decision")
    if clusters:
        for aid in store.accounts_in_clusters(sorted(clusters)):
            decided.setdefault(aid, "cluster decision")
    for aid, why in decided.items():
        if labels.get(aid) == 0:
            out.kept_reviewed.append(aid)
        else:
            out.reasons[aid] = why
    for aid, label in labels.items():
        if label == 1:
            out.reasons.setdefault(aid, "labelled campaign")
    out.kept_reviewed.sort()
    return out


def is_store_url(source: str) -> bool:
    return source.startswith(("sqlite:///", "postgresql://", "postgres://"))


def describe_source(source: str) -> str:
    """A log source without any password."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", source)


def read_window(source: str, since: float | None = None, until: float | None = None,
                exclude: bool = True) -> LogWindow:
    """The records of ``since <= ts < until`` in a log (store URL or ``.jsonl``), excluded accounts left out.

    From a store: one time-range query read in pages; AccountInfo of the accounts in the window; the
    exclusions of :func:`exclusions` (``exclude=False`` keeps every account). A ``.jsonl`` file has no
    decisions or reviews: it is filtered by time only, and the window says so.
    """
    from stillhouse.guard.detect.offline import LogError, iter_jsonl

    if is_store_url(source):
        from stillhouse.guard.store import open_store

        store = open_store(source, init=False)
        try:
            ex = exclusions(store, since, until) if exclude else Exclusions()
            records, dropped = _keep(store.iter_records(since, until), ex.reasons)
            seen = {r.account_id for r in records}
            infos = {info.account_id: info for info, _ in store.list_accounts() if info.account_id in seen}
        finally:
            store.close()
        return LogWindow(describe_source(source), since, until, records, infos, ex, dropped)
    path = Path(source)
    if not path.exists():
        raise LogError(f"log {source!r} not found: give a sqlite:///path, postgresql://... URL or a .jsonl file")
    # file order, as read_log replays a .jsonl log
    records = [r for r in iter_jsonl(path) if (since is None or r.ts >= since) and (until is None or r.ts < until)]
    return LogWindow(str(path), since, until, records, {}, Exclusions(),
                     note="a .jsonl log has no decisions or reviews: nothing excluded")


def _keep(records: Iterator[TrafficRecord], excluded: dict[str, str]) -> tuple[list[TrafficRecord], int]:
    kept: list[TrafficRecord] = []
    dropped = 0
    for r in records:
        if r.account_id in excluded:
            dropped += 1
        else:
            kept.append(r)
    return kept, dropped
