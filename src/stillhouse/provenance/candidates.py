"""Which keys to try: key ids from a guard's traffic log, or given, turned into keys with the secret.

The guard records the key id that answered each request (``traffic.watermark_key_id``); the
distinct ids in its log, with the accounts behind each, are the natural candidates. Keys are
re-derived from the shared secret here and never printed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from stillhouse.watermark.keys import KeyId, WatermarkKeyError, derive_key, key_u64


@dataclass
class Candidate:
    """A key id to test, and who it answered (from the log)."""

    key_id: str
    accounts: set[str] = field(default_factory=set)
    requests: int = 0


def from_log(db_url: str) -> list[Candidate]:
    """Distinct watermark key ids in a guard log, with their accounts and request counts."""
    from stillhouse.provenance.texts import read_log

    rows = read_log(db_url, lambda store: store.watermark_key_usage())
    out: dict[str, Candidate] = {}
    for kid, account, n in rows:
        c = out.setdefault(kid, Candidate(kid))
        c.accounts.add(account)
        c.requests += n
    return sorted(out.values(), key=lambda c: c.key_id)


def clusters_from_log(db_url: str) -> dict[str, list[str]]:
    """``{cluster id: accounts}`` as the guard's detector last linked them (``account_stats.cluster_id``)."""
    from stillhouse.provenance.texts import read_log

    rows = read_log(db_url, lambda store: store.fetch("SELECT account_id, cluster_id FROM account_stats "
                                                      "WHERE cluster_id <> ''"))
    out: dict[str, list[str]] = {}
    for account, cluster in rows:
        out.setdefault(str(cluster), []).append(str(account))
    return {c: sorted(a) for c, a in sorted(out.items())}


def from_ids(key_ids: Iterable[str]) -> list[Candidate]:
    """Candidates from key ids as written (``account/lab/0``); a malformed one is an error naming it."""
    out = []
    for kid in key_ids:
        kid = kid.strip()
        if not kid:
            continue
        KeyId.parse(kid)  # raises WatermarkKeyError naming the id
        out.append(Candidate(kid))
    if not out:
        raise WatermarkKeyError("no key ids to try: give --key-ids account/ID/EPOCH,... or --log sqlite:///guard.db")
    return out


def derive_all(secret: bytes, candidates: Iterable[Candidate]) -> dict[str, int]:
    """``{key id: 64-bit PRF key}`` for the candidates."""
    return {c.key_id: key_u64(derive_key(secret, c.key_id)) for c in candidates}
