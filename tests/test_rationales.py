"""Verified rationales (STaR): sampled, verified, kept at most k per problem, with their teacher-token cost."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from stillhouse.distill.rationales import RationaleConfig, cost_report, sample_rationales, write_rows
from stillhouse.distill.tasks import read_items, wordproblem, wordproblem_splits, write_items


def test_wordproblem_splits_are_disjoint_seeded_and_answer_checked(tmp_path):
    import random

    sets = wordproblem_splits(30, 50, 20, seed=1, steps=3, lo=2, hi=20)
    assert sets == wordproblem_splits(30, 50, 20, seed=1, steps=3, lo=2, hi=20)
    assert sets != wordproblem_splits(30, 50, 20, seed=2, steps=3, lo=2, hi=20)
    ids = [it.id for s in sets.values() for it in s]
    assert len(ids) == len(set(ids)) == 100
    for it in sets["train"]:  # the answer is the running total the question's numbers give
        nums = [int(x) for x in it.id[3:].split("_")]
        assert int(it.answer) == sum(nums) >= 0 and len(nums) == 4
        assert "####" in it.messages[0]["content"] and it.task == "wordproblem"
    q, ans, key = wordproblem(random.Random(0), steps=2)
    assert ans == sum(key) and str(key[0]) in q
    write_items(sets["heldout"], tmp_path / "h.jsonl")
    assert read_items(tmp_path / "h.jsonl") == sets["heldout"]
    with pytest.raises(ValueError, match="distinct"):
        wordproblem_splits(500, 0, 0, steps=1, lo=1, hi=3)


def test_wordproblem_answers_verify_with_the_gsm8k_parser():
    from stillhouse.distill.verify import verify

    assert verify("wordproblem", "5 + 3 = 8\n8 - 2 = 6\n#### 6", "6").ok
    assert verify("wordproblem", "He has 6 apples. The answer is 6.", "6").ok
    assert not verify("wordproblem", "5 + 3 = 8\n#### 8\n", "6").ok


def test_sampled_rationales_are_verified_kept_once_and_costed(smol_tokenizer, tmp_path):
    from conftest import build_tiny_model

    model = build_tiny_model(smol_tokenizer)
    items = wordproblem_splits(0, 3, 0, seed=0)["train"]
    # A problem the tiny random model cannot miss: its answer is whatever number it writes (none: no_number).
    cfg = RationaleConfig(samples=3, temperature=1.0, max_new_tokens=6, keep_per_problem=1, batch_size=2)
    rows = sample_rationales(model, smol_tokenizer, items, cfg)
    assert rows == sample_rationales(model, smol_tokenizer, items, cfg)  # seeded
    assert len(rows) == 9 and [r["sample"] for r in rows[:3]] == [0, 1, 2]
    for r in rows:
        assert r["messages"][-1]["role"] == "assistant" and 1 <= r["teacher_tokens"] <= 7
        assert r["kept"] <= r["correct"]
    # Fixed samples: wrong, right, the same right text again, right in other words.
    import stillhouse.teacher.generate as G

    texts = ["5 + 3 = 9\n#### 1", "#### {a}", "#### {a}", "so {a}.\n#### {a}"]
    calls = []

    def fake_generate(model, tok, prompts, max_new, **kw):
        r = len(calls)
        calls.append(kw.get("seed"))
        return [G.Generation(texts[r].format(a=it.answer), [7] * (r + 2), "stop", 2) for it in items]

    monkey = pytest.MonkeyPatch()
    monkey.setattr(G, "generate", fake_generate)
    try:
        for keep, want in [(1, [False, True, False, False]), (0, [False, True, False, True])]:
            calls.clear()
            rows2 = sample_rationales(model, smol_tokenizer, items,
                                      RationaleConfig(samples=4, temperature=0.7, keep_per_problem=keep, seed=5))
            assert calls == [5, 1005, 2005, 3005]
            assert [r["kept"] for r in rows2[:4]] == want and [r["correct"] for r in rows2[:4]] == [False, True, True, True]
            rep = cost_report(rows2)
            assert rep["teacher_tokens"] == 3 * sum(r + 3 for r in range(4)) and rep["kept"] == 3 * sum(want)
            assert rep["tokens_per_kept"] == pytest.approx(rep["teacher_tokens"] / rep["kept"], abs=0.1)
            assert rep["problems_solved"] == 3 and rep["verified_samples"] == 9
    finally:
        monkey.undo()
    out = write_rows(rows2, tmp_path / "k.jsonl", kept_only=True)
    assert len(out.read_text().splitlines()) == 6
    with pytest.raises(ValueError, match="greedy"):
        RationaleConfig(samples=2, temperature=0.0)


def test_write_rows_refuses_an_empty_training_file(tmp_path):
    with pytest.raises(ValueError, match="no sample verified"):
        write_rows([{"kept": False}], tmp_path / "x.jsonl", kept_only=True)


def test_few_shot_puts_worked_examples_before_the_problem():
    from stillhouse.distill.tasks import WORDPROBLEM_SHOTS, few_shot
    from stillhouse.distill.verify import verify

    item = wordproblem_splits(1, 0, 0)["heldout"][0]
    shot = few_shot(item)
    assert shot.messages[-1] == item.messages[-1] and shot.answer == item.answer and shot.id == item.id
    assert [m["role"] for m in shot.messages] == ["user", "assistant"] * len(WORDPROBLEM_SHOTS) + ["user"]
    import re

    for (q, a), m in zip(WORDPROBLEM_SHOTS, shot.messages[1::2]):  # each worked example is right by our verifier
        start, *events = re.findall(r"(has|buys|finds|wins|gives away|gives|loses|sells) (\d+)", q)
        total = int(start[1]) + sum(int(n) * (1 if verb in ("buys", "finds", "wins") else -1) for verb, n in events)
        assert m["content"] == a and verify("wordproblem", a, str(total)).ok and len(events) == 2


def test_few_shot_examples_carry_no_loss_when_a_student_trains_on_the_conversation(tmp_path, smol_tokenizer):
    from stillhouse.distill.data import IGNORE_INDEX, encode_row
    from stillhouse.distill.tasks import WORDPROBLEM_SHOTS, few_shot

    item = few_shot(wordproblem_splits(1, 0, 0)["heldout"][0], WORDPROBLEM_SHOTS[:2])
    assert [m.get("weight") for m in item.messages if m["role"] == "assistant"] == [0, 0]
    write_items([item], tmp_path / "items.jsonl")
    assert read_items(tmp_path / "items.jsonl")[0].messages == item.messages  # the weights survive the file
    answer = "Mia starts with 3.\n#### 3"
    ex = encode_row({"messages": [*item.messages, {"role": "assistant", "content": answer}]}, smol_tokenizer,
                    max_len=1024, system_prompt="")
    trained = [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]
    assert trained == smol_tokenizer.encode(answer, add_special_tokens=False) + [smol_tokenizer.eos_token_id]
