"""Every loader turns a line nested too deeply and a damaged Parquet file into its own one-line error.

Loaders: the harvester's prompts (skipped as a bad row, or fatal under strict), curation rows,
training rows, and the detector's traffic log. Through the CLI the same inputs end in one line
naming the file and the row, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stillhouse.distill.curate import CurateError, load_rows
from stillhouse.distill.data import DataError, read_rows
from stillhouse.distill.prompts import PromptError, load_prompts
from stillhouse.guard.detect.offline import LogError, read_accounts, read_log

SRC = Path(__file__).resolve().parents[1] / "src"
DEPTHS = (1_030, 100_000)  # past orjson's limit of 1024, and far past Python's recursion limit
CHAT = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}


def _deep(depth: int) -> str:
    return '{"prompt": "x", "meta": ' + "[" * depth + "]" * depth + "}"


def _parquet(path: Path, damage: bool) -> Path:
    """Six prompt rows in three row groups; ``damage``: the second group's data page overwritten."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": [f"What is {i} + 1?" for i in range(6)]}), path, row_group_size=2)
    if damage:
        data = bytearray(path.read_bytes())
        start = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
        data[start:start + 8] = bytes(b ^ 0xFF for b in data[start:start + 8])
        path.write_bytes(bytes(data))
    return path


def _truncated(path: Path) -> Path:
    whole = _parquet(path, damage=False).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


@pytest.mark.parametrize("depth", DEPTHS)
def test_prompts_deep_line_is_a_bad_row(tmp_path: Path, depth: int) -> None:
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "What is 1 + 1?"}) + "\n" + _deep(depth) + "\n")
    ps = load_prompts(src)
    assert [p.messages[0]["content"] for p in ps.prompts] == ["What is 1 + 1?"]
    assert [p.where for p in ps.problems] == ["p.jsonl:2"] and "nested too deeply" in ps.problems[0].reason
    with pytest.raises(PromptError, match=r"p.jsonl:2: nested too deeply"):
        load_prompts(src, strict=True)


def test_prompts_damaged_row_group_is_bad_rows_and_truncated_file_is_fatal(tmp_path: Path) -> None:
    ps = load_prompts(_parquet(tmp_path / "d.parquet", damage=True))
    assert [p.messages[0]["content"] for p in ps.prompts] == [f"What is {i} + 1?" for i in (0, 1, 4, 5)]
    assert [p.where for p in ps.problems] == ["d.parquet:row 2-3"]
    assert "damaged" in ps.problems[0].reason and "re-write the file" in ps.problems[0].reason
    with pytest.raises(PromptError, match=r"d.parquet:row 2-3: row group 1 is damaged"):
        load_prompts(tmp_path / "d.parquet", strict=True)
    for strict in (False, True):
        with pytest.raises(PromptError, match=r"t.parquet: not a readable Parquet file \(ArrowInvalid"):
            load_prompts(_truncated(tmp_path / "t.parquet"), strict=strict)


def test_curate_rows(tmp_path: Path) -> None:
    src = tmp_path / "rows.jsonl"
    for depth in DEPTHS:
        src.write_text(json.dumps(CHAT) + "\n" + _deep(depth) + "\n")
        with pytest.raises(CurateError, match=r"rows.jsonl:2: nested too deeply"):
            load_rows(src)
    src.write_text(json.dumps(CHAT) + "\n[1, 2]\n")
    with pytest.raises(CurateError, match=r"rows.jsonl: row 1: a row must be a JSON object"):
        load_rows(src)
    with pytest.raises(CurateError, match=r"d.parquet:rows 2-3: row group 1 is damaged"):
        load_rows(_parquet(tmp_path / "d.parquet", damage=True))
    with pytest.raises(CurateError, match=r"not a readable Parquet file"):
        load_rows(_truncated(tmp_path / "t.parquet"))


def test_training_rows(tmp_path: Path) -> None:
    for depth in DEPTHS:
        src = tmp_path / "train.jsonl"
        src.write_text(json.dumps(CHAT) + "\n" + _deep(depth) + "\n")
        with pytest.raises(DataError, match=r"train.jsonl:2: nested too deeply"):
            read_rows(src)
        whole = tmp_path / "train.json"
        whole.write_text("[" + json.dumps(CHAT) + ", " + _deep(depth) + "]")
        with pytest.raises(DataError, match=r"train.json: nested too deeply"):
            read_rows(whole)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DataError, match=r"bad.json: not valid JSON"):
        read_rows(tmp_path / "bad.json")


def test_detector_log_and_accounts(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    for depth in DEPTHS:
        log.write_text(_deep(depth) + "\n")
        with pytest.raises(LogError, match=r"log.jsonl:1: nested too deeply"):
            read_log(str(log))
    log.write_text("[1, [2]]\n")
    with pytest.raises(LogError, match=r"log.jsonl:1: a JSON array, not an object"):
        read_log(str(log))
    accounts = tmp_path / "accounts.jsonl"
    accounts.write_text(json.dumps({"account_id": "a"}) + "\n" + _deep(100_000) + "\n")
    with pytest.raises(LogError, match=r"accounts.jsonl:2: nested too deeply"):
        read_accounts(accounts)
    accounts.write_text(json.dumps({"account_id": "a", "colour": "red"}) + "\n")
    with pytest.raises(LogError, match=r"accounts.jsonl:1: .*colour"):
        read_accounts(accounts)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "stillhouse", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_cli_reports_one_line(tmp_path: Path) -> None:
    (tmp_path / "deep.jsonl").write_text(_deep(100_000) + "\n")
    _parquet(tmp_path / "d.parquet", damage=True)
    runs = [
        (["harvest", "--prompts", "d.parquet", "--teacher", "fake", "--out", "h", "--strict", "--no-progress"],
         "d.parquet:row 2-3: row group 1 is damaged"),
        (["curate", "d.parquet", "--out", "c"], "d.parquet:rows 2-3: row group 1 is damaged"),
        (["detect", "--log", "deep.jsonl", "--model", "m"], "deep.jsonl:1: nested too deeply"),
    ]
    for args, fragment in runs:
        res = _cli(args, tmp_path)
        out = res.stdout + res.stderr
        assert res.returncode != 0 and fragment in " ".join(out.split()), out
        assert "Traceback" not in out


def test_shared_jsonl_reader_names_the_line_and_keeps_u2028(tmp_path: Path) -> None:
    from stillhouse.jsonl import iter_jsonl

    class Bad(ValueError):
        pass

    f = tmp_path / "rows.jsonl"
    f.write_text('{"a": "x\u2028y"}\n\n{"b": 2}\r\n', encoding="utf-8")
    assert list(iter_jsonl(f, Bad, "rows")) == [(1, {"a": "x\u2028y"}), (3, {"b": 2})]
    f.write_text('{"a": 1}\n"text"\n')
    with pytest.raises(Bad, match=r"rows.jsonl:2: a JSON string, not an object; expected rows"):
        list(iter_jsonl(f, Bad, "rows"))
    assert list(iter_jsonl(f, Bad, "rows", objects=False)) == [(1, {"a": 1}), (2, "text")]
    f.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(Bad, match=r"rows.jsonl:2: not valid JSON \("):
        list(iter_jsonl(f, Bad, "rows"))
    f.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(Bad, match=r"rows.jsonl: not UTF-8 text; expected rows"):
        list(iter_jsonl(f, Bad, "rows"))
