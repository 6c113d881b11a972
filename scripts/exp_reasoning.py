"""The reasoning experiment: can verified chains of thought take a student past its teacher, does on-policy
distillation beat SFT at the same teacher cost, and does it carry across model families? A recipe over the
package's verbs and library.

Teacher: the bundled SmolLM2-135M-Instruct. Task: 2-step word problems ("Mia has 6 stamps. She buys 9 more.
Then she sells 4. How many stamps does Mia have now?", numbers 2-9) asked for a chain of thought ending in
``#### <number>`` and read by GSM8K's answer parser (``verify(task="wordproblem")``); GSM8K test problems are
read by the same parser. Stages, under OUT (each resumes: a rerun redoes only what is missing):

    split      items/      held-out, training and validation problems (disjoint), the first --gsm8k GSM8K test items
    probe      probe.json  the teacher on the validation problems: chain-of-thought and direct prompts, greedy
                           and sampled (how the task's difficulty was chosen: on validation, never held-out)
    gemma      gemma_probe.json  Gemma 3 270M (base) as a few-shot teacher on the validation problems
    rationales data/       --samples chains of thought per training problem (temperature --temperature), verified
                           (samples.jsonl; verified.jsonl keeps one per problem; cost.json: teacher tokens per kept
                           row), and the teacher's greedy answers, right or wrong (greedy.jsonl: plain SFT's data)
    teacher    .eval-cache the teacher's held-out and GSM8K answers (every student's eval reuses them)
    train      runs/, evals/  a job per student (STUDENTS): `stillhouse train --config` (the pass chosen on the
                           validation problems), then `stillhouse eval --config` on the held-out problems
    report     results.md  accuracy [95% Wilson] and ÷ teacher [95% paired bootstrap] per student, teacher tokens

Students: ``star`` (the small student, SFT on the verified rationales), ``star-self`` (a copy of the teacher on
them), ``sft-greedy`` (SFT on the teacher's
greedy answers), ``gkd`` (on-policy, lmbda 1: the student's own samples on the same prompts, scored by the
white-box teacher; one pass costs about the teacher tokens of the greedy answers), ``gkd-bb`` (the same through
``stillhouse serve``'s POST /v1/score, top-20 logprobs: black-box), ``sft-first`` (SFT on the first half of the
greedy answers) and the two that go on from it at about equal teacher tokens, ``sft-more`` (SFT on the second
half) and ``gkd-more`` (GKD on the second half's prompts, one pass; the recipe of the on-policy distillation
reports: SFT first, then on-policy), ``sft-full`` and ``gkd-full`` (the same two ways with a student of the
teacher's size: the bundled model itself, on the greedy answers, or on-policy on their prompts, one pass),
``sft-low`` and ``gkd-low`` (the same pair for a low teacher budget, run with ``--train 100``; ``sft-low-fast``,
``gkd-low-fast`` and ``gkd-low-rkl`` are the grid their lr and loss were chosen from on a development draw;
``gkd-low-rkl5``, ``gkd-low-cool`` and ``gkd-low-mid`` a second grid, one change each from ``gkd-low``;
``gkd-low-sharp`` and ``gkd-low-sharp25`` a third, the teacher's target sharpened to temperature 0.5 and 0.25;
``kd-low-sharp25`` its off-policy ablation: the same loss on the teacher's greedy answers, sft-low's passes),
``sft-first-full``, ``sft-more-full`` and ``gkd-more-full`` (SFT first, then SFT or GKD, with the student of the
teacher's size; run with ``--train 100``),
``gemma-star`` (Gemma 3 270M, another family,
SFT on the verified rationales' text), ``gemma-sft`` (Gemma 3 270M on the teacher's greedy answers, right or wrong:
plain sequence-level distillation across families); ``gemma-base`` is Gemma 3 270M untrained, scored as it is.

The report gives each model's accuracy as the verifier reads it (GSM8K's parser: ``#### N``, else "the answer
is N", else the last number) and, descriptively, a strict count: the answers whose ``#### N`` or "the answer is
N" line is right (a model that echoes the problem scores by its last number under the first reading, never
under the second).

    .venv/bin/python scripts/exp_reasoning.py --out runs/exp_reasoning
    .venv/bin/python scripts/exp_reasoning.py --out runs/exp_reasoning --stage report

tests/test_exp_reasoning.py runs it scaled down on a tiny random-init teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("split", "probe", "gemma", "rationales", "teacher", "train", "report")
SMALL_STUDENT = "layers:0,1,2,3,14,15,26,27,28,29"
SMALL = {"freeze_embeddings": True, "schedule": "cosine", "system_prompt": ""}
FULL = {"data": "greedy-all", "student": "model:bundled", "system_prompt": ""}
"""A student of the teacher's size from the bundled model, on the teacher's greedy answers (or their prompts)."""
SFT_LOW = {**FULL, "loss": "sft", "epochs": 3, "lr": 5e-5}
GKD_LOW = {**FULL, "loss": "gkd", "lmbda": 1.0, "epochs": 1, "lr": 5e-5}
"""The low-budget pair (``sft-low``, ``gkd-low``); their variants below are one or two changes from these."""
STUDENTS: dict[str, dict[str, Any]] = {  # TrainConfig fields; data: verified | greedy
    "star": {**SMALL, "data": "verified", "loss": "sft", "epochs": 3, "lr": 3e-4},
    "sft-greedy": {**SMALL, "data": "greedy-all", "loss": "sft", "epochs": 3, "lr": 3e-4},
    "gkd": {**SMALL, "data": "greedy-all", "loss": "gkd", "lmbda": 1.0, "epochs": 1, "lr": 3e-4},
    "gkd-bb": {**SMALL, "data": "greedy-all", "loss": "gkd", "lmbda": 1.0, "epochs": 1, "lr": 3e-4,
               "score_teacher": "SERVE"},
    # on-policy after SFT, at equal teacher tokens: a student SFT'd on the first half of the greedy answers goes
    # on either with SFT on the second half or with GKD on the second half's prompts (one pass)
    "sft-first": {**SMALL, "data": "greedy-first", "loss": "sft", "epochs": 3, "lr": 3e-4},
    "sft-more": {**SMALL, "after": "sft-first", "data": "greedy-second", "loss": "sft", "epochs": 2, "lr": 1e-4},
    "gkd-more": {**SMALL, "after": "sft-first", "data": "greedy-second", "loss": "gkd", "lmbda": 1.0, "epochs": 1,
                 "lr": 1e-4},
    # the same comparison with a student of the teacher's own size and architecture: the bundled model (a
    # copy of what star-self was before its training), on the greedy answers or on-policy, from the same start
    "sft-full": {**FULL, "loss": "sft", "epochs": 2, "lr": 5e-5},
    "gkd-full": {**FULL, "loss": "gkd", "lmbda": 1.0, "epochs": 1, "lr": 5e-5},
    # the same two at a low teacher budget (run with --train 100): the pair sits below the teacher's ceiling, where
    # a method's gain per teacher token can show; the variants are the grid the lr and loss are chosen from on a
    # development draw
    "sft-low": SFT_LOW,
    "sft-low-fast": {**SFT_LOW, "lr": 2e-4},
    "gkd-low": GKD_LOW,
    "gkd-low-fast": {**GKD_LOW, "lr": 2e-4},
    "gkd-low-rkl": {**GKD_LOW, "beta": 1.0, "lr": 2e-4},
    # a second grid (2026-12-07), each one change from gkd-low: reverse KL at its lr, cooler samples (nearer the
    # greedy path the students are read on), a middle lr
    "gkd-low-rkl5": {**GKD_LOW, "beta": 1.0},
    "gkd-low-cool": {**GKD_LOW, "gen_temperature": 0.5},
    "gkd-low-mid": {**GKD_LOW, "lr": 1e-4},
    # a third (2026-12-08): the teacher's target sharpened toward its greedy token, as SFT learns its greedy answers
    "gkd-low-sharp": {**GKD_LOW, "teacher_temperature": 0.5},
    "gkd-low-sharp25": {**GKD_LOW, "teacher_temperature": 0.25},
    # its off-policy ablation: sft-low's data and passes, the loss gkd-low-sharp25's (lmbda 0: the teacher's greedy
    # answers, never the student's samples)
    "kd-low-sharp25": {**SFT_LOW, "loss": "gkd", "lmbda": 0.0, "teacher_temperature": 0.25},
    # SFT first, then on-policy, with the student of the teacher's size (run with --train 100: 50 + 50 prompts):
    # sft-low's settings on the first half, then sft-low's or gkd-low's on the second
    "sft-first-full": {**SFT_LOW, "data": "greedy-first"},
    "sft-more-full": {**SFT_LOW, "after": "sft-first-full", "data": "greedy-second"},
    "gkd-more-full": {**GKD_LOW, "after": "sft-first-full", "data": "greedy-second"},
    "star-self": {"data": "verified", "loss": "sft", "student": "self", "epochs": 2, "lr": 5e-5, "system_prompt": ""},
    "gemma-star": {"data": "verified", "loss": "sft", "student": "model:bundled:gemma3-270m", "epochs": 2, "lr": 1e-4,
                   "freeze_embeddings": True, "schedule": "cosine", "system_prompt": None, "select_on": ""},
    "gemma-sft": {"data": "greedy-all", "loss": "sft", "student": "model:bundled:gemma3-270m", "epochs": 1, "lr": 1e-4,
                  "freeze_embeddings": True, "schedule": "cosine", "system_prompt": None, "select_on": ""},
}
UNTRAINED: dict[str, tuple[str, str | None]] = {"gemma-base": ("bundled:gemma3-270m", None),
                                                "smol-start": ("bundled", "")}
"""Models scored as they are, no training, with the system prompt their students are read with (None: the
template's own): the other family's starting point, so a Gemma student's gain is its own (``gemma-base``), and
the bundled model that ``sft-full`` and ``gkd-full`` start from (``smol-start``)."""
COST = {"gemma-star": 6.0, "gemma-sft": 7.0, "gkd": 3.0, "gkd-bb": 3.5, "star-self": 4.0, "sft-full": 3.0,
        "gkd-full": 6.0, **{name: 1.5 for name in STUDENTS if name.startswith(("gkd-low", "kd-low"))}}
"""A job's relative cost (1 when not listed): the scheduler starts the costliest first."""
HALVES = ("greedy-first", "greedy-second")
"""The teacher's greedy answers split in two (first and second half of the training problems)."""
COMMON = {"shuffle": False, "batch_size": 8, "warmup_steps": 4, "select_batch_size": 64}
PAIRS = (("gkd-more", "sft-more"), ("gkd-more", "sft-first"), ("sft-more", "sft-first"),
         ("gkd-more-full", "sft-more-full"), ("gkd-more-full", "sft-first-full"),
         ("sft-more-full", "sft-first-full"),
         ("gkd-full", "sft-full"), ("gkd-full", "smol-start"), ("sft-full", "smol-start"),
         *((g, s) for g in STUDENTS if g.startswith("gkd-low") for s in ("sft-low", "sft-low-fast")),
         ("kd-low-sharp25", "sft-low"), ("gkd-low-sharp25", "kd-low-sharp25"))
"""Students compared item by item in the report (a ÷ b over the same held-out problems, paired bootstrap)."""
GSM8K_STUDENTS = ("star",)
"""Students also read on the GSM8K items (besides the teacher)."""


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage_split(a: argparse.Namespace, out: Path) -> None:
    from stillhouse.distill.tasks import WORDPROBLEM_SHOTS, few_shot, gsm8k, wordproblem_splits, write_items

    for name, items in wordproblem_splits(a.heldout, a.train, a.validation, seed=a.seed, steps=a.steps,
                                          lo=a.lo, hi=a.hi).items():
        if a.shots:  # every model (teacher and students, training and evaluation) sees the same worked examples
            items = [few_shot(it, WORDPROBLEM_SHOTS[:a.shots]) for it in items]
        write_items(items, out / "items" / f"{name}.jsonl")
    if a.gsm8k:
        write_items(gsm8k(a.gsm8k, "test"), out / "items" / "gsm8k.jsonl")


def _teacher(a: argparse.Namespace) -> Any:
    from stillhouse.distill.evaluate import LoadedModel

    return LoadedModel.load(a.teacher, "teacher", device="cpu")


def stage_probe(a: argparse.Namespace, out: Path) -> None:
    """The teacher on the validation problems: chain of thought or just the number, greedy or sampled."""
    from dataclasses import replace

    from stillhouse.distill.rationales import RationaleConfig, cost_report, sample_rationales
    from stillhouse.distill.tasks import WORDPROBLEM_DIRECT, read_items

    t = _teacher(a)
    cot = read_items(out / "items" / "validation.jsonl")
    direct = [replace(it, messages=[{"role": "user", "content": WORDPROBLEM_DIRECT.format(question=it.meta["question"])}])
              for it in cot]
    res = {}
    for name, items, cfg in [
            ("cot-greedy", cot, RationaleConfig(samples=1, temperature=0.0, max_new_tokens=a.max_new_tokens)),
            ("direct-greedy", direct, RationaleConfig(samples=1, temperature=0.0, max_new_tokens=16)),
            (f"cot-T{a.temperature}", cot, RationaleConfig(samples=2, temperature=a.temperature,
                                                         max_new_tokens=a.max_new_tokens, seed=a.seed + 7))][
            :None if a.probe_sampled else 2]:
        t0 = time.time()
        rep = cost_report(sample_rationales(t.model, t.tokenizer, items, cfg))
        res[name] = {**rep, "seconds": round(time.time() - t0, 1)}
        _log(f"probe {name}: {rep['verified_samples']}/{rep['samples']} correct, pass@{cfg.samples} "
             f"{rep['problems_solved']}/{rep['problems']}")
    (out / "probe.json").write_text(json.dumps(res, indent=2) + "\n")


def stage_gemma(a: argparse.Namespace, out: Path) -> None:
    """Gemma 3 270M (a base model) as a teacher: the validation problems after three worked examples, greedy."""
    from stillhouse.distill.evaluate import LoadedModel
    from stillhouse.distill.rationales import RationaleConfig, cost_report, sample_rationales
    from stillhouse.distill.tasks import few_shot, read_items

    g = LoadedModel.load(a.gemma, "gemma", device="cpu")
    items = [it if len(it.messages) > 1 else few_shot(it)  # --shots already put the examples there
             for it in read_items(out / "items" / "validation.jsonl")]
    t0 = time.time()
    rows = sample_rationales(g.model, g.tokenizer, items, RationaleConfig(samples=1, temperature=0.0,
                                                                         max_new_tokens=a.max_new_tokens))
    rep = {**cost_report(rows), "seconds": round(time.time() - t0, 1), "examples": [r["messages"][-1]["content"]
                                                                                   for r in rows[:3]]}
    _log(f"gemma few-shot: {rep['verified_samples']}/{rep['samples']} correct")
    (out / "gemma_probe.json").write_text(json.dumps(rep, indent=2) + "\n")


def stage_rationales(a: argparse.Namespace, out: Path) -> None:
    """The teacher's greedy answers (plain SFT's data) and --samples sampled chains of thought per training problem;
    the verified pool is every answer of either kind that verifies (--keep per problem). Each part resumes."""
    from stillhouse.distill.rationales import (
        RationaleConfig,
        cost_report,
        mark_kept,
        sample_rationales,
        write_rows,
    )
    from stillhouse.distill.tasks import read_items

    items = read_items(out / "items" / "train.jsonl")
    t = None
    parts = {"greedy": RationaleConfig(samples=1, temperature=0.0, max_new_tokens=a.max_new_tokens)}
    if a.samples:  # 0: the greedy answers only (what the sft-* and gkd-* students use)
        parts["samples"] = RationaleConfig(samples=a.samples, temperature=a.temperature,
                                           max_new_tokens=a.max_new_tokens, seed=a.seed)
    rows: dict[str, list[dict[str, Any]]] = {}
    seconds = json.loads((out / "data" / "seconds.json").read_text()) if (out / "data" / "seconds.json").exists() else {}
    for name, cfg in parts.items():
        path = out / "data" / f"{name}.jsonl"
        if path.exists():
            rows[name] = [json.loads(x) for x in path.read_text().splitlines()]
            continue
        t = t or _teacher(a)
        t0 = time.time()
        rows[name] = sample_rationales(t.model, t.tokenizer, items, cfg)
        write_rows(rows[name], path)
        seconds[name] = round(time.time() - t0, 1)
        (out / "data" / "seconds.json").write_text(json.dumps(seconds))
        _log(f"{name}: {json.dumps(cost_report(rows[name]))}")
    greedy = [{**r, "sample": "greedy"} for r in rows["greedy"]]
    rows.setdefault("samples", [])
    pool = mark_kept([*greedy, *rows["samples"]], a.keep)  # greedy first, then the samples in order
    cost = {"greedy": {**cost_report(rows["greedy"]), "seconds": seconds.get("greedy")},
            "samples": {**cost_report(rows["samples"]), "seconds": seconds.get("samples")},
            "verified_pool": cost_report(pool)}
    for r in rows["greedy"]:
        r["kept"] = True  # plain SFT keeps every answer, right or wrong
    write_rows(rows["greedy"], out / "data" / "greedy-all.jsonl")
    if any(r["kept"] for r in pool):
        write_rows(pool, out / "data" / "verified.jsonl", kept_only=True)
    else:
        _log("no rationale verified: the students on verified rationales will be skipped")
    (out / "data" / "cost.json").write_text(json.dumps(cost, indent=2) + "\n")


def _eval_config(a: argparse.Namespace, out: Path, name: str, student: str, items: str = "heldout",
                 system_prompt: str | None = "") -> Any:
    from stillhouse.distill.evaluate import EvalConfig

    gsm = items == "gsm8k"
    path = out / "items" / f"{items}.jsonl"
    n = len(path.read_text().splitlines())
    return EvalConfig(students=(student,) if student else (), labels=(name,) if student else (), teacher=a.teacher,
                      task="gsm8k" if gsm else "wordproblem", items=str(path), limit=n, batch_size=64, kl=False,
                      n_boot=4000, max_new_tokens=a.gsm8k_tokens if gsm else a.max_new_tokens,
                      system_prompt=system_prompt, device="cpu")


def stage_teacher(a: argparse.Namespace, out: Path) -> None:
    from stillhouse.distill.evaluate import evaluate_models, load_items

    t = _teacher(a)
    for items in ("heldout", "gsm8k") if a.gsm8k else ("heldout",):
        cfg = _eval_config(a, out, "teacher", "", items)
        res = evaluate_models(load_items(cfg.task, cfg.limit, path=cfg.items), cfg.task, t, [], cfg,
                              cache_dir=out / ".eval-cache").teacher
        _log(f"teacher on {items}: {sum(res.correct)}/{len(res.correct)}")


def students(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every student's TrainConfig (the black-box one's score_teacher is filled in when its server starts)."""
    from stillhouse.distill.train import TrainConfig

    runs = {}
    for name, spec in STUDENTS.items():
        if name not in a.students:
            continue
        fields = {"student": a.student, "select_on": str(out / "items" / "validation.jsonl"), **COMMON, **spec,
                  "max_new_tokens": a.max_new_tokens, "max_len": a.max_len}
        data = out / "data" / f"{fields.pop('data')}.jsonl"
        after = fields.pop("after", None)
        if after:
            fields["student"] = f"model:hf:{out / 'runs' / after / 'final'}"
        if data.stem in HALVES and not data.exists() and (out / "data" / "greedy-all.jsonl").exists():
            rows = (out / "data" / "greedy-all.jsonl").read_text().splitlines(keepends=True)
            for name_, part in zip(HALVES, (rows[:len(rows) // 2], rows[len(rows) // 2:])):
                (out / "data" / f"{name_}.jsonl").write_text("".join(part))
        if not data.exists():
            _log(f"{name}: no {data.name}, skipped")
            continue
        if fields.get("score_teacher") == "SERVE":
            fields["score_teacher"] = f"http://127.0.0.1:{a.port}/v1"
        runs[name] = TrainConfig(**fields, data=str(data), out=str(out / "runs" / name), teacher=a.teacher,
                                 threads=a.threads, precision=a.precision, seed=a.seed)
    return runs


def _eval_sets(a: argparse.Namespace, out: Path, name: str) -> tuple[str, ...]:
    if name.startswith("gemma-") and a.gemma_heldout:
        from stillhouse.distill.tasks import read_items, write_items

        write_items(read_items(out / "items" / "heldout.jsonl")[:a.gemma_heldout], out / "items" / "heldout-gemma.jsonl")
        return ("heldout-gemma",)
    return ("heldout", "gsm8k") if (a.gsm8k and name in GSM8K_STUDENTS) else ("heldout",)


def _eval_cmds(a: argparse.Namespace, out: Path, name: str, model: str,
               system_prompt: str | None) -> list[tuple[str, ...]]:
    from stillhouse.config import save_config

    cmds = []
    for items in _eval_sets(a, out, name):
        ecfg = out / "configs" / f"eval-{name}-{items}.json"
        save_config(_eval_config(a, out, name, model, items, system_prompt), ecfg)
        cmds.append(("eval", "--config", str(ecfg), "--out", str(out / "evals" / f"{name}-{items}"),
                     "--cache-dir", str(out / ".eval-cache")))
    return cmds


def stage_train(a: argparse.Namespace, out: Path) -> bool:
    from stillhouse.config import save_config

    jobs: list[tuple[str, list[tuple[str, ...]], float]] = [
        (name, _eval_cmds(a, out, name, spec, system), 2.0) for name, (spec, system) in UNTRAINED.items()
        if name in a.students]
    serve, after = None, []
    for name, cfg in students(a, out).items():
        train_cfg = out / "configs" / f"train-{name}.json"
        save_config(cfg, train_cfg)
        cmds = [("train", "--config", str(train_cfg)), *_eval_cmds(a, out, name, f"hf:{cfg.out}/final",
                                                                    cfg.system_prompt)]
        (after if STUDENTS[name].get("after") else jobs).append((name, cmds, COST.get(name, 1.0)))
        if cfg.score_teacher:
            serve = cfg.score_teacher
    proc = None
    try:
        if serve is not None and not all(_is_done(a, out, n, c) for n, c, _ in jobs if n == "gkd-bb"):
            proc = _start_serve(a, out)
        ran = _run_jobs(a, out, jobs)  # then the students that go on from one of these
        return _run_jobs(a, out, after) or ran
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


def _start_serve(a: argparse.Namespace, out: Path) -> subprocess.Popen[bytes]:
    """``stillhouse serve`` on loopback: the black-box teacher (one thread), up once /health answers."""
    import urllib.request

    log = (out / "jobs").resolve()
    log.mkdir(parents=True, exist_ok=True)
    with (log / "serve.log").open("ab") as sink:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "stillhouse", "serve", "--teacher", a.teacher, "--host",
                                 "127.0.0.1", "--port", str(a.port), "--threads", str(a.threads)],
                                stdout=sink, stderr=subprocess.STDOUT, env=_env())
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{a.port}/health", timeout=2):
                _log(f"stillhouse serve is up on port {a.port}")
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"stillhouse serve exited ({proc.returncode}): see {log / 'serve.log'}") from None
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"stillhouse serve did not answer within 10 minutes: see {log / 'serve.log'}")


def _env() -> dict[str, str]:
    from stillhouse.distill.jobs import code_env

    return {**os.environ, **code_env()}


def _is_done(a: argparse.Namespace, out: Path, name: str, cmds: list[tuple[str, ...]]) -> bool:
    from stillhouse.distill.jobs import cli_job, is_done

    return is_done(cli_job(name, cmds), out / "jobs")


def _run_jobs(a: argparse.Namespace, out: Path, jobs: list[tuple[str, list[tuple[str, ...]], float]]) -> bool:
    from stillhouse.distill.jobs import cli_job, code_env, run_jobs

    done = run_jobs([cli_job(name, cmds, cost) for name, cmds, cost in jobs], out / "jobs",
                    parallel=a.jobs, threads_each=a.threads, log=_log, env=code_env())
    return any(r.status != "skipped" for r in done)

def _est(d: dict[str, Any], digits: int = 3) -> str:
    if d is None or d["value"] is None:
        return "undefined"
    return f"{d['value']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"


def strict_correct(samples: Path, who: str, items: Path) -> int:
    """Answers of ``who`` in an eval's samples.jsonl whose ``#### N`` (else "the answer is N") line gives the
    right N: the strict reading, beside the verifier's lenient one (which falls back to the last number)."""
    import re

    answers = {r["id"]: r["answer"] for r in map(json.loads, items.read_text().splitlines())}
    n = 0
    for r in map(json.loads, samples.read_text().splitlines()):
        text = r[who]["output"]
        m = re.search(r"####\s*(-?\d+)", text) or re.search(r"answer is:?\s*\$?(-?\d+)", text)
        n += bool(m) and m.group(1) == str(answers[r["id"]])
    return n


def _teacher_tokens(data: Path) -> int:
    """The teacher tokens the rows of a data file cost (their ``teacher_tokens``)."""
    return sum(json.loads(x).get("teacher_tokens", 0) for x in data.read_text().splitlines())


def _held_out_correct(out: Path, name: str) -> dict[str, bool] | None:
    """``name``'s correctness per held-out problem id (its eval's samples.jsonl), or None."""
    path = out / "evals" / f"{name}-heldout" / "samples.jsonl"
    if not path.exists():
        return None
    return {r["id"]: bool(r[name]["correct"]) for r in map(json.loads, path.read_text().splitlines())}


def paired_lines(outs: list[Path], n_boot: int = 4000) -> list[str]:
    """The PAIRS whose two evals exist in every one of ``outs``: a's and b's correct counts and a ÷ b [95% paired
    bootstrap], the draws' held-out problems concatenated (each draw matched by id within itself)."""
    from stillhouse.distill.metrics import ceiling_ratio

    lines = []
    for x, y in PAIRS:
        cx: list[bool] = []
        cy: list[bool] = []
        for out in outs:
            dx, dy = _held_out_correct(out, x), _held_out_correct(out, y)
            if dx is None or dy is None:
                break
            if set(dx) != set(dy):
                raise SystemExit(f"{x} and {y} were scored on different held-out problems in {out}: "
                                 "rerun their evals")
            cx += [dx[i] for i in sorted(dx)]
            cy += [dy[i] for i in sorted(dx)]
        else:
            r = ceiling_ratio(cx, cy, n_boot=n_boot, seed=0)
            lines.append(f"| {x} ÷ {y} | {sum(cx)}/{len(cx)} vs {sum(cy)}/{len(cy)} | "
                         f"{_est({'value': r.value, 'lo': r.lo, 'hi': r.hi}, 2)} |")
    over = "the same held-out problems" + (f", {len(outs)} draws pooled ({', '.join(map(str, outs))})"
                                           if len(outs) > 1 else "")
    return ["", f"Paired over {over} ({n_boot:,} bootstrap draws):", "",
            "| comparison | correct | ratio [95% CI] |", "|---|---|---|", *lines] if lines else []


def _time_row(name: str, r: dict[str, Any]) -> str:
    """A stage's (times.jsonl) or a job's (jobs/NAME.done) timing record as a table row."""
    return f"| {name} | {r['seconds'] / 60:.1f} | {r['load1']} | {r['finished']} |"


def stage_report(a: argparse.Namespace, out: Path) -> None:
    cost = json.loads((out / "data" / "cost.json").read_text())
    lines = [("| model | training data | teacher tokens | held-out correct | accuracy [95% CI] | ÷ teacher [95% CI] "
              "| strict: #### / answer-is line right | validation by pass |"), "|---|---|---|---|---|---|---|---|"]
    teacher = gsm = None
    gsm_rows = []
    strict_teacher = ""
    for name in (n for n in UNTRAINED if n in a.students):
        for items in _eval_sets(a, out, name):
            path = out / "evals" / f"{name}-{items}"
            if items != "gsm8k" and (path / "results.json").exists():
                s = json.loads((path / "results.json").read_text())["students"][0]
                acc = s["accuracy"]
                strict = strict_correct(path / "samples.jsonl", name, out / "items" / f"{items}.jsonl")
                lines.append(f"| {name} ({s['n_params'] / 1e6:.1f}M) | none: {UNTRAINED[name][0]} as it is | 0 | "
                             f"{round(acc['value'] * acc['n'])}/{acc['n']} | {_est(acc)} | "
                             f"{_est(s['ceiling_ratio'], 2)} | {strict}/{acc['n']} | - |")
    for name, cfg in students(a, out).items():
        for items in ("heldout", "heldout-gemma", "gsm8k"):
            path = out / "evals" / f"{name}-{items}" / "results.json"
            if not path.exists():
                continue
            res = json.loads(path.read_text())
            s = res["students"][0]
            if items == "gsm8k":
                gsm = res["teacher"]
                gsm_rows.append((name, s))
                continue
            if items == "heldout":
                teacher = res["teacher"]
            acc, ratio = s["accuracy"], s["ceiling_ratio"]
            sel_path = Path(cfg.out) / "selection.json"
            info = json.loads((Path(cfg.out) / "final" / "train_result.json").read_text())
            if sel_path.exists():
                sel = json.loads(sel_path.read_text())
                passes = " / ".join(str(e["correct"]) for e in sel["epochs"]) + f" (pass {sel['chosen_epoch']})"
            else:
                passes = f"not chosen: {cfg.epochs} passes fixed in advance"
            if items == "heldout-gemma":
                t_sub = res["teacher"]["accuracy"]
                passes += (f"; first {acc['n']} held-out problems, where the teacher has "
                           f"{round(t_sub['value'] * t_sub['n'])}/{t_sub['n']}")
            src = "verified" if "verified" in cfg.data else "greedy"
            pool = "verified_pool" if src == "verified" else "greedy"
            rows = len(Path(cfg.data).read_text().splitlines())
            if cfg.loss == "gkd" and cfg.lmbda == 0.0:  # the teacher's scores of its own answers: kept at generation
                tokens = cost[pool]["teacher_tokens"]
                data = f"{rows} {src} answers with the teacher's scores, {cfg.epochs} passes"
            elif cfg.loss == "gkd":
                tokens = info.get("teacher_scored_tokens", 0)
                data = f"own samples on {rows} prompts, {cfg.epochs} pass, scored by the teacher" + (
                    " over HTTP (top-20)" if cfg.score_teacher else "")
            elif Path(cfg.data).stem in HALVES:
                tokens = _teacher_tokens(Path(cfg.data))
                data = f"{rows} greedy answers ({Path(cfg.data).stem}), {cfg.epochs} passes"
            else:
                tokens = cost[pool]["teacher_tokens"]
                data = f"{rows} {src} rationales, {cfg.epochs} passes"
            init = STUDENTS[name].get("after")
            if init:
                init_tokens = _teacher_tokens(out / "data" / f"{STUDENTS[init]['data']}.jsonl")
                data = f"from {init} ({init_tokens:,} teacher tokens), then {data}"
                tokens += init_tokens
            strict = strict_correct(path.parent / "samples.jsonl", name, out / "items" / f"{items}.jsonl")
            if items == "heldout" and not strict_teacher:  # the same teacher answers in every held-out eval
                strict_teacher = f"{strict_correct(path.parent / 'samples.jsonl', 'teacher', out / 'items' / 'heldout.jsonl')}/{acc['n']}"
            lines.append(f"| {name} ({s['n_params'] / 1e6:.1f}M) | {data} | {tokens:,} | "
                         f"{round(acc['value'] * acc['n'])}/{acc['n']} | {_est(acc)} | {_est(ratio, 2)} | "
                         f"{strict}/{acc['n']} | {passes} |")
    if teacher is None:
        raise SystemExit(f"no student evaluated yet in {out / 'evals'}: run the train stage first")
    t = teacher["accuracy"]
    lines.insert(2, f"| teacher (greedy) | - | - | {round(t['value'] * t['n'])}/{t['n']} | {_est(t)} | 1 | "
                    f"{strict_teacher or '-'} | - |")
    lines += paired_lines([out]) + (paired_lines([out, *a.pool]) if a.pool else [])
    if gsm is not None:
        g = gsm["accuracy"]
        lines += ["", "GSM8K test (first items, the same answer parser):", "",
                  "| model | correct | accuracy [95% CI] | ÷ teacher [95% CI] |", "|---|---|---|---|",
                  f"| teacher | {round(g['value'] * g['n'])}/{g['n']} | {_est(g)} | 1 |"]
        for name, s in gsm_rows:
            lines.append(f"| {name} | {round(s['accuracy']['value'] * s['accuracy']['n'])}/{s['accuracy']['n']} | "
                         f"{_est(s['accuracy'])} | {_est(s['ceiling_ratio'], 2)} |")
    probe = json.loads((out / "probe.json").read_text()) if (out / "probe.json").exists() else {}
    if (out / "gemma_probe.json").exists():
        probe["gemma-3-270m few-shot greedy"] = json.loads((out / "gemma_probe.json").read_text())
    if probe:
        lines += ["", "Teacher on the validation problems (the difficulty check):", "",
                  "| prompt, decoding | correct samples | problems with one correct |", "|---|---|---|"]
        lines += [f"| {k} | {v['verified_samples']}/{v['samples']} | {v['problems_solved']}/{v['problems']} |"
                  for k, v in probe.items()]
    lines += ["", "Rationales (training problems): " + "; ".join(
        f"{k}: {v['verified_samples']}/{v['samples']} verified, {v['problems_solved']}/{v['problems']} problems "
        f"solved, {v['teacher_tokens']:,} teacher tokens" + (f", {v['kept']} kept, {v['tokens_per_kept']} teacher "
        "tokens per kept row" if k == "verified_pool" else "") for k, v in cost.items())]
    times = out / "times.jsonl"
    latest = {r["stage"]: r for r in map(json.loads, times.read_text().splitlines() if times.exists() else [])}
    lines += ["", "| stage | wall min | load (1 min) at end | finished |", "|---|---|---|---|"]
    lines += [_time_row(k, r) for k, r in latest.items()]
    lines.append(f"| **total** | **{sum(r['seconds'] for r in latest.values()) / 60:.1f}** | | |")
    done = sorted((out / "jobs").glob("*.done")) if (out / "jobs").exists() else []
    if done:  # a rerun of the train stage times only the jobs it ran; each job's own record stays
        lines += ["", "| job (training, validation passes, evaluation) | wall min | load (1 min) at end | finished |",
                  "|---|---|---|---|"]
        lines += [_time_row(path.stem, json.loads(path.read_text())) for path in done]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


STAGE_FUNCS = {"split": stage_split, "probe": stage_probe, "gemma": stage_gemma, "rationales": stage_rationales, "teacher": stage_teacher,
               "train": stage_train, "report": stage_report}
DONE = {"split": "items/validation.jsonl", "probe": "probe.json", "gemma": "gemma_probe.json", "rationales": "data/cost.json",
        "teacher": "evals/.teacher-done"}


def main(argv: list[str] | None = None) -> int:
    from stillhouse.distill.tasks import WORDPROBLEM_SHOTS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/exp_reasoning"))
    p.add_argument("--stage", default="all", help=f"all, or some of {', '.join(STAGES)} (comma-separated)")
    p.add_argument("--teacher", default="bundled", help="teacher spec (bundled, hf:DIR); tests use a tiny hf: model")
    p.add_argument("--gemma", default="bundled:gemma3-270m", help="the other family's model (few-shot teacher probe, "
                   "student init); '' skips the gemma stage")
    p.add_argument("--student", default=SMALL_STUDENT, help="the small student's init (layers of the teacher)")
    p.add_argument("--students", default=",".join(STUDENTS), help="which students to train (comma-separated); gemma-base: Gemma untrained, only scored")
    p.add_argument("--heldout", type=int, default=100, help="held-out word problems (the test set)")
    p.add_argument("--train", type=int, default=200, help="training word problems")
    p.add_argument("--validation", type=int, default=30, help="validation word problems (difficulty, passes)")
    p.add_argument("--gsm8k", type=int, default=20, help="GSM8K test items read by the same parser (0 = none)")
    p.add_argument("--gsm8k-tokens", type=int, default=128, help="completion cap on GSM8K")
    p.add_argument("--steps", type=int, default=2, help="events per word problem")
    p.add_argument("--lo", type=int, default=2, help="smallest number in a problem")
    p.add_argument("--hi", type=int, default=9, help="largest number in a problem (2..9 was chosen on the validation problems: docs/results.md)")
    p.add_argument("--shots", type=int, default=0, choices=range(len(WORDPROBLEM_SHOTS) + 1),
                   help="worked examples (earlier chat turns, no loss on them) before every word problem, for "
                   "every model")
    p.add_argument("--max-len", type=int, default=320, help="training sequence cap in tokens (raise it with --shots)")
    p.add_argument("--samples", type=int, default=2, help="chains of thought sampled per training problem (0: the "
                   "greedy answers only)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the rationales")
    p.add_argument("--keep", type=int, default=0, help="verified rationales kept per problem (0 = every distinct one)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion cap on the word problems")
    p.add_argument("--gemma-heldout", type=int, default=40, help="the Gemma student answers only the first N "
                   "held-out problems (the teacher is scored on the same N); 0 = all")
    p.add_argument("--probe-sampled", action="store_true", help="the probe also samples (2 per problem)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=Path, nargs="*", default=[], metavar="DIR",
                   help="the report's paired rows also pool these draws' held-out problems (other --out directories "
                        "of the same students)")
    p.add_argument("--port", type=int, default=8765, help="loopback port of the black-box teacher (gkd-bb)")
    p.add_argument("--jobs", type=int, default=2, help="training jobs side by side")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each job")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="training precision")
    a = p.parse_args(argv)
    a.students = tuple(x for x in a.students.split(",") if x)
    todo = STAGES if a.stage == "all" else tuple(a.stage.split(","))
    if set(todo) - set(STAGES) or set(a.students) - set(STUDENTS) - set(UNTRAINED) or a.jobs < 1 or a.threads < 1:
        p.error(f"--stage {a.stage} --students {','.join(a.students)}: stages are {', '.join(STAGES)}, students "
                f"{', '.join([*STUDENTS, *UNTRAINED])}; --jobs and --threads at least 1")
    import torch

    torch.set_num_threads(a.threads)
    from stillhouse.distill.jobs import run_stages

    todo = tuple(name for name in todo if name != "gemma" or a.gemma)
    run_stages(a.out, todo, STAGE_FUNCS, a, DONE, touch=("teacher",), log=_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
