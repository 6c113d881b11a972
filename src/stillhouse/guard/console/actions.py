"""What an analyst can do from the console, and the audit trail of each action.

Account actions (``act``):

- ``throttle`` / ``degrade`` / ``block`` / ``allow``: a manual decision on the account (it overrides
  the detector and the rules, also in shadow mode);
- ``clear``: clear the account's manual decision, handing control back to the detector and rules;
- ``evaluator``: mark a known evaluator: a manual ``allow`` and a label 0 (as the review verdict below).

Review verdicts on an automatic decision (``review``), each also a label for
``stillhouse detect --fit --labels``:

- ``confirm`` (label 1): the analyst adopts the decision: a manual decision with its action, so a
  proposal made in shadow mode is enforced from the next request and a later fall of the score does
  not undo it. It is a floor, not a ceiling: the detector and the rules still escalate past it (a
  confirmed throttle becomes a block when the evidence for one comes). It never lowers the account's
  manual decision: confirming the detector's throttle of an account that stands blocked by hand, or by
  an earlier confirmation, records the label and keeps the block;
- ``dismiss`` (label 0): a false positive: a manual ``allow`` overrides it (``clear`` on the account
  hands control back to the detector);
- ``evaluator`` (label 0): a known evaluator (benchmark runner, red team): a manual ``allow``.

Every action writes its decision to the store and the policy in memory before it returns, so it
applies to this replica's next request (other replicas read it within ``key_refresh_s``), and adds
an ``AuditRow``: actor, time, the action, its reason, and the account's decision before and after.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from stillhouse.guard.events import ACTIONS, AccountInfo
from stillhouse.guard.store import AuditRow, NotFound, ReviewRow

if TYPE_CHECKING:
    from stillhouse.guard.app import GuardApp

ACCOUNT_ACTIONS = (*ACTIONS, "clear", "evaluator")
VERDICTS = {"confirm": ("confirmed", 1), "dismiss": ("dismissed", 0), "evaluator": ("evaluator", 0)}
MAX_REASON = 500


class ActionError(ValueError):
    """A bad action request; the message says what to fix (shown to the analyst, answered with 400/404)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def state(app: GuardApp, account_id: str) -> dict[str, Any]:
    """The account's decision as the policy sees it now (the audit's before/after)."""
    acct = app.accounts.get(account_id)
    info = acct[0] if acct else AccountInfo(account_id)
    e = app.policy.explain(info)
    manual = e.get("manual_account") or {}
    detector = e.get("detector") or {}
    return {"action": e["action"], "would": e["would"], "source": e["source"], "reason": e["reason"][:300],
            "decision_id": e["decision_id"], "manual": manual.get("action"), "detector": detector.get("action"),
            "cluster_id": e.get("cluster_id")}


def _reason(reason: str) -> str:
    reason = (reason or "").strip()
    if not reason:
        raise ActionError("give a reason: it is kept with the decision and in the audit trail")
    if len(reason) > MAX_REASON:
        raise ActionError(f"the reason is {len(reason)} characters; keep it under {MAX_REASON}")
    return reason


async def _known(app: GuardApp, account_id: str) -> None:
    if account_id not in app.accounts:
        try:
            await app.db(app.store.get_account, account_id)
        except NotFound as exc:
            raise ActionError(f"no account {account_id!r}", 404) from exc


async def _manual(app: GuardApp, account_id: str, action: str, reason: str, actor: str,
                  floor: str | None = None) -> None:
    row = app.policy.manual("account", account_id, action, reason, actor, floor)
    await app.db(app.store.add_decision, row)
    app.policy.apply_row(row)
    app.metrics.decision(row)


async def _audit(app: GuardApp, actor: str, action: str, target: str, reason: str, before: dict[str, Any]) -> AuditRow:
    row = AuditRow(uuid.uuid4().hex, app.clock(), actor, action, target, reason, before, state(app, target))
    await app.db(app.store.add_audit, row)
    return row


async def act(app: GuardApp, actor: str, account_id: str, action: str, reason: str) -> AuditRow:
    """A manual decision on an account, or ``clear`` (see the module docstring)."""
    if action not in ACCOUNT_ACTIONS:
        raise ActionError(f"unknown action {action!r}; use one of {list(ACCOUNT_ACTIONS)}")
    reason = _reason(reason)
    await _known(app, account_id)
    before = state(app, account_id)
    if action == "clear":
        row = app.policy.manual_decision("account", account_id)
        if row is None:
            raise ActionError(f"{account_id} has no manual decision to clear")
        cleared = await app.db(app.store.clear_decision, row.decision_id, app.clock(), actor)
        app.policy.apply_row(cleared)
    elif action == "evaluator":
        await _manual(app, account_id, "allow", f"known evaluator: {reason} (by {actor})", actor)
        await app.db(app.store.add_review, ReviewRow(uuid.uuid4().hex, "", account_id, "evaluator", 0, reason, actor,
                                                     app.clock()))
    else:
        await _manual(app, account_id, action, f"{reason} (by {actor})", actor)
    return await _audit(app, actor, action, account_id, reason, before)


async def review(app: GuardApp, actor: str, decision_id: str, verdict: str, reason: str) -> AuditRow:
    """An analyst's verdict on an automatic decision: a label, and the decision it implies."""
    if verdict not in VERDICTS:
        raise ActionError(f"unknown verdict {verdict!r}; use one of {list(VERDICTS)}")
    reason = _reason(reason)
    try:
        d = await app.db(app.store.get_decision, decision_id)
    except NotFound as exc:
        raise ActionError(f"no decision {decision_id!r}", 404) from exc
    if d.scope != "account":
        raise ActionError("only account decisions are reviewed here; act on a cluster's members one by one")
    aid = d.target
    before = state(app, aid)
    name, label = VERDICTS[verdict]
    if verdict == "confirm":
        cur = app.policy.manual_decision("account", aid)
        if d.action != "allow" and not (cur is not None and ACTIONS.index(cur.action) > ACTIONS.index(d.action)):
            await _manual(app, aid, d.action, f"confirmed {d.source} decision {decision_id[:8]}: {reason} "
                                              f"(by {actor})", actor, floor=decision_id)
    else:
        what = "known evaluator" if verdict == "evaluator" else f"dismissed {d.source} decision {decision_id[:8]}"
        await _manual(app, aid, "allow", f"{what}: {reason} (by {actor})", actor)
    await app.db(app.store.add_review, ReviewRow(uuid.uuid4().hex, decision_id, aid, name, label, reason, actor,
                                                 app.clock()))
    return await _audit(app, actor, f"review:{name}", aid, reason, before)


def label_json(r: ReviewRow) -> dict[str, Any]:
    """One label line, as ``labels.jsonl`` and ``GET /admin/labels`` give it (``stillhouse detect --fit --labels``
    reads these): {"account_id", "label": 1 campaign | 0 benign, "verdict", "reason", "actor", "ts", "decision_id"}."""
    return {"account_id": r.account_id, "label": int(r.label), "verdict": r.verdict, "reason": r.reason,
            "actor": r.actor, "ts": r.created_at, "decision_id": r.decision_id}
