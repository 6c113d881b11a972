"""Built-in task sets: arithmetic split by construction, GSM8K from the shared dir, HumanEval."""

from __future__ import annotations

import pytest

from stillhouse.distill.tasks import (
    TaskDataMissing,
    arithmetic,
    gsm8k,
    gsm8k_answer,
    humaneval,
    is_heldout_pair,
    load_builtin,
    shared_dir,
)


def test_arithmetic_is_seeded_correct_and_split_disjoint():
    a = arithmetic(300, seed=1)
    assert a == arithmetic(300, seed=1) and a != arithmetic(300, seed=2)
    assert len({x.id for x in a}) == 300
    for x in a:
        m = x.meta
        assert x.answer == str(m["a"] + m["b"]) and len(str(m["a"])) == m["digits"] == len(str(m["b"]))
        assert x.messages == [{"role": "user", "content": f"What is {m['a']} + {m['b']}? Reply with just the number."}]
        assert not is_heldout_pair(m["a"], m["b"])
    assert {x.meta["digits"] for x in a} == {2, 3}
    held = arithmetic(1500, split="heldout", seed=9)  # more than the 2-digit held-out pairs alone
    assert all(is_heldout_pair(x.meta["a"], x.meta["b"]) for x in held)
    train_big = arithmetic(20000, seed=3)
    assert not {x.id for x in held} & {x.id for x in train_big}


def test_arithmetic_errors():
    with pytest.raises(ValueError, match="holds about"):
        arithmetic(5000, split="heldout", digits=(2,))
    with pytest.raises(ValueError, match="split"):
        arithmetic(3, split="test")  # type: ignore[arg-type]


def test_gsm8k_from_shared_dir_and_clear_error(monkeypatch, tmp_path):
    if not (shared_dir() / "data" / "gsm8k" / "test.jsonl").is_file():
        pytest.skip("GSM8K is not in the shared directory on this machine")
    items = gsm8k(5, split="test")
    assert len(items) == 5 and items[0].id == "gsm8k-test-00000"
    assert items[0].answer.lstrip("-").replace(".", "").isdigit()
    assert len(gsm8k(split="test")) == 1319
    assert "####" in items[0].messages[0]["content"]
    monkeypatch.setenv("STILLHOUSE_SHARED", str(tmp_path))
    with pytest.raises(TaskDataMissing, match="STILLHOUSE_SHARED"):
        gsm8k(3)


def test_gsm8k_answer():
    assert gsm8k_answer("so 3+4=7\n#### 1,234") == "1234"
    assert gsm8k_answer("#### $5") == "5"


def test_humaneval_and_specs():
    he = humaneval()
    assert len(he) == 164 and he[0].id == "HumanEval/0"
    assert "def check(candidate)" in he[0].tests and he[0].entry_point in he[0].meta["prompt"]
    assert len(load_builtin("builtin:humaneval:3")) == 3
    assert len(load_builtin("builtin:arithmetic-heldout:7")) == 7
    with pytest.raises(ValueError, match="builtin:gsm8k"):
        load_builtin("builtin:arith")


def test_heldout_split_is_symmetric_in_the_operands():
    from stillhouse.distill.tasks import arithmetic, is_heldout_pair

    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    assert all(is_heldout_pair(a, b) == is_heldout_pair(b, a) for a, b in pairs)
    train = {(i.meta["a"], i.meta["b"]) for i in arithmetic(2000, split="train", digits=(2,))}
    held = {(i.meta["a"], i.meta["b"]) for i in arithmetic(300, split="heldout", digits=(2,))}
    assert not {(b, a) for a, b in held} & train


def test_arithmetic_splits_are_disjoint_as_unordered_pairs_and_seeded(tmp_path):
    from stillhouse.distill.tasks import arithmetic_splits, read_items, write_items

    sets = arithmetic_splits(300, 4000, 200)
    assert [len(sets[k]) for k in ("heldout", "train", "validation")] == [300, 4000, 200]
    keys = {k: {frozenset((it.meta["a"], it.meta["b"])) for it in v} for k, v in sets.items()}
    assert not keys["heldout"] & keys["train"] and not keys["heldout"] & keys["validation"]
    assert not keys["train"] & keys["validation"]
    assert len(keys["heldout"]) == 300 and len(keys["validation"]) == 200, "no unordered pair twice"
    assert all(10 <= it.meta["a"] <= 99 and it.answer == str(it.meta["a"] + it.meta["b"]) for it in sets["train"])
    assert arithmetic_splits(300, 4000, 200) == sets
    assert arithmetic_splits(300, 4000, 200, seed=1)["heldout"] != sets["heldout"]
    small = arithmetic_splits(300, 1000, 0)
    assert small["heldout"] == sets["heldout"] and small["train"] == sets["train"][:1000], "sizes nest"
    back = read_items(write_items(sets["validation"], tmp_path / "val.jsonl"))
    assert back == sets["validation"]
    with pytest.raises(ValueError, match="hold only"):
        arithmetic_splits(300, 8000, 0)
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: a task item needs"):
        read_items(tmp_path / "bad.jsonl")
