"""What a harvest run did: live counters (the progress bar's) and the report printed at its end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from stillhouse.distill.harvest_config import HarvestConfig


@dataclass
class HarvestStats:
    """Live counters of a run (what the progress bar shows)."""

    total: int = 0
    """Records this run set out to do (after skipping finished ones)."""
    skipped: int = 0
    """Records already ok in the store."""
    ok: int = 0
    errors: int = 0
    retries: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    in_flight: int = 0
    started: float = field(default_factory=time.monotonic)
    stopped_reason: str | None = None
    """Why the run stopped before doing everything (a budget cap, an interrupt)."""
    error_kinds: dict[str, int] = field(default_factory=dict)
    request_phase_s: float = 0.0
    """Seconds from the first request's start to the last one's end (prompt loading and keys excluded)."""

    @property
    def done(self) -> int:
        return self.ok + self.errors

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


@dataclass
class HarvestReport:
    """What a finished (or stopped) run did, plus the store's counts afterwards."""

    config: HarvestConfig
    stats: HarvestStats
    store_counts: dict[str, int]
    prompt_problems: list[str]
    duplicates: int

    @property
    def complete(self) -> bool:
        """True when every (prompt, sample) of the run has an ok record."""
        return self.stats.stopped_reason is None and self.stats.errors == 0

    def summary(self) -> str:
        s = self.stats
        rate = s.done / s.elapsed_s if s.elapsed_s > 0 else 0.0
        lines = [
            (f"harvest into {self.config.out}: {s.ok} ok, {s.errors} errors this run "
             f"({s.skipped} already done), {s.requests} requests, {s.retries} retries, "
             f"{s.elapsed_s:.1f} s ({rate:.1f} records/s)"),
            f"tokens: {s.prompt_tokens} prompt + {s.completion_tokens} completion; cost {s.cost:.4f}",
            f"store: {self.store_counts}",
        ]
        if s.error_kinds:
            lines.append(f"errors by kind: {dict(sorted(s.error_kinds.items()))}")
        if self.prompt_problems:
            lines.append(f"skipped {len(self.prompt_problems)} bad prompt row(s), e.g. {self.prompt_problems[0]}")
        if self.duplicates:
            lines.append(f"merged {self.duplicates} duplicate prompt(s)")
        if s.stopped_reason:
            lines.append(f"STOPPED EARLY: {s.stopped_reason}")
        return "\n".join(lines)
