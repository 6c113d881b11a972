"""Verified rationales (STaR-style, Zelikman et al. 2022): sample several chains of thought per problem from a
local teacher, keep one only when its final answer verifies, and count what each kept example cost.

    from stillhouse.distill.rationales import RationaleConfig, sample_rationales, cost_report
    rows = sample_rationales(model, tok, items, RationaleConfig(samples=4, temperature=0.7, max_new_tokens=80))
    write_rows(rows, "rationales.jsonl")     # every sample, right or wrong; train with only_correct=True
    cost_report(rows)                         # {'teacher_tokens': ..., 'kept': ..., 'tokens_per_kept': ...}

Each row is a training row (:mod:`stillhouse.distill.data`): the problem's messages ending with the teacher's
answer, its token ids (for a student of the same tokenizer), ``correct`` and ``reason`` from the task's verifier
(:func:`stillhouse.distill.evaluate.score_outputs`: GSM8K's answer parser for word problems), ``kept`` (verified
and not a repeat of an earlier kept text for the same problem, at most ``keep_per_problem`` per problem) and
``teacher_tokens`` (the completion tokens this sample cost). Rows that fail are kept in the file, with their
reason: nothing is dropped silently. The teacher's cost of a kept example is every sampled token, the failed
samples' included, divided by the kept rows.

Sampling is batched and seeded (:func:`stillhouse.teacher.generate.generate`, ``seed + round``), so a rerun draws
the same samples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RationaleConfig:
    """How rationales are sampled and which are kept."""

    samples: int = 4
    """Chains of thought sampled per problem."""
    temperature: float = 0.7
    """Sampling temperature (0 = greedy: then one sample per problem is all there is)."""
    max_new_tokens: int = 80
    """Most tokens per chain of thought."""
    keep_per_problem: int = 1
    """Most verified rationales kept per problem (distinct texts, earliest first); 0 = all."""
    seed: int = 0
    """Sampling seed; round r uses seed + 1000 * r."""
    batch_size: int = 64
    """Prompts per generation batch."""

    def __post_init__(self) -> None:
        if self.samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"samples={self.samples}, max_new_tokens={self.max_new_tokens}, batch_size="
                             f"{self.batch_size}: each must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature}: must be in [0, 2]")
        if self.temperature == 0.0 and self.samples > 1:
            raise ValueError("temperature=0 (greedy) gives the same answer every time: use samples=1, or a "
                             "temperature above 0")
        if self.keep_per_problem < 0:
            raise ValueError(f"keep_per_problem={self.keep_per_problem}: must be >= 0 (0 = all)")


def sample_rationales(model: Any, tok: Any, items: Sequence[Any], cfg: RationaleConfig,
                      system_prompt: str | None = None,
                      progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """``cfg.samples`` chains of thought per item (TaskItems with an ``answer``), verified; one row per sample,
    in item order then sample order. ``system_prompt`` as in :func:`stillhouse.distill.data.with_system`."""
    from stillhouse.distill.data import with_system
    from stillhouse.distill.evaluate import score_outputs
    from stillhouse.teacher.generate import chat_prompt_ids, generate

    convs = [with_system(list(it.messages), system_prompt) for it in items]
    prompts = [chat_prompt_ids(tok, c) for c in convs]
    rounds = []
    for r in range(cfg.samples):
        gens = generate(model, tok, prompts, cfg.max_new_tokens, batch_size=cfg.batch_size,
                        temperature=cfg.temperature, seed=cfg.seed + 1000 * r if cfg.temperature > 0 else None)
        scored = []
        for task in sorted({it.task for it in items}):  # one verifier per task kind
            idx = [i for i, it in enumerate(items) if it.task == task]
            for i, v in zip(idx, score_outputs(task, [items[i] for i in idx], [gens[i].text for i in idx])):
                scored.append((i, v))
        rounds.append((gens, dict(scored)))
        if progress is not None:
            progress(r + 1, cfg.samples)
    rows = []
    for i, (it, conv) in enumerate(zip(items, convs)):
        for r, (gens, verdicts) in enumerate(rounds):
            g, v = gens[i], verdicts[i]
            rows.append({"id": f"{it.id}/s{r}", "problem_id": it.id, "task": it.task,
                         "messages": [*conv, {"role": "assistant", "content": g.text}], "token_ids": g.token_ids,
                         "answer": it.answer, "correct": v.ok, "reason": v.reason, "kept": False, "sample": r,
                         "finish_reason": g.finish_reason,
                         "teacher_tokens": len(g.token_ids) + (1 if g.stop_id is not None else 0),
                         "temperature": cfg.temperature})
    return mark_kept(rows, cfg.keep_per_problem)


def mark_kept(rows: list[dict[str, Any]], keep_per_problem: int = 1) -> list[dict[str, Any]]:
    """Set each row's ``kept``: verified, not the text of an earlier kept row of the same problem, and at most
    ``keep_per_problem`` per problem (0 = every distinct verified text), in row order. Returns ``rows``."""
    if keep_per_problem < 0:
        raise ValueError(f"keep_per_problem={keep_per_problem}: must be >= 0 (0 = all)")
    kept: dict[str, list[str]] = {}
    for r in rows:
        texts = kept.setdefault(r["problem_id"], [])
        text = r["messages"][-1]["content"]
        r["kept"] = bool(r["correct"]) and text not in texts and (not keep_per_problem or len(texts) < keep_per_problem)
        if r["kept"]:
            texts.append(text)
    return rows


def cost_report(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Problems, samples, verified samples, problems with a verified sample (pass@k), kept rows, teacher tokens,
    and teacher tokens per kept row (every sample's tokens, the failed ones' included)."""
    problems = {r["problem_id"] for r in rows}
    solved = {r["problem_id"] for r in rows if r["correct"]}
    kept = sum(1 for r in rows if r["kept"])
    tokens = sum(int(r["teacher_tokens"]) for r in rows)
    return {"problems": len(problems), "samples": len(rows), "verified_samples": sum(1 for r in rows if r["correct"]),
            "sample_accuracy": round(sum(1 for r in rows if r["correct"]) / max(1, len(rows)), 4),
            "problems_solved": len(solved), "kept": kept, "teacher_tokens": tokens,
            "tokens_per_kept": round(tokens / kept, 1) if kept else None,
            "kept_tokens": sum(int(r["teacher_tokens"]) for r in rows if r["kept"])}


def write_rows(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], *, kept_only: bool = False) -> Path:
    """Rows as JSONL (atomically); ``kept_only`` writes only the kept rows (a training file) and raises
    ValueError when there are none."""
    from stillhouse.config import atomic_write_text

    chosen = [r for r in rows if r["kept"]] if kept_only else list(rows)
    if not chosen:
        raise ValueError(f"no rows to write to {path}: no sample verified; sample more (samples, temperature) or "
                         "choose an easier task")
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen))
    return Path(path)
