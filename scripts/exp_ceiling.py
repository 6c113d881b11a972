"""The ceiling experiment: how close does a distilled student get to its teacher, and can
verified data take it past the teacher?

Teacher: the bundled SmolLM2-135M-Instruct. Task: 2-digit addition ("What is a + b? Reply
with just the number."), scored by ``stillhouse.distill.verify.check_numeric`` (the number
after "=", as the model echoes the sum). Held-out problems are disjoint from training
problems as unordered pairs {a, b}.

Stages (each reads/writes OUT, default runs/exp_ceiling; finished stages are skipped):

    harvest   teacher greedy on the held-out set (its score) and on the training pool,
              storing completions with top-20 logprobs (what an API would give)
    probe     sampling probe: per-sample accuracy and pass@n at a few temperatures,
              on problems the teacher got wrong greedily
    sample    best-of-n sampling at the chosen temperature on greedy-wrong problems
    grid      (only when named) pruned student (10 of 30 layers): SFT and top-k KD on the first
              N greedy examples, N = 250, 1000, 4000 (one pass, constant learning rate, so the
              snapshots at N are the models a separate run on N examples would give)
    epochs    the main grid: for each N (--epochs-n, default the --grid sizes) and loss (sft, topk),
              a fresh run from the pruned init, --more-epochs passes at batch --epochs-batch with
              the learning rate --epochs-lr decayed to zero by cosine; every pass scored on the
              validation split, the best one on the held-out set. (--epochs-schedule continue:
              the one-pass grid run at the largest N continued at its constant learning rate.)
    verified  students trained only on verified-correct teacher answers: the pruned
              student, and the teacher itself (self-distillation); every epoch is exported
              and scored on a validation split, and only the best epoch is scored on the
              held-out set (so epochs are never chosen on the held-out problems)
    staged    the grid's SFT snapshot, then fine-tuned on verified rows only
    report    the markdown tables with 95% Wilson intervals

Run the experiment (``all`` = harvest, epochs, verified, report; grid, probe, sample and
staged run only when named; each stage's wall time goes to OUT/times.jsonl and the report):

    .venv/bin/python scripts/exp_ceiling.py --out runs/exp_ceiling

``--jobs 2`` (the default) runs the harvest as two slices and the independent training runs of
epochs and verified (one per N and loss, one per verified student) as two one-thread processes side
by side, longest first; ``--jobs 1 --threads 2`` runs everything in one process.

or one stage: ``... --stage grid``. Sizes: ``--heldout``, ``--train``, ``--validation``,
``--grid``. tests/test_exp_ceiling.py runs it scaled down on a tiny random-init teacher.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "What is {a} + {b}? Reply with just the number."
ALL_STAGES = ("harvest", "epochs", "verified", "report")
SMALL_STUDENT = "layers:0,1,2,3,14,15,26,27,28,29"
TOPK = 20


def split_problems(n_heldout: int, n_train: int, seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Held-out and training problems, disjoint as unordered pairs."""
    held, train, _val = split_three(n_heldout, n_train, 0, seed)
    return held, train


def split_three(n_heldout: int, n_train: int, n_val: int,
                seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """Held-out (test), training and validation problems; test and validation are each disjoint
    from every other set as unordered pairs. Validation picks epochs; the test set only reports."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    held, held_keys = [], set()
    for a, b in pairs:
        if len(held) == n_heldout:
            break
        if frozenset((a, b)) not in held_keys:
            held.append((a, b))
            held_keys.add(frozenset((a, b)))
    rest = [(a, b) for a, b in pairs if frozenset((a, b)) not in held_keys]
    train = rest[:n_train]
    train_keys = {frozenset(p) for p in train}
    val, val_keys = [], set()
    for a, b in rest[n_train:]:
        key = frozenset((a, b))
        if len(val) == n_val:
            break
        if key not in train_keys and key not in val_keys:
            val.append((a, b))
            val_keys.add(key)
    return held, train, val


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def generate_rows(model: Any, tok: Any, problems: list[tuple[int, int]], path: Path, *, temperature: float = 0.0,
                  n: int = 1, topk: int = 0, batch: int = 64, seed: int = 0, meta: dict[str, Any],
                  system: str | None = None) -> list[dict]:
    """Generate ``n`` completions per problem, appending verified rows to ``path`` (resumable)."""
    from stillhouse.distill.data import with_system
    from stillhouse.distill.modelio import chat_prompt_ids, generate_batch
    from stillhouse.distill.verify import check_numeric

    rows = _read_jsonl(path)
    done = {(r["a"], r["b"], r["sample"]) for r in rows}
    todo = [(a, b, s) for a, b in problems for s in range(n) if (a, b, s) not in done]
    t0, toks = time.time(), 0
    with path.open("a") as f:
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            msgs = [[{"role": "user", "content": PROMPT.format(a=a, b=b)}] for a, b, _ in chunk]
            prompts = [chat_prompt_ids(tok, with_system(m, system)) for m in msgs]
            gens = generate_batch(model, tok, prompts, max_new_tokens=16, temperature=temperature,
                                  top_k_logprobs=topk, seed=seed + i)
            for (a, b, s), m, g in zip(chunk, msgs, gens):
                ok, reason = check_numeric(g.text, a + b)
                row = dict(a=a, b=b, sample=s, messages=m + [{"role": "assistant", "content": g.text}],
                           completion=g.text, token_ids=g.token_ids, finish_reason=g.finish_reason,
                           correct=ok, reason=reason, temperature=temperature,
                           prompt_tokens=len(prompts[0]), completion_tokens=len(g.token_ids), **meta)
                if topk:
                    row.update(top_ids=g.top_ids, top_logprobs=g.top_logprobs)
                f.write(json.dumps(row) + "\n")
                rows.append(row)
                toks += len(g.token_ids)
            f.flush()
            _log(f"{path.name}: {min(i + batch, len(todo))}/{len(todo)} "
                 f"({toks / (time.time() - t0):.0f} completion tok/s)")
    return rows


def stage_harvest(args: argparse.Namespace, out: Path) -> None:
    """Teacher greedy on the held-out set and the training pool. ``--jobs J`` splits the problems
    into J slices, each harvested by its own process into ``*.part<i>.jsonl``, then merged in problem
    order (the file order the grid's first-N cuts depend on); a killed harvest resumes from its parts."""
    from stillhouse.distill.modelio import load_causal_lm

    held, train = split_problems(args.heldout, args.train)
    files = {"teacher_heldout.jsonl": held, "harvest_greedy.jsonl": train}
    if args.jobs > 1 and any(len(_read_jsonl(out / name)) < len(problems) for name, problems in files.items()):
        _run_jobs(out, [(f"harvest-{i}", ["--stage", "harvest", "--part", f"{i}/{args.jobs}"])
                        for i in range(args.jobs)], args)
        for name, problems in files.items():
            _merge_parts(out, name, problems)
    model, tok, rev = load_causal_lm(args.teacher)
    meta = {"model": "SmolLM2-135M-Instruct", "revision": rev}
    t0 = time.time()
    for name, problems in files.items():
        topk = TOPK if name == "harvest_greedy.jsonl" else 0
        if args.part:  # one slice of a parallel harvest: the problems of slice i of j not yet in the merged file
            i, j = (int(x) for x in args.part.split("/"))
            done = {(r["a"], r["b"]) for r in _read_jsonl(out / name)}
            generate_rows(model, tok, [q for q in problems[i::j] if q not in done],
                          out / f"{Path(name).stem}.part{i}.jsonl", meta=meta, topk=topk)
            continue
        rows = generate_rows(model, tok, problems, out / name, topk=topk, meta=meta)
        _log(f"teacher greedy accuracy on {name}: {sum(r['correct'] for r in rows)}/{len(rows)}")
    _log(f"harvest wall {time.time() - t0:.0f}s")


def _merge_parts(out: Path, name: str, problems: list[tuple[int, int]]) -> None:
    """Rows of ``name`` and its ``.part<i>`` files, one per problem, in ``problems`` order (atomic)."""
    stem = Path(name).stem
    parts = sorted(out.glob(f"{stem}.part*.jsonl"))
    by_key = {(r["a"], r["b"]): r for f in [out / name, *parts] for r in _read_jsonl(f)}
    rows = [by_key[q] for q in problems if q in by_key]
    tmp = out / f"{name}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(out / name)
    for f in parts:
        f.unlink()


def _run_jobs(out: Path, jobs: list[tuple[str, list[str]]], args: argparse.Namespace) -> None:
    """Run this script once per job (``(name, stage arguments)``), ``--jobs`` at a time with ``--threads``
    each, in the given order (longest first), logs in OUT/logs/<name>.log.

    Two one-thread processes train 1.35x the tokens/s of one two-thread process on this 2-core machine
    (median per-step tokens/s, measured: 413 + 430 against 625): a 10-example step does not keep two threads busy.
    Children die with this process (PR_SET_PDEATHSIG), so a killed run leaves no trainer behind to race a
    rerun on the same run directory; the rerun resumes every job from its checkpoints.
    """
    (out / "logs").mkdir(exist_ok=True)
    pending, running, failed = list(jobs), {}, []
    while pending or running:
        while pending and len(running) < args.jobs:
            name, extra = pending.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--jobs", "1",
                   "--threads", str(args.threads), "--child", str(os.getpid()), *extra]
            log = (out / "logs" / f"{name}.log").open("ab")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, time.time())
            _log(f"job {name} started: log {out / 'logs' / name}.log")
        time.sleep(0.5)
        for name, (proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            _log(f"job {name} " + ("done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})")
                 + f" after {time.time() - t0:.0f}s")
            if proc.returncode:
                failed.append(name)
    if failed:
        raise SystemExit(f"jobs {failed} failed: see {out / 'logs'}/<job>.log; rerunning the same command "
                         "resumes (finished runs and evaluations are kept)")


def _train_jobs(args: argparse.Namespace, out: Path, stages: list[str]) -> list[tuple[str, list[str]]]:
    """The independent training runs of ``stages`` (epochs: one per N and loss; verified: one per student),
    longest first by examples seen (top-k steps cost ~1.25x an SFT step, the full-size self student ~2x)."""
    jobs: list[tuple[float, str, list[str]]] = []
    if "epochs" in stages:
        for n in _epochs_sizes(args):
            for loss in args.epochs_losses:
                cost = n * args.more_epochs * (1.25 if loss == "topk" else 1.0)
                jobs.append((cost, f"epochs-{loss}-n{n}",
                             ["--stage", "epochs", "--epochs-n", str(n), "--epochs-losses", loss]))
    if "verified" in stages:
        n_verified = len(verified_rows(out))
        for who in args.verified_students:
            if who == "self":
                cost = min(n_verified, args.self_max or n_verified) * args.self_epochs * 2.0
            else:
                cost = min(n_verified, args.verified_max or n_verified) * args.verified_epochs
            jobs.append((cost, f"verified-{who}", ["--stage", "verified", "--verified-students", who]))
    return [(name, extra) for _, name, extra in sorted(jobs, key=lambda j: -j[0])]


def _read_results(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file (a JSON list), or none when it is not written yet."""
    return json.loads(path.read_text()) if path.exists() else []


def _merge_results(path: Path, results: list[dict[str, Any]]) -> None:
    """Replace the rows of ``path`` (a JSON list) that share a label with ``results``; under a file lock,
    as parallel jobs write the same file."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = _read_results(path)
        keep = {r["label"] for r in results}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([r for r in old if r["label"] not in keep] + results, indent=2))
        tmp.rename(path)


def evaluate(model: Any, tok: Any, held: list[tuple[int, int]], path: Path, label: str,
             system: str | None = None) -> dict[str, Any]:
    """Greedy accuracy (Wilson 95%) of a model on the held-out problems; outputs kept in ``path``."""
    from stillhouse.distill.metrics import accuracy

    if path.exists():
        rows = _read_jsonl(path)
    else:
        t0 = time.time()
        tmp = path.with_suffix(".part")
        tmp.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = generate_rows(model, tok, held, tmp, batch=100, meta={"model": label}, system=system)
        tmp.rename(path)
        _log(f"eval {label}: {time.time() - t0:.0f}s")
    est = accuracy([r["correct"] for r in rows])
    return {"label": label, "correct": sum(r["correct"] for r in rows), "n": len(rows),
            "acc": est.value, "lo": est.lo, "hi": est.hi}


def stage_probe(args: argparse.Namespace, out: Path) -> None:
    """Per-sample accuracy and pass@k on greedy-wrong training problems, at a few temperatures."""
    from stillhouse.distill.modelio import load_causal_lm

    wrong = [(r["a"], r["b"]) for r in _read_jsonl(out / "harvest_greedy.jsonl") if not r["correct"]]
    probe = wrong[: args.probe_problems]
    model, tok, rev = load_causal_lm(args.teacher)
    summary = {}
    for temp in args.probe_temps:
        t0 = time.time()
        rows = generate_rows(model, tok, probe, out / f"probe_T{temp}.jsonl", temperature=temp, n=args.probe_n,
                             seed=17, meta={"model": "SmolLM2-135M-Instruct", "revision": rev})
        by: dict[tuple[int, int], list[bool]] = {}
        for r in rows:
            by.setdefault((r["a"], r["b"]), []).append(r["correct"])
        pass_at = {k: sum(_pass_at_k(len(v), sum(v), k) for v in by.values()) / len(by)
                   for k in (1, 2, 4, 8) if k <= args.probe_n}
        summary[str(temp)] = {"problems": len(by), "samples": len(rows),
                              "per_sample": sum(r["correct"] for r in rows) / len(rows),
                              "pass_at": pass_at, "tokens": sum(r["completion_tokens"] for r in rows),
                              "wall_s": round(time.time() - t0, 1)}
        _log(f"probe T={temp}: {summary[str(temp)]}")
    (out / "probe.json").write_text(json.dumps(summary, indent=2))


def _pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def stage_sample(args: argparse.Namespace, out: Path) -> None:
    """Best-of-n sampling on greedy-wrong training problems; only verified samples are used later."""
    from stillhouse.distill.modelio import load_causal_lm

    wrong = [(r["a"], r["b"]) for r in _read_jsonl(out / "harvest_greedy.jsonl") if not r["correct"]]
    todo = wrong[args.probe_problems: args.probe_problems + args.sample_problems]
    model, tok, rev = load_causal_lm(args.teacher)
    t0 = time.time()
    rows = generate_rows(model, tok, todo, out / "harvest_sampled.jsonl", temperature=args.sample_temp,
                         n=args.sample_n, seed=1234, meta={"model": "SmolLM2-135M-Instruct", "revision": rev})
    solved = {(r["a"], r["b"]) for r in rows if r["correct"]}
    _log(f"best-of-{args.sample_n} at T={args.sample_temp}: {len(solved)}/{len(todo)} greedy-wrong problems "
         f"rescued; {sum(r['completion_tokens'] for r in rows)} completion tokens; {time.time() - t0:.0f}s")


def verified_rows(out: Path) -> list[dict[str, Any]]:
    """One verified teacher answer per problem: greedy when it verifies, else the first verified sample.

    Answers are never constructed: every row is a teacher output that the verifier accepted.
    """
    rows, seen = [], set()
    for name in ("harvest_greedy.jsonl", "harvest_sampled.jsonl"):
        for r in _read_jsonl(out / name):
            key = (r["a"], r["b"])
            if r["correct"] and key not in seen:
                seen.add(key)
                rows.append(r)
    return rows


def _train_and_eval(args, out: Path, name: str, data: Path, held, teacher, snapshot_at=(), select: bool = False,
                    **cfg_kw) -> list[dict]:
    """Train (or resume) run ``name`` and evaluate it on ``held``. ``select``: export every epoch,
    score each on the validation problems and report the held-out score of the best epoch only
    (fewest epochs on a tie), so the number of epochs is never chosen on the held-out set."""
    if select:
        cfg_kw["export_epochs"] = True
    from transformers import AutoModelForCausalLM

    from stillhouse.config import config_to_dict
    from stillhouse.distill.train import TrainConfig, train

    run = out / "runs" / name
    cfg = TrainConfig(data=str(data), out=str(run), teacher=cfg_kw.pop("teacher_spec", args.teacher),
                      threads=args.threads, seed=0, precision=args.precision,
                      snapshot_at=tuple(snapshot_at), shuffle=False, system_prompt=args.student_system,
                      freeze_embeddings=args.freeze_embeddings and cfg_kw.get("student") != "self", **cfg_kw)
    done = run / "final" / "train_config.json"
    if not done.exists() or {k: v for k, v in json.loads(done.read_text()).items() if k != "__config__"} \
            != config_to_dict(cfg):
        t0 = time.time()
        res = train(cfg, teacher=teacher)
        _log(f"train {name}: {res.steps} steps, {res.examples_seen} examples, {res.tokens_seen} tokens, "
             f"{time.time() - t0:.0f}s; last {res.last}")
    results = []
    dirs = [(n, run / "snapshots" / f"n{n}") for n in snapshot_at]
    val_scores: list[dict[str, Any]] = []
    if select:
        _, _, val = split_three(args.heldout, args.train, args.validation)
        for k in range(1, cfg.epochs + 1):
            model = AutoModelForCausalLM.from_pretrained(str(run / "epochs" / f"e{k}")).eval()
            v = evaluate(model, teacher[1], val, out / "evals" / "val" / f"{name}-e{k}.jsonl", f"{name}-e{k}",
                         system=args.student_system)
            val_scores.append({"epochs": k, **v})
            _log(f"validation {name} e{k}: {v['correct']}/{v['n']} = {v['acc']:.3f}")
        best = max(val_scores, key=lambda v: (v["correct"], -v["epochs"]))
        dirs.append((0, run / "epochs" / f"e{best['epochs']}"))
    elif not snapshot_at:
        dirs.append((0, run / "final"))
    for n, d in dirs:
        model = AutoModelForCausalLM.from_pretrained(str(d)).eval()
        label = f"{name}@{n}" if snapshot_at else (f"{name}-e{best['epochs']}" if select else name)
        r = evaluate(model, teacher[1], held, out / "evals" / f"{label}.jsonl", label, system=args.student_system)
        r.update(train_examples=n, run=name, parameters=sum(p.numel() for p in model.parameters()))
        if select:
            r.update(epochs_chosen=best["epochs"], validation=[{k: v[k] for k in ("epochs", "correct", "n", "acc")}
                                                                for v in val_scores])
        results.append(r)
        _log(f"{label}: {r['correct']}/{r['n']} = {r['acc']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]")
    return results


def stage_grid(args: argparse.Namespace, out: Path) -> None:
    """SFT and top-k KD of the pruned student on the first N greedy examples (nested, one pass)."""
    from stillhouse.distill.modelio import load_causal_lm

    held, _ = split_problems(args.heldout, args.train)
    teacher = load_causal_lm(args.teacher)
    # The teacher's score under the students' prompt format too, so the comparison is like for like.
    evaluate(teacher[0], teacher[1], held, out / "evals" / "teacher-student-format.jsonl", "teacher-student-format",
             system=args.student_system)
    grid = tuple(n for n in args.grid if n <= args.train)
    results = []
    for loss in args.grid_losses:
        results += _train_and_eval(args, out, f"pruned10-{loss}", out / "harvest_greedy.jsonl", held, teacher,
                                   snapshot_at=grid, student=args.pruned, loss=loss, alpha=0.0,
                                   max_examples=max(grid), batch_size=args.batch, lr=args.lr,
                                   warmup_steps=10, epochs=1)
    _merge_results(out / "grid.json", results)


def stage_epochs(args: argparse.Namespace, out: Path) -> None:
    """More passes over the largest grid N, every epoch scored on validation, the best one on the
    held-out set (later epochs reshuffle). ``--epochs-schedule continue``: the grid run's end-of-pass
    checkpoint continued to ``--more-epochs`` epochs at the grid's constant learning rate; ``cosine``:
    a fresh run from the init, ``--more-epochs`` epochs at ``--epochs-lr`` decayed to zero by cosine."""
    import shutil

    from stillhouse.distill.modelio import load_causal_lm

    largest = max(x for x in args.grid if x <= args.train)
    fresh = args.epochs_schedule == "cosine"
    sizes = _epochs_sizes(args)
    held, _ = split_problems(args.heldout, args.train)
    teacher = load_causal_lm(args.teacher)
    results = []
    for n, loss in [(n, loss) for n in sizes for loss in args.epochs_losses]:
        lr = args.epochs_lr if fresh and args.epochs_lr else args.lr
        batch = args.epochs_batch if fresh else args.batch
        name = f"pruned10-{loss}" + (f"-n{n}" if n != largest else "") + f"-{args.more_epochs}ep" + \
            (f"-cos{lr:g}" + (f"-bs{batch}" if batch != 10 else "") if fresh else "")  # session 3-4 runs: bs 10
        run = out / "runs" / name
        if not fresh:
            src = out / "runs" / f"pruned10-{loss}"
            first = src / "checkpoints" / f"step-{n // args.batch:07d}"
            if not first.exists() and not (run / "checkpoints").exists():
                raise SystemExit(f"{first} is missing: run --stage grid with N={n} first")
            if not (run / "epochs" / "e1").exists():  # epoch 1 is the grid's one-pass model at N
                (run / "checkpoints").mkdir(parents=True, exist_ok=True)
                shutil.copytree(first, run / "checkpoints" / first.name, dirs_exist_ok=True)
                shutil.copytree(src / "snapshots" / f"n{n}", run / "epochs" / "e1", dirs_exist_ok=True)
                shutil.copy(src / "metrics.jsonl", run / "metrics.jsonl")
        res = _train_and_eval(args, out, name, out / "harvest_greedy.jsonl", held, teacher, select=True,
                              student=args.pruned, loss=loss, alpha=0.0, max_examples=n, batch_size=batch,
                              lr=lr, warmup_steps=10, epochs=args.more_epochs,
                              schedule="cosine" if fresh else "constant")
        for r in res:
            r["train_examples"] = n
            r["label"] = f"{r['label']} (N={n})"
        results += res
    _merge_results(out / "epochs.json", results)


def _epochs_sizes(args: argparse.Namespace) -> list[int]:
    """The N of stage epochs: --epochs-n, else every --grid size (cosine) or the largest (continue)."""
    largest = max(x for x in args.grid if x <= args.train)
    fresh = args.epochs_schedule == "cosine"
    sizes = args.epochs_n or ([x for x in args.grid if x <= args.train] if fresh else [largest])
    if not fresh and sizes != [largest]:
        raise SystemExit(f"--epochs-n {sizes}: only a cosine run starts fresh at another N; the 'continue' "
                         f"schedule continues the grid run at N={largest} (add --epochs-schedule cosine)")
    if any(not 0 < x <= args.train for x in sizes):
        raise SystemExit(f"--epochs-n {sizes}: each N must be in 1..--train ({args.train})")
    return sizes


def stage_verified(args: argparse.Namespace, out: Path) -> None:
    """Students trained only on verified-correct teacher answers."""
    from stillhouse.distill.modelio import load_causal_lm

    held, _ = split_problems(args.heldout, args.train)
    teacher = load_causal_lm(args.teacher)
    results = []
    for who in args.verified_students:
        rows = verified_rows(out)
        limit = args.self_max if who == "self" else args.verified_max
        rows = rows[:limit] if limit else rows
        data = out / f"verified_{who}.jsonl"
        if not data.exists():  # frozen at first use, so a resumed run sees the same rows
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        rows = _read_jsonl(data)
        _log(f"verified set for {who}: {len(rows)} rows ({sum(r['temperature'] == 0 for r in rows)} greedy)")
        if not rows:
            data.unlink()
            _log(f"no verified rows for {who}: the teacher answered no training problem correctly; skipped")
            continue
        if who == "self":
            res = _train_and_eval(args, out, "self-verified", data, held, teacher, select=True, student="self",
                                  loss="sft", batch_size=args.batch, lr=args.self_lr, warmup_steps=10,
                                  epochs=args.self_epochs)
        else:
            res = _train_and_eval(args, out, "pruned10-verified", data, held, teacher, select=True,
                                  student=args.pruned, loss="sft", batch_size=args.batch,
                                  lr=args.verified_lr or args.lr, schedule=args.verified_schedule,
                                  warmup_steps=10, epochs=args.verified_epochs)
        for r in res:
            r["verified_rows"] = len(rows)
        results += res
    _merge_results(out / "verified.json", results)


def stage_staged(args: argparse.Namespace, out: Path) -> None:
    """The pruned student healed on N greedy examples (grid SFT snapshot), then fine-tuned on verified rows only."""
    from stillhouse.distill.modelio import load_causal_lm

    held, _ = split_problems(args.heldout, args.train)
    base = out / "runs" / "pruned10-sft" / "snapshots" / f"n{args.staged_from}"
    start = load_causal_lm(f"hf:{base}")
    data = out / "verified_pruned.jsonl"
    rows = _read_jsonl(data)
    res = _train_and_eval(args, out, f"pruned10-sft{args.staged_from}+verified", data, held, start,
                          teacher_spec=f"hf:{base}", student="self",
                          loss="sft", batch_size=args.batch, lr=args.lr, warmup_steps=10,
                          epochs=args.staged_epochs)
    for r in res:
        r["verified_rows"] = len(rows)
        r["train_examples"] = f"{args.staged_from} greedy + {len(rows)} verified x {args.staged_epochs}"
    _merge_results(out / "verified.json", res)


def _ratio(acc: float, teacher_acc: float) -> str:
    return f"{acc / teacher_acc:.2f}" if teacher_acc else "-"


def stage_report(args: argparse.Namespace, out: Path) -> None:
    """Markdown tables of every measured model, with 95% Wilson intervals, and grid.png."""
    held, _ = split_problems(args.heldout, args.train)
    t = evaluate(None, None, held, out / "teacher_heldout.jsonl", "teacher")
    lines = ["| model | train examples | params | correct | accuracy [95% CI] | ÷ teacher |", "|---|---|---|---|---|---|",
             (f"| teacher SmolLM2-135M-Instruct (greedy) | - | 134.5M | {t['correct']}/{t['n']} | "
              f"{t['acc']:.3f} [{t['lo']:.3f}, {t['hi']:.3f}] | 1.00 |")]
    ts = out / "evals" / "teacher-student-format.jsonl"
    if ts.exists():
        r = evaluate(None, None, held, ts, "teacher")
        lines.append(f"| teacher, students' prompt format (system '{args.student_system}') | - | 134.5M | "
                     f"{r['correct']}/{r['n']} | {r['acc']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | "
                     f"{_ratio(r['acc'], t['acc'])} |")
    for name in ("grid.json", "epochs.json", "verified.json"):
        for r in _read_results(out / name):
            lines.append(f"| {r['label']} | {r['train_examples'] or 'all'} | {r['parameters'] / 1e6:.1f}M | "
                         f"{r['correct']}/{r['n']} | {r['acc']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] | "
                         f"{_ratio(r['acc'], t['acc'])} |")
    table = "\n".join(lines) + "\n" + _times_table(out)
    plot_grid(out, t)
    (out / "results.md").write_text(table + "\n![accuracy vs N](grid.png)\n")
    print(table)


def _times_table(out: Path) -> str:
    """Wall time of the latest run of each stage (OUT/times.jsonl), and their sum."""
    path = out / "times.jsonl"
    if not path.exists():
        return ""
    latest = {r["stage"]: r for r in _read_jsonl(path) if r["stage"] != "report"}
    for combined in [k for k in latest if "+" in k]:  # parallel jobs: epochs+verified replaces earlier runs of each
        for part in combined.split("+"):
            if part in latest and latest[part]["finished"] < latest[combined]["finished"]:
                del latest[part]
    rows = [f"| {k} | {r['seconds'] / 60:.1f} | {r.get('jobs', 1)} x {r['threads']} | {r['load1']} | {r['finished']} |"
            for k, r in latest.items()]
    total = sum(r["seconds"] for r in latest.values())
    return ("\n| stage | wall min | jobs x threads | load (1 min) at end | finished |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + f"\n| **total** | **{total / 60:.1f}** | | | |\n")


def plot_grid(out: Path, teacher: dict[str, Any]) -> Path | None:
    """grid.png: the pruned student's accuracy against N per loss, with the teacher's line."""
    from stillhouse.distill.metrics import Estimate
    from stillhouse.distill.plots import score_vs_examples

    if not (out / "grid.json").exists() and not (out / "epochs.json").exists():
        return None
    series: dict[str, list[tuple[int, Estimate]]] = {}
    for r in _read_results(out / "grid.json"):
        series.setdefault(f"{r['run']} (one pass)", []).append(
            (int(r["train_examples"]), Estimate(r["acc"], r["lo"], r["hi"], r["n"])))
    # the fresh cosine runs of stage epochs, one series per recipe across N (run names differ only in -n<N>)
    for r in _read_results(out / "epochs.json"):
        if "-cos" in r["run"]:
            recipe = re.sub(r"-n\d+-", "-", r["run"])
            series.setdefault(recipe, []).append(
                (int(r["train_examples"]), Estimate(r["acc"], r["lo"], r["hi"], r["n"])))
    series = {k: sorted(v, key=lambda x: x[0]) for k, v in series.items()}
    t = Estimate(teacher["acc"], teacher["lo"], teacher["hi"], teacher["n"])
    return score_vs_examples(series, out / "grid.png", teacher=t,
                             title="10-layer student vs N examples (epoch chosen on validation)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/exp_ceiling"))
    p.add_argument("--stage", default="all",
                   choices=["all", "harvest", "probe", "sample", "grid", "epochs", "verified", "staged", "report"])
    p.add_argument("--heldout", type=int, default=300, help="held-out problems")
    p.add_argument("--train", type=int, default=4000, help="training-pool problems harvested greedily")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of each job; 1 is fastest on a shared 2-core machine")
    p.add_argument("--jobs", type=int, default=2,
                   help="processes run side by side: the harvest's slices, and the independent training runs "
                        "of epochs and verified (2 fills this 2-core machine; 1 = everything in this process)")
    p.add_argument("--part", default="", help=argparse.SUPPRESS)  # I/J: one harvest slice (set by --jobs)
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)  # parent pid: a job of --jobs
    p.add_argument("--grid", type=int, nargs="+", default=[250, 1000, 4000], help="training-set sizes N")
    p.add_argument("--grid-losses", nargs="+", default=["sft", "topk"])
    p.add_argument("--more-epochs", type=int, default=4, help="stage epochs: passes over each N")
    p.add_argument("--epochs-losses", nargs="+", default=["sft", "topk"], help="stage epochs: losses")
    p.add_argument("--epochs-schedule", default="cosine", choices=["continue", "cosine"],
                   help="stage epochs: fresh cosine runs at each N, or continue the one-pass grid run at the largest N")
    p.add_argument("--epochs-lr", type=float, default=5e-4,
                   help="stage epochs, cosine: peak LR (0 = --lr); 5e-4 rose over 3e-4 on validation for SFT (53 vs 47 of 200)")
    p.add_argument("--epochs-batch", type=int, default=10, help="stage epochs, cosine: batch size")
    p.add_argument("--epochs-n", type=int, nargs="+", default=None,
                   help="stage epochs, cosine: training-set sizes (default: the --grid sizes)")
    p.add_argument("--student-system", default="",
                   help="system prompt of student training and evaluation ('' keeps sequences short; "
                        "the template default adds 30 tokens to a 40-token example)")
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-4, help="learning rate of the pruned student")
    p.add_argument("--self-lr", type=float, default=5e-5, help="learning rate of the self-distilled student")
    p.add_argument("--validation", type=int, default=200,
                   help="validation problems (disjoint from held-out and training) that choose the epochs")
    p.add_argument("--verified-epochs", type=int, default=6,
                   help="most epochs of the pruned student on verified rows (the best on validation is reported)")
    p.add_argument("--verified-lr", type=float, default=3e-4, help="peak LR of the pruned student on verified rows "
                                                                    "(0 = --lr)")
    p.add_argument("--verified-schedule", default="cosine", choices=["constant", "cosine"],
                   help="LR schedule of the pruned student on verified rows (cosine: validation rises every pass, "
                        "115/200 at pass 6; constant 2e-4 jumped between passes, 77-98/200 at its best)")
    p.add_argument("--self-epochs", type=int, default=2,
                   help="most epochs of the self-distilled student (the best on validation is reported)")
    p.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the small student's token embeddings (tied to its LM head) at the teacher's values: "
                        "1.24x faster steps on one CPU thread (the self student always trains them)")
    p.add_argument("--pruned", default=SMALL_STUDENT,
                   help="the small student's init: 10 of the teacher's 30 layers (the first four, two in the middle, "
                        "the last four; pruned:10 = every third)")
    p.add_argument("--teacher", default="bundled", help="teacher spec (bundled, hf:DIR); tests use a tiny hf: model")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="training precision (auto = bf16 where the CPU has AVX512-BF16/AMX)")
    p.add_argument("--staged-from", type=int, default=1000, help="grid SFT snapshot the staged student starts from")
    p.add_argument("--staged-epochs", type=int, default=1)
    p.add_argument("--verified-students", nargs="+", default=["pruned", "self"], choices=["pruned", "self"])
    p.add_argument("--verified-max", type=int, default=0, help="cap on verified rows for the pruned student")
    p.add_argument("--self-max", type=int, default=400, help="cap on verified rows for the self-distilled student")
    p.add_argument("--probe-problems", type=int, default=32)
    p.add_argument("--probe-n", type=int, default=8)
    p.add_argument("--probe-temps", type=float, nargs="+", default=[0.3, 0.7])
    p.add_argument("--sample-problems", type=int, default=600, help="greedy-wrong problems to sample on")
    p.add_argument("--sample-n", type=int, default=4)
    p.add_argument("--sample-temp", type=float, default=0.3)
    args = p.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        raise SystemExit(f"--jobs {args.jobs} --threads {args.threads}: both must be at least 1")
    if args.part and not re.fullmatch(r"\d+/\d+", args.part):
        raise SystemExit(f"--part {args.part!r}: use I/J (slice I of J, from 0)")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a parallel job inherits
    if args.child:
        _die_with_parent(args.child)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = {"harvest": stage_harvest, "probe": stage_probe, "sample": stage_sample, "grid": stage_grid,
              "epochs": stage_epochs, "verified": stage_verified, "staged": stage_staged, "report": stage_report}
    todo = [name for name in stages if args.stage == name or (args.stage == "all" and name in ALL_STAGES)]
    parallel = [name for name in todo if name in ("epochs", "verified")] if args.jobs > 1 and not args.part else []
    for name in todo:
        if name in parallel:
            if name != parallel[0]:
                continue  # the independent runs of epochs and verified share one pool of jobs
            name = "+".join(parallel)
            _log(f"stage {name}: {args.jobs} jobs of {args.threads} thread(s)")
            t0 = time.time()
            _run_jobs(args.out, _train_jobs(args, args.out, parallel), args)
        else:
            _log(f"stage {name}")
            t0 = time.time()
            stages[name](args, args.out)
        if not args.child:
            _record_time(args.out, name, time.time() - t0, args.threads, args.jobs)
    return 0


def _die_with_parent(parent: int) -> None:
    """A job gets SIGKILL when its parent dies (Linux PR_SET_PDEATHSIG); if the parent is already gone, exit."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        return  # not Linux: a killed parent leaves its jobs running to the end
    if os.getppid() != parent:
        raise SystemExit(f"parent {parent} is gone: not starting this job")


def _record_time(out: Path, stage: str, seconds: float, threads: int, jobs: int) -> None:
    """Append one stage's wall time to OUT/times.jsonl (the report sums the latest run of each stage)."""
    row = {"stage": stage, "seconds": round(seconds, 1), "threads": threads, "jobs": jobs,
           "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "load1": round(os.getloadavg()[0], 2)}
    with (out / "times.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
