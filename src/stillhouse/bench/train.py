"""``stillhouse bench train``: training tokens/s of our trainer against TRL's ``SFTTrainer`` and a
plain PyTorch loop, on the same student, data, batch size and sequence lengths, plus MFU.

    stillhouse bench train                              # pruned:10 student, 512 examples, batch 16
    stillhouse bench train --examples 128 --arms ours-bf16,plain-fp32

Arms (one after another in one run; each starts from the same student weights, written once as
an HF directory under OUT/student):

- ``peak-fp32`` / ``peak-bf16``: this machine's peak matmul FLOP/s (best of several 2048^3
  matmuls with the same thread count), the denominator of MFU;
- ``plain-fp32``: a plain PyTorch loop: ``model(input_ids, labels=...)`` (full logits), AdamW;
- ``ours-fp32`` / ``ours-bf16``: :func:`stillhouse.distill.train.train` (LM head on the answer
  positions only, fused AdamW, ``--precision``);
- ``trl-fp32`` / ``trl-bf16``: TRL ``SFTTrainer`` (prompt-completion data, so the loss is on the
  completion only, like ours) in its pinned virtualenv (:mod:`stillhouse.bench.peers`, built on
  first use; ``--peer-python trl=PATH`` names another), through ``bench/trl_worker.py``;
- ``ours_gkd-fp32`` / ``ours_gkd-bf16``: on-policy distillation, ``stillhouse train --loss gkd`` (white-box
  teacher: the bundled model the student is cut from), and ``trl_gkd-fp32`` / ``trl_gkd-bf16``: TRL's
  ``trl.experimental.gkd.GKDTrainer``, on the same student, teacher and ``gkd_examples`` chat rows, with
  TRL's defaults on both sides (lmbda 0.5, beta 0.5, sampling temperature 0.9) and ``gkd_max_new_tokens``.
  Speed is examples/s over the same timed span as the other arms (sampling included); then each trained
  student answers ``heldout`` held-out 2-digit additions greedily (the rows' system prompt), checked by
  the verifier: the speed counts only at equal or better held-out accuracy. The student before training
  is scored too (``student-init``), for scale. A student cut from the teacher answers no addition at this
  scale, so that check holds only vacuously; ``gkd_sft`` = N first teaches the cut student N additions of the
  training split (our SFT trainer, untimed, one pass), and both GKD arms start from that student
  (OUT/gkd-sft/final): the recipe of the on-policy reports, SFT first, then on-policy. Each trainer draws its own on-policy steps (ours from
  (seed, step), TRL from Python's ``random``), and an on-policy step costs several off-policy ones, so the
  table also gives each arm's mean seconds per on- and per off-policy step and the examples/s those imply
  at exactly lmbda 0.5 (:func:`at_lmbda`): the ratio that does not depend on the coin flips of a short run.

Timing, the same for every arm: wall time from the end of the first optimizer step to the end of
the last (loading, tokenization, the warm-up step and checkpoint writes excluded), over the
non-pad tokens of those steps (total tokens x (steps - 1) / steps). MFU = 6 x parameters x
tokens/s / peak FLOP/s of the arm's precision (the PaLM definition: model FLOPs, whatever the
implementation skips). For our arms, HFU also counts the FLOPs actually executed: the LM head
runs on the answer positions only, so ours does fewer FLOPs per token than 6 x parameters.

Results go to OUT/results.json and a Markdown table on stdout (copied into docs/benchmarks.md).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stillhouse.config import ConfigError, save_config

ARMS = ("peak-fp32", "peak-bf16", "plain-fp32", "ours-fp32", "ours-bf16", "trl-fp32", "trl-bf16",
        "ours_gkd-fp32", "ours_gkd-bf16", "trl_gkd-fp32")
GKD_ARMS = ("ours_gkd-fp32", "ours_gkd-bf16", "trl_gkd-fp32", "trl_gkd-bf16")
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True)
class BenchTrainConfig:
    """One ``bench train`` run."""

    teacher: str = "bundled"
    student: str = "pruned:10"
    examples: int = 512
    batch_size: int = 16
    lr: float = 1e-4
    threads: int = 2
    arms: tuple[str, ...] = ARMS
    peers: bool = True
    """Run the TRL arms, building TRL's pinned virtualenv on first use; False skips them."""
    peer_python: tuple[str, ...] = ()
    """``trl=PATH``: run TRL with this python instead of its pinned virtualenv."""
    out: str = "runs/bench-train"
    peak_size: int = 2048
    """Side of the square matmul that measures peak FLOP/s."""
    gkd_examples: int = 256
    """Chat rows the GKD arms train on (one epoch, batch_size rows a step)."""
    gkd_max_new_tokens: int = 16
    """Most tokens the student samples per on-policy completion in the GKD arms."""
    heldout: int = 200
    """Held-out 2-digit additions each GKD arm's student answers after training."""
    gkd_sft: int = 0
    """2-digit additions of the training split (right answers) the student learns first, with our SFT trainer,
    untimed, one pass; both GKD arms start from that student. 0 = from the cut student."""

    def __post_init__(self) -> None:
        from stillhouse.bench.peers import check_overrides

        check_overrides(self.peer_python)
        bad = [a for a in self.arms if a not in ARMS + GKD_ARMS]
        if bad:
            raise ConfigError(f"unknown arms {bad}: choose from {', '.join(dict.fromkeys(ARMS + GKD_ARMS))}")
        if any(a in GKD_ARMS for a in self.arms) and (self.gkd_examples < 2 * self.batch_size or self.heldout < 1
                                                       or self.gkd_max_new_tokens < 1):
            raise ConfigError(f"gkd_examples={self.gkd_examples}, heldout={self.heldout}, gkd_max_new_tokens="
                              f"{self.gkd_max_new_tokens}: need two batches of examples, and at least 1 of each")
        if self.examples < 2 * self.batch_size:
            raise ConfigError(f"examples={self.examples}: need at least two batches ({2 * self.batch_size})")
        if self.threads < 1:
            raise ConfigError(f"threads={self.threads}: must be at least 1")
        if self.gkd_sft < 0 or 0 < self.gkd_sft < self.batch_size:
            raise ConfigError(f"gkd_sft={self.gkd_sft}: 0 (the GKD arms start from the cut student) or at least "
                              f"one batch ({self.batch_size}) of additions to learn first")


def addition_row(a: int, b: int) -> dict[str, Any]:
    """``a + b`` as a chat example, answered right in the teacher's echo format."""
    from stillhouse.distill.tasks import ARITHMETIC_TEMPLATE

    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": ARITHMETIC_TEMPLATE.format(a=a, b=b)},
                         {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]}


def make_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Short chat examples (2- and 3-digit additions answered in the teacher's echo format)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        hi = rng.choice((100, 1000))
        a, b = rng.randrange(10, hi), rng.randrange(10, hi)
        rows.append(addition_row(a, b))
    return rows


def peak_flops(dtype_name: str, threads: int, size: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` FLOP/s of a ``size``^3 matmul in ``dtype_name``."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * size ** 3 / best


def _timed(stamps: list[float], tokens: int) -> tuple[float, float]:
    steps = len(stamps)
    return tokens * (steps - 1) / steps, stamps[-1] - stamps[0]


def run_plain(student_dir: Path, data: Path, cfg: BenchTrainConfig) -> dict[str, Any]:
    """A plain PyTorch loop: HF forward with labels (logits at every position), AdamW."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillhouse.distill.data import collate, encode_file

    torch.set_num_threads(cfg.threads)
    tok = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).train()
    examples = encode_file(data, tok, 512)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stamps = []
    for i in range(0, len(examples), cfg.batch_size):
        batch = collate(examples[i:i + cfg.batch_size], pad)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        stamps.append(time.perf_counter())
    tokens = sum(len(e.input_ids) for e in examples)
    timed_tokens, timed_s = _timed(stamps, tokens)
    return {"arm": "plain-fp32", "steps": len(stamps), "tokens": tokens, "timed_tokens": timed_tokens,
            "timed_s": timed_s}


def run_ours(student_dir: Path, data: Path, cfg: BenchTrainConfig, precision: str, out: Path) -> dict[str, Any]:
    """The stillhouse trainer, as ``stillhouse train`` runs it."""
    from stillhouse.distill.data import encode_file
    from stillhouse.distill.modelio import load_causal_lm
    from stillhouse.distill.train import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    teacher = load_causal_lm(f"hf:{student_dir}")
    tcfg = TrainConfig(data=str(data), out=str(out), teacher=f"hf:{student_dir}", student="self", loss="sft",
                       shuffle=False, batch_size=cfg.batch_size, lr=cfg.lr, threads=cfg.threads,
                       precision=precision, max_len=512)  # type: ignore[arg-type]
    stamps: list[float] = []
    train(tcfg, teacher=teacher, on_step=lambda _row: stamps.append(time.perf_counter()), progress=False)
    examples = encode_file(data, teacher[1], 512)
    tokens = sum(len(e.input_ids) for e in examples)
    answer = sum(sum(1 for x in e.labels[1:] if x >= 0) for e in examples)
    timed_tokens, timed_s = _timed(stamps, tokens)
    return {"arm": f"ours-{precision}", "steps": len(stamps), "tokens": tokens, "answer_tokens": answer,
            "timed_tokens": timed_tokens, "timed_s": timed_s}


def run_trl(student_dir: Path, data: Path, cfg: BenchTrainConfig, precision: str, out: Path,
            python: Path) -> dict[str, Any]:
    """TRL SFTTrainer in its own virtualenv (see trl_worker.py)."""

    pc = out / "trl-data.jsonl"
    with pc.open("w") as f:
        for line in data.read_text().splitlines():
            m = json.loads(line)["messages"]
            f.write(json.dumps({"prompt": m[:-1], "completion": m[-1:]}) + "\n")
    spec = {"student": str(student_dir), "data": str(pc), "batch_size": cfg.batch_size, "lr": cfg.lr,
            "threads": cfg.threads, "precision": precision, "max_len": 512, "out": str(out / f"trl-{precision}")}
    return _trl_worker(python, out, f"trl-{precision}", "trl-spec.json", spec, "TRL worker")


def _trl_worker(python: Any, out: Path, arm: str, spec_name: str, spec: dict[str, Any], what: str) -> dict[str, Any]:
    """Run bench/trl_worker.py on ``spec`` in TRL's virtualenv; its result (``OUT/ARM.json``), or the arm marked
    skipped with the end of the worker's stderr."""
    from stillhouse.bench.peers import run_env

    (out / spec_name).write_text(json.dumps(spec))
    res = out / f"{arm}.json"
    worker = Path(__file__).with_name("trl_worker.py")
    proc = subprocess.run([str(python), str(worker), str(out / spec_name), str(res)],
                          capture_output=True, text=True, check=False, env=run_env("trl"))
    if proc.returncode != 0:
        return {"arm": arm, "skipped": f"{what} failed: {proc.stderr.strip()[-600:]}"}
    return json.loads(res.read_text())


def heldout_items(n: int) -> list[Any]:
    """The GKD arms' held-out 2-digit additions, asked as the training rows ask."""
    from stillhouse.distill.tasks import arithmetic

    return arithmetic(n, "heldout", seed=0, digits=(2,))


def score_student(model_dir: Path, items: list[Any], threads: int) -> dict[str, Any]:
    """Greedy answers of the student in ``model_dir`` on ``items`` (system prompt SYSTEM), verified."""
    import torch
    from transformers import AutoTokenizer

    from stillhouse.distill.metrics import accuracy
    from stillhouse.distill.select import score_pass

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    correct, ok = score_pass(Path(model_dir), tok, items, SYSTEM, batch_size=100)
    acc = accuracy(ok)
    return {"heldout_correct": correct, "heldout_n": len(ok), "heldout_acc": [acc.value, acc.lo, acc.hi],
            "heldout_verdicts": ok}


def sft_first(student_dir: Path, cfg: BenchTrainConfig, out: Path) -> Path:
    """The GKD arms' start when ``cfg.gkd_sft``: the cut student after one pass of our SFT trainer over
    ``cfg.gkd_sft`` additions of the training split (disjoint from the held-out ones), right answers in the
    rows' format. Untimed; reused when OUT/gkd-sft/final exists for the same rows."""
    from stillhouse.distill.tasks import arithmetic
    from stillhouse.distill.train import TrainConfig, train

    data = out / "gkd-sft-data.jsonl"
    rows = "".join(json.dumps(addition_row(it.meta["a"], it.meta["b"])) + "\n"
                   for it in arithmetic(cfg.gkd_sft, "train", seed=2, digits=(2,)))
    final = out / "gkd-sft" / "final"
    if final.exists() and data.exists() and data.read_text() == rows:
        return final
    data.write_text(rows)
    shutil.rmtree(out / "gkd-sft", ignore_errors=True)
    tcfg = TrainConfig(data=str(data), out=str(out / "gkd-sft"), teacher=f"hf:{student_dir}", student="self",
                       loss="sft", epochs=1, shuffle=True, batch_size=cfg.batch_size, lr=3e-4, threads=cfg.threads,
                       precision="fp32", max_len=512)
    return train(tcfg, progress=False).final_dir


def run_ours_gkd(teacher: tuple[Any, Any, str], teacher_spec: str, student_dir: Path, data: Path,
                 cfg: BenchTrainConfig, precision: str, out: Path) -> dict[str, Any]:
    """``stillhouse train --loss gkd`` (TRL's GKD defaults), white-box, as the CLI runs it, from the student in
    ``student_dir`` (the teacher's vocabulary)."""
    from stillhouse.distill.train import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    tcfg = TrainConfig(data=str(data), out=str(out), teacher=teacher_spec, student=f"model:hf:{student_dir}",
                       loss="gkd",
                       lmbda=0.5, beta=0.5, gen_temperature=0.9, max_new_tokens=cfg.gkd_max_new_tokens,
                       shuffle=False, batch_size=cfg.batch_size, lr=cfg.lr, threads=cfg.threads,
                       precision=precision, max_len=512)  # type: ignore[arg-type]
    stamps: list[float] = []
    on_policy_at: list[int] = []

    def step(row: dict[str, Any]) -> None:
        if row.get("on_policy"):
            on_policy_at.append(len(stamps))
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    res = train(tcfg, teacher=teacher, on_step=step, progress=False)
    wall = time.perf_counter() - t0
    n = cfg.gkd_examples
    info = json.loads((res.final_dir / "train_result.json").read_text())
    return {"arm": f"ours_gkd-{precision}", "steps": len(stamps), "examples": n,
            "timed_examples": n * (len(stamps) - 1) / len(stamps), "timed_s": stamps[-1] - stamps[0],
            "wall_s": wall, "on_policy_steps": info.get("on_policy_steps"), "on_policy_at": on_policy_at,
            "step_stamps": stamps, "model_dir": str(res.final_dir)}


def step_seconds(stamps: list[float], on_policy_at: list[int]) -> tuple[float | None, float | None]:
    """Mean seconds of the on-policy and of the off-policy steps after the first (the warm-up step, whose start
    is not stamped); None for a kind with no timed step. Step i runs from stamps[i-1] to stamps[i]."""
    on: list[float] = []
    off: list[float] = []
    for i in range(1, len(stamps)):
        (on if i in on_policy_at else off).append(stamps[i] - stamps[i - 1])
    return (sum(on) / len(on) if on else None), (sum(off) / len(off) if off else None)


def at_lmbda(seconds_on: float | None, seconds_off: float | None, batch_size: int, lmbda: float) -> float | None:
    """Examples/s a run would reach if its on-policy share were exactly ``lmbda`` (the per-kind step times
    weighted by lmbda, so two trainers' coin flips do not decide their ratio)."""
    if seconds_on is None or seconds_off is None:
        return None
    return batch_size / (lmbda * seconds_on + (1 - lmbda) * seconds_off)


def run_trl_gkd(student_dir: Path, teacher_dir: Path, data: Path, cfg: BenchTrainConfig, precision: str, out: Path,
                python: Path) -> dict[str, Any]:
    """TRL GKDTrainer in its own virtualenv (trl_worker.py, mode gkd)."""

    spec = {"mode": "gkd", "student": str(student_dir), "teacher": str(teacher_dir), "data": str(data),
            "batch_size": cfg.batch_size, "lr": cfg.lr, "threads": cfg.threads, "precision": precision, "max_len": 512,
            "lmbda": 0.5, "beta": 0.5, "temperature": 0.9, "max_new_tokens": cfg.gkd_max_new_tokens,
            "out": str(out / f"trl_gkd-{precision}")}
    return _trl_worker(python, out, f"trl_gkd-{precision}", "trl-gkd-spec.json", spec, "TRL GKD worker")


def run_bench(cfg: BenchTrainConfig) -> dict[str, Any]:
    """Run every arm of ``cfg``; write OUT/results.json and print the table."""
    import torch

    from stillhouse.bench.peers import prepare
    from stillhouse.distill.modelio import load_causal_lm
    from stillhouse.distill.student import count_parameters, make_student

    # The peer first: a first-use build must finish before anything is measured.
    wants_trl = cfg.peers and any(a.startswith("trl") for a in cfg.arms)
    peer_py, peer_errors = prepare(["trl"] if wants_trl else [], cfg.peer_python)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "bench_config.json")
    torch.set_num_threads(cfg.threads)
    t_model, tok, _rev = load_causal_lm(cfg.teacher)
    student = make_student(t_model, cfg.student, seed=0)
    params = count_parameters(student)
    head = student.get_output_embeddings().weight.numel()
    student_dir = out / "student"
    student.save_pretrained(student_dir)
    tok.save_pretrained(student_dir)
    del student
    gkd_arms = [a for a in cfg.arms if a in GKD_ARMS]
    teacher = (t_model, tok, _rev) if gkd_arms else None
    del t_model
    data = out / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(cfg.examples)))
    gkd_data = out / "gkd-data.jsonl"
    gkd_data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(cfg.gkd_examples, seed=1)))
    items = heldout_items(cfg.heldout) if gkd_arms else []
    gkd_student = sft_first(student_dir, cfg, out) if gkd_arms and cfg.gkd_sft else student_dir

    results: dict[str, Any] = {"config": cfg.__dict__, "parameters": params, "head_parameters": head, "arms": {}}
    peaks = {}
    if gkd_arms:
        results["arms"]["student-init"] = {"arm": "student-init", "model_dir": str(gkd_student),
                                           **score_student(gkd_student, items, cfg.threads)}
    for arm in cfg.arms:
        kind, prec = arm.rsplit("-", 1)
        print(f"[{time.strftime('%H:%M:%S')}] {arm} ...", flush=True)
        if kind in ("ours_gkd", "trl_gkd"):
            if kind == "ours_gkd" and teacher is not None:
                r = run_ours_gkd(teacher, cfg.teacher, gkd_student, gkd_data, cfg, prec, out / arm)
            elif "trl" in peer_py:
                from stillhouse.teacher.bundled import resolve_model_dir

                r = run_trl_gkd(gkd_student, resolve_model_dir(cfg.teacher)[0], gkd_data, cfg, prec, out,
                                peer_py["trl"])
            else:
                r = {"arm": arm, "skipped": peer_errors.get("trl", "--no-peers")}
            if "timed_s" in r:
                r["examples_per_s"] = r["timed_examples"] / r["timed_s"]
                if "step_stamps" in r:
                    r["s_on_policy_step"], r["s_off_policy_step"] = step_seconds(r["step_stamps"], r["on_policy_at"])
                    r["examples_per_s_at_lmbda"] = at_lmbda(r["s_on_policy_step"], r["s_off_policy_step"],
                                                            cfg.batch_size, 0.5)
                r.update(score_student(Path(r["model_dir"]), items, cfg.threads))
            results["arms"][arm] = r
            (out / "results.json").write_text(json.dumps(results, indent=2))
            continue
        if kind == "peak":
            peaks[prec] = peak_flops(prec, cfg.threads, cfg.peak_size)
            results["arms"][arm] = {"arm": arm, "flops": peaks[prec]}
            continue
        if kind == "plain":
            r = run_plain(student_dir, data, cfg)
        elif kind == "ours":
            r = run_ours(student_dir, data, cfg, prec, out / arm)
        elif "trl" in peer_py:
            r = run_trl(student_dir, data, cfg, prec, out, peer_py["trl"])
        else:
            r = {"arm": arm, "skipped": peer_errors.get("trl", "--no-peers")}
        if "timed_s" in r:
            r["tok_per_s"] = r["timed_tokens"] / r["timed_s"]
        results["arms"][arm] = r
        (out / "results.json").write_text(json.dumps(results, indent=2))
    for arm, r in results["arms"].items():
        prec = arm.rsplit("-", 1)[-1]
        if "tok_per_s" in r and prec in peaks:
            r["mfu"] = 6 * params * r["tok_per_s"] / peaks[prec]
            if "answer_tokens" in r:  # FLOPs ours executes: body on every token, head on answers only
                per_tok = 6 * ((params - head) + head * r["answer_tokens"] / r["tokens"])
                r["hfu"] = per_tok * r["tok_per_s"] / peaks[prec]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    return results


def _ratio(x: float, ref: float | None) -> str:
    return f"{x / ref:.2f}×" if ref else "-"


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "-"


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the arms, with ratios to TRL of the same precision and to TRL fp32."""
    arms = results["arms"]
    head = (f"student {results['parameters'] / 1e6:.1f}M parameters, {results['config']['examples']} examples, "
            f"batch {results['config']['batch_size']}, {results['config']['threads']} threads")
    lines = [head, "",
             "| arm | tokens/s | ÷ TRL same precision | ÷ TRL fp32 | MFU | HFU |", "|---|---|---|---|---|---|"]
    gkd = {a: r for a, r in arms.items() if a in GKD_ARMS or a == "student-init"}
    arms = {a: r for a, r in arms.items() if a not in gkd}
    for arm, r in arms.items():
        if "flops" in r:
            lines.append(f"| {arm} | peak {r['flops'] / 1e9:.0f} GFLOP/s | | | | |")
            continue
        if "skipped" in r:
            lines.append(f"| {arm} | skipped: {r['skipped'][:120]} | | | | |")
            continue
        same = arms.get(f"trl-{arm.split('-')[1]}", {}).get("tok_per_s")
        fp32 = arms.get("trl-fp32", {}).get("tok_per_s")
        cells = [arm, f"{r['tok_per_s']:.0f}", _ratio(r["tok_per_s"], same), _ratio(r["tok_per_s"], fp32),
                 _pct(r.get("mfu")), _pct(r.get("hfu"))]
        lines.append("| " + " | ".join(cells) + " |")
    if gkd:
        c = results["config"]
        lines += ["", (f"GKD: {c.get('gkd_examples')} examples, batch {c['batch_size']}, lmbda 0.5, beta 0.5, sampling "
                       f"temperature 0.9, at most {c.get('gkd_max_new_tokens')} new tokens; held-out 2-digit additions"
                       + (f"; both start from the cut student after one SFT pass over {c['gkd_sft']} training-split "
                          "additions (student-init)" if c.get("gkd_sft") else "")),
                  "", ("| arm | examples/s | ÷ TRL GKD fp32 | on-policy steps | s per on- / off-policy step | "
                       "examples/s at lmbda 0.5 | ÷ TRL GKD fp32 | held-out correct | accuracy [95% CI] |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        ref = gkd.get("trl_gkd-fp32", {}).get("examples_per_s")
        ref_l = gkd.get("trl_gkd-fp32", {}).get("examples_per_s_at_lmbda")
        for arm, r in gkd.items():
            if "skipped" in r:
                lines.append(f"| {arm} | skipped: {r['skipped'][:120]} | | | | | | | |")
                continue
            acc = r.get("heldout_acc")
            on, off, lam = r.get("s_on_policy_step"), r.get("s_off_policy_step"), r.get("examples_per_s_at_lmbda")
            cells = [arm, f"{r['examples_per_s']:.2f}" if "examples_per_s" in r else "-",
                     _ratio(r["examples_per_s"], ref) if "examples_per_s" in r else "-",
                     f"{r['on_policy_steps']}/{r['steps']}" if r.get("on_policy_steps") is not None else "-",
                     " / ".join(f"{x:.1f}" if x is not None else "-" for x in (on, off)) if "step_stamps" in r else "-",
                     f"{lam:.2f}" if lam else "-", _ratio(lam, ref_l) if lam else "-",
                     f"{r.get('heldout_correct')}/{r.get('heldout_n')}",
                     f"{acc[0]:.3f} [{acc[1]:.3f}, {acc[2]:.3f}]" if acc else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
