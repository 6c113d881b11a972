"""The harvester's manners toward a provider: rate limits (Retry-After, RPM, TPM), budgets and backoff.

A 429/503 with Retry-After pauses every new request until it has passed; requests per minute are
spaced; a token bucket holds tokens per minute; hard caps on requests, tokens and cost reserve before a
call and settle with the usage the server reports. Nothing here gets around a provider's limits.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable


class RateLimiter:
    """Retry-After cool-down, RPM spacing and a TPM bucket, for one event loop."""

    def __init__(self, rpm: float = 0.0, tpm: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.rpm, self.tpm, self.clock = rpm, tpm, clock
        self.not_before = 0.0
        self._next_slot = 0.0
        self._level = tpm  # tokens available; may go negative (a queue of reservations)
        self._level_t = clock()

    def cool_down(self, seconds: float) -> None:
        """No request starts for ``seconds`` from now (a 429/503 Retry-After)."""
        self.not_before = max(self.not_before, self.clock() + seconds)

    def delay_for(self, tokens: int) -> float:
        """Reserve a start for a request of ~``tokens``; returns how long to wait before it."""
        now = self.clock()
        start = max(now, self.not_before)
        if self.rpm:
            start = max(start, self._next_slot)
            self._next_slot = start + 60.0 / self.rpm
        if self.tpm:
            rate = self.tpm / 60.0
            self._level = min(self.tpm, self._level + (now - self._level_t) * rate)
            self._level_t = now
            self._level -= tokens
            if self._level < 0:
                start = max(start, now + (-self._level) / rate)
        return start - now

    def settle(self, reserved: int, actual: int) -> None:
        """Give back (or take) the difference between the reserved and the reported tokens."""
        if self.tpm:
            self._level += reserved - actual

    async def acquire(self, tokens: int) -> None:
        wait = self.delay_for(tokens)
        if wait > 0:
            await asyncio.sleep(wait)
        # A Retry-After that arrived while we slept pushes us back again.
        while self.not_before > self.clock():
            await asyncio.sleep(self.not_before - self.clock())


class Budget:
    """Hard caps on requests, tokens and cost, with reservations for requests in flight."""

    def __init__(self, max_requests: int = 0, max_tokens: int = 0, max_cost: float = 0.0,
                 spent_requests: int = 0, spent_tokens: int = 0, spent_cost: float = 0.0):
        self.max_requests, self.max_tokens, self.max_cost = max_requests, max_tokens, max_cost
        self.requests, self.tokens, self.cost = spent_requests, spent_tokens, spent_cost

    def reserve(self, tokens: int, cost: float) -> str | None:
        """Reserve one request; returns None, or the reason the cap forbids it."""
        if self.max_requests and self.requests + 1 > self.max_requests:
            return f"budget cap max_requests={self.max_requests} reached ({self.requests} used)"
        if self.max_tokens and self.tokens + tokens > self.max_tokens:
            return (f"budget cap max_total_tokens={self.max_tokens} reached ({self.tokens} used, the next request "
                    f"may need {tokens})")
        if self.max_cost and self.cost + cost > self.max_cost + 1e-12:
            return f"budget cap max_cost={self.max_cost:g} reached ({self.cost:.6g} used)"
        self.requests += 1
        self.tokens += tokens
        self.cost += cost
        return None

    def settle(self, reserved_tokens: int, reserved_cost: float, tokens: int, cost: float) -> None:
        self.tokens += tokens - reserved_tokens
        self.cost += cost - reserved_cost


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff before retry number ``attempt`` (1-based)."""
    return rng.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def estimate_prompt_tokens(messages_json: str, n_messages: int) -> int:
    """A rough token count for budgets and TPM before the server tells us (≈ 4 bytes a token)."""
    return len(messages_json) // 4 + 4 * n_messages + 8
