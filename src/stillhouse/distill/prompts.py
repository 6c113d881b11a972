"""Prompt inputs for harvest: JSONL, Parquet, a Hugging Face datasets directory, or a built-in set.

``load_prompts(source)`` reads any of::

    prompts.jsonl               one JSON object a line: {"id": ..., "messages": [...]}
                                or {"id": ..., "prompt": "..."} (id optional)
    prompts.parquet             the same fields as columns
    DIR[#SPLIT]                 a directory written by datasets' save_to_disk
                                (a DatasetDict uses SPLIT, default 'train')
    builtin:NAME[:N]            a built-in task set, see stillhouse.distill.tasks

Every other field of a row (``answer``, ``task``, ``tests``...) travels with the prompt as
``meta`` into the harvest store, so curation can verify against it. A row without an id
gets ``p-`` plus the first 12 hex digits of its prompt hash, which is stable when lines move.

Fields that change the teacher's answer travel with the request and its record key instead
(:data:`REQUEST_FIELDS`: ``tools``, ``tool_choice``, ``parallel_tool_calls``, ``response_format``,
``reasoning_effort``). Messages may be whole OpenAI conversations: assistant turns with
``tool_calls`` (and a null content), ``tool`` results with their ``tool_call_id``.

A conversation harvested turn by turn::

    {"id": "c1", "messages": [{"role": "user", "content": "Hi"}], "turns": ["And then?", "Thanks"]}

``messages`` is the seed (it may hold earlier turns of any author); ``turns`` are the next user turns,
each a string, a message, or a list of messages (e.g. ``tool`` results; a tool result without a
``tool_call_id`` gets the id of the teacher's call in the same place). Turn k is sent with the
teacher's own answers to turns 0..k-1 in its context.

Bad rows (not JSON, nested too deeply, no messages/prompt, wrong roles or types, a damaged
Parquet row group) become :class:`Problem`\\ s with their line numbers (row ranges); the caller
skips them, or with ``strict=True`` :class:`PromptError` is raised before any teacher call. A
source that cannot be opened at all (a truncated Parquet file) is a PromptError at once. Rows
whose messages repeat an earlier row are merged (one record per distinct prompt) and counted in
``duplicates``.

``PromptLoader(source).take(n)`` reads the same way a piece at a time (the harvester starts its
requests after the first prompts and reads the rest between them); ``load_prompts`` is
``PromptLoader(source, limit=...).result(strict=...)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, NamedTuple

from stillhouse.distill.store import canonical_json, compact_json
from stillhouse.teacher.base import Message

ROLES = ("system", "user", "assistant", "developer", "tool")


class PromptError(ValueError):
    """The prompt source is unusable, or (strict mode) has bad rows; the message lists them."""


class Prompt(NamedTuple):
    """One prompt: a stable id, the chat messages, and whatever else its row carried.

    Immutable (a NamedTuple rather than a frozen dataclass: a loader builds one per row, and building
    a frozen dataclass of these six fields took about 4x as long here).
    """

    id: str
    messages: list[Message]
    # The shared default is never mutated: every loaded row gets its own dict.
    meta: dict[str, Any] = {}  # noqa: RUF012
    hash: str = ""
    """prompt_hash(messages), filled by the loader."""
    messages_json: str = ""
    """canonical_json(messages), filled by the loader (saves re-encoding per record)."""
    meta_json: str = "{}"
    """canonical_json(meta), filled by the loader."""
    request_json: str = ""
    """compact_json of the row's request fields (REQUEST_FIELDS: tools, ...; keys in the row's order, as
    they are sent); "" when it has none."""
    turns: tuple[tuple[Message, ...], ...] = ()
    """A conversation's next turns (each the messages to add after the teacher's last answer); () = one turn."""
    turn: int = 0
    """Which turn of its conversation this prompt is (the harvester builds turns 1, 2, ...)."""

    @property
    def dedup_key(self) -> str:
        """What makes two rows the same prompt: the messages' hash, and the request fields and turns."""
        if not self.request_json and not self.turns:
            return self.hash
        return hashlib.sha256(f"{self.hash}\x00{self.request_json}\x00{canonical_json(self.turns)}".encode()
                              ).hexdigest()


@dataclass(frozen=True)
class Problem:
    """A row that could not be used."""

    where: str
    """'FILE:LINE' (JSONL), 'FILE:row N' (Parquet, datasets)."""
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class PromptSet:
    """What a source yielded."""

    prompts: list[Prompt]
    problems: list[Problem]
    duplicates: int = 0
    source: str = ""


def check_messages(messages: Any, where: str = "messages") -> list[Message]:
    """Validate OpenAI chat messages; raises ValueError naming the first wrong field."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'{where}' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}] is a {type(m).__name__}, not an object")
        if m.get("role") not in ROLES:
            raise ValueError(f"{where}[{i}].role={m.get('role')!r}: use one of {', '.join(ROLES)}")
        content = m.get("content")
        calls = m.get("tool_calls")
        if calls is not None:
            if m.get("role") != "assistant":
                raise ValueError(f"{where}[{i}]: only an assistant message carries tool_calls")
            check_tool_calls(calls, f"{where}[{i}].tool_calls")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
                raise ValueError(f"{where}[{i}].content parts must be {{'type': 'text', 'text': '...'}}")
        elif content is None and calls:
            pass  # an assistant turn that only calls tools
        elif not isinstance(content, str):
            raise ValueError(f"{where}[{i}].content must be a string, not {type(content).__name__}")
    if messages[-1].get("role") == "assistant":
        raise ValueError(f"the last message of '{where}' is the assistant's: end with a user turn (or a tool "
                         "result) for the teacher to answer")
    return messages


def check_tool_calls(calls: Any, where: str) -> None:
    """OpenAI ``tool_calls``: a list of ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
    if not isinstance(calls, list):
        raise ValueError(f"{where} must be a list of {{'id', 'type': 'function', 'function': {{'name', "  # noqa: TRY004
                         "'arguments'}}} objects")
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"{where}[{j}] needs 'function': {{'name': '...', 'arguments': '...'}}")  # noqa: TRY004


REQUEST_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "reasoning_effort")
"""Row fields sent with the request (and part of its record key) rather than kept as meta."""


def check_request(row: dict[str, Any]) -> dict[str, Any]:
    """The row's request fields, checked; raises ValueError naming the bad one."""
    req = {k: row[k] for k in REQUEST_FIELDS if row.get(k) is not None}
    tools = req.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and isinstance((t.get("function") or {}).get("name"), str) for t in tools):
            raise ValueError("'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\", "
                             "\"parameters\"...}} objects")
        if not tools:
            del req["tools"]
    choice = req.get("tool_choice")
    if choice is not None and not (choice in ("auto", "none", "required") or isinstance(choice, dict)):
        raise ValueError(f"'tool_choice'={choice!r}: use auto, none, required or {{\"type\": \"function\", "
                         "\"function\": {\"name\": ...}}")
    return req


def check_turns(turns: Any) -> tuple[tuple[Message, ...], ...]:
    """A conversation's next turns: each a string (a user message), a message, or a list of messages."""
    if not isinstance(turns, list) or not turns:
        raise ValueError("'turns' must be a non-empty list of next user turns (strings, messages or lists of "
                         "messages)")
    out = []
    for k, t in enumerate(turns):
        if isinstance(t, str):
            if not t.strip():
                raise ValueError(f"turns[{k}] is empty")
            msgs: list[Message] = [{"role": "user", "content": t}]
        elif isinstance(t, dict):
            msgs = [t]
        else:
            msgs = t
        msgs = check_messages(msgs, where=f"turns[{k}]")
        if any(m.get("role") == "assistant" for m in msgs):
            raise ValueError(f"turns[{k}]: a turn holds the next user or tool messages; the teacher writes the "
                             "assistant's")
        out.append(tuple(msgs))
    return tuple(out)


def messages_json(messages: list[Message]) -> str:
    """canonical_json(messages), built directly when every message is just a string role and content.

    ``{"content": ..., "role": ...}`` in sorted-key order with the strings encoded by the very function
    the canonical encoder uses (``ensure_ascii=False``), so the text is identical; anything else (other
    keys, content parts) goes through :func:`canonical_json`.
    """
    parts = []
    for m in messages:
        if len(m) != 2:
            return canonical_json(messages)
        content, role = m.get("content"), m.get("role")
        if type(content) is not str or type(role) is not str:
            return canonical_json(messages)
        parts.append(f'{{"content":{encode_basestring(content)},"role":{encode_basestring(role)}}}')
    return f"[{','.join(parts)}]"


_PROMPT_KEYS = ("id", "messages", "prompt", "turns", *REQUEST_FIELDS)
_ROLE_SET = frozenset(ROLES)


def _plain_messages_json(messages: Any) -> str | None:
    """messages_json(messages) in one pass when every message is exactly a valid string role and a
    string content and the last is not the assistant's, else None (then check_messages decides).

    The common JSONL row: 0.9 µs against 1.3 µs for check_messages + messages_json here. The loader
    runs on the event loop between requests, so its time per row is taken from the requests."""
    if type(messages) is not list or not messages:
        return None
    parts = []
    role = None
    for m in messages:
        if type(m) is not dict or len(m) != 2:
            return None
        role, content = m.get("role"), m.get("content")
        if type(role) is not str or role not in _ROLE_SET or type(content) is not str:
            return None
        parts.append(f'{{"content":{encode_basestring(content)},"role":{encode_basestring(role)}}}')
    if role == "assistant":
        return None
    return f"[{','.join(parts)}]"


def row_to_prompt(row: Any) -> Prompt:
    """One input row (a dict) → Prompt; raises ValueError saying what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, not {type(row).__name__}")
    messages = row.get("messages")
    if messages is not None:
        mj = _plain_messages_json(messages)
        if mj is None:  # anything unusual: the checked path (which also names what is wrong)
            # Parquet/datasets give list-of-struct rows with every key present; drop the None ones.
            if isinstance(messages, list):
                messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                            for m in messages]
            messages = check_messages(messages)
            mj = messages_json(messages)
    else:
        text = row.get("prompt")
        if text is None:
            raise ValueError("needs 'messages' (a list of {role, content}) or 'prompt' (a string)")
        if not isinstance(text, str) or not text or text.isspace():
            raise ValueError("'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": text}]
        mj = f'[{{"content":{encode_basestring(text)},"role":"user"}}]'
    ph = hashlib.sha256(mj.encode()).hexdigest()  # = store.prompt_hash(messages)
    rid = row.get("id")
    if rid is None or rid == "":
        rid = f"p-{ph[:12]}"
    elif type(rid) is not str:
        if not isinstance(rid, (str, int)):
            raise ValueError(f"'id' must be a string or an integer, not {type(rid).__name__}")
        rid = str(rid)
    if len(row) == ("id" in row) + ("messages" in row) + ("prompt" in row):
        return Prompt(rid, messages, {}, ph, mj, "{}")
    meta = {k: v for k, v in row.items() if k not in _PROMPT_KEYS}
    meta_json = canonical_json(meta)  # raises TypeError when not JSON-serialisable
    req = check_request(row)
    turns = check_turns(row["turns"]) if row.get("turns") is not None else ()
    if not req and not turns:
        return Prompt(rid, messages, meta, ph, mj, meta_json)
    p = Prompt(rid, messages, meta, ph, mj, meta_json, compact_json(req) if req else "", turns)
    if rid == f"p-{ph[:12]}" and row.get("id") in (None, ""):
        p = p._replace(id=f"p-{p.dedup_key[:12]}")  # rows differing in tools or turns only: different ids
    return p


_decode_json = json.JSONDecoder().decode


def _loads_line_std(line: bytes) -> Any:
    return _decode_json(line.decode())  # str decoding skips json.loads' encoding detection


_loads_line: Callable[[bytes], Any]
try:  # orjson (the `fast` extra) parses a short JSONL row in about half the time (2.0 vs 4.4 µs here)
    from orjson import loads as _loads_line
except ImportError:  # pragma: no cover - the standard library does the same, slower
    _loads_line = _loads_line_std

Rows = Iterator[tuple[Any, Any, str | None]]
"""(where in the source, without its prefix; the row; why it is unusable or None)."""


TOO_DEEP = ("nested too deeply to parse (about 1,000 levels of arrays/objects); give each row as one flat "
            'object: {"id", "messages"} or {"id", "prompt"}')


def _jsonl_rows(path: Path) -> Rows:
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            try:  # the common case: a valid UTF-8 line; anything else takes the standard path below
                row = _loads_line(line)
            except (ValueError, RecursionError):
                if not line.strip():
                    continue
                try:  # json.loads itself: BOMs, UTF-16/32, and its own error message
                    row = json.loads(line)
                except ValueError as exc:
                    yield lineno, None, f"not valid JSON ({exc})"
                    continue
                except RecursionError:
                    yield lineno, None, TOO_DEEP
                    continue
            yield lineno, row, None


def _parquet_rows(path: Path) -> Rows:
    from stillhouse.distill.tables import TableError, parquet_row_groups

    try:
        for first, n, rows, why in parquet_row_groups(path):
            if rows is None:
                yield f"{first}-{first + n - 1}", None, why
                continue
            for i, row in enumerate(rows, first):
                yield i, row, None
    except TableError as exc:
        raise PromptError(str(exc)) from None


def _datasets_rows(path: Path, split: str | None) -> Rows:
    try:
        import datasets
    except ImportError as exc:
        raise PromptError("reading a datasets directory needs datasets: pip install 'stillhouse[data]'") from exc
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # pyarrow's errors are OSError/ValueError
        why = " ".join(str(exc).split())[:200]
        raise PromptError(f"{path}: not a readable datasets directory ({type(exc).__name__}: {why}); save it "
                          "again with save_to_disk, or give the prompts as .jsonl or .parquet") from None
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise PromptError(f"{path} holds splits {sorted(ds)}; choose one with '{path}#SPLIT'")
        ds = ds[name]
    elif split:
        raise PromptError(f"{path} is a single Dataset; drop '#{split}'")
    for i, row in enumerate(ds):
        yield i, row, None


def _builtin_rows(source: str) -> Rows:
    from stillhouse.distill.tasks import TaskDataMissing, load_builtin

    try:
        items = load_builtin(source)
    except (TaskDataMissing, ValueError) as exc:
        raise PromptError(str(exc)) from exc
    for item in items:
        row = item.to_json()
        row = {k: v for k, v in row.items() if v is not None and v != {}}
        yield item.id, row, None


def _rows(source: str) -> tuple[str, Rows]:
    """The source's rows, and the prefix that makes a row's place a 'where' ('FILE:' + line)."""
    if source.startswith("builtin:"):
        return f"{source}:", _builtin_rows(source)
    path_s, _, split = source.partition("#")
    path = Path(path_s).expanduser()
    if not path.exists():
        raise PromptError(f"prompts source {path} does not exist. Give a .jsonl or .parquet file, a datasets "
                          "directory, or builtin:NAME[:N]")
    if path.is_dir():
        return f"{path.name}:row ", _datasets_rows(path, split or None)
    if path.suffix == ".parquet":
        return f"{path.name}:row ", _parquet_rows(path)
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return f"{path.name}:", _jsonl_rows(path)
    raise PromptError(f"{path}: unknown prompt format {path.suffix!r}; use .jsonl, .parquet, a datasets "
                      "directory or builtin:NAME[:N]")


class PromptLoader:
    """Reads a source a piece at a time, so a harvest can start its requests while the rest loads.

    ``take(n)`` reads rows until ``n`` more usable prompts (all the rest when None) and returns them;
    ``done`` turns True at the end of the source or the limit; ``result()`` is then the PromptSet that
    :func:`load_prompts` returns (it raises the same errors). Problems, duplicates and id clashes are
    judged exactly as one pass would: earlier rows win.
    """

    def __init__(self, source: str | os.PathLike[str], *, limit: int | None = None):
        self.source = str(source)
        if limit is not None and limit < 0:
            raise PromptError(f"limit={limit}: must be >= 0")
        self._limit = limit
        self._prefix, self._rows = _rows(self.source)
        self.prompts: list[Prompt] = []
        self.problems: list[Problem] = []
        self.duplicates = 0
        self.done = limit == 0
        self._seen: set[str] = set()  # prompt hashes
        self._ids: dict[str, Any] = {}  # id -> where (without the prefix) it was first used

    def take(self, n: int | None = None) -> list[Prompt]:
        """The next usable prompts (up to ``n``), in source order; [] once ``done``."""
        prompts = self.prompts
        start = len(prompts)
        if self.done or (n is not None and n < 1):
            return []
        stop = self._limit if self._limit is not None else -1
        if n is not None and (stop < 0 or start + n < stop):
            stop = start + n
        prefix, seen, ids, problems = self._prefix, self._seen, self._ids, self.problems
        append = prompts.append
        for loc, row, err in self._rows:
            if err is None:
                try:
                    p = row_to_prompt(row)
                except (ValueError, TypeError) as exc:
                    err = str(exc)
                except RecursionError:  # a field nested too deeply to encode
                    err = TOO_DEEP
            if err is not None:
                problems.append(Problem(f"{prefix}{loc}", err))
                continue
            dk = p.hash if not p.request_json and not p.turns else p.dedup_key
            if dk in seen:
                self.duplicates += 1
                continue
            if p.id in ids:
                problems.append(Problem(f"{prefix}{loc}",
                                        f"id {p.id!r} already used at {prefix}{ids[p.id]} for different messages"))
                continue
            seen.add(dk)
            ids[p.id] = loc
            append(p)
            if len(prompts) == stop:
                break
        else:
            self.done = True
        if self._limit is not None and len(prompts) >= self._limit:
            self.done = True
        return prompts[start:]

    def result(self, *, strict: bool = False) -> PromptSet:
        """The whole set (reads what is left first); PromptError for bad rows under strict, or no prompts."""
        self.take()
        problems = self.problems
        if strict and problems:
            raise PromptError(format_problems(problems,
                                              header=f"{self.source}: {len(problems)} bad row(s) (strict mode)"))
        if not self.prompts:
            detail = ("\n" + format_problems(problems)) if problems else ""
            raise PromptError(f"{self.source}: no usable prompts{detail}")
        return PromptSet(self.prompts, problems, self.duplicates, self.source)


def load_prompts(source: str | os.PathLike[str], *, strict: bool = False, limit: int | None = None) -> PromptSet:
    """Read every usable prompt of ``source`` (the first ``limit`` usable ones when given)."""
    return PromptLoader(source, limit=limit).result(strict=strict)


def format_problems(problems: Iterable[Problem], header: str = "", show: int = 20) -> str:
    """A readable list of problems (the first ``show``)."""
    problems = list(problems)
    lines = [header] if header else []
    lines += [f"  {p}" for p in problems[:show]]
    if len(problems) > show:
        lines.append(f"  ... and {len(problems) - show} more")
    return "\n".join(lines)
