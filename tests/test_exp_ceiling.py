"""The ceiling experiment (scripts/exp_ceiling.py), run as a user would, scaled down to a tiny random-init teacher."""

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
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "exp_ceiling.py"), *args], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_experiment_end_to_end_on_a_tiny_teacher(tmp_path, smol_tokenizer):
    from conftest import build_tiny_model

    tdir = tmp_path / "teacher"
    build_tiny_model(smol_tokenizer).save_pretrained(tdir)
    smol_tokenizer.save_pretrained(tdir)
    out = tmp_path / "exp"
    common = ["--out", str(out), "--teacher", f"hf:{tdir}", "--heldout", "8", "--train", "30", "--validation", "8",
              "--sizes", "20", "--student", "pruned:1", "--precision", "fp32"]
    _run(*common, "--stage", "split,harvest,export")
    items = {k: _rows(out / "items" / f"{k}.jsonl") for k in ("heldout", "train", "validation")}
    assert [len(v) for v in items.values()] == [8, 30, 8]
    harvest = _rows(out / "data" / "train.jsonl")
    assert [r["id"] for r in harvest] == [it["id"] for it in items["train"]], "two shards, exported in problem order"
    assert all((out / "jobs" / f"harvest-{i}.done").exists() for i in (0, 1))
    assert all(len(r["top_ids"][0]) == 20 and r["token_ids"] for r in harvest)
    # A random-init teacher is never right; make a few answers right so the verified students have data
    # (fixture only: the real experiment never constructs answers).
    for r in harvest[:6]:
        a, b = r["meta"]["meta"]["a"], r["meta"]["meta"]["b"]
        r["messages"][-1]["content"] = f"{a} + {b} = {a + b}"
        for k in ("token_ids", "top_ids", "top_logprobs"):
            r.pop(k)
    (out / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in harvest))
    table = _run(*common)  # the rest: curate, teacher, train (4 jobs of train + eval), report
    assert len(_rows(out / "curated" / "train.jsonl")) == 6
    runs = {"sft-n20": 4, "topk-n20": 4, "verified-small": 6, "verified-self": 2}
    for name, passes in runs.items():
        run = out / "runs" / name
        sel = json.loads((run / "selection.json").read_text())
        assert [e["epoch"] for e in sel["epochs"]] == list(range(1, passes + 1)) and sel["epochs"][0]["n"] == 8
        assert (run / "final" / "model.safetensors").exists() and not (run / "epochs").exists()
        res = json.loads((out / "evals" / name / "results.json").read_text())
        assert res["n_items"] == 8 and res["students"][0]["accuracy"]["n"] == 8
        assert res["teacher"]["accuracy"]["value"] == 0.0 and res["students"][0]["ceiling_ratio"]["value"] is None
        assert f"| {name} (" in table and f"(pass {sel['chosen_epoch']})" in table
        assert json.loads((out / "jobs" / f"{name}.done").read_text())["seconds"] > 0
    saved = json.loads((out / "runs" / "sft-n20" / "final" / "train_config.json").read_text())
    assert (saved["schedule"], saved["lr"], saved["epochs"], saved["batch_size"], saved["max_examples"]) == \
        ("cosine", 5e-4, 4, 10, 20)
    steps = [r for r in _rows(out / "runs" / "sft-n20" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 4 * 2 + 1)), "4 passes of 2 steps, from a fresh init"
    self_cfg = json.loads((out / "runs" / "verified-self" / "final" / "train_config.json").read_text())
    assert self_cfg["student"] == "self" and self_cfg["max_examples"] == 6 and not self_cfg["freeze_embeddings"]
    assert "| teacher (greedy) | - | 0/8 |" in table and "**total**" in table
    assert (out / "grid.png").stat().st_size > 1000
    # a rerun finds everything done and changes nothing
    state = {p: p.read_bytes() for pattern in ("jobs/*.done", "evals/*/results.json", "runs/*/metrics.jsonl")
             for p in out.glob(pattern)}
    _run(*common)
    assert state == {p: p.read_bytes() for p in state}
