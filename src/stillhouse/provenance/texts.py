"""Text to test, from a plain file, a JSONL dataset or a harvest run directory.

Every source becomes a list of :class:`Sample`: the answer text, the prompt messages when the
source has them (their tuples are dropped from what is scored), and the generated token ids when
the source kept them (a harvest run with logprobs; else the text is tokenized again).

- ``FILE.txt`` (any non-JSONL file): the whole file is one sample;
- ``FILE.jsonl``: one sample per row, from ``messages`` (the last assistant turn is the text, the
  turns before it the prompt), else ``text``/``response``/``completion``/``output`` (with
  ``prompt``/``instruction`` as the prompt), optional ``token_ids`` and ``temperature``, and, for the
  counterfactual test, the ``key_id`` that answered, the ``account`` that asked and the request's
  sampling fields (``max_tokens``, ``top_p``, ``seed``, ``stop``);
- a harvest run directory (``stillhouse harvest --out RUN``): its stored answers;
- a guard's traffic log (``sqlite:///guard.db``, ``postgresql://...``): the watermarked answers it
  served, with their prompts (one account's alone with ``account``), so ``provenance model --reading
  own`` can ask a suspect the very questions our watermarked answers went to; each sample keeps the
  account that asked and the key id that answered (for key-matched scoring, :mod:`.matched`).

Errors: :class:`TextSourceError` (a ``ValueError``) names the source and what was expected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from stillhouse.jsonl import iter_jsonl

T = TypeVar("T")

TEXT_FIELDS = ("text", "response", "completion", "output", "answer")
PROMPT_FIELDS = ("prompt", "instruction", "question")


class TextSourceError(ValueError):
    """The text source is missing or unreadable; the message names it and the expected shape."""


@dataclass
class Sample:
    """One answer to test."""

    text: str
    prompt: list[dict[str, Any]] = field(default_factory=list)
    """The messages before the answer (may be empty)."""
    token_ids: list[int] | None = None
    account: str = ""
    """The account that asked (a guard log only)."""
    key_id: str = ""
    """The watermark key id that answered (a guard log only)."""
    temperature: float | None = None
    """The temperature the answer was sampled at, where the source says (a guard's log and a harvest run record the
    request's; a JSONL row's ``temperature``): the weighted score's weights use it."""
    scheme: str = ""
    """The watermark scheme that answered, where the source says (a guard's log: the upstream confirms it), else
    empty (the test takes ``--scheme``)."""
    params: dict[str, Any] = field(default_factory=dict)
    """The request's sampling fields as recorded (a guard's log: the request's; a JSONL row: those of
    :data:`SAMPLING_FIELDS` it has), which the counterfactual test draws its answers with."""


SAMPLING_FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop")


def _temperature(value: Any) -> float | None:
    """A recorded sampling temperature, or None when there is none (or it is not a number >= 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    return float(value) if ok else None


def _from_row(row: Any, where: str) -> Sample:
    if not isinstance(row, dict):
        raise TextSourceError(f"{where}: a row must be a JSON object with 'messages' or 'text'")
    ids = row.get("token_ids")
    ids = [int(t) for t in ids] if isinstance(ids, list) and all(isinstance(t, int) for t in ids) else None
    temp = _temperature(row.get("temperature"))
    who: dict[str, Any] = {"account": str(row.get("account") or ""), "key_id": str(row.get("key_id") or ""),
                           "params": {k: row[k] for k in SAMPLING_FIELDS if row.get(k) is not None}}
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs:
        if not all(isinstance(m, dict) for m in msgs):
            raise TextSourceError(f"{where}: 'messages' must be a list of {{'role', 'content'}} objects")
        if msgs[-1].get("role") == "assistant":
            return Sample(_content(msgs[-1].get("content")), [dict(m) for m in msgs[:-1]], ids, temperature=temp,
                          **who)
        return Sample("", [dict(m) for m in msgs], None)  # a prompt only (closed mode asks it)
    for name in TEXT_FIELDS:
        if isinstance(row.get(name), str):
            prompt = next((row[p] for p in PROMPT_FIELDS if isinstance(row.get(p), str)), "")
            return Sample(row[name], [{"role": "user", "content": prompt}] if prompt else [], ids, temperature=temp,
                          **who)
    for name in PROMPT_FIELDS:
        if isinstance(row.get(name), str):
            return Sample("", [{"role": "user", "content": row[name]}], None)
    raise TextSourceError(f"{where}: no 'messages' and none of {TEXT_FIELDS + PROMPT_FIELDS}")


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def read_log(db_url: str, read: Callable[[Any], T]) -> T:
    """``read(store)`` on a guard's traffic log, opened read-only in spirit: a SQLite path that does not exist is
    an error (not a new empty database), and anything the store raises (a server down, a file that is not a
    guard's log) becomes one TextSourceError naming the URL."""
    from stillhouse.guard.store import open_store

    if db_url.startswith("sqlite:///") and not Path(db_url.removeprefix("sqlite:///")).is_file():
        raise TextSourceError(f"{db_url}: no such file; give the guard's --db URL (sqlite:///path/to/guard.db)")
    try:
        store = open_store(db_url, init=False)
        try:
            return read(store)
        finally:
            store.close()
    except Exception as exc:  # noqa: BLE001 - sqlite3 or psycopg: a server down, not a guard's log, ...
        raise TextSourceError(f"{db_url}: cannot read the guard's traffic log ({type(exc).__name__}: {exc}); "
                              "give the guard's --db URL") from None


def _from_log(db_url: str, limit: int, account: str) -> list[Sample]:
    """The watermarked answers (status 200, a watermark key id) in a guard's traffic log, with their prompts,
    in arrival order; only ``account``'s when given."""
    def read(store: Any) -> list[Sample]:
        out: list[Sample] = []
        for rec in store.iter_records():
            if rec.watermark_key_id and rec.status == 200 and (not account or rec.account_id == account):
                out.append(Sample(rec.response_text, [dict(m) for m in rec.messages], None, rec.account_id,
                                  rec.watermark_key_id, _temperature(rec.params.get("temperature", 1.0)),
                                  rec.watermark_scheme, dict(rec.params)))
                if limit and len(out) >= limit:
                    break
        return out

    return read_log(db_url, read)


def load_samples(source: str | Path, limit: int = 0, account: str = "") -> list[Sample]:
    """The samples of a file, JSONL dataset, harvest run or guard log URL (the first ``limit``; 0 = all).
    ``account`` (a guard log only): that account's requests alone."""
    from stillhouse.guard.detect.logwindow import is_store_url

    if isinstance(source, str) and is_store_url(source):
        return _from_log(source, limit, account)
    if account:
        raise TextSourceError(f"account={account!r}: only a guard log (sqlite:///... or postgresql://...) "
                              "knows accounts; drop it, or give the log as the source")
    path = Path(source)
    if not path.exists():
        raise TextSourceError(f"{source}: no such file or directory; give a text file, a .jsonl dataset or a "
                              "harvest run directory")
    out: list[Sample] = []
    if path.is_dir():
        from stillhouse.distill.store import HarvestStore, StoreError

        try:
            store = HarvestStore(path, readonly=True)
        except StoreError as exc:
            raise TextSourceError(f"{source}: {exc}") from None
        with store:
            for rec in store.records():
                msgs = rec.chat()
                ids = None if rec.token_ids is None else [int(t) for t in rec.token_ids]
                out.append(Sample(_content(msgs[-1].get("content")), msgs[:-1], ids,
                                  temperature=_temperature(rec.params.get("temperature"))))
                if limit and len(out) >= limit:
                    break
        return out
    if path.suffix == ".jsonl":
        for n, row in iter_jsonl(path, TextSourceError, "one row per line", objects=False):
            out.append(_from_row(row, f"{source}:{n}"))
            if limit and len(out) >= limit:
                break
        return out
    try:
        return [Sample(path.read_text())]
    except UnicodeDecodeError:
        raise TextSourceError(f"{source}: not UTF-8 text; give a text file, a .jsonl dataset or a harvest run") from None
