"""The core install harvests; a missing optional dependency names its pip line, never a traceback.

Each CLI run here is a subprocess in which the optional modules are blocked
(``sys.modules[name] = None`` makes ``import name`` fail as if it were not installed), talking
to a real fake OpenAI server on loopback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from stillhouse.extras import CORE, EXTRAS, install_hint, missing_dependency
from stillhouse.testing.fakeserver import start_in_thread as start_fake

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
OPTIONAL = sorted(EXTRAS)
"""Every module an extra installs: a core install has none of them."""
# distribution name → import name, where they differ
IMPORT_NAME = {"scikit-learn": "sklearn", "sentence-transformers": "sentence_transformers"}


def _dist(requirement: str) -> str:
    return re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0].lower()


def test_extras_table_agrees_with_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared: dict[str, set[str]] = {}
    for extra, reqs in project["optional-dependencies"].items():
        if extra in ("all", "test"):
            continue
        for r in reqs:
            declared.setdefault(IMPORT_NAME.get(_dist(r), _dist(r).replace("-", "_")), set()).add(extra)
    assert {m: set(e) for m, e in EXTRAS.items()} == declared
    core = {IMPORT_NAME.get(_dist(r), _dist(r).replace("-", "_")) for r in project["dependencies"]}
    assert set(CORE) == core
    assert not core & set(EXTRAS)


def test_hints_pick_the_verbs_extra() -> None:
    assert install_hint("torch") == "pip install 'stillhouse[local]'"
    assert install_hint("transformers.cache_utils") == "pip install 'stillhouse[local]'"
    assert install_hint("uvicorn", verb="guard") == "pip install 'stillhouse[guard]'"
    assert install_hint("uvicorn", verb="harvest") == "pip install 'stillhouse[serve]'"
    assert install_hint("httptools") == "pip install httptools"
    assert install_hint("no_such_module") is None
    gone = ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow")
    assert "pip install 'stillhouse[data]'" in (missing_dependency(gone, "curate") or "")
    # an import that fails for another reason (a version mismatch) is a bug to show, not a hint
    assert missing_dependency(ImportError("cannot import name 'X' from 'torch'", name="torch")) is None
    assert missing_dependency(ModuleNotFoundError("No module named 'zzz'", name="zzz")) is None


def _cli(args: list[str], block: list[str], cwd: Path, timeout: float = 120,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``stillhouse ARGS`` in a fresh interpreter where the modules in ``block`` cannot be imported."""
    boot = ("import sys\n"
            f"for name in {block!r}:\n"
            "    sys.modules[name] = None\n"
            "from stillhouse.cli import run\n"
            f"sys.argv = ['stillhouse', *{args!r}]\n"
            "run()\n")
    full = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-c", boot], check=False, cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def fake_url():
    with start_fake() as srv:
        yield srv.base_url


def test_core_install_harvests_and_exports(fake_url: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    res = _cli(["harvest", "--prompts", "builtin:arithmetic:30", "--teacher", fake_url, "--out", str(run_dir),
                "--no-progress"], OPTIONAL, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "30 ok" in res.stderr or "'ok': 30" in res.stderr, res.stderr
    res = _cli(["export", str(run_dir), "--out", str(tmp_path / "data"), "--format", "jsonl"], OPTIONAL, tmp_path)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for split in ("train", "heldout")
            for line in (tmp_path / "data" / f"{split}.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all(r["messages"][-1]["role"] == "assistant" for r in rows)


def test_without_httptools_the_harvester_falls_back_to_aiohttp(fake_url: str, tmp_path: Path) -> None:
    res = _cli(["harvest", "--prompts", "builtin:arithmetic:5", "--teacher", fake_url, "--out",
                str(tmp_path / "run"), "--no-progress"], [*OPTIONAL, "httptools"], tmp_path)
    assert res.returncode == 0, res.stderr
    code = ("import sys; sys.modules['httptools'] = None\n"
            "from stillhouse.teacher.openai import OpenAITeacher\n"
            "print(OpenAITeacher('http://127.0.0.1:9/v1').client)\n"
            "OpenAITeacher('http://127.0.0.1:9/v1', client='raw')\n")
    res = subprocess.run([sys.executable, "-c", code], check=False, env={**os.environ, "PYTHONPATH": str(SRC)},
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "aiohttp"
    assert "pip install httptools" in res.stderr


@pytest.mark.parametrize("case,hint", [
    ("parquet", "pip install 'stillhouse[data]'"),
    ("bundled", "pip install 'stillhouse[local]'"),
    ("export-parquet", "pip install 'stillhouse[data]'"),
])
def test_a_missing_extra_names_its_pip_line(fake_url: str, tmp_path: Path, case: str, hint: str) -> None:
    run_dir = tmp_path / "run"
    if case == "parquet":
        (tmp_path / "p.parquet").write_bytes(b"PAR1")
        args = ["harvest", "--prompts", str(tmp_path / "p.parquet"), "--teacher", fake_url, "--out", str(run_dir)]
    elif case == "bundled":
        args = ["harvest", "--prompts", "builtin:arithmetic:2", "--teacher", "bundled", "--out", str(run_dir)]
    else:
        res = _cli(["harvest", "--prompts", "builtin:arithmetic:4", "--teacher", fake_url, "--out", str(run_dir),
                    "--no-progress"], OPTIONAL, tmp_path)
        assert res.returncode == 0, res.stderr
        args = ["export", str(run_dir), "--out", str(tmp_path / "data"), "--format", "parquet"]
    res = _cli([*args, "--no-progress"] if case != "export-parquet" else args, OPTIONAL, tmp_path)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert hint in res.stderr, res.stderr
    assert "Traceback" not in res.stderr + res.stdout and "╭" not in res.stderr, res.stderr


def test_missing_data_is_one_line_too(tmp_path: Path) -> None:
    res = _cli(["harvest", "--prompts", "builtin:arithmetic:4", "--teacher", "fake", "--out", "run", "--no-progress"],
               [], tmp_path)
    assert res.returncode == 0, res.stderr
    env = {"STILLHOUSE_SHARED": str(tmp_path / "none")}
    # the default evaluation sets: curation runs and says which one it could not decontaminate against
    res = _cli(["curate", "run", "--out", "cur"], [], tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert "not decontaminated against builtin:gsm8k-test" in " ".join(res.stdout.split()), res.stdout
    # a set the user names must be there: one line that says where it was looked for
    res = _cli(["curate", "run", "--out", "cur2", "--eval-sets", "builtin:gsm8k-test"], [], tmp_path, env=env)
    assert res.returncode == 1 and "GSM8K test split not found" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "╭" not in res.stderr
