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

Format = Literal["jsonl", "parquet", "hf"]


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


def is_heldout(prompt_hash: str, share: float, salt: str = "") -> bool:
    """The split rule: a pure function of the prompt hash."""
    if share <= 0:
        return False
    if share >= 1:
        return True
    h = hashlib.sha256((salt + prompt_hash).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < share


def record_to_row(rec: HarvestRecord, logprobs: bool = False) -> dict[str, Any]:
    """One store record as an export row (JSON-ready)."""
    row: dict[str, Any] = {
        "messages": rec.chat(),
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


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """Parquet/hf form: meta and params as JSON strings, message content as strings."""
    out = dict(row)
    out["meta"] = json.dumps(row["meta"], sort_keys=True)
    out["params"] = json.dumps(row["params"], sort_keys=True)
    out["messages"] = [{"role": str(m.get("role")), "content": m["content"] if isinstance(m.get("content"), str)
                        else json.dumps(m.get("content"))} for m in row["messages"]]
    return out


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
            if cfg.order == "prompts":
                records = in_prompt_order(cfg.run_dir, records)
            if cfg.format == "jsonl":
                handles = {s: (tmp / f"{s}.jsonl").open("w") for s in ("train", "heldout")}
                try:
                    for rec in records:
                        split = "heldout" if is_heldout(rec.prompt_hash, cfg.heldout, cfg.salt) else "train"
                        handles[split].write(json.dumps(record_to_row(rec, cfg.logprobs), ensure_ascii=False)
                                             + "\n")
                        counts[split] += 1
                        prompts[split].add(rec.prompt_hash)
                finally:
                    for f in handles.values():
                        f.close()
                files = {s: str(out / f"{s}.jsonl") for s in ("train", "heldout")}
            else:
                rows: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
                for rec in records:
                    split = "heldout" if is_heldout(rec.prompt_hash, cfg.heldout, cfg.salt) else "train"
                    rows[split].append(_flat(record_to_row(rec, cfg.logprobs)))
                    counts[split] += 1
                    prompts[split].add(rec.prompt_hash)
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
        s: datasets.Dataset.from_list(rs, features=features) if features is not None
        else datasets.Dataset.from_dict({}) for s, rs in rows.items()
    })
    dd.save_to_disk(str(tmp / "data"))
    # Move the DatasetDict's files up so that load_from_disk(OUT) works.
    for p in (tmp / "data").iterdir():
        os.replace(p, tmp / p.name)
    (tmp / "data").rmdir()
