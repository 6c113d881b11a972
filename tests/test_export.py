"""Export: chat-messages rows, a deterministic split by prompt hash, three formats."""

from __future__ import annotations

import asyncio
import json

import pytest

from stillhouse.config import ConfigError
from stillhouse.distill.export import ExportConfig, export_run, is_heldout
from stillhouse.distill.harvest import HarvestConfig, run_harvest
from stillhouse.distill.store import StoreError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("h") / "run"
    cfg = HarvestConfig(prompts="builtin:arithmetic:200", teacher="fake", out=str(out), samples=2,
                        temperature=0.7, seed=5, logprobs=True, top_logprobs=3, max_tokens=16)
    rep = asyncio.run(run_harvest(cfg))
    assert rep.stats.ok == 400
    return out


def read_jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_jsonl_rows_are_chat_messages_and_split_by_prompt(run_dir, tmp_path):
    res = export_run(ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "e"), heldout=0.25))
    train, held = read_jsonl(tmp_path / "e" / "train.jsonl"), read_jsonl(tmp_path / "e" / "heldout.jsonl")
    assert len(train) + len(held) == 400 == sum(res.counts.values())
    assert 0.15 < len(held) / 400 < 0.35
    for row in train[:5]:
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][0]["role"] == "user"
        assert "logprobs" not in row
    tp, hp = {r["prompt_hash"] for r in train}, {r["prompt_hash"] for r in held}
    assert not tp & hp, "all samples of a prompt land on the same side"
    assert all(is_heldout(h, 0.25) for h in hp) and not any(is_heldout(h, 0.25) for h in tp)
    meta = json.loads((tmp_path / "e" / "export.json").read_text())
    assert meta["counts"] == res.counts and meta["heldout"] == 0.25


def test_split_is_deterministic_and_salt_changes_it(run_dir, tmp_path):
    export_run(ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "a")))
    export_run(ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "b")))
    export_run(ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "c"), salt="x"))
    a, b, c = ((tmp_path / d / "heldout.jsonl").read_text() for d in "abc")
    assert a == b and a != c
    assert is_heldout("00", 0.0) is False and is_heldout("00", 1.0) is True


def test_parquet_and_hf_with_logprobs(run_dir, tmp_path):
    import datasets
    import pyarrow.parquet as pq

    export_run(ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "p"), format="parquet", logprobs=True))
    t = pq.read_table(tmp_path / "p" / "train.parquet").to_pylist()
    h = pq.read_table(tmp_path / "p" / "heldout.parquet").to_pylist()
    assert len(t) + len(h) == 400
    row = t[0]
    assert len(row["tokens"]) == len(row["logprobs"]) == len(row["top_logprobs"]) == row["completion_tokens"]
    assert len(row["top_logprobs"][0]) == 3 and "".join(row["tokens"]).strip() == row["messages"][-1]["content"]
    assert json.loads(row["meta"])["task"] == "arithmetic"
    export_run(ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "hf"), format="hf"))
    dd = datasets.load_from_disk(str(tmp_path / "hf"))
    assert set(dd) == {"train", "heldout"} and dd["train"].num_rows + dd["heldout"].num_rows == 400
    assert dd["train"][0]["messages"][-1]["role"] == "assistant"


def test_bad_input(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="format"):
        ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "x"), format="csv")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="heldout"):
        ExportConfig(run_dir=str(run_dir), out=str(tmp_path / "x"), heldout=1.5)
    with pytest.raises(StoreError, match="not a harvest run"):
        export_run(ExportConfig(run_dir=str(tmp_path / "nope"), out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()
