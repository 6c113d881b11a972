"""Capability leaked: what the examples that got past the guard are worth to a student.

The arena's main run counts leaked *examples*; this stage measures leaked *capability*
with the distill pipeline's own training and evaluation:

1. serve the real teacher (``CapabilityConfig.teacher``, the bundled SmolLM2 by default) on
   loopback (``stillhouse.serve.app``, continuous batching);
2. run the ``harvest`` campaign shape (generated additions in the distill template, see
   :mod:`.campaigns`) in simulated time through a real guard with the arena's fitted
   detector and its policy engine enforcing, to that teacher. Only campaign traffic is
   sent: per-account scores do not depend on other accounts' traffic, and the detector's
   thresholds were calibrated on benign traffic alone;
3. the **leaked set** = the answers the guard let through before the block; the **full
   harvest** = every planned prompt answered by the same teacher without a guard (answers
   already received through the guard are reused, the refused ones are asked directly);
4. both sets are verified like ``stillhouse curate`` does (``stillhouse.distill.verify``:
   the sum after "=") and, with ``verified_only``, only correct rows are kept — the recipe
   that takes a self-distilled student past this teacher (docs/results.md);
5. two students from the same init (``student``, ``self`` = a copy of the teacher) trained
   by SFT with ``stillhouse.distill.train`` on each set, same hyperparameters;
6. init, leaked-data and full-harvest students scored by ``stillhouse.distill.evaluate`` on
   held-out 2-digit additions (greedy), each with a Wilson 95% interval, and the gain ratio
   (leaked gain / full gain over the init) with a paired-bootstrap interval
   (:func:`stillhouse.arena.metrics.gain_ratio`). Goal: at most 0.5.

Run: ``stillhouse arena --capability`` (after the main arena), or on a fitted detector::

    stillhouse arena --capability-only --out RUN     # RUN/detector from an earlier arena run

Cost on 2 CPU cores with the defaults (300 planned requests, 100 eval items): minutes,
dominated by the teacher's answers through the guard and the two SFT runs.

Exception tree::

    ValueError
    └── CapabilityError     the stage cannot run as configured (names the field or the missing piece)
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stillhouse.arena.review import REVIEWERS, QueueReviewer, ReviewerKind

SERVED_NAME = "arena-teacher"


class CapabilityError(ValueError):
    """The capability stage cannot run as configured; the message names the problem and the fix."""


@dataclass(frozen=True)
class CapabilityConfig:
    """The capability-leaked stage of the arena (``stillhouse arena --capability``)."""

    teacher: str = "bundled"
    """Local teacher spec (bundled, hf:DIR, gguf:FILE): served to the campaign and the students' init."""
    student: str = "self"
    """Student init for ``stillhouse.distill.train`` (self = a copy of the teacher; pruned:N ...)."""
    accounts: int = 3
    """Campaign accounts of the harvest."""
    requests_per_account: int = 100
    """Planned requests per account (planned examples = accounts x this)."""
    days: float = 1.0
    """Simulated span of the harvest (Poisson arrivals around the clock)."""
    seed: int = 500
    """Campaign seed (which training additions are asked; held out from every calibration)."""
    verified_only: bool = True
    """Train only on rows whose answer verifies (as ``stillhouse curate`` keeps them)."""
    epochs: int = 3
    """SFT epochs of each student (the recipe of ``make demo``, scripts/demo.py, the same for both)."""
    batch_size: int = 8
    """SFT batch size of each student."""
    lr: float = 5e-5
    """SFT learning rate of each student."""
    warmup_steps: int = 2
    """SFT warmup steps of each student."""
    eval_limit: int = 100
    """Held-out 2-digit additions (``stillhouse eval --task arithmetic2``)."""
    eval_seed: int = 0
    """Which held-out additions are drawn for the evaluation."""
    threads: int = 1
    """torch CPU threads for serving, training and eval (1 is fastest on a shared 2-core machine)."""
    max_batch: int = 16
    """Continuous-batching width of the served teacher (the unguarded re-asks run concurrently)."""
    concurrency: int = 3
    """Turns of different accounts sent through the guard at once (``run_traffic(concurrency=)``), so
    the real teacher batches them; 1 = strictly one at a time."""
    review_every_h: float = 0.0
    """An operator works the guard's review queue every this many simulated hours of the harvest
    (:mod:`.review`); 0 = nobody reviews. Inside ``stillhouse arena --capability`` a 0 here takes the
    arena's own ``review_every_h`` and ``reviewer`` (the same operator works both stages)."""
    reviewer: ReviewerKind = "oracle"
    """Who reviews: 'oracle' or 'rubber-stamp' (:mod:`.review`). Only campaign traffic is sent here, so
    both block every account the detector degraded for review, an oracle also the throttled ones."""

    def __post_init__(self) -> None:
        for name in ("accounts", "requests_per_account", "epochs", "batch_size", "eval_limit", "threads",
                     "max_batch", "concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CapabilityError(f"CapabilityConfig.{name}={value!r}: must be an integer >= 1")
        if self.days <= 0:
            raise CapabilityError(f"CapabilityConfig.days={self.days}: must be > 0")
        if not self.review_every_h >= 0:
            raise CapabilityError(f"CapabilityConfig.review_every_h={self.review_every_h}: 0 (no review) or a "
                                  "positive number of simulated hours, e.g. 24")
        if self.reviewer not in REVIEWERS:
            raise CapabilityError(f"CapabilityConfig.reviewer={self.reviewer!r}: use one of {list(REVIEWERS)}")
        if not self.lr > 0:
            raise CapabilityError(f"CapabilityConfig.lr={self.lr}: must be > 0, e.g. 5e-5")
        if self.warmup_steps < 0:
            raise CapabilityError(f"CapabilityConfig.warmup_steps={self.warmup_steps}: must be >= 0")
        from stillhouse.teacher.spec import parse_spec

        try:
            local = parse_spec(self.teacher).is_local
        except ValueError as exc:
            raise CapabilityError(f"CapabilityConfig.teacher: {exc}") from exc
        if not local:  # the campaign goes to a teacher this process loads and serves on loopback
            raise CapabilityError(f"CapabilityConfig.teacher={self.teacher!r}: give a local model (bundled, "
                                  "hf:DIR or gguf:FILE); the campaign only reaches a teacher served on this machine")
        from stillhouse.distill.student import parse_student

        try:
            parse_student(self.student)
        except ValueError as exc:
            raise CapabilityError(f"CapabilityConfig.student: {exc}") from exc


def with_operator(cfg: CapabilityConfig, every_h: float, reviewer: ReviewerKind) -> CapabilityConfig:
    """``cfg`` with the arena's review operator when it names none of its own (the same operator works the
    evaluation's queue and this stage's)."""
    if cfg.review_every_h == 0 and every_h > 0:
        return replace(cfg, review_every_h=every_h, reviewer=reviewer)
    return cfg


def _rows(pairs: list[tuple[str, str]], answers: dict[str, str]) -> list[dict[str, Any]]:
    """Training rows (chat messages ending with the teacher's answer) with their verification."""
    from stillhouse.distill.verify import verify

    rows = []
    for prompt, text in pairs:
        check = verify("arithmetic", text, answers[prompt])
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}],
                     "correct": check.ok, "reason": check.reason, "answer": answers[prompt]})
    return rows


async def _ask_directly(base_url: str, prompts: list[str], params: dict[str, Any], concurrency: int) -> list[str]:
    """The unguarded harvest: each prompt straight to the served teacher (bounded concurrency)."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, prompt: str) -> str:
        async with sem:
            body = {"model": SERVED_NAME, "messages": [{"role": "user", "content": prompt}], **params}
            async with session.post(f"{base_url}/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    raise CapabilityError(f"the teacher answered {r.status} to an unguarded request: "
                                          f"{(await r.text())[:200]}")
                data = await r.json()
                return str(data["choices"][0]["message"]["content"])

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return list(await asyncio.gather(*(one(session, p) for p in prompts)))


def _train(cfg: CapabilityConfig, rows: list[dict[str, Any]], out: Path, loaded: tuple[Any, Any, str]) -> Path | None:
    """SFT the student on ``rows``; returns the exported HF dir, or None when there is nothing to train on."""
    from stillhouse.distill.train import TrainConfig, train

    if not rows:
        return None
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    tcfg = TrainConfig(data=str(data), out=str(out / "student"), teacher=cfg.teacher, student=cfg.student,
                       loss="sft", epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       warmup_steps=cfg.warmup_steps, threads=cfg.threads, device="cpu")
    return train(tcfg, teacher=loaded, progress=False).final_dir


def run_capability(cfg: CapabilityConfig, detector_dir: str | Path, out_dir: str | Path,
                   loaded: tuple[Any, Any, str] | None = None, progress: Any = None,
                   detector: Any = None) -> dict[str, Any]:
    """The whole stage (module docstring); returns its metrics (also ``capability.json`` in ``out_dir``).

    ``loaded`` = an already loaded ``(model, tokenizer, revision)`` teacher (tests pass a tiny
    model); otherwise ``cfg.teacher`` is loaded. ``detector`` = a detector object to use instead
    of the fitted one in ``detector_dir`` (tests pass a stand-in).
    """
    import torch

    from stillhouse.arena import metrics as m
    from stillhouse.arena.campaigns import CampaignConfig, generate_campaign
    from stillhouse.config import save_config
    from stillhouse.distill.tasks import arithmetic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A rerun starts the stage over. Its outputs are all derived, and the old guard store still holds
    # the blocks it enforced: a rerun on it was refused from its first request and "leaked" nothing.
    for name in ("guard", "leaked", "full"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("leaked.jsonl", "full.jsonl", "capability.json"):
        (out / name).unlink(missing_ok=True)
    save_config(cfg, out / "capability_config.json")
    if detector is None and not (Path(detector_dir) / "detector.json").exists():
        raise CapabilityError(f"no fitted detector in {detector_dir}: run `stillhouse arena` first (it writes "
                              "RUN/detector/), or point --out at a run that has one")
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    if loaded is None:
        from stillhouse.distill.modelio import load_causal_lm

        loaded = load_causal_lm(cfg.teacher)
    rev = loaded[2]
    timings["load_s"] = time.perf_counter() - t_all

    spec = CampaignConfig(shape="harvest", accounts=cfg.accounts, requests_per_account=cfg.requests_per_account,
                          days=cfg.days, seed=cfg.seed, name="capability-harvest")
    accounts, turns = generate_campaign(spec)
    answers = {str(it.messages[-1]["content"]): str(it.answer)
               for it in arithmetic(cfg.accounts * cfg.requests_per_account, "train", seed=cfg.seed)}

    result, leaked_pairs, full_pairs, missing, review = _harvest(cfg, out, loaded, detector, detector_dir, accounts,
                                                                 turns, progress, timings)

    leaked_rows, full_rows = _rows(leaked_pairs, answers), _rows(full_pairs, answers)
    for name, rows in (("leaked", leaked_rows), ("full", full_rows)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    keep = (lambda rows: [r for r in rows if r["correct"]]) if cfg.verified_only else (lambda rows: rows)
    train_leaked, train_full = keep(leaked_rows), keep(full_rows)

    # 3. two students from the same init, same recipe.
    t = time.perf_counter()
    dirs = {"full": _train(cfg, train_full, out / "full", loaded)}
    # nothing refused: the leaked set is the full harvest, and so is its student (same data, same seed)
    dirs["leaked"] = dirs["full"] if not missing else _train(cfg, train_leaked, out / "leaked", loaded)
    timings["train_s"] = time.perf_counter() - t

    # 4. evaluate init (= the teacher for 'self'), leaked and full students on the same held-out items.
    t = time.perf_counter()
    correct, scores, n_items = _evaluate(cfg, loaded, dirs)
    timings["eval_s"] = time.perf_counter() - t
    ratio = m.gain_ratio(correct["init"], correct["leaked"], correct["full"])
    timings["total_s"] = time.perf_counter() - t_all

    outcome = result.outcomes
    first_block = [o.first_block for o in outcome.values() if o.first_block is not None]
    metrics = {
        "config": json.loads((out / "capability_config.json").read_text()),
        "teacher_revision": rev,
        "planned": len(turns), "sent": sum(o.sent for o in outcome.values()),
        "leaked": len(leaked_pairs), "leaked_share": len(leaked_pairs) / len(turns) if turns else 0.0,
        "blocked_accounts": len(first_block), "accounts": len(accounts),
        "leaked_verified": len(train_leaked) if cfg.verified_only else sum(r["correct"] for r in leaked_rows),
        "full_verified": sum(r["correct"] for r in full_rows),
        "train_rows": {"leaked": len(train_leaked), "full": len(train_full)},
        "trained": {k: v is not None for k, v in dirs.items()},
        "eval_items": n_items,
        "accuracy": {k: {"value": e.value, "lo": e.lo, "hi": e.hi, "n": e.n} for k, e in scores.items()},
        "review": review or "nobody reviews (review_every_h 0)",
        "gain_ratio": ratio,
        "goal_met": bool(ratio["value"] <= 0.5) if ratio["value"] == ratio["value"] else None,
        "timings_s": timings,
    }
    (out / "capability.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics


def _harvest(cfg: CapabilityConfig, out: Path, loaded: tuple[Any, Any, str], detector: Any, detector_dir: str | Path,
             accounts: Any, turns: Any, progress: Any,
             timings: dict[str, float]) -> tuple[Any, list, list, list, dict[str, Any] | None]:
    """Steps 1-2: the campaign through the guard in front of the real teacher served on loopback (and the
    review queue's operator, with ``cfg.review_every_h``), then the prompts it refused straight to the same
    teacher. Returns (traffic result, leaked (prompt, answer) pairs, the full harvest's pairs, the refused
    prompts, the operator's summary or None)."""
    from stillhouse.arena.campaigns import HARVEST_MAX_TOKENS
    from stillhouse.arena.simulate import GuardGateway, RecordingGateway, SimClock, run_traffic
    from stillhouse.guard.detect import WindowDetector
    from stillhouse.http.server import ServerThread
    from stillhouse.serve.app import ServeConfig, create_app
    from stillhouse.teacher.batcher import BatchConfig
    from stillhouse.teacher.local import LocalTeacher

    model, tok, rev = loaded
    params = {"max_tokens": HARVEST_MAX_TOKENS, "temperature": 0.0}
    teacher = LocalTeacher(model, tok, name=SERVED_NAME, revision=rev, batch=BatchConfig(max_batch=cfg.max_batch))
    app = create_app(teacher, ServeConfig(served_name=SERVED_NAME, max_batch=cfg.max_batch, threads=cfg.threads))
    if detector is None:
        detector = WindowDetector.load(detector_dir)
    with ServerThread(app) as server:
        base = server.base_url.removesuffix("/v1")
        # 1. the campaign through the guard (detector + policy enforcing), in simulated time.
        t = time.perf_counter()
        clock = SimClock()
        guard = GuardGateway(str(out / "guard"), base, detector, clock, accounts, model=SERVED_NAME)
        recorder = RecordingGateway(guard)

        async def guarded() -> tuple[Any, QueueReviewer | None]:
            await guard.start()
            reviewer = (QueueReviewer(guard.app, cfg.reviewer, frozenset(a.info.account_id for a in accounts))
                        if cfg.review_every_h > 0 else None)
            try:
                return await run_traffic(accounts, turns, recorder, detector, clock, progress,
                                         "capability: harvest through the guard (real teacher)",
                                         concurrency=cfg.concurrency,
                                         periodic=(cfg.review_every_h * 3600, reviewer) if reviewer else None), reviewer
            finally:
                await guard.stop()

        result, reviewer = asyncio.run(guarded())
        review = reviewer.summary(cfg.review_every_h) if reviewer else None
        timings["guarded_harvest_s"] = time.perf_counter() - t
        # In the plan's order, not the order the answers came back in (concurrent requests finish in an order
        # that depends on the machine's load, and the students' training follows the rows' order).
        sent = sorted(recorder.sent, key=lambda x: (x[0].ts, x[0].session_id))
        leaked_pairs = [(tu.user_text, r.text) for tu, r in sent if r.status == 200]
        got = dict(leaked_pairs)
        # 2. the unblocked harvest: the refused prompts straight to the same teacher.
        t = time.perf_counter()
        missing = [tu.user_text for tu, r in sent if r.status != 200]
        extra = asyncio.run(_ask_directly(base, missing, params, cfg.max_batch)) if missing else []
        timings["unguarded_rest_s"] = time.perf_counter() - t
    teacher.close()
    full_pairs = [(tu.user_text, got.get(tu.user_text, "")) for tu, _ in sent]
    rest = dict(zip(missing, extra))
    full_pairs = [(p, a if p in got else rest[p]) for p, a in full_pairs]
    return result, leaked_pairs, full_pairs, missing, review


def _evaluate(cfg: CapabilityConfig, loaded: tuple[Any, Any, str],
              dirs: dict[str, Path | None]) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Step 4: the teacher, the init and the leaked and full students on the same held-out items; returns
    (per-item correctness by label, accuracy by label, items). A student with nothing to train on is its init."""
    import numpy as np
    import torch

    from stillhouse.distill.evaluate import EvalConfig, LoadedModel, evaluate_models, load_items

    model, tok, rev = loaded
    items = load_items("arithmetic2", cfg.eval_limit, seed=cfg.eval_seed)
    teacher_lm = LoadedModel("teacher", model, tok, rev, cfg.teacher)
    students: list[LoadedModel] = []
    labels: list[str] = []
    if cfg.student != "self":
        from stillhouse.distill.student import make_student

        torch.manual_seed(0)
        students.append(LoadedModel("init", make_student(model, cfg.student, seed=0).eval(), tok, "init",
                                    cfg.student))
        labels.append("init")
    for name in ("leaked", "full"):
        d = dirs[name]
        if d is not None and not (name == "full" and d == dirs["leaked"]):
            students.append(LoadedModel.load(f"hf:{d}", label=f"{name}-student", device="cpu"))
            labels.append(name)
    ev = evaluate_models(items, "arithmetic2", teacher_lm, students,
                         EvalConfig(students=(), task="arithmetic2", limit=cfg.eval_limit, seed=cfg.eval_seed,
                                    kl=False, device="cpu"))
    correct = {"teacher": np.array(ev.teacher.correct, dtype=float)}
    scores = {"teacher": ev.teacher.accuracy}
    for label, s in zip(labels, ev.students):
        correct[label], scores[label] = np.array(s.correct, dtype=float), s.accuracy
    correct.setdefault("init", correct["teacher"])
    scores.setdefault("init", scores["teacher"])
    if dirs["full"] is not None and dirs["full"] == dirs["leaked"]:
        correct["full"], scores["full"] = correct["leaked"], scores["leaked"]
    for name in ("leaked", "full"):  # nothing to train on: the student is its init
        correct.setdefault(name, correct["init"])
        scores.setdefault(name, scores["init"])
    return correct, scores, len(items)
