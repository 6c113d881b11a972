"""The ceiling experiment: how close does a distilled student get to its teacher, and can verified
data take it past the teacher? A recipe over the package's verbs.

Teacher: the bundled SmolLM2-135M-Instruct. Task: 2-digit addition ("What is a + b? Reply with just
the number."), checked by ``stillhouse.distill.verify.check_numeric``. Stages, writing under OUT (each
resumes: a rerun of the same command redoes only what is missing):

    split    items/     held-out, training and validation additions, disjoint as unordered pairs
    harvest  harvest/   the teacher greedy on the training items with top-20 logprobs: --jobs shards,
                        one-thread jobs side by side (distill/jobs.py) filling one store
    export   data/      every answer, right or wrong, in problem order: the plain students' data
    curate   curated/   the verified answers only: the verified students' data
    teacher  .eval-cache/  the teacher's held-out answers (every student's eval reuses them)
    train    runs/, evals/  a job per student: `stillhouse train --config` (the pass chosen on the
                        validation items, TrainConfig.select_on), then `stillhouse eval --config` on
                        the held-out items; --jobs one-thread jobs side by side, longest first
    report   results.md, grid.png  accuracy [95% Wilson] and ÷ teacher [95% paired bootstrap, 4,000
                        draws] of every student, with each pass's validation score

Students (STUDENTS below): the small student (``--student``, 10 of the teacher's 30 layers, frozen
embeddings) on the first N harvested answers by SFT and by top-k KD, 4 cosine passes; the small student
on the verified answers, 6 passes; a copy of the teacher (self) on the first 400 verified answers.

    .venv/bin/python scripts/exp_ceiling.py --out runs/exp_ceiling            # everything, about 40 min
    .venv/bin/python scripts/exp_ceiling.py --out runs/exp_ceiling --stage report

tests/test_exp_ceiling.py runs it scaled down on a tiny random-init teacher.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("split", "harvest", "export", "curate", "teacher", "train", "report")
SMALL_STUDENT = "layers:0,1,2,3,14,15,26,27,28,29"
SMALL = {"freeze_embeddings": True, "schedule": "cosine"}
STUDENTS: dict[str, dict[str, Any]] = {  # TrainConfig fields; "{n}" runs once per --sizes N
    "sft-n{n}": {**SMALL, "data": "all", "loss": "sft", "epochs": 4, "lr": 5e-4},
    "topk-n{n}": {**SMALL, "data": "all", "loss": "topk", "epochs": 4, "lr": 5e-4},
    "verified-small": {**SMALL, "data": "verified", "epochs": 6, "lr": 3e-4},
    "verified-self": {"data": "verified", "student": "self", "epochs": 2, "lr": 5e-5, "max_examples": 400},
}
COMMON = {"shuffle": False, "system_prompt": "", "batch_size": 10, "warmup_steps": 10, "select_batch_size": 100}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage_split(a: argparse.Namespace, out: Path) -> None:
    from stillhouse.distill.tasks import arithmetic_splits, write_items

    for name, items in arithmetic_splits(a.heldout, a.train, a.validation).items():
        write_items(items, out / "items" / f"{name}.jsonl")


def stage_harvest(a: argparse.Namespace, out: Path) -> None:
    """--jobs one-thread processes, each a shard of the items in white-box batches of 64, into one store."""
    from stillhouse.config import save_config
    from stillhouse.distill.harvest import HarvestConfig

    jobs = []
    for i in range(a.jobs):
        cfg = HarvestConfig(prompts=str(out / "items" / "train.jsonl"), teacher=a.teacher, out=str(out / "harvest"),
                            max_tokens=16, logprobs=True, top_logprobs=20, local_batch=64, shard=f"{i}/{a.jobs}")
        save_config(cfg, out / "configs" / f"harvest-{i}.json")
        jobs.append((f"harvest-{i}", [("harvest", "--config", str(out / "configs" / f"harvest-{i}.json"))], 0.0))
    _run_jobs(a, out, jobs)


def stage_export(a: argparse.Namespace, out: Path) -> None:
    from stillhouse.distill.export import ExportConfig, export_run

    _log(export_run(ExportConfig(run_dir=str(out / "harvest"), out=str(out / "data"), heldout=0.0, logprobs=True,
                                 order="prompts")).summary())


def stage_curate(a: argparse.Namespace, out: Path) -> None:
    from stillhouse.distill.curate import CurateConfig, curate_run

    cfg = CurateConfig(eval_sets=(), arithmetic_split_rule=False, near_dup_threshold=1.0, drop_truncated=False)
    _log(f"curated: {curate_run(out / 'data' / 'train.jsonl', cfg, out_dir=out / 'curated')[1]['kept']} verified")


def stage_teacher(a: argparse.Namespace, out: Path) -> None:
    from stillhouse.distill.evaluate import LoadedModel, evaluate_models, load_items

    cfg = _eval_config(a, out, "teacher", "")
    items = load_items(cfg.task, cfg.limit, path=cfg.items)
    t = evaluate_models(items, cfg.task, LoadedModel.load(a.teacher, "teacher"), [], cfg,
                        cache_dir=out / ".eval-cache").teacher
    _log(f"teacher on the held-out items: {sum(t.correct)}/{len(t.correct)}")


def students(a: argparse.Namespace, out: Path) -> dict[str, tuple[Any, int, float]]:
    """Every student's TrainConfig, N (plain students; else 0) and cost (examples seen; a top-k step costs
    about 1.25x an SFT step, the self student's 2x): the costliest jobs start first."""
    from stillhouse.distill.train import TrainConfig

    verified = sum(1 for _ in (out / "curated" / "train.jsonl").open())
    runs: dict[str, tuple[Any, int, float]] = {}
    for pattern, spec in STUDENTS.items():
        for n in a.sizes if "{n}" in pattern else [0]:
            fields = {"student": a.student, **COMMON, **spec}
            rows = n or min(verified, fields.get("max_examples") or verified)
            if rows == 0:
                _log(f"{pattern}: no verified answers, skipped")
                continue
            name, data = pattern.format(n=n), "data" if fields.pop("data") == "all" else "curated"
            cfg = TrainConfig(**{**fields, "max_examples": rows}, data=str(out / data / "train.jsonl"),
                              out=str(out / "runs" / name), teacher=a.teacher, threads=a.threads,
                              precision=a.precision, seed=0, select_on=str(out / "items" / "validation.jsonl"))
            cost = rows * cfg.epochs * (1.25 if cfg.loss == "topk" else 1) * (2 if cfg.student == "self" else 1)
            runs[name] = (cfg, n, cost)
    return runs


def _eval_config(a: argparse.Namespace, out: Path, name: str, student: str, n: int = 0) -> Any:
    from stillhouse.distill.evaluate import EvalConfig

    return EvalConfig(students=(student,) if student else (), labels=(name,) if student else (),
                      teacher=a.teacher, task="arithmetic2", items=str(out / "items" / "heldout.jsonl"),
                      limit=a.heldout, batch_size=100 if student else 64, kl=False, n_boot=4000,
                      system_prompt=COMMON["system_prompt"], train_examples=(n,) if n else (), device="cpu")


def stage_train(a: argparse.Namespace, out: Path) -> bool:
    from stillhouse.config import save_config

    jobs = []
    for name, (cfg, n, cost) in students(a, out).items():
        train_cfg, eval_cfg = out / "configs" / f"train-{name}.json", out / "configs" / f"eval-{name}.json"
        save_config(cfg, train_cfg)
        save_config(_eval_config(a, out, name, f"hf:{cfg.out}/final", n), eval_cfg)
        jobs.append((name, [("train", "--config", str(train_cfg)),
                            ("eval", "--config", str(eval_cfg), "--out", str(out / "evals" / name),
                             "--cache-dir", str(out / ".eval-cache"))], cost))
    return _run_jobs(a, out, jobs)


def _run_jobs(a: argparse.Namespace, out: Path, jobs: list[tuple[str, list[tuple[str, ...]], float]]) -> bool:
    """Run (name, stillhouse commands, cost) jobs on distill/jobs.py's pool with this same code; True when
    one ran (False: all were done)."""
    from stillhouse.distill.jobs import cli_job, code_env, run_jobs

    done = run_jobs([cli_job(name, cmds, cost) for name, cmds, cost in jobs], out / "jobs",
                    parallel=a.jobs, threads_each=a.threads, log=_log, env=code_env())
    return any(r.status != "skipped" for r in done)

def stage_report(a: argparse.Namespace, out: Path) -> None:
    from stillhouse.distill.metrics import Estimate
    from stillhouse.distill.plots import score_vs_examples

    def est(d: dict[str, Any], digits: int = 3) -> str:  # a ratio is null when the teacher scored 0
        return "undefined" if d["value"] is None else f"{d['value']:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"

    header = "| model | training data | held-out correct | accuracy [95% CI] | ÷ teacher [95% CI] | validation by pass |"
    lines = [header, "|---|---|---|---|---|---|"]
    series: dict[str, list[tuple[int, Estimate]]] = {}
    teacher = None
    for name, (cfg, _, _) in students(a, out).items():
        path = out / "evals" / name / "results.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        s, teacher = res["students"][0], res["teacher"]
        acc, ratio = s["accuracy"], s["ceiling_ratio"]
        sel = json.loads((Path(cfg.out) / "selection.json").read_text())
        passes = " / ".join(str(e["correct"]) for e in sel["epochs"])
        data = f"{cfg.max_examples} {'verified' if 'curated' in cfg.data else 'harvested'}, {cfg.epochs} passes"
        lines.append(f"| {name} ({s['n_params'] / 1e6:.1f}M) | {data} | {round(acc['value'] * acc['n'])}/"
                     f"{acc['n']} | {est(acc)} | {est(ratio, 2)} | {passes} (pass {sel['chosen_epoch']}) |")
        if s["train_examples"]:
            series.setdefault(cfg.loss, []).append((s["train_examples"], Estimate(**acc)))
    if teacher is None:
        raise SystemExit(f"no student evaluated yet in {out / 'evals'}: run the train stage first")
    t = teacher["accuracy"]
    lines.insert(2, f"| teacher (greedy) | - | {round(t['value'] * t['n'])}/{t['n']} | {est(t)} | 1 | - |")
    times = out / "times.jsonl"
    latest = {r["stage"]: r for r in map(json.loads, times.read_text().splitlines() if times.exists() else [])}
    lines += ["", "| stage | wall min | load (1 min) at end | finished |", "|---|---|---|---|"]
    lines += [f"| {k} | {r['seconds'] / 60:.1f} | {r['load1']} | {r['finished']} |" for k, r in latest.items()]
    lines.append(f"| **total** | **{sum(r['seconds'] for r in latest.values()) / 60:.1f}** | | |")
    if series:
        score_vs_examples({k: sorted(v) for k, v in series.items()}, out / "grid.png", teacher=Estimate(**t),
                          title="small student vs N examples (pass chosen on validation)")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


STAGE_FUNCS = {"split": stage_split, "harvest": stage_harvest, "export": stage_export, "curate": stage_curate,
               "teacher": stage_teacher, "train": stage_train, "report": stage_report}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/exp_ceiling"))
    p.add_argument("--stage", default="all", help=f"all, or some of {', '.join(STAGES)} (comma-separated)")
    p.add_argument("--teacher", default="bundled", help="teacher spec (bundled, hf:DIR); tests use a tiny hf: model")
    p.add_argument("--student", default=SMALL_STUDENT, help="the small student's init (layers of the teacher)")
    p.add_argument("--heldout", type=int, default=300, help="held-out additions (the test set)")
    p.add_argument("--train", type=int, default=4000, help="training additions harvested from the teacher")
    p.add_argument("--validation", type=int, default=200, help="validation additions (choose each run's pass)")
    p.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000], help="N of the plain students")
    p.add_argument("--jobs", type=int, default=2, help="training jobs side by side (2 fill a 2-core machine)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads of each job")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="training precision")
    a = p.parse_args(argv)
    todo = STAGES if a.stage == "all" else tuple(a.stage.split(","))
    if set(todo) - set(STAGES) or a.jobs < 1 or a.threads < 1 or any(not 0 < n <= a.train for n in a.sizes):
        p.error(f"--stage {a.stage} --jobs {a.jobs} --threads {a.threads} --sizes {a.sizes}: stages are "
                f"{', '.join(STAGES)}; jobs and threads at least 1; each size in 1..--train")
    import torch

    # One thread here too: at load 5-7 on 2 cores, one two-thread process harvested 256 prompts in 307-435 s,
    # two one-thread processes in 99-152 s (2026-12-05).
    torch.set_num_threads(a.threads)
    done = {"split": "items/validation.jsonl", "export": "data/export.json", "curate": "curated/report.json",
            "teacher": "evals/.teacher-done"}
    from stillhouse.distill.jobs import run_stages

    run_stages(a.out, todo, STAGE_FUNCS, a, done, touch=("teacher",), log=_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
