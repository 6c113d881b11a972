"""Per-account limits: requests/min, tokens/min, requests/day, concurrent streams → 429 + Retry-After.

Rates are token buckets (capacity = the per-minute or per-day limit, refilled continuously), kept as
plain functions of (level, last time, now) so the arithmetic can be checked by hand. The daily
bucket is the one that bites a paced campaign: a harvest sent at a steady 100 requests a day never
meets a per-minute limit, however tight. It is tracked only while a daily limit is in force (by
default, while an account is degraded: ``GuardConfig.degrade_requests_per_day``), starting full.
Tokens are only known after a response, so the tokens/min bucket is charged afterwards
and may go negative: while it is below zero the account's next request is refused, with a
Retry-After that says when it will be back above zero.

Time comes from an injected clock (the arena runs on simulated time). Limits are per
replica: N replicas behind a balancer allow up to N× the configured rates.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass


def bucket_refill(level: float, last: float, now: float, per_min: float, capacity: float | None = None) -> float:
    """Bucket level at ``now``: refilled at ``per_min``/60 per second, capped at ``capacity`` (default
    ``per_min``: a minute's worth)."""
    cap = float(per_min) if capacity is None else capacity
    return min(cap, level + max(0.0, now - last) * per_min / 60.0)


def seconds_until(level: float, need: float, per_min: float) -> float:
    """Seconds until a bucket at ``level`` holds ``need`` (0 if it already does)."""
    if level >= need:
        return 0.0
    return (need - level) * 60.0 / per_min


def _duration(seconds: float) -> str:
    """A wait as a person reads it: 45s, 12 min, 3.4 h."""
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


DAY_MIN = 1440.0
"""Minutes in a day: a daily bucket is a per-minute one of ``per_day / DAY_MIN``."""


@dataclass(frozen=True)
class Limits:
    """The limits in force for one account (0 = unlimited)."""

    requests_per_min: int
    tokens_per_min: int
    max_concurrent_streams: int
    requests_per_day: int = 0

    def scaled(self, factor: float) -> Limits:
        """Tighter limits for a throttled account (never below 1 where a limit exists)."""
        def f(x: int) -> int:
            return max(1, int(x * factor)) if x else 0
        return Limits(f(self.requests_per_min), f(self.tokens_per_min), f(self.max_concurrent_streams),
                      f(self.requests_per_day))

    def capped_per_day(self, cap: int) -> Limits:
        """These limits with at most ``cap`` requests a day (0 = no cap; a tighter daily limit stays)."""
        if not cap or 0 < self.requests_per_day <= cap:
            return self
        return dataclasses.replace(self, requests_per_day=cap)


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused, and when to come back."""

    which: str
    """"requests_per_min", "tokens_per_min", "requests_per_day" or "max_concurrent_streams"."""
    retry_after_s: int
    message: str


class _State:
    __slots__ = ("day_last", "day_level", "req_last", "req_level", "streams", "tok_last", "tok_level")

    def __init__(self, now: float, limits: Limits):
        self.req_level = float(limits.requests_per_min)
        self.req_last = now
        self.tok_level = float(limits.tokens_per_min)
        self.tok_last = now
        self.day_level: float | None = None
        """None until a daily limit first applies; then the bucket starts full."""
        self.day_last = now
        self.streams = 0


class RateLimiter:
    """In-memory limiter, one state per account."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self._state: dict[str, _State] = {}

    def _get(self, account_id: str, limits: Limits, now: float) -> _State:
        st = self._state.get(account_id)
        if st is None:
            st = self._state[account_id] = _State(now, limits)
        return st

    def admit(self, account_id: str, limits: Limits, stream: bool) -> Refusal | None:
        """Take one request (and one stream slot if ``stream``), or say why not."""
        now = self.clock()
        st = self._get(account_id, limits, now)
        if limits.tokens_per_min:
            st.tok_level = bucket_refill(st.tok_level, st.tok_last, now, limits.tokens_per_min)
            st.tok_last = now
            if st.tok_level <= 0:
                wait = seconds_until(st.tok_level, 1.0, limits.tokens_per_min)
                return Refusal("tokens_per_min", max(1, math.ceil(wait)),
                               f"token limit reached ({limits.tokens_per_min} tokens/min); retry in {wait:.1f}s")
        if stream and limits.max_concurrent_streams and st.streams >= limits.max_concurrent_streams:
            return Refusal("max_concurrent_streams", 1,
                           f"too many concurrent streams (limit {limits.max_concurrent_streams}); "
                           "wait for one to finish")
        if limits.requests_per_day:
            per_min = limits.requests_per_day / DAY_MIN
            st.day_level = (float(limits.requests_per_day) if st.day_level is None
                            else bucket_refill(st.day_level, st.day_last, now, per_min, limits.requests_per_day))
            st.day_last = now
            if st.day_level < 1.0:
                wait = seconds_until(st.day_level, 1.0, per_min)
                return Refusal("requests_per_day", max(1, math.ceil(wait)),
                               f"daily request limit reached ({limits.requests_per_day} requests/day for this "
                               f"account now); retry in {_duration(wait)}")
        if limits.requests_per_min:
            st.req_level = bucket_refill(st.req_level, st.req_last, now, limits.requests_per_min)
            st.req_last = now
            if st.req_level < 1.0:
                wait = seconds_until(st.req_level, 1.0, limits.requests_per_min)
                return Refusal("requests_per_min", max(1, math.ceil(wait)),
                               f"request limit reached ({limits.requests_per_min} requests/min); "
                               f"retry in {wait:.1f}s")
            st.req_level -= 1.0
        if limits.requests_per_day and st.day_level is not None:
            st.day_level -= 1.0
        if stream:
            st.streams += 1
        return None

    def charge_tokens(self, account_id: str, limits: Limits, tokens: int) -> None:
        """Charge the tokens a finished request used."""
        if not limits.tokens_per_min or tokens <= 0:
            return
        now = self.clock()
        st = self._get(account_id, limits, now)
        st.tok_level = bucket_refill(st.tok_level, st.tok_last, now, limits.tokens_per_min) - tokens
        st.tok_last = now

    def release_stream(self, account_id: str) -> None:
        st = self._state.get(account_id)
        if st is not None and st.streams > 0:
            st.streams -= 1

    def open_streams(self, account_id: str) -> int:
        st = self._state.get(account_id)
        return st.streams if st else 0
