"""scripts/exp_provenance.py's data stages, run as a user would (in a temporary working directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "exp_provenance.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def _row(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _setup(tmp_path: Path) -> Path:
    out = tmp_path / "runs" / "provenance"
    out.mkdir(parents=True)
    (out / "clean.jsonl").write_text("".join(json.dumps(_row(f"q{i}", f"clean {i}")) + "\n" for i in range(10)))
    gen = [{**_row(f"w{i}", f"marked {i}"), "token_ids": [1, 2], "key_id": "account/a/0"} for i in range(4)]
    (out / "gen-wm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    return out


def test_clean_mix_needs_no_watermarked_file(tmp_path):
    out = _setup(tmp_path)
    (out / "gen-wm.jsonl").unlink()  # a clean mix must not read any generated answers
    proc = _run(tmp_path, "mix", "--share", "0", "--rows", "6", "--seed", "1", "--name", "clean")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in (out / "data-clean.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert all(r["messages"][1]["content"].startswith("clean ") for r in rows)


def test_watermarked_share_without_wm_is_one_line_error(tmp_path):
    _setup(tmp_path)
    proc = _run(tmp_path, "mix", "--share", "0.5", "--rows", "6", "--name", "half")
    assert proc.returncode != 0
    assert "--wm" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "provenance" / "data-half.jsonl").exists()


def test_mix_takes_the_share_from_the_named_answers(tmp_path):
    out = _setup(tmp_path)
    proc = _run(tmp_path, "mix", "--wm", "wm", "--share", "0.5", "--rows", "6", "--name", "half")
    assert proc.returncode == 0, proc.stderr
    texts = [json.loads(x)["messages"][1]["content"] for x in (out / "data-half.jsonl").read_text().splitlines()]
    assert sum(t.startswith("marked ") for t in texts) == 3 and sum(t.startswith("clean ") for t in texts) == 3
