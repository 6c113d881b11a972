"""Prompt inputs: JSONL (messages or prompt), Parquet, datasets directories, built-in sets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stillhouse.distill.prompts import PromptError, load_prompts, row_to_prompt
from stillhouse.distill.store import canonical_json


def jsonl(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_jsonl_forms_ids_meta_and_bad_lines_with_line_numbers(tmp_path):
    src = jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"prompt": "What is 2 + 2?", "answer": "4"},
        "{broken json",
        "",
        {"id": "c", "messages": [{"role": "wizard", "content": "x"}]},
        {"id": "d", "prompt": 7},
        {"id": "e"},
        {"id": "f", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"id": 12, "prompt": "numbers as ids are fine"},
    ])
    ps = load_prompts(src)
    assert ps.prompts[0].id == "a"
    assert ps.prompts[1].id.startswith("p-") and ps.prompts[1].meta == {"answer": "4"}
    assert ps.prompts[1].messages == [{"role": "user", "content": "What is 2 + 2?"}]
    assert ps.prompts[2].id == "12"
    where = [p.where for p in ps.problems]
    assert where == ["p.jsonl:3", "p.jsonl:5", "p.jsonl:6", "p.jsonl:7", "p.jsonl:8"]
    reasons = " | ".join(p.reason for p in ps.problems)
    assert "not valid JSON" in reasons and "wizard" in reasons and "'prompt' must be" in reasons
    assert "needs 'messages'" in reasons and "assistant" in reasons
    with pytest.raises(PromptError) as ei:
        load_prompts(src, strict=True)
    assert "p.jsonl:3" in str(ei.value) and "5 bad row(s)" in str(ei.value)


def test_generated_id_is_stable_when_lines_move(tmp_path):
    a = load_prompts(jsonl(tmp_path / "a.jsonl", [{"prompt": "x"}, {"prompt": "y"}])).prompts
    b = load_prompts(jsonl(tmp_path / "b.jsonl", [{"prompt": "y"}, {"prompt": "x"}])).prompts
    assert {p.id: p.messages[0]["content"] for p in a} == {p.id: p.messages[0]["content"] for p in b}


def test_duplicates_merge_and_id_clash_is_a_problem(tmp_path):
    ps = load_prompts(jsonl(tmp_path / "d.jsonl", [
        {"id": "a", "prompt": "same"}, {"id": "b", "prompt": "same"}, {"id": "a", "prompt": "other"}]))
    assert [p.id for p in ps.prompts] == ["a"] and ps.duplicates == 1
    assert "already used" in ps.problems[0].reason


def test_limit_and_empty_and_missing_and_unknown_format(tmp_path):
    src = jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}"} for i in range(10)])
    assert len(load_prompts(src, limit=3).prompts) == 3
    with pytest.raises(PromptError, match="no usable prompts"):
        load_prompts(jsonl(tmp_path / "bad.jsonl", ["nope"]))
    with pytest.raises(PromptError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "p.txt").write_text("hi")
    with pytest.raises(PromptError, match="unknown prompt format"):
        load_prompts(tmp_path / "p.txt")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "x", "messages": [{"role": "user", "content": "Hello"}], "prompt": None, "answer": "1"},
            {"id": None, "messages": None, "prompt": "Plain prompt", "answer": "2"},
            {"id": "z", "messages": None, "prompt": None, "answer": "3"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    ps = load_prompts(tmp_path / "p.parquet")
    assert [p.messages[-1]["content"] for p in ps.prompts] == ["Hello", "Plain prompt"]
    assert ps.prompts[0].meta == {"answer": "1"}
    assert [p.where for p in ps.problems] == ["p.parquet:row 2"]


def test_datasets_directory_and_splits(tmp_path):
    import datasets

    d = datasets.Dataset.from_list([{"prompt": "one"}, {"prompt": "two"}])
    d.save_to_disk(str(tmp_path / "single"))
    assert len(load_prompts(tmp_path / "single").prompts) == 2
    dd = datasets.DatasetDict({"train": d, "test": datasets.Dataset.from_list([{"prompt": "three"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_prompts(tmp_path / "dd").prompts) == 2
    assert [p.messages[0]["content"] for p in load_prompts(f"{tmp_path / 'dd'}#test").prompts] == ["three"]
    with pytest.raises(PromptError, match="choose one"):
        load_prompts(f"{tmp_path / 'dd'}#nope")


def test_builtin_sets_carry_references():
    ps = load_prompts("builtin:arithmetic:8")
    assert len(ps.prompts) == 8
    p = ps.prompts[0]
    a, b = p.meta["meta"]["a"], p.meta["meta"]["b"]
    assert p.meta["answer"] == str(a + b) and p.meta["task"] == "arithmetic"
    he = load_prompts("builtin:humaneval:2").prompts
    assert "def check" in he[0].meta["tests"] and he[0].meta["entry_point"]
    with pytest.raises(PromptError, match="builtin:arithmetic"):
        load_prompts("builtin:nope")


def test_row_to_prompt_content_parts():
    p = row_to_prompt({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert p.messages[0]["content"][0]["text"] == "hi"
    with pytest.raises(ValueError, match="content"):
        row_to_prompt({"messages": [{"role": "user", "content": 3}]})


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Naïve \"quotes\"\n\u2028 and \\ back"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello"}, {"role": "user", "content": ""}],
    [{"role": "user", "content": "hi", "name": "bob"}],  # a third key: the checked path
    [{"content": "x", "role": "user"}],  # key order does not matter
])
def test_plain_fast_path_gives_the_canonical_json(messages):
    p = row_to_prompt({"messages": messages})
    assert p.messages_json == canonical_json(messages)
    assert p.hash == hashlib.sha256(canonical_json(messages).encode()).hexdigest()


@pytest.mark.parametrize("messages, why", [
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "assistant"),
    ([{"role": "wizard", "content": "a"}], "role"),
    ([{"role": ["user"], "content": "a"}], "role"),
    ([{"role": "user", "content": None}], "content"),
    ([], "non-empty"),
])
def test_fast_path_never_accepts_what_the_checks_reject(messages, why):
    with pytest.raises(ValueError, match=why):
        row_to_prompt({"messages": messages})
