"""Pre-aggregated counters of the traffic log, as plain functions of a batch of records.

The operator console answers over logs of millions of records by reading small tables
that the log writer keeps up to date in the same transaction as the records themselves
(``SqlStore.write_records``), never by scanning the log:

- ``traffic_hourly``  per hour: requests, prompt/completion tokens, errors (status >= 500),
  refusals (4xx), and requests per enforced tier (allow / throttle / degrade / block);
- ``account_stats``   per account: the same counters, first/last seen, plus the detector's
  latest score, its maximum, its cluster and its reasons (``SqlStore.put_scores``);
- ``account_hourly``  per account and hour: requests, tokens, errors, refusals, maximum score;
- ``account_links``   per account: the infrastructure it was seen on (client IP, /24 or /48
  subnet, user agent with header fingerprint), the evidence a cluster's links rest on.

:func:`batch_rollups` turns a batch into the rows to add; the store adds them with
``ON CONFLICT ... DO UPDATE SET x = x + excluded.x``, so a batch written twice would count
twice: the store skips request ids it already holds before aggregating (spool replays).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from stillhouse.guard.events import ACTIONS, TrafficRecord

HOUR_S = 3600.0
TIERS = ACTIONS
"""The enforced tiers counted per hour, mildest first (columns n_allow ... n_block)."""
LINK_KINDS = ("ip", "subnet", "ua")


def hour_of(ts: float) -> float:
    """Start of the hour holding ``ts`` (unix seconds)."""
    return float(int(ts // HOUR_S) * HOUR_S)


def subnet_key(ip: str) -> str:
    """The /24 of an IPv4 address or the /48 of an IPv6 one ("" when it is neither)."""
    if not ip:
        return ""
    if ":" in ip:
        parts = ip.split(":")
        return ":".join(parts[:3]) + "::/48" if len(parts) >= 3 else ""
    parts = ip.split(".")
    return ".".join(parts[:3]) + ".0/24" if len(parts) == 4 else ""


def ua_key(user_agent: str, header_fingerprint: str) -> str:
    """A short key for (user agent, header-name fingerprint): clients that look alike share it."""
    if not user_agent and not header_fingerprint:
        return ""
    hit = _UA_KEYS.get((user_agent, header_fingerprint))
    if hit is None:
        if len(_UA_KEYS) > 4096:
            _UA_KEYS.clear()
        h = hashlib.blake2b(f"{user_agent}|{header_fingerprint}".encode(), digest_size=6).hexdigest()
        hit = _UA_KEYS[(user_agent, header_fingerprint)] = f"{user_agent[:80]} [{h}]"
    return hit


_UA_KEYS: dict[tuple[str, str], str] = {}
"""A few clients send most requests: their keys are computed once (bounded; cleared when full)."""


@dataclass
class Rollups:
    """What one batch adds to the counter tables (see the module docstring)."""

    hourly: dict[float, list[int]] = field(default_factory=dict)
    """hour -> [requests, prompt_tokens, completion_tokens, errors, refused, n_allow, n_throttle, n_degrade, n_block]."""
    accounts: dict[str, list[Any]] = field(default_factory=dict)
    """account -> [requests, prompt_tokens, completion_tokens, errors, refused, first_ts, last_ts]."""
    account_hourly: dict[tuple[str, float], list[int]] = field(default_factory=dict)
    """(account, hour) -> [requests, tokens, errors, refused]."""
    links: dict[tuple[str, str, str], float] = field(default_factory=dict)
    """(account, kind, value) -> first time seen in this batch."""


def batch_rollups(records: list[TrafficRecord]) -> Rollups:
    """The counter rows a batch of records adds. Records without an account (401s) count only per hour."""
    out = Rollups()
    tier_at = {t: 5 + i for i, t in enumerate(TIERS)}
    for r in records:
        hour = hour_of(r.ts)
        pt, ct = int(r.prompt_tokens), int(r.completion_tokens)
        err = 1 if r.status >= 500 else 0
        refused = 1 if 400 <= r.status < 500 else 0
        h = out.hourly.get(hour)
        if h is None:
            h = out.hourly[hour] = [0] * 9
        h[0] += 1
        h[1] += pt
        h[2] += ct
        h[3] += err
        h[4] += refused
        h[tier_at.get(r.decision, 5)] += 1
        aid = r.account_id
        if not aid:
            continue
        a = out.accounts.get(aid)
        if a is None:
            out.accounts[aid] = [1, pt, ct, err, refused, r.ts, r.ts]
        else:
            a[0] += 1
            a[1] += pt
            a[2] += ct
            a[3] += err
            a[4] += refused
            a[5] = min(a[5], r.ts)
            a[6] = max(a[6], r.ts)
        ah = out.account_hourly.get((aid, hour))
        if ah is None:
            out.account_hourly[(aid, hour)] = [1, pt + ct, err, refused]
        else:
            ah[0] += 1
            ah[1] += pt + ct
            ah[2] += err
            ah[3] += refused
        for kind, value in (("ip", r.client_ip), ("subnet", subnet_key(r.client_ip)),
                            ("ua", ua_key(r.user_agent, r.header_fingerprint))):
            if value:
                key = (aid, kind, value[:300])
                if key not in out.links or r.ts < out.links[key]:
                    out.links[key] = r.ts
    return out
