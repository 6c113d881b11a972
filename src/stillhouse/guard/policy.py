"""The policy engine: allow, throttle, degrade or block, per account and per account cluster.

Inputs, from strongest to weakest:

1. **manual decisions** set by an admin, on an account, then on a cluster — always enforced,
   also in shadow mode; an admin reverses any automatic decision by setting a manual
   ``allow`` (and clears it again to hand control back). A manual decision that confirms an
   automatic one (the console's review ``confirm``), or one set "at least" (the admin API's
   ``at_least``), is a floor instead: at least its action, and the rules and the detector
   still escalate past it (``FLOOR``);
2. **automatic decisions**: the harshest of the config's metadata rules (country, signup
   path, org, payment fingerprint) and the detector's verdicts (``Detector`` in
   ``guard/events.py``: ``verdict.suggested`` when flagged, and the config's score rules).

Every decision is a ``DecisionRow`` with a reason and the signals behind it. Manual and
detector decisions are persisted (through the ``persist`` callback the gateway wires to
its log writer, so a store outage spools them instead of losing them) and loaded back
on start, so a block survives a restart. Rule decisions are recomputed from the config
and recorded once per (rule, account) with a deterministic id.

Shadow mode: automatic decisions are computed, persisted with ``shadow=True`` and
written in each traffic record's ``decision_reason`` ("shadow: would block ..."), but the
enforced action stays ``allow``.

Plug a detector in with ``engine.take_verdict(detector.verdict(account_id))`` after each
``detector.observe(record, account)``; the gateway does exactly that.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stillhouse.guard.config import PolicyRule
from stillhouse.guard.events import ACTIONS, AccountInfo, Action, Verdict
from stillhouse.guard.store import DecisionRow


def harsher(a: str, b: str) -> str:
    """The harsher of two actions (allow < throttle < degrade < block)."""
    return a if ACTIONS.index(a) >= ACTIONS.index(b) else b  # type: ignore[arg-type]


FLOOR = "floor"
"""The signal that makes a manual decision a floor (``[FLOOR, decision id it confirms]``): the account gets at
least its action, and the rules and the detector may still go harsher. A console review's ``confirm`` writes
one, and so does the admin API's ``"at_least": true``; every other manual decision is exact (an analyst's
throttle overrides a detector's block)."""


def is_floor(signals: list[list[Any]]) -> bool:
    """Whether a manual decision with these signals is a floor (see ``FLOOR``)."""
    return any(s and s[0] == FLOOR for s in signals)


def rule_matches(rule: PolicyRule, account: AccountInfo | None, score: float | None) -> bool:
    """Whether one rule fires for an account (metadata rules) or a verdict score (score rules)."""
    if rule.field == "score":
        return score is not None and score >= rule.min_score
    return account is not None and getattr(account, rule.field) == rule.equals


@dataclass(frozen=True)
class Effective:
    """The decision for one request."""

    action: Action
    """What is enforced."""
    would: Action
    """What the policy computed (differs from ``action`` only in shadow mode)."""
    reason: str
    source: str
    """"manual", "rule", "detector" or "default"."""
    decision_id: str | None = None
    signals: list[list[Any]] = field(default_factory=list)


_ALLOW = Effective("allow", "allow", "", "default")


def _manual_effective(row: DecisionRow) -> Effective:
    """A manual decision as it is enforced (also in shadow mode)."""
    a: Action = row.action  # type: ignore[assignment]
    return Effective(a, a, f"manual {row.scope} decision {row.decision_id[:8]}: {row.reason}", "manual",
                     row.decision_id, row.signals)


class PolicyEngine:
    """Holds the active decisions in memory; persistence goes through ``persist``."""

    def __init__(self, rules: tuple[PolicyRule, ...] = (), shadow: bool = False,
                 clock: Callable[[], float] | None = None,
                 persist: Callable[[DecisionRow], None] | None = None):
        import time

        self.rules = rules
        self.shadow = shadow
        self.clock = clock or time.time
        self.persist = persist or (lambda row: None)
        self._manual: dict[tuple[str, str], DecisionRow] = {}
        """(scope, target) → active manual decision."""
        self._detector: dict[str, DecisionRow] = {}
        """account id → active detector decision."""
        self._cluster_of: dict[str, str] = {}
        self._rule_seen: set[str] = set()
        self._cache: dict[str, Effective] = {}

    # -- state --------------------------------------------------------------------------
    def apply_row(self, row: DecisionRow) -> None:
        """Take a stored decision into memory (startup load, or a change by another replica)."""
        self._cache.clear()
        if row.source == "manual":
            key = (row.scope, row.target)
            cur = self._manual.get(key)
            if row.cleared_at is not None:
                if cur is not None and cur.decision_id == row.decision_id:
                    del self._manual[key]
            elif cur is None or (row.created_at, row.decision_id) >= (cur.created_at, cur.decision_id):
                self._manual[key] = row
        elif row.source == "detector":
            cur = self._detector.get(row.target)
            if row.cleared_at is not None:
                if cur is not None and cur.decision_id == row.decision_id:
                    del self._detector[row.target]
            elif cur is None or (row.created_at, row.decision_id) >= (cur.created_at, cur.decision_id):
                self._detector[row.target] = row
            for name, value in row.signals:
                if name == "cluster_id" and value:
                    self._cluster_of[row.target] = str(value)
        elif row.source == "rule":
            self._rule_seen.add(row.decision_id)

    def load(self, rows: list[DecisionRow]) -> None:
        """Load the store's decisions (all of them, in creation order)."""
        latest: dict[str, DecisionRow] = {}
        for row in rows:  # a row persisted twice (issued, then cleared): the later version wins
            latest[row.decision_id] = row
        for row in sorted(latest.values(), key=lambda r: (r.created_at, r.decision_id)):
            if row.cleared_at is None or row.source == "rule":
                self.apply_row(row)

    def active(self) -> list[DecisionRow]:
        """Every active manual and detector decision."""
        return sorted([*self._manual.values(), *self._detector.values()], key=lambda r: r.created_at)

    def cluster_of(self, account_id: str) -> str | None:
        return self._cluster_of.get(account_id)

    def manual_decision(self, scope: str, target: str) -> DecisionRow | None:
        """The active manual decision on an account or cluster, if any."""
        return self._manual.get((scope, target))

    # -- admin --------------------------------------------------------------------------
    def manual(self, scope: str, target: str, action: str, reason: str, by: str,
               floor: str | None = None) -> DecisionRow:
        """A new manual decision (replaces the previous one on the same target). Caller persists it.

        ``floor``: make it a floor (``FLOOR``), not exact; the value is the id of the automatic decision it
        confirms ("" when it confirms none: an admin's "at least")."""
        if scope not in ("account", "cluster"):
            raise ValueError(f"scope={scope!r}: use 'account' or 'cluster'")
        if action not in ACTIONS:
            raise ValueError(f"action={action!r}: use one of {ACTIONS}")
        if not target:
            raise ValueError("target: give the account id or cluster id the decision applies to")
        now = self.clock()
        cur = self._manual.get((scope, target))
        if cur is not None and now <= cur.created_at:  # the same clock tick: still after the one it replaces,
            now = math.nextafter(cur.created_at, math.inf)  # else the tie goes to the larger random id
        signals: list[list[Any]] = [[FLOOR, floor]] if floor is not None else []
        return DecisionRow(uuid.uuid4().hex, scope, target, action, reason or f"set by {by}", "manual", now, by,
                           signals, False)

    # -- detector -----------------------------------------------------------------------
    def take_verdict(self, verdict: Verdict | None) -> DecisionRow | None:
        """Turn a detector verdict into a (persisted) decision when the action changes."""
        if verdict is None:
            return None
        if verdict.cluster_id:
            if self._cluster_of.get(verdict.account_id) != verdict.cluster_id:
                self._cache.clear()
            self._cluster_of[verdict.account_id] = verdict.cluster_id
        action: str = verdict.suggested if verdict.flagged else "allow"
        fired = [r.name for r in self.rules if rule_matches(r, None, verdict.score)]
        for r in self.rules:
            if r.name in fired:
                action = harsher(action, r.action)
        cur = self._detector.get(verdict.account_id)
        if (cur.action if cur else "allow") == action:
            return None
        now = self.clock()
        if cur is not None:
            cleared = DecisionRow(**{**cur.__dict__, "cleared_at": now, "cleared_by": "detector: superseded"})
            self.persist(cleared)
            self.apply_row(cleared)
        if action == "allow":
            return None
        top = ", ".join(f"{name}={value:.3g}" for name, value in verdict.reasons[:5])
        reason = (f"detector score {verdict.score:.3f}"
                  + (f" (threshold set for benign FPR {verdict.fpr_at_threshold:.2%})"
                     if verdict.fpr_at_threshold is not None else "")
                  + (f"; rules {fired}" if fired else "") + (f"; {verdict.note}" if verdict.note else "")
                  + (f"; top signals: {top}" if top else ""))
        signals: list[list[Any]] = [[n, float(v)] for n, v in verdict.reasons]
        signals.append(["score", float(verdict.score)])
        if verdict.cluster_id:
            signals.append(["cluster_id", verdict.cluster_id])
        row = DecisionRow(uuid.uuid4().hex, "account", verdict.account_id, action, reason, "detector",
                          now, "detector", signals, self.shadow)
        self.persist(row)
        self.apply_row(row)
        return row

    # -- the hot path -------------------------------------------------------------------
    def decide(self, account: AccountInfo) -> Effective:
        """The decision for a request of this account."""
        hit = self._cache.get(account.account_id)
        if hit is not None:
            return hit
        eff = self._decide(account)
        self._cache[account.account_id] = eff
        return eff

    def _decide(self, account: AccountInfo) -> Effective:
        aid = account.account_id
        cluster = self._cluster_of.get(aid)
        # the account's manual decision, then its cluster's: the first exact one is the base; floors on the
        # way (a confirmation, an admin's "at least") only raise what would apply without them
        floor: DecisionRow | None = None
        exact: DecisionRow | None = None
        for row in (self._manual.get(("account", aid)), self._manual.get(("cluster", cluster)) if cluster else None):
            if row is None:
                continue
            if not is_floor(row.signals):
                exact = row
                break
            if floor is None or ACTIONS.index(row.action) > ACTIONS.index(floor.action):  # type: ignore[arg-type]
                floor = row
        best = _manual_effective(exact) if exact is not None else self._automatic(account)
        if floor is not None:
            if ACTIONS.index(best.would) <= ACTIONS.index(floor.action):  # type: ignore[arg-type]
                return _manual_effective(floor)
            if best.source == "manual":  # an exact manual decision harsher than the floor
                return best
            fa: Action = floor.action  # type: ignore[assignment]
            if self.shadow:
                return Effective(fa, best.would, f"{_manual_effective(floor).reason}; shadow: would {best.would} "
                                 f"({best.reason})", "manual", floor.decision_id, floor.signals)
            return Effective(best.action, best.would, f"{best.reason} (above the manual floor, {fa})",
                             best.source, best.decision_id, best.signals)
        if self.shadow and best.source != "manual" and best.would != "allow":
            return Effective("allow", best.would, f"shadow: would {best.would} ({best.reason})", best.source,
                             best.decision_id, best.signals)
        return best

    def _automatic(self, account: AccountInfo) -> Effective:
        """The harshest of the metadata rules and the detector's decision (shadow mode not applied)."""
        aid = account.account_id
        best: Effective = _ALLOW
        for rule in self.rules:
            if (rule.field != "score" and rule_matches(rule, account, None)
                    and ACTIONS.index(rule.action) > ACTIONS.index(best.would)):
                did = f"rule:{rule.name}:{aid}"
                best = Effective(rule.action, rule.action, f"rule {rule.name}: {rule.field} == {rule.equals!r}",
                                 "rule", did, [[rule.field, rule.equals]])
        det = self._detector.get(aid)
        if det is not None and ACTIONS.index(det.action) > ACTIONS.index(best.would):  # type: ignore[arg-type]
            da: Action = det.action  # type: ignore[assignment]
            best = Effective(da, da, det.reason, "detector", det.decision_id, det.signals)
        if best.source == "rule" and best.decision_id not in self._rule_seen:
            self._rule_seen.add(best.decision_id or "")
            self.persist(DecisionRow(best.decision_id or "", "account", aid, best.would, best.reason, "rule",
                                     self.clock(), "rule", best.signals, self.shadow))
        return best

    def explain(self, account: AccountInfo) -> dict[str, Any]:
        """Everything that bears on this account's decision, for the admin API."""
        eff = self._decide(account)
        cluster = self._cluster_of.get(account.account_id)
        return {
            "account_id": account.account_id,
            "action": eff.action,
            "would": eff.would,
            "reason": eff.reason,
            "source": eff.source,
            "decision_id": eff.decision_id,
            "signals": eff.signals,
            "shadow": self.shadow,
            "cluster_id": cluster,
            "manual_account": self._manual.get(("account", account.account_id)).__dict__
            if ("account", account.account_id) in self._manual else None,
            "manual_cluster": self._manual[("cluster", cluster)].__dict__
            if cluster and ("cluster", cluster) in self._manual else None,
            "detector": self._detector[account.account_id].__dict__
            if account.account_id in self._detector else None,
        }
