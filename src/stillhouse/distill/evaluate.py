"""Evaluate students against their teacher on the same held-out items.

    stillhouse eval --model hf:runs/student --teacher bundled --task arithmetic2 --limit 300 --out eval/

For each model (teacher first): greedy, batched generation on the held-out items
(:func:`stillhouse.teacher.generate.generate`; the items are a task's built-in held-out draw, or a
file of items, ``EvalConfig.items``; students may get a system turn, ``EvalConfig.system_prompt``), then

* **accuracy** with a Wilson 95% interval (answers checked by :mod:`.verify`; HumanEval
  in the sandbox);
* **agreement**: share of items where the student's greedy output equals the teacher's
  (exact match after whitespace normalization);
* **KL(teacher ‖ student)**: mean per-token KL of the next-token distributions over the
  teacher's greedy completion (prompt + completion fed to both models; both must be local
  models with the same tokenizer);
* **ceiling ratio**: student accuracy ÷ teacher accuracy, with a paired-bootstrap 95% interval.

Output in ``--out``: ``report.md``, ``results.json``, ``samples.jsonl`` (every output and
verdict), ``config.json`` (replay with ``--config``) and PNG plots (student vs teacher bars;
score vs training examples when ``--train-examples`` is given).

The teacher's greedy outputs are cached on disk keyed by (revision, task, items,
max_new_tokens), so evaluating several students re-generates nothing for the teacher; a
student loaded from disk (a ``sha256:`` content-hash revision) is cached the same way.

Library use (what an experiment script calls)::

    from stillhouse.distill.evaluate import EvalConfig, LoadedModel, evaluate_models, load_items
    items = load_items("arithmetic2", limit=300)
    teacher = LoadedModel.load("bundled", label="teacher")
    student = LoadedModel(label="sft-1000", model=m, tokenizer=tok, revision="step-500")
    result = evaluate_models(items, "arithmetic2", teacher, [student], EvalConfig(students=()))
    result.students[0].accuracy      # Estimate(value, lo, hi, n)

Exception tree::

    EvalError           bad task, missing data or a model that cannot be evaluated
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stillhouse.distill.data import with_system
from stillhouse.distill.metrics import Estimate, accuracy, agreement, ceiling_ratio
from stillhouse.teacher.generate import Generation, chat_prompt_ids, generate
from stillhouse.watermark.green import DEFAULT_PARAMS

TASKS = ("arithmetic2", "arithmetic3", "gsm8k", "wordproblem", "humaneval")
DEFAULT_MAX_NEW_TOKENS = {"arithmetic2": 16, "arithmetic3": 16, "gsm8k": 320, "wordproblem": 80, "humaneval": 384}
CACHE_FORMAT = 3


class EvalError(Exception):
    """The evaluation cannot run as asked; the message says why and how to fix it."""


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation. Saved as ``config.json`` next to the report."""

    students: tuple[str, ...]
    """Student specs (``hf:DIR``, ``bundled``, ``gguf:FILE``). On the command line: ``--model SPEC``, repeated
    for several students; ``--model LABEL=SPEC`` also names one."""
    labels: tuple[str, ...] = ()
    """Display names, one per student; empty = derived from the specs."""
    teacher: str = "bundled"
    """Teacher spec: a local model (KL and agreement need its logits and greedy outputs)."""
    task: Literal["arithmetic2", "arithmetic3", "gsm8k", "wordproblem", "humaneval"] = "arithmetic2"
    """arithmetic2/3: held-out 2-/3-digit additions; gsm8k: the test split; wordproblem: held-out 2-step word
    problems (chain-of-thought prompt, GSM8K's answer parser); humaneval: all 164."""
    limit: int = 200
    """Number of held-out items."""
    seed: int = 0
    """Which held-out arithmetic items are drawn (the split itself does not depend on it)."""
    batch_size: int = 32
    """Prompts per generation batch (teacher.generate: equal-length prompts share their prefix's KV cache)."""
    max_new_tokens: int | None = None
    """Completion cap; None = the task's default (16 arithmetic, 320 GSM8K, 80 word problems, 384 HumanEval)."""
    kl: bool = True
    """Compute KL(teacher ‖ student) over the teacher's greedy completions."""
    kl_batch_size: int = 8
    """Sequences per forward pass for KL."""
    train_examples: tuple[int, ...] = ()
    """Training-set size behind each student (same order), for the score-vs-examples plot."""
    n_boot: int = 1000
    """Bootstrap resamples for the ceiling-ratio interval."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the models run; auto = cuda when torch sees a GPU, else cpu."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Model dtype for loading (float32 on a CPU)."""
    items: str = ""
    """A .jsonl of task items to evaluate on instead of the task's built-in held-out draw (rows of
    TaskItem.to_json, e.g. a split from tasks.arithmetic_splits); limit caps them, seed is unused."""
    system_prompt: str | None = None
    """System turn the students get on every item (None = their chat template's default): the
    system_prompt they were trained with. The teacher keeps its template's default."""
    watermark_teacher: str = ""
    """A watermark key id (e.g. server/eval/0): the teacher answers watermarked with it, as ``serve --watermark``
    would (the secret from watermark_secret_env). Give the teacher as a student too (--model plain=bundled) to
    score it both ways on the same items in one run."""
    watermark_secret_env: str = "STILLHOUSE_WATERMARK_SECRET"
    """Environment variable holding the watermark secret (for watermark_teacher)."""
    watermark_gamma: float = DEFAULT_PARAMS.gamma
    """Green share of the teacher's watermark (as serve's --watermark-gamma)."""
    watermark_delta: float = DEFAULT_PARAMS.delta
    """Logit bias of the teacher's watermark (as serve's --watermark-delta; the default is the scheme's,
    :class:`~stillhouse.watermark.green.WatermarkParams`, measured to keep the teacher's accuracy)."""
    watermark_context: int = DEFAULT_PARAMS.context
    """Context window of the teacher's watermark (as serve's --watermark-context)."""
    watermark_entropy: float = DEFAULT_PARAMS.entropy
    """Entropy gate of the teacher's watermark in nats (as serve's --watermark-entropy; 0 = none; the default is
    the scheme's, as for watermark_delta)."""

    def __post_init__(self) -> None:
        if self.watermark_teacher:
            from stillhouse.watermark.green import WatermarkParams
            from stillhouse.watermark.keys import KeyId

            KeyId.parse(self.watermark_teacher)  # raises naming the expected form
            WatermarkParams(self.watermark_gamma, self.watermark_delta, self.watermark_context, self.watermark_entropy)
        if isinstance(self.students, str):
            raise TypeError("students must be a tuple of specs, e.g. ('hf:runs/student',)")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: choose one of {', '.join(TASKS)}")
        if self.limit < 1:
            raise ValueError(f"limit={self.limit}: evaluate at least 1 item")
        if self.batch_size < 1 or self.kl_batch_size < 1:
            raise ValueError("batch_size and kl_batch_size must be >= 1")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: >= 1, or None for the task default")
        if self.labels and len(self.labels) != len(self.students):
            raise ValueError(f"{len(self.labels)} labels for {len(self.students)} students: give one per student")
        if self.train_examples and len(self.train_examples) != len(self.students):
            raise ValueError(f"{len(self.train_examples)} train_examples for {len(self.students)} students: "
                             "give one size per --model, in order")
        if self.n_boot < 10:
            raise ValueError(f"n_boot={self.n_boot}: at least 10")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: auto, cpu or cuda")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: float32, bfloat16 or float16")

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[self.task]


def max_new_tokens_for(task: str) -> int:
    """The completion cap of a task name (an EvalConfig task, or a TaskItem's: 'arithmetic', 'gsm8k', ...)."""
    return DEFAULT_MAX_NEW_TOKENS.get(task, 16 if task.startswith("arithmetic") else 320)


def parse_model_args(args: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``["sft=hf:dir", "hf:other"]`` → labels and specs (a label defaults to the spec's last part)."""
    labels, specs = [], []
    for a in args:
        label, sep, spec = a.partition("=")
        if not sep:
            spec, label = a, Path(a.split(":", 1)[-1]).name or a
        if not spec:
            raise ValueError(f"--model {a!r}: write SPEC or LABEL=SPEC, e.g. sft=hf:runs/sft")
        labels.append(label)
        specs.append(spec)
    return tuple(labels), tuple(specs)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EvalError("device=cuda but torch sees no GPU: use --device cpu or auto")
    return device


# -- items and models ----------------------------------------------------------------------------

def load_items(task: str, limit: int, seed: int = 0, path: str = "") -> list[Any]:
    """The held-out items of a task (:class:`~stillhouse.distill.tasks.TaskItem`): the first ``limit``
    of the file ``path`` when given, else the task's built-in held-out draw."""
    from stillhouse.distill import tasks

    try:
        if path:
            return tasks.read_items(path)[:limit]
        if task == "arithmetic2":
            return tasks.arithmetic(limit, "heldout", seed=seed, digits=(2,))
        if task == "arithmetic3":
            return tasks.arithmetic(limit, "heldout", seed=seed, digits=(3,))
        if task == "gsm8k":
            return tasks.gsm8k(limit, "test")
        if task == "wordproblem":
            return tasks.wordproblem_splits(limit, 0, 0, seed=seed)["heldout"]
        if task == "humaneval":
            return tasks.humaneval(limit)
    except (FileNotFoundError, ValueError) as exc:
        raise EvalError(str(exc)) from exc
    raise EvalError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")


@dataclass
class LoadedModel:
    """A model ready to evaluate: an HF causal LM and its tokenizer, plus provenance."""

    label: str
    model: Any
    tokenizer: Any
    revision: str
    spec: str = ""
    processor: Any = None
    """A logits processor ``(input_ids, scores) -> scores`` used in greedy generation (a watermark), or None."""

    @classmethod
    def load(cls, spec: str, label: str = "", device: str = "auto", dtype: str = "float32") -> LoadedModel:
        """Load a local spec (``bundled``, ``hf:DIR``, ``gguf:FILE``)."""
        from stillhouse.teacher.bundled import ModelNotFound, load_model
        from stillhouse.teacher.spec import parse_spec

        try:
            ts = parse_spec(spec)
        except ValueError as exc:
            raise EvalError(str(exc)) from exc
        if not ts.is_local:
            raise EvalError(f"{spec!r} is not a local model: eval needs white-box models "
                            "('bundled', 'hf:DIR' or 'gguf:FILE')")
        try:
            model, tok, rev = load_model(ts, dtype=dtype, device=resolve_device(device))
        except ModelNotFound as exc:
            raise EvalError(str(exc)) from exc
        return cls(label or Path(ts.target).name or spec, model, tok, rev, spec)

    @property
    def n_params(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))


def kl_to_teacher(
    teacher: LoadedModel,
    student: LoadedModel,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    batch_size: int = 8,
) -> tuple[float, list[float]]:
    """KL(teacher ‖ student) over completion tokens: (token-weighted mean, per-item means).

    Each sequence is prompt + completion; the logits at position t predict token t+1, so the
    completion's tokens are predicted by positions ``len(prompt)-1 ... len(seq)-2``.
    """
    import torch

    from stillhouse.distill.metrics import kl_per_position

    if len(teacher.tokenizer) != len(student.tokenizer) or teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise EvalError("KL needs the teacher and student to share a tokenizer; these differ (pass --no-kl)")
    vocab = len(teacher.tokenizer)
    pad = teacher.tokenizer.pad_token_id or 0
    t_dev = next(teacher.model.parameters()).device
    s_dev = next(student.model.parameters()).device
    total, count = 0.0, 0
    per_item: list[float] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [list(p) + list(c) for p, c in zip(prompts[start:start + batch_size],
                                                  completions[start:start + batch_size])]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, :len(s)] = 1
        with torch.inference_mode():
            tl = teacher.model(input_ids=ids.to(t_dev), attention_mask=mask.to(t_dev), use_cache=False).logits
            sl = student.model(input_ids=ids.to(s_dev), attention_mask=mask.to(s_dev), use_cache=False).logits
            kl = kl_per_position(tl[..., :vocab].float().cpu(), sl[..., :vocab].float().cpu())
        for r, (p, c) in enumerate(zip(prompts[start:start + batch_size], completions[start:start + batch_size])):
            if not c:
                per_item.append(float("nan"))
                continue
            vals = kl[r, len(p) - 1: len(p) - 1 + len(c)]
            per_item.append(float(vals.mean()))
            total += float(vals.sum())
            count += len(c)
    return (total / count if count else float("nan")), per_item


# -- scoring -------------------------------------------------------------------------------------

def score_outputs(task: str, items: Sequence[Any], texts: Sequence[str], sandbox_timeout_s: float = 5.0) -> list[Any]:
    """Verdicts (:class:`~stillhouse.distill.verify.Check`) for each output."""
    from stillhouse.distill.sandbox import SandboxConfig
    from stillhouse.distill.verify import answer_style, check_code, check_numeric

    verdicts = []
    for item, text in zip(items, texts):
        if task == "humaneval":
            problem = {"prompt": item.meta["prompt"], "test": item.tests, "entry_point": item.entry_point}
            verdicts.append(check_code(text, problem, config=SandboxConfig(timeout_s=sandbox_timeout_s)))
        else:
            verdicts.append(check_numeric(text, item.answer, answer_style(task)))
    return verdicts


def _num(x: float | None) -> float | None:
    """A JSON-safe number: NaN (an undefined ratio, an empty completion) becomes null."""
    return None if x is None or math.isnan(x) else round(float(x), 6)


@dataclass
class ModelScore:
    """One model's results on the items."""

    label: str
    spec: str
    revision: str
    n_params: int
    accuracy: Estimate
    outputs: list[str]
    correct: list[bool]
    reasons: list[str]
    agreement: Estimate | None = None
    kl: float | None = None
    kl_items: list[float] | None = None
    """Per-item mean KL over that item's teacher completion."""
    ceiling: Estimate | None = None
    train_examples: int | None = None
    gen_seconds: float = 0.0
    tokens_generated: int = 0
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        def est(e: Estimate | None) -> dict[str, float | None] | None:
            return None if e is None else {"value": _num(e.value), "lo": _num(e.lo), "hi": _num(e.hi), "n": e.n}

        return {"label": self.label, "spec": self.spec, "revision": self.revision, "n_params": self.n_params,
                "accuracy": est(self.accuracy), "agreement": est(self.agreement), "kl": _num(self.kl),
                "ceiling_ratio": est(self.ceiling), "train_examples": self.train_examples,
                "gen_seconds": round(self.gen_seconds, 3), "tokens_generated": self.tokens_generated,
                "outputs_cached": self.cached}


@dataclass
class EvalResult:
    """Teacher and students on the same items."""

    task: str
    item_ids: list[str]
    teacher: ModelScore
    students: list[ModelScore] = field(default_factory=list)
    config: EvalConfig | None = None

    def to_json(self) -> dict[str, Any]:
        from stillhouse.config import config_to_dict

        return {"task": self.task, "n_items": len(self.item_ids), "teacher": self.teacher.to_json(),
                "students": [s.to_json() for s in self.students],
                "config": config_to_dict(self.config) if self.config else None}

    def rows(self) -> list[list[str]]:
        """Table rows: model, params, accuracy [CI], agreement, KL, ceiling ratio [CI]."""
        out = []
        for s in [self.teacher, *self.students]:
            acc = f"{s.accuracy.value:.3f} [{s.accuracy.lo:.3f}, {s.accuracy.hi:.3f}]"
            agr = "—" if s.agreement is None else f"{s.agreement.value:.3f}"
            kl = "—" if s.kl is None else f"{s.kl:.4f}"
            if s.ceiling is None:
                ceil = "1 (teacher)" if s is self.teacher else "—"
            elif math.isnan(s.ceiling.value):
                ceil = "undefined (teacher scored 0)"
            else:
                ceil = f"{s.ceiling.value:.2f} [{s.ceiling.lo:.2f}, {s.ceiling.hi:.2f}]"
            out.append([s.label, f"{s.n_params / 1e6:.1f}M", acc, agr, kl, ceil])
        return out

    HEADER = ("model", "params", "accuracy [95% CI]", "agreement", "KL(T‖S)", "ceiling ratio [95% CI]")

    def table(self) -> Any:
        from rich.table import Table

        t = Table(title=f"{self.task}: {len(self.item_ids)} held-out items")
        for h in self.HEADER:
            t.add_column(h, justify="left" if h == "model" else "right")
        for r in self.rows():
            t.add_row(*r)
        return t

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADER) + " |", "|" + "---|" * len(self.HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows()]
        return "\n".join(lines)


# -- the teacher cache ---------------------------------------------------------------------------

def teacher_cache_key(revision: str, task: str, items: Sequence[Any], max_new_tokens: int,
                      conversations: Sequence[list[dict[str, Any]]] | None = None) -> str:
    """A key that changes with the model's weights, the task, the exact items (as sent: ``conversations``
    when they differ from the items' messages, e.g. with a system turn) and the cap."""
    convs = conversations if conversations is not None else [it.messages for it in items]
    blob = json.dumps({"format": CACHE_FORMAT, "revision": revision, "task": task, "max_new_tokens": max_new_tokens,
                       "items": [[it.id, c] for it, c in zip(items, convs)]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _load_cached(path: Path) -> list[Generation] | None:
    try:
        data = json.loads(path.read_text())
        return [Generation(g["text"], list(g["token_ids"]), g["finish_reason"], g.get("stop_id"))
                for g in data["generations"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- the evaluation ------------------------------------------------------------------------------

def evaluate_models(
    items: Sequence[Any],
    task: str,
    teacher: LoadedModel,
    students: Sequence[LoadedModel],
    config: EvalConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    train_examples: Sequence[int | None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> EvalResult:
    """Score the teacher and every student on ``items``; the library core of ``stillhouse eval``."""
    from stillhouse.config import atomic_write_text

    cfg = config or EvalConfig(students=(), task=task)  # type: ignore[arg-type]
    if not items:
        raise EvalError("no items to evaluate")
    max_new = cfg.new_tokens
    convs = [it.messages for it in items]
    s_convs = [with_system(list(c), cfg.system_prompt) for c in convs]

    def gen(lm: LoadedModel, conversations: list[list[dict[str, Any]]]) -> tuple[list[Generation], float]:
        t0 = time.perf_counter()
        cb = (lambda done: progress(f"generate {lm.label}", done, len(conversations))) if progress else None
        prompts = [chat_prompt_ids(lm.tokenizer, c) for c in conversations]
        gens = generate(lm.model, lm.tokenizer, prompts, max_new, batch_size=cfg.batch_size, progress=cb,
                        logits_processor=lm.processor)
        return gens, time.perf_counter() - t0

    def gen_cached(lm: LoadedModel, always: bool,
                   conversations: list[list[dict[str, Any]]]) -> tuple[list[Generation], float, bool]:
        """Outputs from the cache when the revision, task, items and cap match. The teacher is
        always cached; a student only when its revision is a content hash (sha256:...), since an
        in-memory model's label-like revision may not change when its weights do."""
        path: Path | None = None
        if cache_dir is not None and (always or lm.revision.startswith("sha256:")):
            key = teacher_cache_key(lm.revision, task, items, max_new, conversations)
            path = Path(cache_dir) / f"greedy-{key}.json"
        hit = _load_cached(path) if path is not None and path.is_file() else None
        if hit is not None and len(hit) == len(items):
            return hit, 0.0, True
        gens, secs = gen(lm, conversations)
        if path is not None:
            atomic_write_text(path, json.dumps({
                "revision": lm.revision, "task": task, "max_new_tokens": max_new,
                "item_ids": [it.id for it in items],
                "generations": [{"text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason,
                                 "stop_id": g.stop_id} for g in gens]}))
        return gens, secs, False

    t_gens, t_secs, cached = gen_cached(teacher, True, convs)
    t_texts = [g.text for g in t_gens]
    t_verdicts = score_outputs(task, items, t_texts)
    t_correct = [v.ok for v in t_verdicts]
    t_score = ModelScore(teacher.label, teacher.spec, teacher.revision, teacher.n_params, accuracy(t_correct),
                         t_texts, t_correct, [v.reason for v in t_verdicts], gen_seconds=t_secs,
                         tokens_generated=sum(len(g.token_ids) for g in t_gens), cached=cached)

    t_prompts = [chat_prompt_ids(teacher.tokenizer, list(c)) for c in convs]
    # the completion as the teacher produced it, including its stop token: ending is learnt too
    t_completions = [g.token_ids + ([g.stop_id] if g.stop_id is not None else []) for g in t_gens]

    sizes: list[int | None] = (list(train_examples) if train_examples is not None
                               else list(cfg.train_examples) or [None] * len(students))
    scores: list[ModelScore] = []
    for lm, n_train in zip(students, sizes + [None] * (len(students) - len(sizes))):
        gens, secs, hit = gen_cached(lm, False, s_convs)
        texts = [g.text for g in gens]
        verdicts = score_outputs(task, items, texts)
        correct = [v.ok for v in verdicts]
        kl, kl_items = None, None
        if cfg.kl:
            if progress:
                progress(f"KL {lm.label}", 0, 1)
            try:
                kl, kl_items = kl_to_teacher(teacher, lm, t_prompts, t_completions, cfg.kl_batch_size)
            except EvalError:
                kl = None  # a different tokenizer: no shared next-token distribution to compare
            if progress:
                progress(f"KL {lm.label}", 1, 1)
        scores.append(ModelScore(
            lm.label, lm.spec, lm.revision, lm.n_params, accuracy(correct), texts, correct,
            [v.reason for v in verdicts], agreement=agreement(texts, t_texts), kl=kl, kl_items=kl_items,
            ceiling=ceiling_ratio(correct, t_correct, n_boot=cfg.n_boot, seed=cfg.seed),
            train_examples=n_train, gen_seconds=secs, tokens_generated=sum(len(g.token_ids) for g in gens),
            cached=hit))
    return EvalResult(task, [it.id for it in items], t_score, scores, cfg)


def write_report(result: EvalResult, out_dir: str | Path, command: str = "") -> Path:
    """report.md, results.json, samples.jsonl, config.json and the plots; returns report.md's path."""
    from stillhouse.config import atomic_write_text, save_config
    from stillhouse.distill import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(result.to_json(), indent=2) + "\n")
    if result.config is not None:
        save_config(result.config, out / "config.json")
    lines = []
    for k, iid in enumerate(result.item_ids):
        rec: dict[str, Any] = {"id": iid}
        for s in [result.teacher, *result.students]:
            rec[s.label] = {"output": s.outputs[k], "correct": s.correct[k], "reason": s.reasons[k]}
            if s.kl_items is not None:
                rec[s.label]["kl"] = _num(s.kl_items[k])
        lines.append(json.dumps(rec, ensure_ascii=False))
    atomic_write_text(out / "samples.jsonl", "\n".join(lines) + "\n")

    pngs = [plots.student_vs_teacher(result, out / "student_vs_teacher.png")]
    sized = [s for s in result.students if s.train_examples is not None]
    if sized:
        series = {"student": [(int(s.train_examples), s.accuracy) for s in sized]}  # type: ignore[arg-type]
        pngs.append(plots.score_vs_examples(series, out / "score_vs_examples.png", teacher=result.teacher.accuracy,
                                            title=f"{result.task}: accuracy vs training examples"))
    t = result.teacher
    intro = (f"{len(result.item_ids)} held-out items, greedy decoding. Teacher: `{t.spec or t.label}` "
             f"(revision `{t.revision[:20]}`, {t.n_params / 1e6:.1f}M parameters).")
    md = [f"# Evaluation: {result.task}", "", intro, ""]
    if command:
        md += ["Command:", "", "```", command, "```", ""]
    md += [result.markdown(), "",
           "- accuracy: Wilson 95% interval; agreement: exact match with the teacher's greedy output;",
           "- KL(T‖S): mean per-token KL over the teacher's greedy completions (nats);",
           "- ceiling ratio: student ÷ teacher accuracy, paired bootstrap 95% interval.", ""]
    for p in pngs:
        md.append(f"![{p.stem}]({p.name})")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return out / "report.md"


def watermark_model(lm: LoadedModel, cfg: EvalConfig) -> None:
    """Make ``lm`` answer watermarked with ``cfg.watermark_teacher``'s key; its label and revision say so
    (so cached unwatermarked outputs are never reused)."""
    from stillhouse.watermark.green import RowWatermark, WatermarkParams, batch_processor, vocab_hashes
    from stillhouse.watermark.keys import WatermarkKeyError, derive_key, key_u64, load_secret

    params = WatermarkParams(cfg.watermark_gamma, cfg.watermark_delta, cfg.watermark_context, cfg.watermark_entropy)
    try:
        key = key_u64(derive_key(load_secret(cfg.watermark_secret_env), cfg.watermark_teacher))
    except WatermarkKeyError as exc:
        raise EvalError(str(exc)) from None
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    lm.processor = batch_processor(RowWatermark(key, params, vocab_hashes(vocab), cfg.watermark_teacher))
    lm.label += "+watermark"
    lm.revision += (f"+watermark:{cfg.watermark_teacher}:g{params.gamma:g}:d{params.delta:g}:h{params.context}"
                    + (f":e{params.entropy:g}" if params.entropy else ""))


def run_eval(cfg: EvalConfig, out_dir: str | Path, *, cache_dir: str | Path | None = None,
             console: Any = None) -> EvalResult:
    """Load the models a config names, evaluate, write the report. What ``stillhouse eval`` runs."""
    import shlex
    import sys

    from stillhouse.progress import step_bars

    out = Path(out_dir)
    if not cfg.students:
        raise EvalError("no students: pass --model SPEC at least once")
    items = load_items(cfg.task, cfg.limit, cfg.seed, cfg.items)
    cache = Path(cache_dir) if cache_dir else out.parent / ".eval-cache"
    teacher = LoadedModel.load(cfg.teacher, label="teacher", device=cfg.device, dtype=cfg.dtype)
    if cfg.watermark_teacher:
        watermark_model(teacher, cfg)
    labels = cfg.labels or parse_model_args(cfg.students)[0]
    students = [LoadedModel.load(spec, label=label, device=cfg.device, dtype=cfg.dtype)
                for spec, label in zip(cfg.students, labels)]
    with step_bars(console, remaining=False) as progress:
        result = evaluate_models(items, cfg.task, teacher, students, cfg, cache_dir=cache, progress=progress)
    write_report(result, out, command="stillhouse " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    return result
