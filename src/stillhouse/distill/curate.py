"""Curation: harvested teacher samples → a verified, deduplicated, decontaminated training set.

    stillhouse curate RUN_DIR [--eval-sets builtin:gsm8k-test,builtin:humaneval] [--keep-per-prompt 1]

Steps, in order (each reports rows in, rows out and why rows were dropped):

1. ``load``        successful harvest records only; failed ones are dropped as ``harvest_error``
2. ``format``      empty, truncated (finish_reason ``length``), too long, no number for a
                   numeric task, code that does not parse
3. ``exact_dup``   same prompt and same answer after normalization (first kept)
4. ``decontam``    13-gram overlap with the evaluation sets (:mod:`.decontam`)
5. ``verify``      the answer checked against the reference (:mod:`.verify`; code in the sandbox)
6. ``near_dup``    MinHash LSH over prompt + answer (:mod:`.dedup`), after verification so a
                   wrong copy never shadows a right one
7. ``best_of_n``   per prompt, keep up to ``keep_per_prompt`` verified samples, greedy first

Nothing is deleted: every dropped row is written with its step and reason. Output, in
``RUN_DIR/curated/`` (or ``--out``)::

    kept.parquet      the kept rows (all fields)
    dropped.parquet   the dropped rows, with ``step``, ``reason`` and ``reason_code``
    train.jsonl       chat messages for training: {"messages": [..., assistant], "id",
                      "record_id", "prompt_id", "task", "correct"}, plus the teacher's
                      "token_ids", "top_ids" and "top_logprobs" when harvested (for top-k
                      KD); ``record_id`` is the harvest store's key
    report.json       per-step counts and reasons, the input, the config
    config.json       the frozen :class:`CurateConfig` (replay with ``--config``)

Rows come from the harvest store of a run directory (:func:`load_rows`), or from a JSONL
or Parquet file of rows with the fields of :data:`ROW_FIELDS` (``messages`` + ``response``
at least), so curated data from anywhere goes through the same steps.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stillhouse.config import atomic_write_text, config_to_dict, save_config
from stillhouse.jsonl import iter_jsonl

ROW_FIELDS = (
    "id", "prompt_id", "messages", "response", "sample_index", "temperature", "finish_reason",
    "completion_tokens", "error", "task", "answer", "tests", "entry_point", "prompt", "teacher", "revision",
)
"""The fields of a curation row. Only ``messages`` and ``response`` are required."""

LOGPROB_FIELDS = ("token_ids", "top_ids", "top_logprobs", "top_tokens")
"""Optional per-token teacher data a row may carry into train.jsonl (for top-k KD)."""

DEFAULT_EVAL_SETS = ("builtin:arithmetic-heldout:1000", "builtin:gsm8k-test", "builtin:humaneval")

STEPS = ("load", "format", "exact_dup", "decontam", "verify", "near_dup", "best_of_n")


class CurateError(Exception):
    """Curation could not run (missing input, unreadable rows); the message says how to fix it."""


@dataclass(frozen=True)
class CurateConfig:
    """How to curate. Saved as ``curated/config.json``; replay with ``--config``."""

    eval_sets: tuple[str, ...] = DEFAULT_EVAL_SETS
    """Evaluation sets to decontaminate against (``builtin:...`` specs); empty = skip."""
    ngram: int = 13
    """n-gram length for decontamination."""
    arithmetic_split_rule: bool = True
    """Also drop any addition whose pair lies in the generated held-out split (by its hash,
    :func:`stillhouse.distill.tasks.is_heldout_pair`), whichever items an eval draws. Turn off
    when the experiment uses its own train/held-out split of additions."""
    near_dup_threshold: float = 0.85
    """Estimated Jaccard (word 3-gram shingles of prompt + answer) at or above which two rows
    are near-duplicates; 1.0 turns the step off."""
    near_dup_num_perm: int = 128
    """MinHash permutations."""
    seed: int = 1
    """MinHash seed."""
    verify: Literal["require", "annotate", "off"] = "require"
    """require: drop rows that fail or cannot be verified; annotate: keep them, record the
    verdict; off: no verification (and best_of_n keeps any sample)."""
    keep_per_prompt: int = 1
    """Best-of-n: verified samples kept per prompt (greedy first, then by sample index)."""
    min_response_chars: int = 1
    """Shorter answers are dropped as ``format``."""
    max_response_tokens: int | None = None
    """Longer answers (completion tokens; whitespace words when unknown) are dropped; None = no cap."""
    drop_truncated: bool = True
    """Drop answers that stopped at max_tokens (finish_reason 'length')."""
    include_logprobs: bool = True
    """Copy the teacher's token ids and top-k logprobs (when harvested) into train.jsonl, for top-k KD."""
    sandbox_timeout_s: float = 5.0
    """Per-sample wall-clock limit for code verification."""
    sandbox_memory_mb: int = 512
    """Per-sample memory limit for code verification."""

    def __post_init__(self) -> None:
        if isinstance(self.eval_sets, str):
            raise TypeError("eval_sets must be a tuple of specs, e.g. ('builtin:gsm8k-test',)")
        if self.ngram < 1:
            raise ValueError(f"ngram={self.ngram}: must be >= 1 (13 is the usual)")
        if not 0.0 < self.near_dup_threshold <= 1.0:
            raise ValueError(f"near_dup_threshold={self.near_dup_threshold}: a Jaccard in (0, 1]")
        if self.near_dup_num_perm < 16:
            raise ValueError(f"near_dup_num_perm={self.near_dup_num_perm}: at least 16")
        if self.verify not in ("require", "annotate", "off"):
            raise ValueError(f"verify={self.verify!r}: choose 'require', 'annotate' or 'off'")
        if self.keep_per_prompt < 1:
            raise ValueError(f"keep_per_prompt={self.keep_per_prompt}: keep at least 1 sample per prompt")
        if self.min_response_chars < 0:
            raise ValueError(f"min_response_chars={self.min_response_chars}: must be >= 0")
        if self.max_response_tokens is not None and self.max_response_tokens < 1:
            raise ValueError(f"max_response_tokens={self.max_response_tokens}: >= 1, or None for no cap")
        if self.sandbox_timeout_s <= 0:
            raise ValueError(f"sandbox_timeout_s={self.sandbox_timeout_s}: must be > 0")
        if self.sandbox_memory_mb < 64:
            raise ValueError(f"sandbox_memory_mb={self.sandbox_memory_mb}: at least 64")


@dataclass
class StepReport:
    """One step's accounting: ``rows_in == rows_out + dropped``."""

    step: str
    rows_in: int
    rows_out: int
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def dropped(self) -> int:
        return self.rows_in - self.rows_out


@dataclass
class CurateResult:
    """What :func:`curate_rows` returns."""

    kept: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    steps: list[StepReport]
    config: CurateConfig
    eval_sets_skipped: list[str] = field(default_factory=list)
    """Default evaluation sets not decontaminated against because their data is not on this machine (why)."""

    def summary(self) -> dict[str, Any]:
        return {
            "rows_in": self.steps[0].rows_in if self.steps else 0,
            "kept": len(self.kept),
            "dropped": len(self.dropped),
            "eval_sets_skipped": self.eval_sets_skipped,
            "steps": [
                {"step": s.step, "rows_in": s.rows_in, "rows_out": s.rows_out, "dropped": s.dropped,
                 "reasons": s.reasons, "seconds": round(s.seconds, 3)}
                for s in self.steps
            ],
        }


# -- rows ----------------------------------------------------------------------------------------

def prompt_key(messages: Sequence[dict[str, Any]]) -> str:
    """A stable id for a prompt (its messages)."""
    blob = json.dumps([{"role": m.get("role"), "content": m.get("content")} for m in messages], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _user_text(messages: Sequence[dict[str, Any]]) -> str:
    return "\n".join(str(m.get("content", "")) for m in messages if m.get("role") != "assistant")


def normalize_row(raw: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """Fill the :data:`ROW_FIELDS` of a row, raising CurateError when it has no messages.

    A row whose ``messages`` end with an assistant turn and that has no ``response``
    takes that turn as its response (exported chat data)."""
    if not isinstance(raw, dict):
        raise CurateError(f"row {index}: a row must be a JSON object with 'messages', not {type(raw).__name__}")
    row = {k: raw.get(k) for k in ROW_FIELDS}
    # aliases used by experiment scripts and exports: completion = response, sample = sample_index
    if row["response"] is None and raw.get("completion") is not None:
        row["response"] = raw["completion"]
    if row["sample_index"] is None and raw.get("sample") is not None:
        row["sample_index"] = raw["sample"]
    for k in LOGPROB_FIELDS:
        if raw.get(k) is not None:
            row[k] = raw[k]
    msgs = raw.get("messages")
    if msgs is None and raw.get("prompt") is not None and raw.get("task") != "humaneval":
        msgs = [{"role": "user", "content": str(raw["prompt"])}]
    if not isinstance(msgs, list) or not msgs:
        raise CurateError(f"row {index}: no 'messages' list (fields: {sorted(raw)[:12]})")
    msgs = [dict(m) for m in msgs]
    if msgs[-1].get("role") == "assistant":  # exported chat data: the last turn is the answer
        if row["response"] is None:
            row["response"] = str(msgs[-1].get("content", ""))
        msgs = msgs[:-1]
    row["messages"] = msgs
    row["response"] = "" if row["response"] is None else str(row["response"])
    row["prompt_id"] = str(row["prompt_id"] or prompt_key(msgs))
    row["sample_index"] = int(row["sample_index"] or 0)
    row["temperature"] = float(row["temperature"] or 0.0)
    row["id"] = str(row["id"] or f"{row['prompt_id']}#{row['sample_index']}")
    row["finish_reason"] = row["finish_reason"] or "stop"
    return row


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(obj, dict) and name in obj:
            return obj[name]
        if not isinstance(obj, dict) and hasattr(obj, name):
            return getattr(obj, name)
    return default


def row_from_record(rec: Any) -> dict[str, Any]:
    """A curation row from one :class:`~stillhouse.distill.store.HarvestRecord`.

    The reference travels in ``rec.meta`` (what the prompt row carried: ``task``, ``answer``,
    ``tests``, ``entry_point``, and for built-in sets a nested ``meta`` with the HumanEval prompt).
    """
    params = _get(rec, "params", default={}) or {}
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except json.JSONDecodeError:
            params = {}
    meta: dict[str, Any] = _get(rec, "meta", default={}) or {}
    inner: dict[str, Any] = meta["meta"] if isinstance(meta.get("meta"), dict) else {}
    return {
        "id": _get(rec, "key", "id"),
        "prompt_id": _get(rec, "prompt_id"),
        "messages": _get(rec, "messages"),
        "response": _get(rec, "response", "text"),
        "sample_index": _get(rec, "sample_index", default=0),
        "temperature": _get(rec, "temperature", default=params.get("temperature", 0.0)),
        "finish_reason": _get(rec, "finish_reason"),
        "completion_tokens": _get(rec, "completion_tokens"),
        "error": _get(rec, "error") if _get(rec, "status", default="ok") != "ok" or _get(rec, "error") else None,
        "task": meta.get("task"),
        "answer": meta.get("answer"),
        "tests": meta.get("tests"),
        "entry_point": meta.get("entry_point"),
        "prompt": inner.get("prompt") or meta.get("humaneval_prompt"),
        "teacher": _get(rec, "teacher"),
        "revision": _get(rec, "revision"),
        **_logprob_lists(rec),
    }


def _logprob_lists(rec: Any) -> dict[str, Any]:
    """The record's token ids and top-k arrays as JSON-ready lists (absent ones omitted)."""
    out: dict[str, Any] = {}
    for name in LOGPROB_FIELDS:
        value = _get(rec, name)
        if value is None:
            continue
        if hasattr(value, "tolist"):
            value = value.tolist()
        if name == "top_logprobs":
            value = [[round(float(x), 4) for x in row] for row in value]
        out[name] = value
    return out


def load_rows(source: str | Path) -> list[dict[str, Any]]:
    """Rows from a run directory (its harvest store), or a ``.jsonl`` / ``.parquet`` file."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".parquet":
            from stillhouse.distill.tables import TableError, parquet_row_groups

            raw = []
            try:
                for first, n, rows, why in parquet_row_groups(path):
                    if rows is None:
                        raise CurateError(f"{path}:rows {first}-{first + n - 1}: {why}")
                    raw += rows
            except TableError as exc:
                raise CurateError(str(exc)) from None
        else:
            raw = [row for _, row in iter_jsonl(path, CurateError, "one row per line (fix or remove the line)",
                                                objects=False)]
        out = []
        for i, r in enumerate(raw):
            try:
                out.append(normalize_row(r, i))
            except CurateError as exc:
                raise CurateError(f"{path}: {exc}") from None
            except RecursionError:
                raise CurateError(f"{path}: row {i} is nested too deeply to process (about 1,000 levels of "
                                  "arrays/objects); fix or remove it") from None
        return out
    if not path.is_dir():
        raise CurateError(f"{path} does not exist: give a harvest run directory or a .jsonl/.parquet file")
    from stillhouse.distill.store import HarvestStore, StoreError

    try:
        with HarvestStore(path, readonly=True) as store:
            records = list(store.records(status=None))  # failed records too: they are reported, not hidden
    except StoreError as exc:
        raise CurateError(str(exc)) from exc
    if not records:
        raise CurateError(f"{path}: the harvest store holds no records; run `stillhouse harvest` first")
    return [normalize_row(row_from_record(r), i) for i, r in enumerate(records)]


# -- references --------------------------------------------------------------------------------

_ARITH = re.compile(r"what is (\d+) \+ (\d+)\?", re.IGNORECASE)
_GSM_ID = re.compile(r"^gsm8k-(train|test)-(\d+)$")


class ReferenceResolver:
    """Finds the reference for a row: its own fields, then its prompt id (``arith-a+b``,
    ``gsm8k-train-00012``, ``HumanEval/3``), then its text (an arithmetic question, a
    GSM8K question, a HumanEval prompt). Task data is loaded lazily, once."""

    def __init__(self) -> None:
        self._gsm: dict[str, list[Any]] = {}
        self._gsm_by_head: dict[tuple[str, ...], Any] | None = None
        self._he: dict[str, Any] | None = None

    def _gsm8k(self, split: str) -> list[Any]:
        if split not in self._gsm:
            from stillhouse.distill.tasks import TaskDataMissing, gsm8k

            try:
                self._gsm[split] = gsm8k(None, split)  # type: ignore[arg-type]
            except TaskDataMissing:
                self._gsm[split] = []
        return self._gsm[split]

    def _humaneval(self) -> dict[str, Any]:
        if self._he is None:
            from stillhouse.distill.tasks import TaskDataMissing, humaneval

            try:
                self._he = {it.id: it for it in humaneval()}
            except TaskDataMissing:
                self._he = {}
        return self._he

    def resolve(self, row: dict[str, Any]) -> tuple[str | None, Any]:
        """``(task, reference)``; reference is a number string or a HumanEval problem dict."""
        task = row.get("task")
        if row.get("tests") and row.get("entry_point"):
            prompt = row.get("prompt")
            if not prompt:
                known = self._humaneval().get(str(row.get("prompt_id") or ""))
                prompt = known.meta["prompt"] if known is not None else ""
            return "humaneval", {"prompt": prompt, "test": row["tests"], "entry_point": row["entry_point"]}
        pid = str(row.get("prompt_id") or "")
        text = _user_text(row["messages"])
        if row.get("answer") not in (None, ""):
            return task or ("arithmetic" if _ARITH.search(text) else "math"), str(row["answer"])
        m = re.match(r"^arith-(\d+)\+(\d+)$", pid) or _ARITH.search(text)
        if m:
            return "arithmetic", str(int(m.group(1)) + int(m.group(2)))
        g = _GSM_ID.match(pid)
        if g:
            items = self._gsm8k(g.group(1))
            idx = int(g.group(2))
            hit = next((it for it in items if it.id == pid), items[idx] if idx < len(items) else None)
            if hit is not None:
                return "gsm8k", hit.answer
        if pid.startswith("HumanEval/") or "def " in text:
            he = self._humaneval()
            item = he.get(pid) or next((it for it in he.values() if it.meta["prompt"].strip() in text), None)
            if item is not None:
                return "humaneval", {"prompt": item.meta["prompt"], "test": item.tests,
                                     "entry_point": item.entry_point}
        if task == "gsm8k" or "####" in text or len(text) > 80:
            item = self._gsm8k_by_text(text)
            if item is not None:
                return "gsm8k", item.answer
        return task, None

    def _gsm8k_by_text(self, text: str) -> Any:
        from stillhouse.distill.dedup import tokenize

        if self._gsm_by_head is None:
            self._gsm_by_head = {}
            for split in ("train", "test"):
                for it in self._gsm8k(split):
                    self._gsm_by_head.setdefault(tuple(tokenize(it.meta["question"])[:16]), it)
        head = tuple(tokenize(text)[:16])
        return self._gsm_by_head.get(head)


# -- the pipeline ------------------------------------------------------------------------------

def _reason_code(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


def _format_reason(row: dict[str, Any], cfg: CurateConfig) -> str | None:
    resp = row["response"]
    if row.get("error"):
        return None  # handled in load
    if not resp.strip():
        return "empty: the answer is empty"
    if len(resp.strip()) < cfg.min_response_chars:
        return f"too_short: under {cfg.min_response_chars} chars"
    if cfg.drop_truncated and row.get("finish_reason") == "length":
        return "truncated: stopped at max_tokens"
    if cfg.max_response_tokens is not None:
        ntok = row.get("completion_tokens") or len(resp.split())
        if ntok > cfg.max_response_tokens:
            return f"too_long: {ntok} tokens > {cfg.max_response_tokens}"
    task = row.get("_task")
    if task in ("arithmetic", "gsm8k", "math"):
        from stillhouse.distill.verify import extract_answer

        if extract_answer(resp) is None:
            return "no_number: a numeric task needs a number in the answer"
    if task == "humaneval":
        from stillhouse.distill.verify import completion_for

        ref = row.get("_reference") or {}
        try:
            ast.parse((ref.get("prompt") or "") + completion_for(ref, resp))
        except SyntaxError as exc:
            return f"syntax: the code does not parse ({exc.msg}, line {exc.lineno})"
    return None


def curate_rows(
    rows: Sequence[dict[str, Any]],
    config: CurateConfig | None = None,
    *,
    eval_texts: Iterable[Any] | None = None,
    resolver: ReferenceResolver | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> CurateResult:
    """Run every step over normalized rows (see :func:`normalize_row`).

    ``eval_texts`` overrides loading ``config.eval_sets`` (tests pass a small list);
    ``progress(step, done, total)`` is called as rows are processed.
    """
    from stillhouse.distill.decontam import Decontaminator, load_eval_texts
    from stillhouse.distill.dedup import NearDeduper, exact_duplicates, normalize
    from stillhouse.distill.sandbox import SandboxConfig
    from stillhouse.distill.verify import answer_style, check_code, check_numeric

    cfg = config or CurateConfig()
    resolver = resolver or ReferenceResolver()
    steps: list[StepReport] = []
    dropped: list[dict[str, Any]] = []

    def run_step(name: str, current: list[dict[str, Any]],
                 decide: Callable[[list[dict[str, Any]]], list[str | None]]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        verdicts = decide(current)
        kept: list[dict[str, Any]] = []
        reasons: Counter[str] = Counter()
        for row, reason in zip(current, verdicts):
            if reason is None:
                kept.append(row)
            else:
                code = _reason_code(reason)
                reasons[code] += 1
                dropped.append({**row, "step": name, "reason": reason, "reason_code": code})
        steps.append(StepReport(name, len(current), len(kept), dict(reasons.most_common()),
                                time.perf_counter() - t0))
        return kept

    def tick(name: str, total: int) -> Callable[[int], None]:
        return (lambda done: progress(name, done, total)) if progress else (lambda done: None)

    rows = [dict(r) for r in rows]
    for r in rows:
        r["_task"], r["_reference"] = resolver.resolve(r)
        r["task"] = r["_task"]

    # 1. load: failed harvest records
    current = run_step("load", rows, lambda rs: [
        f"harvest_error: {str(r['error'])[:200]}" if r.get("error") else None for r in rs])

    # 2. format and length
    current = run_step("format", current, lambda rs: [_format_reason(r, cfg) for r in rs])

    # 3. exact duplicates: same prompt, same answer
    def exact(rs: list[dict[str, Any]]) -> list[str | None]:
        dup = exact_duplicates([_user_text(r["messages"]) + "\x00" + r["response"] for r in rs])
        return [None if d is None else f"exact_dup: same as {rs[d]['id']}" for d in dup]

    current = run_step("exact_dup", current, exact)

    # 4. decontamination
    # The default sets are skipped where their data is absent (and the report names them); sets the user
    # named must be there.
    skipped: list[str] | None = [] if tuple(cfg.eval_sets) == DEFAULT_EVAL_SETS else None
    texts = list(eval_texts) if eval_texts is not None else load_eval_texts(cfg.eval_sets, missing=skipped)
    deco = Decontaminator(n=cfg.ngram, arithmetic_split_rule=cfg.arithmetic_split_rule).fit(texts)

    def decontam(rs: list[dict[str, Any]]) -> list[str | None]:
        out: list[str | None] = []
        for r in rs:
            hit = deco.check(_user_text(r["messages"]))
            out.append(hit.reason() if hit else None)
        return out

    current = run_step("decontam", current, decontam)

    # 5. verification
    sandbox = SandboxConfig(timeout_s=cfg.sandbox_timeout_s, memory_mb=cfg.sandbox_memory_mb)

    def verify(rs: list[dict[str, Any]]) -> list[str | None]:
        out: list[str | None] = []
        step_tick = tick("verify", len(rs))
        for i, r in enumerate(rs):
            task, ref = r["_task"], r["_reference"]
            step_tick(i)
            if cfg.verify == "off":
                r["verified"], r["verdict"] = None, "off"
                out.append(None)
                continue
            if ref is None:
                ok, reason = False, f"unverifiable: no reference for task {task or 'unknown'}"
            elif task == "humaneval":
                ok, reason = check_code(r["response"], ref, config=sandbox)
            else:
                ok, reason = check_numeric(r["response"], ref, answer_style(task))
            r["verified"], r["verdict"] = ok, reason
            out.append(None if ok or cfg.verify == "annotate" else reason)
        step_tick(len(rs))
        return out

    current = run_step("verify", current, verify)

    # 6. near duplicates among the survivors, greedy and earlier rows first
    order = sorted(range(len(current)), key=lambda i: (current[i]["temperature"] > 0, current[i]["sample_index"], i))
    current = [current[i] for i in order]

    def near(rs: list[dict[str, Any]]) -> list[str | None]:
        if cfg.near_dup_threshold >= 1.0:  # off (MinHash LSH cannot band at a threshold of 1)
            return [None] * len(rs)
        nd = NearDeduper(threshold=cfg.near_dup_threshold, num_perm=cfg.near_dup_num_perm, seed=cfg.seed)
        found = nd.fit_predict([normalize(_user_text(r["messages"])) + " || " + normalize(r["response"]) for r in rs])
        return [None if f is None else f"near_dup: ~{f.jaccard:.2f} Jaccard with {rs[f.of]['id']}" for f in found]

    current = run_step("near_dup", current, near)

    # 7. best-of-n: per prompt, up to k samples (verified ones first when annotating), greedy first
    def best(rs: list[dict[str, Any]]) -> list[str | None]:
        taken: Counter[str] = Counter()
        out: list[str | None] = [None] * len(rs)
        ranked = sorted(range(len(rs)), key=lambda i: (rs[i].get("verified") is False, rs[i]["temperature"] > 0,
                                                       rs[i]["sample_index"], i))
        for i in ranked:
            pid = rs[i]["prompt_id"]
            if taken[pid] >= cfg.keep_per_prompt:
                out[i] = f"best_of_n: prompt already has {cfg.keep_per_prompt} kept sample(s)"
            else:
                taken[pid] += 1
        return out

    current = run_step("best_of_n", current, best)

    for r in current + dropped:
        r.pop("_reference", None)
        r.pop("_task", None)
    return CurateResult(kept=current, dropped=dropped, steps=steps, config=cfg, eval_sets_skipped=skipped or [])


# -- writing -----------------------------------------------------------------------------------

def training_record(row: dict[str, Any], include_logprobs: bool = True) -> dict[str, Any]:
    """One train.jsonl line: the chat with the answer as the assistant turn, pointers back to
    the harvest record, and (``include_logprobs``) the teacher's token ids and top-k logprobs."""
    rec = {
        "messages": list(row["messages"]) + [{"role": "assistant", "content": row["response"]}],
        "id": row["id"],
        "record_id": row["id"],
        "prompt_id": row["prompt_id"],
        "task": row.get("task"),
        "verified": row.get("verified"),
        "correct": row.get("verified"),
    }
    if include_logprobs:
        rec.update({k: row[k] for k in LOGPROB_FIELDS if row.get(k) is not None})
    return rec


def _to_table(rows: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    cols = list(ROW_FIELDS) + ["verified", "verdict", "step", "reason", "reason_code"]
    data: dict[str, list[Any]] = {c: [] for c in cols}
    for r in rows:
        for c in cols:
            v = r.get(c)
            if c == "messages":
                v = json.dumps(v, ensure_ascii=False)
            elif v is not None and not isinstance(v, (str, int, float, bool)):
                v = json.dumps(v, ensure_ascii=False, default=str)
            data[c].append(v)
    types = {"sample_index": pa.int64(), "temperature": pa.float64(), "completion_tokens": pa.int64(),
             "verified": pa.bool_()}
    return pa.table({c: pa.array([None if v is None else (str(v) if c not in types else v) for v in vals],
                                 type=types.get(c, pa.string()))
                     for c, vals in data.items()})


def write_outputs(result: CurateResult, out_dir: str | Path, source: str = "") -> dict[str, Any]:
    """Write kept/dropped Parquet, train.jsonl, report.json and config.json; return the report."""
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(_to_table(result.kept), out / "kept.parquet")
    pq.write_table(_to_table(result.dropped), out / "dropped.parquet")
    atomic_write_text(out / "train.jsonl",
                      "".join(json.dumps(training_record(r, result.config.include_logprobs), ensure_ascii=False) + "\n"
                              for r in result.kept))
    save_config(result.config, out / "config.json")
    report = {"source": str(source), "created_unix": time.time(), **result.summary(),
              "config": config_to_dict(result.config),
              "files": {"kept": "kept.parquet", "dropped": "dropped.parquet", "train": "train.jsonl"}}
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def report_table(result: CurateResult) -> Any:
    """A rich table of the steps."""
    from rich.table import Table

    table = Table(title="curation", show_lines=False)
    for col in ("step", "in", "out", "dropped", "why (top reasons)", "s"):
        table.add_column(col, justify="right" if col in ("in", "out", "dropped", "s") else "left")
    for s in result.steps:
        why = ", ".join(f"{k} {v}" for k, v in list(s.reasons.items())[:4])
        table.add_row(s.step, str(s.rows_in), str(s.rows_out), str(s.dropped), why, f"{s.seconds:.2f}")
    return table


def curate_run(source: str | Path, config: CurateConfig | None = None, out_dir: str | Path | None = None,
               progress: Callable[[str, int, int], None] | None = None) -> tuple[CurateResult, dict[str, Any]]:
    """Load rows from ``source``, curate them and write ``out_dir`` (default ``RUN_DIR/curated``)."""
    cfg = config or CurateConfig()
    src = Path(source)
    rows = load_rows(src)
    result = curate_rows(rows, cfg, progress=progress)
    target = Path(out_dir) if out_dir else (src / "curated" if src.is_dir() else src.with_suffix("").parent
                                              / (src.stem + "-curated"))
    report = write_outputs(result, target, source=str(src))
    report["out_dir"] = str(target)
    return result, report
