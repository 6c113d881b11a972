"""API keys: issue, revoke, rotate, authenticate. Only hashes are ever stored.

A key looks like ``sk-sh-<key_id>-<secret>``: ``key_id`` (12 hex chars) is public and is
what logs, admin listings and traffic records carry; the secret is 43 URL-safe
characters from ``secrets``. The store keeps ``sha256(key)``; since keys are long random
strings, a plain SHA-256 is enough (no password stretching needed) and lets the hot path
authenticate with one dict lookup.

``KeyRing`` is the gateway's in-memory view of the keys table. Changes made through it
(issue/revoke/rotate) take effect on the very next request of this replica; changes made
by other replicas sharing a PostgreSQL store are picked up by ``refresh`` (called every
``key_refresh_s``). It also keeps authenticating while the store is down, from the last
state it saw, which is what fail-open needs.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from stillhouse.guard.store import KeyRow, NotFound, SqlStore

KEY_PREFIX = "sk-sh-"
_KEY_RE = re.compile(r"^sk-sh-([0-9a-f]{12})-[A-Za-z0-9_\-]{20,}$")


def hash_key(key: str) -> str:
    """SHA-256 hex of a presented key (what the store keeps)."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The public key id inside a well-formed key, else None."""
    m = _KEY_RE.match(key)
    return m.group(1) if m else None


def new_key() -> tuple[str, str]:
    """A fresh (key_id, key). The key is shown once to the admin and never stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


@dataclass(frozen=True)
class KeyEntry:
    """What authentication yields: the key id and its account."""

    key_id: str
    account_id: str


@dataclass(frozen=True)
class IssuedKey:
    """A newly issued key; ``key`` is the only copy of the secret. Its repr hides it."""

    key_id: str
    account_id: str
    key: str

    def __repr__(self) -> str:
        return f"IssuedKey(key_id={self.key_id!r}, account_id={self.account_id!r}, key='sk-sh-…')"


class KeyRing:
    """In-memory hash → key map, backed by the store."""

    def __init__(self, store: SqlStore):
        self.store = store
        self._by_hash: dict[str, KeyEntry] = {}
        self._rows: dict[str, KeyRow] = {}
        self._seen_until = 0.0

    def load(self) -> None:
        """Read every key from the store (startup)."""
        self._rows = {}
        self._by_hash = {}
        self._apply(self.store.list_keys())

    def refresh(self) -> int:
        """Pick up keys issued or revoked elsewhere since the last look; returns how many rows changed."""
        # A few seconds of overlap covers clock skew between replicas; re-applying a row is harmless.
        rows = self.store.list_keys(updated_since=self._seen_until - 5.0)
        return self._apply(rows)

    def _apply(self, rows: list[KeyRow]) -> int:
        changed = 0
        for row in rows:
            old = self._rows.get(row.key_id)
            if old == row:
                continue
            changed += 1
            self._rows[row.key_id] = row
            if row.revoked_at is None:
                self._by_hash[row.key_hash] = KeyEntry(row.key_id, row.account_id)
            else:
                self._by_hash.pop(row.key_hash, None)
            self._seen_until = max(self._seen_until, row.updated_at)
        return changed

    def authenticate(self, key: str) -> KeyEntry | None:
        """The live key entry for a presented key, or None (unknown, malformed or revoked)."""
        if not key.startswith(KEY_PREFIX):
            return None
        return self._by_hash.get(hash_key(key))

    def identify_revoked(self, key: str) -> KeyEntry | None:
        """The entry of a revoked key when ``key`` is exactly that key (so its use is logged to its account)."""
        kid = key_id_of(key)
        row = self._rows.get(kid) if kid else None
        if row is not None and row.revoked_at is not None and row.key_hash == hash_key(key):
            return KeyEntry(row.key_id, row.account_id)
        return None

    def issue(self, account_id: str, now: float) -> IssuedKey:
        """Create a key for an existing account; raises NotFound for an unknown account."""
        self.store.get_account(account_id)
        key_id, key = new_key()
        row = KeyRow(key_id, account_id, hash_key(key), now, None, now)
        self.store.add_key(row)
        self._apply([row])
        return IssuedKey(key_id, account_id, key)

    def revoke(self, key_id: str, now: float) -> KeyRow:
        """Revoke a key; the next request with it gets 401."""
        row = self.store.revoke_key(key_id, now)
        self._apply([row])
        return row

    def rotate(self, key_id: str, now: float) -> IssuedKey:
        """Revoke a live key and issue a new one for the same account."""
        old = self.store.get_key(key_id)
        if old.revoked_at is not None:
            raise NotFound(f"key {key_id!r} is already revoked; issue a new key for {old.account_id!r} instead")
        issued = self.issue(old.account_id, now)
        self.revoke(key_id, now)
        return issued

    def rows(self, account_id: str | None = None) -> list[KeyRow]:
        rows = list(self._rows.values())  # one C-level copy: safe while the refresh thread writes
        return [r for r in rows if account_id is None or r.account_id == account_id]
