"""The records and the one interface shared by the guard, the detector and the arena.

The gateway writes a :class:`TrafficRecord` for every request; the detector reads
them (online, one at a time, or offline from the traffic log) and answers with a
:class:`Verdict` per account; the policy engine turns verdicts into decisions.
Keeping these here, and small, is what lets online and offline scoring run the
same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Action = Literal["allow", "throttle", "degrade", "block"]
ACTIONS: tuple[Action, ...] = ("allow", "throttle", "degrade", "block")
"""Ordered from mildest to harshest."""


@dataclass
class AccountInfo:
    """Who an account says it is. ``payment_fingerprint`` is a hash, never card data."""

    account_id: str
    org: str = ""
    signup_path: str = ""
    country: str = ""
    payment_fingerprint: str = ""
    created_at: float = 0.0


@dataclass
class TrafficRecord:
    """One request through the gateway, as the traffic log stores it."""

    request_id: str
    ts: float
    """Arrival time, unix seconds (simulated time in the arena)."""
    account_id: str
    key_id: str
    client_ip: str = ""
    user_agent: str = ""
    header_fingerprint: str = ""
    """Hash of the request's header names in arrival order."""
    model: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    """Sampling fields of the request: max_tokens, n, temperature, logprobs, top_logprobs, stream."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    """The prompt as sent (possibly redacted)."""
    response_text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    status: int = 200
    decision: Action = "allow"
    decision_reason: str = ""
    session_id: str = ""
    """Client-supplied conversation id when present (header ``X-Session-Id``), else empty."""
    watermark_key_id: str = ""
    """The watermark key id the upstream confirmed it answered with (never the key), else empty."""
    watermark_scheme: str = ""
    """That watermark's scheme as the upstream confirmed it (kgw or exp), else empty (an older upstream)."""


@dataclass
class Verdict:
    """The detector's view of one account (or of the cluster it belongs to)."""

    account_id: str
    score: float
    """Higher is more suspicious; thresholds are calibrated on benign traffic."""
    flagged: bool
    suggested: Action = "allow"
    cluster_id: str | None = None
    reasons: list[tuple[str, float]] = field(default_factory=list)
    """Top signals with their contributions, most important first."""
    fpr_at_threshold: float | None = None
    """The benign false-positive rate the threshold was set for."""
    note: str = ""
    """Why ``suggested`` is milder than the score's tier, when it is (a block score without the evidence a
    block needs: ``DetectConfig.block_requires``)."""


class Detector(Protocol):
    """What the policy engine needs from a detector."""

    def observe(self, record: TrafficRecord, account: AccountInfo | None = None) -> None:
        """Take one finished request into account (incremental, cheap)."""
        ...

    def verdict(self, account_id: str) -> Verdict | None:
        """The current verdict for an account, or None when it has no traffic yet."""
        ...
