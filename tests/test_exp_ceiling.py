"""The ceiling experiment (scripts/exp_ceiling.py), scaled down to a tiny random-init teacher."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("exp_ceiling", ROOT / "scripts" / "exp_ceiling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_splits_are_disjoint_as_unordered_pairs():
    exp = _load_script()
    held, train, val = exp.split_three(300, 4000, 200)
    assert (len(held), len(train), len(val)) == (300, 4000, 200)
    keys = [{frozenset(p) for p in s} for s in (held, train, val)]
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]
    assert exp.split_problems(300, 4000) == (held, train)


def test_experiment_end_to_end_on_a_tiny_teacher(tmp_path, smol_tokenizer):
    from conftest import build_tiny_model

    exp = _load_script()
    tdir = tmp_path / "teacher"
    build_tiny_model(smol_tokenizer).save_pretrained(tdir)
    smol_tokenizer.save_pretrained(tdir)
    out = tmp_path / "exp"
    common = ["--out", str(out), "--teacher", f"hf:{tdir}", "--heldout", "8", "--train", "30", "--validation", "8",
              "--grid", "10", "20", "--batch", "5", "--verified-epochs", "2", "--self-epochs", "1",
              "--precision", "fp32", "--pruned", "pruned:1"]
    assert exp.main([*common, "--stage", "harvest"]) == 0  # --jobs 2: two slices, merged
    harvest = [json.loads(x) for x in (out / "harvest_greedy.jsonl").read_text().splitlines()]
    assert len(harvest) == 30 and all(len(r["top_ids"][0]) == exp.TOPK for r in harvest if r["top_ids"])
    assert not list(out.glob("*.part*.jsonl")), "the slices are merged away"
    # the merged files are the one-process harvest: same problems, same order, same greedy outputs
    seq = tmp_path / "seq"
    assert exp.main([*common, "--out", str(seq), "--stage", "harvest", "--jobs", "1"]) == 0
    for name in ("harvest_greedy.jsonl", "teacher_heldout.jsonl"):
        a, b = ([json.loads(x) for x in (d / name).read_text().splitlines()] for d in (out, seq))
        assert [(r["a"], r["b"], r["completion"]) for r in a] == [(r["a"], r["b"], r["completion"]) for r in b]
    # A random-init teacher is never right; mark a few rows correct with the true answer so the
    # verified stage has data (fixture only: the real experiment never constructs answers).
    for r in harvest[:6]:
        r["correct"], r["messages"][-1]["content"] = True, f"{r['a']} + {r['b']} = {r['a'] + r['b']}"
    (out / "harvest_greedy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in harvest))
    assert exp.main([*common, "--stage", "all", "--more-epochs", "2", "--epochs-batch", "5", "--epochs-lr", "1e-3"]) == 0
    # all = harvest, epochs (fresh cosine runs at every N, both losses), verified, report
    main = json.loads((out / "epochs.json").read_text())
    assert sorted(r["run"] for r in main) == ["pruned10-sft-2ep-cos0.001-bs5", "pruned10-sft-n10-2ep-cos0.001-bs5",
                                              "pruned10-topk-2ep-cos0.001-bs5", "pruned10-topk-n10-2ep-cos0.001-bs5"]
    assert all([v["epochs"] for v in r["validation"]] == [1, 2] for r in main)
    cos_run = out / "runs" / "pruned10-sft-2ep-cos0.001-bs5"
    saved = json.loads((cos_run / "final" / "train_config.json").read_text())
    assert saved["schedule"] == "cosine" and saved["lr"] == 1e-3 and saved["epochs"] == 2 and saved["batch_size"] == 5
    steps = [json.loads(line)["step"] for line in (cos_run / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and len(steps) == 2 * 20 // 5  # a fresh run from the init
    small = out / "runs" / "pruned10-sft-n10-2ep-cos0.001-bs5"
    assert len((small / "metrics.jsonl").read_text().splitlines()) == 2 * 10 // 5
    verified = json.loads((out / "verified.json").read_text())
    pruned = next(r for r in verified if r["run"] == "pruned10-verified")
    assert pruned["epochs_chosen"] in (1, 2) and [v["epochs"] for v in pruned["validation"]] == [1, 2]
    assert pruned["verified_rows"] == 6 and pruned["n"] == 8
    times = [json.loads(x) for x in (out / "times.jsonl").read_text().splitlines()]
    assert [t["stage"] for t in times[-3:]] == ["harvest", "epochs+verified", "report"]
    assert times[-2]["jobs"] == 2 and len(list((out / "logs").glob("*.log"))) == 2 + 4 + 2  # harvest, runs
    assert "| epochs+verified |" in (out / "results.md").read_text()
    assert (out / "grid.png").stat().st_size > 1000  # drawn from the cosine runs alone (no one-pass grid yet)
    # the one-pass grid (named only), and the continue schedule on top of it
    assert exp.main([*common, "--stage", "grid"]) == 0
    grid = json.loads((out / "grid.json").read_text())
    assert {r["label"] for r in grid} == {"pruned10-sft@10", "pruned10-sft@20", "pruned10-topk@10", "pruned10-topk@20"}
    assert exp.main([*common, "--stage", "epochs", "--more-epochs", "2", "--epochs-schedule", "continue",
                     "--epochs-losses", "sft"]) == 0
    more = [r for r in json.loads((out / "epochs.json").read_text()) if r["run"] == "pruned10-sft-2ep"]
    assert [v["epochs"] for v in more[0]["validation"]] == [1, 2] and more[0]["train_examples"] == 20
    with pytest.raises(SystemExit, match="only a cosine run"):
        exp.main([*common, "--stage", "epochs", "--epochs-schedule", "continue", "--epochs-n", "10"])
    assert exp.main([*common, "--stage", "report"]) == 0
    table = (out / "results.md").read_text()
    assert "pruned10-sft-2ep" in table and "pruned10-topk-n10-2ep-cos0.001-bs5" in table and "**total**" in table
    assert "pruned10-verified-e" in table and "self-verified-e1" in table
    assert (out / "grid.png").stat().st_size > 1000
