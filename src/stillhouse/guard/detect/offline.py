"""Offline scoring: read a traffic log and replay it through the same ``observe`` as the guard.

Sources (:func:`read_log`):

- ``sqlite:///path/guard.db`` or ``postgresql://...`` — the guard's traffic log, through
  its store (``stillhouse.guard.store.open_store``), in the store's arrival order
  (``ts, request_id``);
- ``path.jsonl`` — one :class:`TrafficRecord` as JSON per line (``records_to_jsonl`` writes it),
  in file order.

:func:`replay` feeds the records, in that order, to a fitted :class:`WindowDetector` and
returns one verdict per account. The guard feeds its detector the same records in the
order they finish; when that order is the log's order (sequential traffic, or distinct
timestamps) and the log is unredacted, online and offline verdicts are identical — the
tests check it on a real SQLite log.

Run: ``stillhouse detect --log sqlite:///run/guard.db --model DIR``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stillhouse.guard.detect.detector import WindowDetector
from stillhouse.guard.events import AccountInfo, TrafficRecord, Verdict


class LogError(ValueError):
    """A log source cannot be read; the message names the source and the fix."""


TOO_DEEP = "nested too deeply to parse (about 1,000 levels of arrays/objects)"


def record_to_dict(record: TrafficRecord) -> dict[str, Any]:
    return dataclasses.asdict(record)


def records_to_jsonl(records: Iterable[TrafficRecord], path: str | Path) -> int:
    """Write records as JSON lines; returns how many."""
    n = 0
    with Path(path).open("w") as f:
        for r in records:
            f.write(json.dumps(record_to_dict(r)) + "\n")
            n += 1
    return n


def iter_jsonl(path: Path) -> Iterator[TrafficRecord]:
    """The TrafficRecords of a .jsonl log in file order; LogError names the line of a bad one."""
    fields = {f.name for f in dataclasses.fields(TrafficRecord)}
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LogError(f"{path}:{lineno}: not JSON ({exc.msg}); expected one TrafficRecord per line") from exc
            except RecursionError:
                raise LogError(f"{path}:{lineno}: {TOO_DEEP}; expected one TrafficRecord per line") from None
            if not isinstance(data, dict):
                raise LogError(f"{path}:{lineno}: a {type(data).__name__}, not a JSON object; expected one "
                               "TrafficRecord per line")
            unknown = set(data) - fields
            if unknown:
                raise LogError(f"{path}:{lineno}: unknown field(s) {sorted(unknown)}; TrafficRecord has {sorted(fields)}")
            try:
                yield TrafficRecord(**data)
            except TypeError as exc:
                raise LogError(f"{path}:{lineno}: {exc}") from exc


def read_log(source: str) -> tuple[list[TrafficRecord], dict[str, AccountInfo]]:
    """(records in replay order, account infos when the source has them)."""
    if source.startswith(("sqlite:///", "postgresql://", "postgres://")):
        from stillhouse.guard.store import open_store

        store = open_store(source, init=False)
        try:
            records = store.read_records()
            accounts = {info.account_id: info for info, _ in store.list_accounts()}
        finally:
            store.close()
        return records, accounts
    path = Path(source)
    if not path.exists():
        raise LogError(f"log {source!r} not found: give a sqlite:///path, postgresql://... URL or a .jsonl file")
    return list(iter_jsonl(path)), {}


def read_accounts(path: str | Path) -> dict[str, AccountInfo]:
    """AccountInfo per account from a JSONL file (one AccountInfo as JSON per line)."""
    out = {}
    with Path(path).open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LogError(f"{path}:{lineno}: not JSON ({exc.msg}); expected one AccountInfo per line") from exc
            except RecursionError:
                raise LogError(f"{path}:{lineno}: {TOO_DEEP}; expected one AccountInfo per line") from None
            if not isinstance(data, dict):
                raise LogError(f"{path}:{lineno}: expected one AccountInfo (a JSON object) per line")
            try:
                info = AccountInfo(**data)
            except TypeError as exc:
                raise LogError(f"{path}:{lineno}: {exc}; expected one AccountInfo per line") from exc
            out[info.account_id] = info
    return out


def replay(detector: WindowDetector, records: Iterable[TrafficRecord],
           accounts: dict[str, AccountInfo] | None = None) -> dict[str, Verdict]:
    """Feed every record to ``detector.observe`` in order; the final verdict of each account."""
    accounts = accounts or {}
    seen: list[str] = []
    known: set[str] = set()
    for r in records:
        detector.observe(r, accounts.get(r.account_id))
        if r.account_id not in known:
            known.add(r.account_id)
            seen.append(r.account_id)
    out = {}
    for aid in seen:
        v = detector.verdict(aid)
        if v is not None:
            out[aid] = v
    return out
