"""The arena's traffic plan: who sends what, when, from where.

Generators (:mod:`.population` for benign users, :mod:`.campaigns` for distillation
campaigns) produce :class:`SimAccount` s and their planned :class:`Turn` s. The
simulator (:mod:`.simulate`) sends the turns in time order through a gateway and
turns each follow-up into a real conversation (earlier turns plus the answers the
teacher actually gave).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from stillhouse.guard.events import AccountInfo


@dataclass
class Turn:
    """One planned request."""

    ts: float
    account_id: str
    session_id: str
    user_text: str
    system: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    client_ip: str = ""
    user_agent: str = ""
    header_names: tuple[str, ...] = ()
    """Header names in the order the client sends them (the gateway fingerprints the order)."""
    followup: bool = False
    """Continue the session's conversation (earlier turns and answers are sent along)."""
    cover: bool = False
    """Cover traffic of a campaign account (benign-looking; not counted as leaked distillation data)."""
    reply: str | None = None
    """The real reply this turn got in its source conversation (ShareGPT); the arena's sim upstream answers
    with it (:mod:`.replies`). None: the sim teacher's length-aware filler."""
    context_chars: int | None = None
    """How a follow-up carries its conversation. None: the last four exchanges (the synthetic population's
    client). N: the full prior conversation, as a chat client sends it, the oldest exchanges dropped while
    the whole exceeds N characters (a client fitting its model's context window)."""


@dataclass
class SimAccount:
    """A simulated account and the truth about it (the detector never sees ``kind`` or ``campaign``)."""

    info: AccountInfo
    kind: str
    """'benign:<archetype>' (synthetic: casual, power, batch, bench; real: see :mod:`.realpop`) or
    'campaign:<shape>'."""
    campaign: str | None = None
    """Campaign id (shared by every account of one campaign); None for benign accounts."""
    planned: int = 0
    """Requests this account plans to send (without enforcement)."""

    @property
    def malicious(self) -> bool:
        return self.campaign is not None


def fingerprint(text: str) -> str:
    """A short stable hex hash (payment fingerprints, header fingerprints)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


SDK_HEADERS: tuple[tuple[str, ...], ...] = (
    ("host", "accept-encoding", "connection", "accept", "user-agent", "authorization", "content-type",
     "content-length"),
    ("host", "user-agent", "accept", "accept-encoding", "authorization", "content-type", "content-length"),
    ("host", "content-type", "authorization", "user-agent", "accept", "content-length"),
    ("host", "connection", "content-length", "accept", "authorization", "content-type", "origin", "user-agent",
     "accept-encoding", "accept-language"),
)
USER_AGENTS: tuple[str, ...] = (
    "OpenAI/Python 1.54.3", "OpenAI/Python 1.40.0", "OpenAI/JS 4.67.1", "python-requests/2.32.3",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/129.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 Safari/605.1.15",
    "aiohttp/3.10.5", "curl/8.5.0", "langchain-openai/0.2.1", "litellm/1.50.0",
)
