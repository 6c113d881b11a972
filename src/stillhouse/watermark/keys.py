"""Watermark keys from one secret, and the channel that carries a key *id* from the guard to ``serve``.

One secret (``$STILLHOUSE_WATERMARK_SECRET``, shared by the guard and the server) yields

- a **watermark key** per key id, ``HMAC(HMAC(secret, "stillhouse/watermark/key"), key_id)``
  (HKDF's extract-then-expand with SHA-256, one block), and
- a **channel key**, ``HMAC(secret, "stillhouse/watermark/channel")``, that authenticates the header.

A key id names whose key it is and when: ``account/<id>/<epoch>``, ``cluster/<id>/<epoch>`` or
``server/<name>/<epoch>``, the subject percent-encoded; ``epoch = floor(t / rotate_s)``, so keys
rotate without any state. With keys per request (the guard's ``watermark_per_request``) the request id
follows: ``account/<id>/<epoch>/<request id>``, a key of its own for every answer, still naming its
account. The key itself never travels or gets stored: the guard logs the key id,
the server derives the key from the id, ``provenance`` re-derives candidates from ids.

The header the guard sets on every upstream request (clients never reach the upstream's headers:
the guard builds upstream requests from scratch)::

    X-Stillhouse-Watermark: v1 kid=account/lab/20424 rid=<request id> ts=<unix s> mac=<hex>

``mac = HMAC-SHA256(channel key, "v1|kid|rid|ts")``; the server refuses a header whose mac does not
verify or whose ``ts`` is more than ``max_skew_s`` from its clock (:class:`ChannelError`, answered 401),
and answers with ``X-Stillhouse-Watermark-Applied: <kid>``, which the guard records and does not relay.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote

SECRET_ENV = "STILLHOUSE_WATERMARK_SECRET"
"""The environment variable that holds the shared secret by default."""
HEADER = "x-stillhouse-watermark"
"""Request header, guard -> server (lower case, as ASGI presents it)."""
APPLIED_HEADER = "x-stillhouse-watermark-applied"
"""Response header, server -> guard: the key id the answer was watermarked with."""
SCHEME_HEADER = "x-stillhouse-watermark-scheme"
"""Response header, server -> guard: the scheme of that watermark (kgw or exp), which detection needs."""
MIN_SECRET_CHARS = 16
MAX_SKEW_S = 300.0

KeyScope = Literal["account", "cluster", "server"]
SCOPES: tuple[KeyScope, ...] = ("account", "cluster", "server")


class WatermarkKeyError(ValueError):
    """A secret, key id or epoch is unusable; the message says how to fix it."""


class ChannelError(ValueError):
    """An ``X-Stillhouse-Watermark`` header failed to parse or authenticate."""


@dataclass(frozen=True)
class KeyId:
    """Whose watermark key, and for which epoch."""

    scope: KeyScope
    subject: str
    epoch: int = 0
    request: str = ""
    """The request this key answered alone (keys per request), or empty (one key for the subject's epoch)."""

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise WatermarkKeyError(f"key scope {self.scope!r}: use one of {SCOPES}")
        if not self.subject:
            raise WatermarkKeyError("key subject is empty: give an account id, cluster id or server name")
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or self.epoch < 0:
            raise WatermarkKeyError(f"key epoch {self.epoch!r}: must be an integer >= 0")

    def __str__(self) -> str:
        base = f"{self.scope}/{quote(self.subject, safe='')}/{self.epoch}"
        return f"{base}/{quote(self.request, safe='')}" if self.request else base

    @classmethod
    def parse(cls, text: str) -> KeyId:
        """The inverse of ``str()``: ``account/lab/3`` -> KeyId("account", "lab", 3); ``account/lab/3/r9`` ->
        KeyId("account", "lab", 3, "r9")."""
        parts = text.split("/")
        if len(parts) not in (3, 4) or not parts[2].isdigit() or (len(parts) == 4 and not parts[3]):
            raise WatermarkKeyError(f"key id {text!r}: expected SCOPE/SUBJECT/EPOCH or SCOPE/SUBJECT/EPOCH/REQUEST, "
                                    "e.g. account/lab/0")
        return cls(parts[0], unquote(parts[1]), int(parts[2]),  # type: ignore[arg-type]
                   unquote(parts[3]) if len(parts) == 4 else "")


def epoch_of(ts: float, rotate_s: float) -> int:
    """The key epoch of time ``ts``; ``rotate_s <= 0`` means keys never rotate (epoch 0)."""
    if rotate_s <= 0:
        return 0
    return max(0, int(ts // rotate_s))


def load_secret(env_name: str = SECRET_ENV) -> bytes:
    """The shared secret from the environment; a missing or short one is a one-line error."""
    value = os.environ.get(env_name, "")
    if len(value) < MIN_SECRET_CHARS:
        raise WatermarkKeyError(
            f"${env_name} {'is not set' if not value else 'is too short'}: watermarking needs a secret of at "
            f"least {MIN_SECRET_CHARS} characters shared by the guard and the server, e.g. "
            f"export {env_name}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return value.encode()


def derive_key(secret: bytes, key_id: KeyId | str) -> bytes:
    """The 32-byte watermark key of ``key_id`` (HKDF-SHA256 with the key id as info, one block)."""
    prk = hmac.new(secret, b"stillhouse/watermark/key", hashlib.sha256).digest()
    return hmac.new(prk, str(key_id).encode() + b"\x01", hashlib.sha256).digest()


def key_u64(key: bytes) -> int:
    """The 64-bit integer the green-list PRF is keyed with."""
    return int.from_bytes(key[:8], "big")


def _channel_key(secret: bytes) -> bytes:
    return hmac.new(secret, b"stillhouse/watermark/channel", hashlib.sha256).digest()


def _mac(secret: bytes, kid: str, rid: str, ts: int) -> str:
    return hmac.new(_channel_key(secret), f"v1|{kid}|{rid}|{ts}".encode(), hashlib.sha256).hexdigest()


_SAFE = re.compile(r"^[A-Za-z0-9._~%/-]{1,300}$")


def sign_header(secret: bytes, key_id: KeyId | str, request_id: str, ts: float) -> str:
    """The header value the guard sends for one request."""
    kid, rid, t = str(key_id), request_id, int(ts)
    if not _SAFE.match(kid) or not _SAFE.match(rid):
        raise ChannelError(f"key id {kid!r} or request id {rid!r} has characters a header cannot carry")
    return f"v1 kid={kid} rid={rid} ts={t} mac={_mac(secret, kid, rid, t)}"


def verify_header(secret: bytes, value: str, now: float, max_skew_s: float = MAX_SKEW_S) -> KeyId:
    """The key id of an authentic header; :class:`ChannelError` (naming why) otherwise."""
    fields = value.strip().split(" ")
    if not fields or fields[0] != "v1":
        raise ChannelError("watermark header: unknown version (expected 'v1 kid=... rid=... ts=... mac=...')")
    kv = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    if set(kv) != {"kid", "rid", "ts", "mac"} or not kv["ts"].isdigit():
        raise ChannelError("watermark header: malformed (expected 'v1 kid=... rid=... ts=... mac=...')")
    ts = int(kv["ts"])
    if not hmac.compare_digest(kv["mac"], _mac(secret, kv["kid"], kv["rid"], ts)):
        raise ChannelError("watermark header: the mac does not verify (only the guard, holding the shared "
                           "secret, may choose a watermark key)")
    if abs(now - ts) > max_skew_s:
        raise ChannelError(f"watermark header: timestamp {ts} is more than {max_skew_s:g} s from this "
                           "server's clock (stale or replayed)")
    try:
        return KeyId.parse(kv["kid"])
    except WatermarkKeyError as exc:
        raise ChannelError(f"watermark header: {exc}") from exc
