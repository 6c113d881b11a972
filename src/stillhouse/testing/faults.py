"""The fake server's behaviour: its latency, its answers' form and a deterministic fault schedule.

Fault schedule. Each request is keyed by the SHA-1 of its body; the server counts how many
times it has seen that body (the *attempt*). ``--faults KIND=RATE,...`` are transient: a
fault is drawn from a hash of (body, attempt), and only while attempt < ``--fault-attempts``
(default 2), so a client that retries enough times always gets through — the outcome of
every request is a pure function of (body, attempt), independent of arrival order.
``--permanent-faults KIND=RATE,...`` are drawn from the body alone and hit every attempt:
those records can never succeed. Kinds:

    429        429 with ``Retry-After: <retry_after_s>`` and an OpenAI-style error body
    503        503 with ``Retry-After``
    500        500 Internal Server Error
    400        400 Bad Request (only sensible as a permanent fault)
    timeout    the answer is held for ``--hang-s`` seconds (default 30) before it is sent
    truncated  200 with the JSON body cut in half
    empty      200 with ``"choices": []``
    drop       the connection is closed without an answer
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

from stillhouse.teacher.fake import REASONING_FORMS

FaultKind = Literal["429", "503", "500", "400", "timeout", "truncated", "empty", "drop"]
FAULT_KINDS: tuple[str, ...] = ("429", "503", "500", "400", "timeout", "truncated", "empty", "drop")


def parse_faults(text: str) -> tuple[tuple[str, float], ...]:
    """Parse ``"429=0.1,500=0.05"`` into ((kind, rate), ...), validating kinds and rates."""
    out: list[tuple[str, float]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, rate_s = part.partition("=")
        if not sep:
            raise ValueError(f"fault {part!r}: write KIND=RATE, e.g. 429=0.1")
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind {kind!r}: choose from {', '.join(FAULT_KINDS)}")
        try:
            rate = float(rate_s)
        except ValueError as exc:
            raise ValueError(f"fault {part!r}: rate {rate_s!r} is not a number") from exc
        out.append((kind, rate))
    return tuple(out)


@dataclass(frozen=True)
class FakeServerConfig:
    """How the fake server behaves."""

    latency_ms: float = 50.0
    """Every answer waits this long before it is sent (the fixed latency L)."""
    model: str = "fake-model"
    """The id /v1/models lists and completions carry."""
    faults: tuple[tuple[str, float], ...] = ()
    """Transient faults as (kind, rate); see the module docstring."""
    permanent_faults: tuple[tuple[str, float], ...] = ()
    """Faults drawn per request body that hit every attempt."""
    fault_attempts: int = 2
    """Transient faults can only hit the first this-many attempts of a body."""
    retry_after_s: float = 0.2
    """The Retry-After a 429/503 carries."""
    hang_s: float = 30.0
    """How long a 'timeout' fault holds the answer."""
    error_rate: float = 0.3
    """Share of arithmetic answers that are off by one."""
    seed: int = 0
    """Changes every answer and every fault draw."""
    stream_chunk_delay_ms: float = 0.0
    """Pause between SSE chunks when streaming."""
    reasoning: str = "off"
    """How answers carry a chain of thought: off, reasoning_content, reasoning or think (inline)."""
    keep_bodies: bool = False
    """Keep the bytes of every 200 answer (``FakeServer.bodies``: request body -> answer bodies)."""

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or math.isnan(self.latency_ms):
            raise ValueError(f"latency_ms={self.latency_ms}: must be >= 0")
        for name in ("faults", "permanent_faults"):
            pairs = getattr(self, name)
            for kind, rate in pairs:
                if kind not in FAULT_KINDS:
                    raise ValueError(f"{name}: unknown kind {kind!r}; choose from {', '.join(FAULT_KINDS)}")
                if not 0.0 <= rate <= 1.0:
                    raise ValueError(f"{name}: rate {rate} for {kind} must be between 0 and 1")
            if sum(r for _, r in pairs) > 1.0 + 1e-9:
                raise ValueError(f"{name}: rates sum to more than 1")
        if self.fault_attempts < 0:
            raise ValueError(f"fault_attempts={self.fault_attempts}: must be >= 0")
        if self.retry_after_s < 0 or self.hang_s < 0:
            raise ValueError("retry_after_s and hang_s must be >= 0")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate={self.error_rate}: must be between 0 and 1")
        if self.reasoning not in REASONING_FORMS:
            raise ValueError(f"reasoning={self.reasoning!r}: choose from {', '.join(REASONING_FORMS)}")


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def _pick(pairs: tuple[tuple[str, float], ...], u: float) -> str | None:
    acc = 0.0
    for kind, rate in pairs:
        acc += rate
        if u < acc:
            return kind
    return None


def choose_fault(cfg: FakeServerConfig, body_key: str, attempt: int) -> str | None:
    """The fault (or None) for the ``attempt``-th sighting (0-based) of a body: a pure function."""
    if cfg.permanent_faults:
        kind = _pick(cfg.permanent_faults, _unit(cfg.seed, "perm", body_key))
        if kind is not None:
            return kind
    if cfg.faults and attempt < cfg.fault_attempts:
        return _pick(cfg.faults, _unit(cfg.seed, "tr", body_key, attempt))
    return None
