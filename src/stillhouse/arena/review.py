"""An operator who works the console's review queue, in the arena's simulated time.

The policy blocks on a score only with the evidence a block needs (``DetectConfig.block_requires``: a
rare ask or a coordinated cluster); a block score without it is degraded and listed in the console's
review queue, because eval runners, judges and batch services look like that too. Without anyone
working that queue a plain harvest is degraded and never blocked, and leaks its whole plan. This
module puts the operator in: every ``ArenaConfig.review_every_h`` simulated hours it reads the queue
(``console.queries.review_queue``, what the review page shows) and acts through the console's own
actions (``console.actions``), so the decisions land in the guard's store, policy and audit trail as an
analyst's would. Two operators bound what review can do:

- ``oracle``: a perfect analyst (knows which accounts are campaigns): blocks every campaign account in
  the queue and dismisses every benign one (label 0, a manual allow). The leak it leaves is the cost of
  the review delay alone.
- ``rubber-stamp``: blocks every account the detector degraded for review and confirms every other
  decision as it stands, knowing nothing: what blocking on the score alone, a review delay later,
  costs benign accounts.

Cluster decisions are not in the queue's unit of review (``actions.review`` takes account decisions);
their members' own decisions are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from stillhouse.guard.app import GuardApp

ReviewerKind = Literal["oracle", "rubber-stamp"]
REVIEWERS: tuple[str, ...] = ("oracle", "rubber-stamp")
ACTOR = "arena-operator"


@dataclass
class QueueReviewer:
    """Works the review queue of ``app`` each time it is called (see the module docstring)."""

    app: GuardApp
    kind: ReviewerKind
    campaign_accounts: frozenset[str]
    rounds: int = 0
    actions: dict[str, dict[str, int]] = field(default_factory=lambda: {"campaign": {}, "benign": {}})
    blocked: set[str] = field(default_factory=set)
    """Accounts the operator blocked (not those the policy had blocked already)."""

    async def __call__(self) -> None:
        from stillhouse.guard.console.actions import act, review
        from stillhouse.guard.console.queries import review_queue

        self.rounds += 1
        # live, the log writer flushes every fraction of a second; simulated hours pass faster than that, so
        # the operator first lets it write what the policy decided up to now
        await self.app.writer.flush()
        pending: list[dict[str, Any]] = []
        after = ""
        while True:
            items, after_next, _total = await self.app.db(review_queue, self.app.store, after)
            pending += items
            if after_next is None:
                break
            after = after_next
        for d in pending:
            if d["scope"] != "account":
                continue
            aid = d["target"]
            campaign = aid in self.campaign_accounts
            what = self._decide(d, campaign)
            reason = f"review round {self.rounds}: {self.kind} operator"
            # the verdict closes the queue entry (and is a label); a block then overrides the confirmed decision
            await review(self.app, ACTOR, d["decision_id"], "dismiss" if what == "dismiss" else "confirm", reason)
            if what == "block":
                await act(self.app, ACTOR, aid, "block", reason)
                self.blocked.add(aid)
            side = self.actions["campaign" if campaign else "benign"]
            side[what] = side.get(what, 0) + 1

    def _decide(self, decision: dict[str, Any], campaign: bool) -> str:
        """``block``, ``confirm`` or ``dismiss`` for one pending decision (a block the policy made already is
        only confirmed)."""
        if self.kind == "oracle":
            want = "block" if campaign else "dismiss"
        else:
            want = "block" if decision["action"] == "degrade" else "confirm"
        return "confirm" if want == "block" and decision["action"] == "block" else want

    def summary(self, every_h: float) -> dict[str, Any]:
        benign = sorted(self.blocked - self.campaign_accounts)
        return {"reviewer": self.kind, "every_h": every_h, "rounds": self.rounds, "actions": self.actions,
                "blocked_accounts": {"campaign": len(self.blocked) - len(benign), "benign": len(benign)},
                "benign_blocked": benign[:20]}
