"""A freshly loaded detector with its window state rebuilt from the guard's own log.

The guard keeps each account's sliding window in memory; a detector loaded from disk starts empty. To
swap models without forgetting the last week (``POST /admin/detector/reload``, ``guard/reload.py``), the
new one replays the log's records with ``ts >= now - window_s`` (its own ``DetectConfig.window_s``) through
the same ``observe`` the guard runs, in the log's order: its verdicts are then those of an offline replay of
that stretch of the log (``stillhouse detect --log ...``), and the records the guard observes next continue
it as they would continue the offline replay.

Caveats: a log written with ``GuardConfig.redact`` other than "none" holds redacted text, so the rebuilt
window scores that text, not what the guard saw online; records still in the guard's disk spool (the store
was down) are not in the log and are missed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Rebuilt:
    """What a rebuild replayed."""

    directory: str
    """The model directory loaded (a symlink resolved: the version itself)."""
    since: float
    records: int = 0
    accounts: int = 0
    seconds: float = 0.0
    request_ids: set[str] = field(default_factory=set)
    """The replayed records' ids: records the guard observed meanwhile are fed only if not among them."""

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "since": self.since, "replayed_records": self.records,
                "replayed_accounts": self.accounts, "seconds": round(self.seconds, 3)}


def rebuild(directory: str | Path, db_url: str, now: float) -> tuple[Any, Rebuilt]:
    """``(detector, Rebuilt)``: the fitted detector in ``directory`` (resolved), fed the log's last
    ``window_s`` seconds before ``now``. Raises ``DetectorLoadError`` when the directory holds no detector."""
    from stillhouse.guard.detect.load import load_detector
    from stillhouse.guard.store import open_store

    t0 = time.perf_counter()
    resolved = Path(directory).resolve()
    det = load_detector(resolved)
    info = Rebuilt(str(resolved), now - det.config.window_s)
    store = open_store(db_url, init=False)
    try:
        infos = {a.account_id: a for a, _ in store.list_accounts()}
        seen: set[str] = set()
        for r in store.iter_records(info.since, None):
            det.observe(r, infos.get(r.account_id))
            info.request_ids.add(r.request_id)
            seen.add(r.account_id)
    finally:
        store.close()
    info.records, info.accounts = len(info.request_ids), len(seen)
    info.seconds = time.perf_counter() - t0
    return det, info
