"""The reasoning experiment (scripts/exp_reasoning.py), run as a user would, scaled down to a tiny random-init
teacher: every stage, the white-box and black-box (through a real `stillhouse serve`) on-policy students."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "exp_reasoning.py"), *args], env=env, check=False,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_reasoning_experiment_end_to_end_on_a_tiny_teacher(tmp_path, smol_tokenizer):
    import socket

    from conftest import build_tiny_model

    tdir = tmp_path / "teacher"
    build_tiny_model(smol_tokenizer).save_pretrained(tdir)
    smol_tokenizer.save_pretrained(tdir)
    out = tmp_path / "exp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--out", str(out), "--teacher", f"hf:{tdir}", "--heldout", "6", "--train", "8", "--validation", "4",
              "--gsm8k", "0", "--samples", "2", "--max-new-tokens", "8", "--student", "pruned:1", "--precision",
              "fp32", "--students", "star,sft-greedy,gkd,gkd-bb,sft-first,sft-more,gkd-more", "--port", str(port), "--gemma", ""]
    _run(*common, "--stage", "split,probe,rationales")
    items = {k: _rows(out / "items" / f"{k}.jsonl") for k in ("heldout", "train", "validation")}
    assert [len(v) for v in items.values()] == [6, 8, 4]
    assert set(json.loads((out / "probe.json").read_text())) == {"cot-greedy", "direct-greedy"}
    samples, greedy = _rows(out / "data" / "samples.jsonl"), _rows(out / "data" / "greedy-all.jsonl")
    assert len(samples) == 16 and len(greedy) == 8 and all(r["kept"] for r in greedy)
    cost = json.loads((out / "data" / "cost.json").read_text())
    assert cost["samples"]["teacher_tokens"] == sum(r["teacher_tokens"] for r in samples)
    assert cost["verified_pool"]["teacher_tokens"] == cost["samples"]["teacher_tokens"] + sum(
        r["teacher_tokens"] for r in greedy)
    # A random-init teacher is never right: mark a few samples verified so the verified student has data
    # (fixture only: the real experiment keeps only answers its verifier accepts).
    for r in samples[:3]:
        r["messages"][-1]["content"] = f"#### {r['answer']}"
        r.pop("token_ids")
        r["correct"] = r["kept"] = True
    (out / "data" / "verified.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples[:3]))
    table = _run(*common)  # teacher, train (4 jobs of train + eval), report
    for name in ("star", "sft-greedy", "gkd", "gkd-bb"):
        res = json.loads((out / "evals" / f"{name}-heldout" / "results.json").read_text())
        assert res["n_items"] == 6 and f"| {name} (" in table
        assert (out / "runs" / name / "final" / "model.safetensors").exists()
    for name in ("gkd", "gkd-bb"):
        info = json.loads((out / "runs" / name / "final" / "train_result.json").read_text())
        assert info["on_policy_steps"] == info["step"] == 1 and info["teacher_scored_tokens"] > 0
    # SFT first, then SFT or GKD on the second half: both start from sft-first's final, each half read once
    assert [len(_rows(out / "data" / f"greedy-{h}.jsonl")) for h in ("first", "second")] == [4, 4]
    assert _rows(out / "data" / "greedy-first.jsonl") + _rows(out / "data" / "greedy-second.jsonl") == greedy
    for name in ("sft-more", "gkd-more"):
        cfg = json.loads((out / "runs" / name / "final" / "train_config.json").read_text())
        assert cfg["student"] == f"model:hf:{out / 'runs' / 'sft-first' / 'final'}" and f"| {name} (" in table
        assert cfg["data"].endswith("greedy-second.jsonl") and "then" in table.split(f"| {name} (")[1].split("\n")[0]
    assert json.loads((out / "runs" / "gkd-more" / "final" / "train_result.json").read_text())["on_policy_steps"] == 1
    bb = json.loads((out / "runs" / "gkd-bb" / "final" / "train_config.json").read_text())
    assert bb["score_teacher"] == f"http://127.0.0.1:{port}/v1" and bb["loss"] == "gkd"
    assert "| teacher (greedy) | - | - | 0/6 |" in table and "**total**" in table and "| strict:" in table
    assert "tokens per kept" not in table or "verified" in table
    assert "| gkd-more ÷ sft-more | " in table and "| gkd-more ÷ sft-first | " in table  # paired, item by item
    assert "| gkd-bb | " in table.split("| job (training")[1]  # each job's own wall time


def test_shots_put_the_same_worked_examples_before_every_problem(tmp_path):
    plain, shots = tmp_path / "plain", tmp_path / "shots"
    sizes = ["--heldout", "5", "--train", "4", "--validation", "3", "--gsm8k", "0", "--stage", "split"]
    _run("--out", str(plain), *sizes)
    _run("--out", str(shots), *sizes, "--shots", "2")
    for split in ("heldout", "train", "validation"):
        a, b = _rows(plain / "items" / f"{split}.jsonl"), _rows(shots / "items" / f"{split}.jsonl")
        assert [r["id"] for r in a] == [r["id"] for r in b]  # the same problems, only the prompt differs
        for x, y in zip(a, b):
            assert y["messages"][-1] == x["messages"][-1] and len(y["messages"]) == 5
            assert [m.get("weight") for m in y["messages"][1:-1:2]] == [0, 0]
            assert y["messages"][:4] == b[0]["messages"][:4]


def test_strict_reading_needs_the_final_answer_line(tmp_path):
    """The strict count takes `#### N`, else "the answer is N"; an echo of the problem whose last number happens to
    be the answer (which the lenient verifier accepts) does not count."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("exp_reasoning", ROOT / "scripts" / "exp_reasoning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps({"id": f"p{i}", "answer": a}) + "\n" for i, a in enumerate(["8", "5", "3"])))
    outs = ["7 + 6 = 13\n13 - 5 = 8\n#### 8", "The answer is 5.", "Zoe has 7. She loses 4. How many now? 3"]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"id": f"p{i}", "m": {"output": o}}) + "\n" for i, o in enumerate(outs)))
    assert mod.strict_correct(samples, "m", items) == 2
    samples.write_text(json.dumps({"id": "p0", "m": {"output": "#### 9 and the answer is 8"}}) + "\n")
    assert mod.strict_correct(samples, "m", items) == 0  # the #### line speaks first


def test_paired_comparisons_match_items_by_id(tmp_path):
    """The report's paired rows: a ÷ b over the same problems, matched by id (not by line order); evals over
    different problems are refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("exp_reasoning", ROOT / "scripts" / "exp_reasoning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def write(name, correct, ids, out=tmp_path):
        d = out / "evals" / f"{name}-heldout"
        d.mkdir(parents=True, exist_ok=True)
        (d / "samples.jsonl").write_text("".join(json.dumps({"id": i, name: {"correct": c}}) + "\n"
                                                 for i, c in zip(ids, correct)))

    ids = [f"p{i}" for i in range(40)]
    write("gkd-full", [i % 2 == 0 for i in range(40)], ids)  # 20 right
    write("sft-full", [i % 4 == 0 for i in range(40)][::-1], ids[::-1])  # 10 right, lines in reverse order
    lines = mod.paired_lines([tmp_path], n_boot=200)
    row = next(x for x in lines if x.startswith("| gkd-full ÷ sft-full"))
    from stillhouse.distill.metrics import ceiling_ratio

    order = sorted(ids)  # the interval depends on the pairing: matched by id, whatever the files' line order
    want = ceiling_ratio([int(i[1:]) % 2 == 0 for i in order], [int(i[1:]) % 4 == 0 for i in order], n_boot=200)
    assert "20/40 vs 10/40" in row and f"| 2.00 [{want.lo:.2f}, {want.hi:.2f}] |" in row
    assert not any("smol-start" in x for x in lines)  # no eval, no row
    other = tmp_path / "draw2"  # a second draw pooled: its problems follow the first's, matched by id within it
    write("gkd-full", [True] * 5 + [False] * 5, ids[:10], other)
    write("sft-full", [False] * 5 + [True] * 5, ids[:10], other)
    pooled = next(x for x in mod.paired_lines([tmp_path, other], n_boot=200) if x.startswith("| gkd-full ÷ sft-full"))
    want = ceiling_ratio([int(i[1:]) % 2 == 0 for i in order] + [int(i[1:]) < 5 for i in sorted(ids[:10])],
                         [int(i[1:]) % 4 == 0 for i in order] + [int(i[1:]) >= 5 for i in sorted(ids[:10])], n_boot=200)
    assert "25/50 vs 15/50" in pooled and f"| {want.value:.2f} [{want.lo:.2f}, {want.hi:.2f}] |" in pooled
    write("sft-full", [True] * 39, ids[:39])
    with pytest.raises(SystemExit, match="different held-out problems"):
        mod.paired_lines([tmp_path], n_boot=200)


def test_samples_0_keeps_the_greedy_answers_only(tmp_path, smol_tokenizer):
    from conftest import build_tiny_model

    tdir = tmp_path / "teacher"
    build_tiny_model(smol_tokenizer).save_pretrained(tdir)
    smol_tokenizer.save_pretrained(tdir)
    out = tmp_path / "exp"
    _run("--out", str(out), "--teacher", f"hf:{tdir}", "--heldout", "3", "--train", "4", "--validation", "2",
         "--gsm8k", "0", "--samples", "0", "--max-new-tokens", "4", "--gemma", "", "--stage", "split,rationales")
    assert len(_rows(out / "data" / "greedy-all.jsonl")) == 4 and not (out / "data" / "samples.jsonl").exists()
    cost = json.loads((out / "data" / "cost.json").read_text())
    assert cost["samples"]["samples"] == 0 and cost["greedy"]["samples"] == 4
