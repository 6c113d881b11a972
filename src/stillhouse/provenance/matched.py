"""Key-matched and pooled scoring: each key tested only on answers to the prompts it answered.

The plain test (:func:`.detect.score_keys`) scores every one of the suspect's answers under every
candidate key, so answers to prompts that key never answered dilute its test. A guard's traffic log
knows, for every watermarked answer, which key id answered it and which account asked; with that log
as the source the suspect answers the same prompts, and

- **matched** (:func:`matched_tuples`): key ``k`` is tested on the suspect's answers to the prompts
  ``k`` answered, and no others (distinct tuples within that set, prompt tuples dropped as before);
- **pooled** (:func:`pooled_parts`, :func:`score_pooled`): a group of accounts (a campaign, or a
  cluster the guard's detector linked) is one hypothesis, "the suspect learned from this group's
  answers": every member's answer is scored under the key that answered it, and the evidence is the
  distinct ``(key, window, token)`` triples; one exact binomial test per group.

With weight levels (the weighted score of :mod:`.detect`) each tuple or triple carries its level and the exact
test is that of the weighted sum; the levels come from the text and the teacher, never a key, so the argument below
holds for them unchanged.

Why it stays exact. Under H0 for key ``k`` the suspect never learned from ``k``'s answers, so what it
writes does not depend on ``k``'s green lists. Which answers are scored for ``k`` depends only on the
log (who asked what, which key id answered), the suspect and the teacher's entropy gate, never on
``k``'s green lists. So the green bits of ``k``'s distinct tuples are independent Bernoulli(gamma)
(the PRF model the whole test rests on), and ``P(Binomial(N, gamma) >= green)`` is exact. For a group
the same holds for each member key; distinct keys are independent PRF keys, so the green bits of
distinct ``(key, tuple)`` triples are independent too, and their sum is Binomial(N, gamma) under the
group's H0 (the suspect learned from none of the group's keys). Learning from *other* keys' answers
does not break either H0: other keys are independent of these. Holm runs over every hypothesis tested,
single keys and groups together (:func:`.detect.adjust`), so the chance of naming any key or group falsely is
at most the level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from stillhouse.provenance.detect import KeyScore, Selection, Tuple, green_test, score_uniforms, select
from stillhouse.watermark.green import WatermarkParams, green_flags, uniform

GivenBy = Literal["operator", "cluster"]


@dataclass(frozen=True)
class Group:
    """Accounts tested together as one hypothesis."""

    name: str
    """``group:a+b`` (given by the operator) or ``cluster:ID`` (linked by the guard's detector)."""
    accounts: tuple[str, ...]
    given_by: GivenBy
    """Who said these accounts belong together: the operator (``--group``) or the detector (its cluster)."""


def _rows_by_key(key_ids: Sequence[str], rows: Sequence[int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for j in rows:
        out.setdefault(key_ids[j], []).append(j)
    return out


def matched_tuples(seqs: Sequence[Sequence[int]], key_ids: Sequence[str], context: int, exclude: set[Tuple],
                   dedup: bool = True, keep: Sequence[Sequence[bool]] | None = None,
                   levels: Sequence[Sequence[int]] | None = None,
                   exp: Sequence[bool] | None = None) -> dict[str, Selection]:
    """``{key id: the distinct tuples of the answers that key answered}``; ``key_ids[j]`` answered ``seqs[j]``
    (``exp[j]``: EXP-scored)."""
    if len(key_ids) != len(seqs):
        raise ValueError(f"{len(key_ids)} key ids for {len(seqs)} answers")
    return {kid: select(seqs, rows, context, exclude, dedup, keep, levels, exp)
            for kid, rows in _rows_by_key(key_ids, range(len(seqs))).items()}


def pooled_parts(seqs: Sequence[Sequence[int]], key_ids: Sequence[str], accounts: Sequence[str],
                 members: Sequence[str], context: int, exclude: set[Tuple], dedup: bool = True,
                 keep: Sequence[Sequence[bool]] | None = None,
                 levels: Sequence[Sequence[int]] | None = None,
                 exp: Sequence[bool] | None = None) -> dict[str, Selection]:
    """A group's evidence: ``{key id: distinct tuples}`` over the members' answers, each under the key that
    answered it (so the distinct ``(key, tuple)`` triples are what is scored)."""
    if not len(key_ids) == len(accounts) == len(seqs):
        raise ValueError(f"{len(seqs)} answers, {len(key_ids)} key ids, {len(accounts)} accounts: must be equal")
    wanted = set(members)
    rows = [j for j, a in enumerate(accounts) if a in wanted]
    return {kid: select(seqs, r, context, exclude, dedup, keep, levels, exp)
            for kid, r in _rows_by_key(key_ids, rows).items()}


def score_pooled(parts: Mapping[str, Selection], keys: Mapping[str, int], params: WatermarkParams,
                 name: str) -> KeyScore:
    """Green triples among all of ``parts`` (each key's tuples under that key) and the exact p-value (binomial, or
    of the weighted sum when the parts carry levels)."""
    missing = sorted(set(parts) - set(keys))
    if missing:
        raise ValueError(f"no key derived for {missing}")
    levels = ([u for sel in parts.values() for u in sel.levels or []]
              if any(sel.levels is not None for sel in parts.values()) else None)
    if any(sel.exp is not None for sel in parts.values()):  # EXP-scored triples among them
        us = [uniform(keys[kid], t) for kid, sel in parts.items() for t in sel.tuples]
        return score_uniforms(us, params, name, levels,
                              [e for sel in parts.values() for e in (sel.exp or [False] * len(sel.tuples))])
    flags = [f for kid, sel in parts.items() for f in green_flags(keys[kid], sel.tuples, params)]
    return green_test(flags, params, name, levels)


def check_groups(groups: Sequence[Group], known: Sequence[str]) -> None:
    """Raise ValueError naming any group member that asked nothing in the source."""
    have = set(known)
    for g in groups:
        unknown = [a for a in g.accounts if a not in have]
        if unknown:
            shown = ", ".join(sorted(have)[:20]) + (" ..." if len(have) > 20 else "")
            raise ValueError(f"group {','.join(g.accounts)}: account(s) {', '.join(unknown)} have no watermarked "
                             f"answer in the source; name accounts from the guard's log ({shown})")


def operator_groups(specs: Sequence[str]) -> list[Group]:
    """Groups as given (``--group a,b,c``, repeatable); an empty or duplicated member is an error."""
    out = []
    for spec in specs:
        members = tuple(a.strip() for a in spec.split(","))
        if not members or any(not a for a in members):
            raise ValueError(f"group {spec!r}: give account ids separated by commas, e.g. --group camp-0,camp-1")
        if len(set(members)) != len(members):
            raise ValueError(f"group {spec!r}: an account is named twice")
        out.append(Group("group:" + "+".join(members), members, "operator"))
    return out
