"""Export a harvest run as OpenAI chat-messages data, split train/held-out by prompt hash.

    stillhouse export runs/h1 --format jsonl --out data/h1 --heldout 0.1

Writes ``OUT/train.*`` and ``OUT/heldout.*`` (``.jsonl``, ``.parquet``, or one datasets
``DatasetDict`` saved with ``save_to_disk`` for ``hf``) plus ``OUT/export.json`` (the
ExportConfig and the counts). Each row::

    {"messages": [...prompt..., {"role": "assistant", "content": TEXT}],
     "id": PROMPT_ID, "sample_index": 0, "key": RECORD_KEY, "prompt_hash": ...,
     "teacher": SPEC, "model": ..., "revision": ..., "finish_reason": "stop",
     "prompt_tokens": 12, "completion_tokens": 7, "meta": {...}}

With ``--logprobs`` rows also carry ``tokens``/``logprobs`` and ``top_tokens`` or
``top_ids`` with ``top_logprobs``. In Parquet and hf, ``meta`` is a JSON string (rows
from different sources have different meta keys, and a column needs one type).

Reasoning, tools and conversations. The assistant message carries what the teacher sent: ``tool_calls``
(OpenAI form, ``arguments`` strings as sent; ``content`` null when it was), and its chain of thought as
``--reasoning`` says:

    field    a ``reasoning_content`` key (``--reasoning-key``), the content the bare answer (default)
    inline   in the content before the answer, by ``--reasoning-template`` (a ``<think>`` block by
             default); content that came with its ``<think>`` block is kept as it came
    strip    dropped; the content is the bare answer

Rows of a request that offered tools carry them as ``"tools"`` (a JSON string in Parquet and hf); tool
results are ``tool`` messages in the conversation. A conversation harvested turn by turn is one row per
conversation (``--conversations whole``, default): every teacher turn in place, with its reasoning, and
``turn`` the last turn's index; ``turns`` gives one row per harvested turn instead. Assistant messages
that are context rather than this row's teacher answers (a seed conversation's, or earlier turns under
``turns``) carry ``"weight": 0``, so training puts no loss on them. When the exported content differs
from the text the teacher's tokens spell (reasoning moved), the row carries no token-level data.

The split is a pure function of the prompt: a prompt is held out when
``sha256(salt + prompt_hash)`` falls below ``heldout``, so every sample of a prompt lands
on the same side, and the split is identical on every machine and rerun.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stillhouse.config import ConfigError, atomic_write_text, config_to_dict
from stillhouse.distill.store import HarvestRecord, HarvestStore
from stillhouse.teacher.message import (
    DEFAULT_REASONING_TEMPLATE,
    THINK_OPEN,
    field_reasoning,
    inline_reasoning,
    split_think,
)

Format = Literal["jsonl", "parquet", "hf"]
ReasoningMode = Literal["field", "inline", "strip"]


@dataclass(frozen=True)
class ExportConfig:
    """One export of a harvest run."""

    run_dir: str
    """The harvest run directory."""
    out: str
    """Output directory."""
    format: Format = "jsonl"
    """The file format; hf = a datasets directory (save_to_disk)."""
    heldout: float = 0.1
    """Share of prompts held out, in [0, 1]."""
    logprobs: bool = False
    """Include the stored token logprobs."""
    include_errors: bool = False
    """Also export failed records (their 'status' says so; text is empty)."""
    salt: str = ""
    """A different salt gives a different split of the same share."""
    order: Literal["store", "prompts"] = "store"
    """store: rows in the order they were written; prompts: in the order of the run's prompt source
    (config.json's prompts, then by sample index), e.g. after a sharded harvest."""
    reasoning: ReasoningMode = "field"
    """The teacher's chain of thought: field = its own key on the assistant message (reasoning_key);
    inline = in the content before the answer (reasoning_template); strip = dropped."""
    reasoning_key: str = "reasoning_content"
    """The assistant message key that holds the reasoning under reasoning=field (what the student's
    chat template reads, e.g. reasoning_content or reasoning)."""
    reasoning_template: str = DEFAULT_REASONING_TEMPLATE
    """How reasoning=inline writes a reasoning that came in a field: {reasoning} and {answer} filled in."""
    conversations: Literal["whole", "turns"] = "whole"
    """A conversation harvested turn by turn: whole = one row with every teacher turn; turns = a row per
    harvested turn (earlier turns as context)."""

    def __post_init__(self) -> None:
        if self.format not in ("jsonl", "parquet", "hf"):
            raise ConfigError(f"format={self.format!r}: choose jsonl, parquet or hf")
        if not 0.0 <= self.heldout <= 1.0:
            raise ConfigError(f"heldout={self.heldout}: a share between 0 and 1, e.g. 0.1")
        if not self.out:
            raise ConfigError("out: give an output directory")
        if self.order not in ("store", "prompts"):
            raise ConfigError(f"order={self.order!r}: choose store or prompts")
        if Path(self.out).resolve() == Path(self.run_dir).resolve():
            raise ConfigError("out: write the export next to the run directory, not into it")
        if self.reasoning not in ("field", "inline", "strip"):
            raise ConfigError(f"reasoning={self.reasoning!r}: choose field, inline or strip")
        if not self.reasoning_key or self.reasoning_key in ("role", "content", "tool_calls", "weight"):
            raise ConfigError(f"reasoning_key={self.reasoning_key!r}: name a key of its own, e.g. reasoning_content")
        if "{reasoning}" not in self.reasoning_template or "{answer}" not in self.reasoning_template:
            raise ConfigError(f"reasoning_template={self.reasoning_template!r}: it must contain {{reasoning}} and "
                              "{answer}")
        if self.conversations not in ("whole", "turns"):
            raise ConfigError(f"conversations={self.conversations!r}: choose whole or turns")


def is_heldout(prompt_hash: str, share: float, salt: str = "") -> bool:
    """The split rule: a pure function of the prompt hash."""
    if share <= 0:
        return False
    if share >= 1:
        return True
    h = hashlib.sha256((salt + prompt_hash).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < share


def format_assistant(message: dict[str, Any], mode: ReasoningMode = "field", key: str = "reasoning_content",
                     template: str = DEFAULT_REASONING_TEMPLATE) -> dict[str, Any]:
    """An assistant message with its reasoning (a reasoning field, or a ``<think>`` block leading the
    content) as ``mode`` says; every other field as it is, in its place (a reasoning field kept under
    ``key`` where it was), so a message that needs no change is the very message."""
    content = message.get("content")
    found = field_reasoning(message)
    if found is not None:
        reasoning: str | None = found[1]
        answer = content
        was_inline = False
    elif isinstance(content, str) and THINK_OPEN in content and split_think(content)[0] is not None:
        reasoning, answer = split_think(content)
        was_inline = True
    else:
        return dict(message)
    out: dict[str, Any] = {}
    for k, v in message.items():
        if k not in ("reasoning_content", "reasoning"):
            out[k] = v
        elif mode == "field" and found is not None and k == found[0]:
            out[key] = reasoning
    if mode == "field":
        out["content"] = answer
        out[key] = reasoning
    elif mode == "inline":
        out["content"] = content if was_inline else inline_reasoning(reasoning or "", answer or "", template)
    else:
        out["content"] = answer
    return out


def record_to_row(rec: HarvestRecord, logprobs: bool = False, cfg: ExportConfig | None = None,
                  chain: list[HarvestRecord] | None = None) -> dict[str, Any]:
    """One store record as an export row (JSON-ready), formatted as ``cfg`` says (default: reasoning as a
    field). ``chain``: the records of the conversation's turns before ``rec`` (turn 0 first), whose answers
    are put in place of their context copies; without it, earlier assistant turns are context (weight 0)."""
    mode: ReasoningMode = "field" if cfg is None else cfg.reasoning
    key = "reasoning_content" if cfg is None else cfg.reasoning_key
    template = DEFAULT_REASONING_TEMPLATE if cfg is None else cfg.reasoning_template
    messages = [dict(m) for m in rec.messages]
    for m in messages:
        if m.get("role") == "assistant":
            m["weight"] = 0
    for prev in chain or []:  # each earlier teacher answer, with every field it came with
        messages[len(prev.messages)] = format_assistant(prev.assistant(), mode, key, template)
    last = format_assistant(rec.assistant(), mode, key, template)
    messages.append(last)
    row: dict[str, Any] = {
        "messages": messages,
        "id": rec.prompt_id,
        "sample_index": rec.sample_index,
        "key": rec.key,
        "prompt_hash": rec.prompt_hash,
        "teacher": rec.teacher,
        "model": rec.model,
        "revision": rec.revision,
        "status": rec.status,
        "finish_reason": rec.finish_reason,
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "params": rec.params,
        "meta": rec.meta,
    }
    tools = rec.tools
    if tools is not None:
        row["tools"] = tools
    if rec.turn or chain:
        row["turn"] = rec.turn
    if logprobs and (last.get("content") or "") != (rec.text or ""):
        logprobs = False  # the tokens spell the text as the teacher wrote it, not this content
    if logprobs:
        row["tokens"] = rec.tokens
        row["token_ids"] = None if rec.token_ids is None else rec.token_ids.tolist()
        row["logprobs"] = None if rec.logprobs is None else rec.logprobs.tolist()
        row["top_tokens"] = rec.top_tokens
        row["top_ids"] = None if rec.top_ids is None else rec.top_ids.tolist()
        row["top_logprobs"] = None if rec.top_logprobs is None else rec.top_logprobs.tolist()
    return row


@dataclass
class ExportResult:
    """Where the export went and how many rows each split got."""

    config: ExportConfig
    files: dict[str, str]
    counts: dict[str, int]
    prompts: dict[str, int]

    def summary(self) -> str:
        parts = ", ".join(f"{k}: {self.counts[k]} rows / {self.prompts[k]} prompts -> {self.files[k]}"
                          for k in ("train", "heldout"))
        return f"exported {self.config.run_dir} as {self.config.format}: {parts}"


def in_prompt_order(run_dir: str, records: Iterable[HarvestRecord]) -> list[HarvestRecord]:
    """``records`` sorted by their prompt's place in the run's prompt source, then by sample index
    (a record whose prompt is no longer in the source goes last)."""
    from stillhouse.config import load_config
    from stillhouse.distill.harvest import HarvestConfig
    from stillhouse.distill.prompts import load_prompts

    cfg = load_config(HarvestConfig, Path(run_dir) / "config.json")
    place = {p.hash: i for i, p in enumerate(load_prompts(cfg.prompts, limit=cfg.limit).prompts)}
    return sorted(records, key=lambda r: (place.get(r.prompt_hash, len(place)), r.sample_index))


def conversations(records: list[HarvestRecord]) -> list[tuple[HarvestRecord, list[HarvestRecord]]]:
    """``(last turn, the turns before it)`` for every conversation among ``records`` (ok records): a
    record whose conversation goes on in another record is not a row of its own. A turn's parent is the
    record of the turn before with the same prompt, sample, teacher and params whose messages start it."""
    groups: dict[tuple[Any, ...], dict[int, list[HarvestRecord]]] = {}
    for r in records:
        g = (r.prompt_id, r.sample_index, r.teacher, json.dumps(r.params, sort_keys=True))
        groups.setdefault(g, {}).setdefault(r.turn, []).append(r)
    parent: dict[str, HarvestRecord] = {}
    has_child: set[str] = set()
    for turns in groups.values():
        for t, rs in turns.items():
            for r in rs:
                for p in turns.get(t - 1, []):
                    n = len(p.messages)
                    if r.messages[:n] == p.messages and len(r.messages) > n and r.status == p.status == "ok":
                        parent[r.key] = p
                        has_child.add(p.key)
                        break
    out: list[tuple[HarvestRecord, list[HarvestRecord]]] = []
    for r in records:
        if r.key in has_child:
            continue
        chain: list[HarvestRecord] = []
        up = parent.get(r.key)
        while up is not None:
            chain.append(up)
            up = parent.get(up.key)
        out.append((r, chain[::-1]))
    return out


def _flat(row: dict[str, Any], message_keys: list[str]) -> dict[str, Any]:
    """Parquet/hf form: meta, params and tools as JSON strings; every message with the same keys
    (``message_keys``, None where a message has none), text content as strings."""
    out = dict(row)
    out["meta"] = json.dumps(row["meta"], sort_keys=True)
    out["params"] = json.dumps(row["params"], sort_keys=True)
    if "tools" in row:
        out["tools"] = json.dumps(row["tools"], ensure_ascii=False)
    msgs = []
    for m in row["messages"]:
        f = {k: m.get(k) for k in message_keys}
        f["role"] = str(m.get("role"))
        c = m.get("content")
        f["content"] = c if isinstance(c, str) or (c is None and m.get("tool_calls")) else json.dumps(c)
        msgs.append(f)
    out["messages"] = msgs
    return out


def _message_keys(rows: Iterable[dict[str, Any]]) -> list[str]:
    """role, content, then every other message key the rows use, in order of first use."""
    keys = {"role": None, "content": None}
    for row in rows:
        for m in row["messages"]:
            for k in m:
                keys.setdefault(k, None)
    return list(keys)


def export_run(cfg: ExportConfig) -> ExportResult:
    """Write the export; the output directory is replaced only once the new one is complete."""
    out = Path(cfg.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    counts = {"train": 0, "heldout": 0}
    prompts: dict[str, set[str]] = {"train": set(), "heldout": set()}
    files: dict[str, str] = {}
    try:
        with HarvestStore(cfg.run_dir, readonly=True) as store:
            records: Iterable[HarvestRecord] = store.records(status=None if cfg.include_errors else "ok")
            pairs: Iterable[tuple[HarvestRecord, list[HarvestRecord] | None]]
            if cfg.conversations == "whole" and store.max_turn() > 0:
                every = list(records)
                ok = conversations([r for r in every if r.status == "ok"])
                pairs = [*ok, *((r, None) for r in every if r.status != "ok")]
                if cfg.order == "prompts":
                    place = {id(r): i for i, r in enumerate(in_prompt_order(cfg.run_dir, [r for r, _ in pairs]))}
                    pairs = sorted(pairs, key=lambda rc: place[id(rc[0])])
            else:
                if cfg.order == "prompts":
                    records = in_prompt_order(cfg.run_dir, records)
                pairs = ((r, None) for r in records)
            if cfg.format == "jsonl":
                handles = {s: (tmp / f"{s}.jsonl").open("w") for s in ("train", "heldout")}
                try:
                    for rec, chain in pairs:
                        split = "heldout" if is_heldout(rec.prompt_hash, cfg.heldout, cfg.salt) else "train"
                        handles[split].write(json.dumps(record_to_row(rec, cfg.logprobs, cfg, chain),
                                                        ensure_ascii=False) + "\n")
                        counts[split] += 1
                        prompts[split].add(rec.prompt_hash)
                finally:
                    for f in handles.values():
                        f.close()
                files = {s: str(out / f"{s}.jsonl") for s in ("train", "heldout")}
            else:
                rows: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
                for rec, chain in pairs:
                    split = "heldout" if is_heldout(rec.prompt_hash, cfg.heldout, cfg.salt) else "train"
                    rows[split].append(record_to_row(rec, cfg.logprobs, cfg, chain))
                    counts[split] += 1
                    prompts[split].add(rec.prompt_hash)
                keys = _message_keys([*rows["train"], *rows["heldout"]])
                rows = {k: [_flat(r, keys) for r in v] for k, v in rows.items()}
                cols = list({c: None for v in rows.values() for r in v for c in r})  # a column needs every row
                rows = {k: [{c: r.get(c) for c in cols} for r in v] for k, v in rows.items()}
                if cfg.format == "parquet":
                    _write_parquet(tmp, rows)
                    files = {s: str(out / f"{s}.parquet") for s in ("train", "heldout")}
                else:
                    _write_hf(tmp, rows)
                    files = {s: f"{out} (split {s!r})" for s in ("train", "heldout")}
        result = ExportResult(cfg, files, counts, {k: len(v) for k, v in prompts.items()})
        atomic_write_text(tmp / "export.json", json.dumps(
            {"__config__": "ExportConfig", **config_to_dict(cfg), "counts": counts,
             "prompts": result.prompts}, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_parquet(tmp: Path, rows: dict[str, list[dict[str, Any]]]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError("format=parquet needs pyarrow: pip install 'stillhouse[data]'") from exc
    every = rows["train"] + rows["heldout"]
    schema = pa.Table.from_pylist(every).schema if every else None  # one schema for both splits
    for split, rs in rows.items():
        if schema is None:
            table = pa.table({})
        else:
            table = pa.Table.from_pylist(rs, schema=schema)
        pq.write_table(table, tmp / f"{split}.parquet")


def _write_hf(tmp: Path, rows: dict[str, list[dict[str, Any]]]) -> None:
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError("format=hf needs datasets: pip install 'stillhouse[data]'") from exc
    every = rows["train"] + rows["heldout"]
    features = datasets.Dataset.from_list(every).features if every else None  # one schema for both splits
    dd = datasets.DatasetDict({
        s: datasets.Dataset.from_list(rs, features=features) if features is not None and rs
        else datasets.Dataset.from_dict({k: [] for k in features}, features=features) if features is not None
        else datasets.Dataset.from_dict({}) for s, rs in rows.items()
    })
    dd.save_to_disk(str(tmp / "data"), num_shards={s: 1 for s in dd})  # an empty split too gets its (empty) shard
    # Move the DatasetDict's files up so that load_from_disk(OUT) works.
    for p in (tmp / "data").iterdir():
        os.replace(p, tmp / p.name)
    (tmp / "data").rmdir()
