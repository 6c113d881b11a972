"""Curation on a small constructed run: each bad row is dropped at the right step, for the
right reason, counts add up, and nothing is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stillhouse.distill.curate import CurateConfig, curate_rows, load_rows, normalize_row, write_outputs
from stillhouse.distill.decontam import Decontaminator, EvalText
from stillhouse.distill.dedup import NearDeduper, exact_duplicates
from stillhouse.distill.tasks import is_heldout_pair

Q = "What is {a} + {b}? Reply with just the number."
GSM_Q = ("A baker makes 24 loaves every morning and sells three quarters of them before noon, "
         "then bakes 10 more for the evening rush. How many loaves does she have left?")
LONG_ANSWER = ("First the baker sells three quarters of 24 loaves which is 18 loaves so she keeps 6 loaves "
               "and then she bakes 10 more loaves for the evening rush so in total she has 6 plus 10 "
               "which makes 16 loaves left at the end of the day. The answer is 16")


def _pairs(heldout: bool, count: int) -> list[tuple[int, int]]:
    out = []
    for a in range(10, 100):
        for b in range(10, 100):
            if is_heldout_pair(a, b) == heldout:
                out.append((a, b))
                if len(out) == count:
                    return out
    raise AssertionError("not enough pairs")


def _row(content: str, response: str, **kw: object) -> dict:
    return normalize_row({"messages": [{"role": "user", "content": content}], "response": response, **kw})


def constructed_rows() -> tuple[list[dict], dict[str, str]]:
    """Rows, and the step each deliberately bad row must be dropped at."""
    (a1, b1), (a2, b2), (a3, b3), (a4, b4) = _pairs(False, 4)
    (ha, hb), = _pairs(True, 1)
    rows: list[dict] = []
    expect: dict[str, str] = {}

    def add(row: dict, step: str | None = None) -> None:
        row["id"] = f"r{len(rows)}"
        rows.append(row)
        if step:
            expect[row["id"]] = step

    add(_row(Q.format(a=a1, b=b1), f"{a1} + {b1} = {a1 + b1}"))                       # good
    add(_row(Q.format(a=a1, b=b1), f"{a1} + {b1} = {a1 + b1}"), "exact_dup")          # exact copy
    add(_row(Q.format(a=a1, b=b1), f"{a1} +  {b1} =   {a1 + b1}"), "exact_dup")       # spacing only
    add(_row(Q.format(a=a2, b=b2), f"{a2} + {b2} = {a2 + b2 + 1}"), "verify")         # wrong answer
    add(_row(Q.format(a=a3, b=b3), "", finish_reason="stop"), "format")               # empty
    add(_row(Q.format(a=a3, b=b3), f"{a3} + {b3} = ", finish_reason="length",
             sample_index=1, temperature=0.8), "format")                              # truncated
    add(_row(Q.format(a=a4, b=b4), "", error="HTTP 500: boom"), "load")                 # failed harvest
    add(_row(Q.format(a=ha, b=hb), f"{ha} + {hb} = {ha + hb}"), "decontam")           # held-out pair
    add(_row(GSM_Q + "\n\nSolve step by step.", LONG_ANSWER, answer="16"), "decontam")  # eval-set question
    near_prompt = "Tom has 9 apples, eats 2 and buys 9 more. How many now? Explain your steps carefully."
    base = ("Tom starts with 9 apples and eats 2 of them which leaves 7 apples then he buys 9 more "
            "apples at the market so he has 7 plus 9 apples which is 16 apples in total at the end = 16")
    add(_row(near_prompt, base, answer="16", prompt_id="tom"))                          # good (greedy)
    add(_row(near_prompt, base.replace("market", "shop"), answer="16", prompt_id="tom",
             sample_index=1, temperature=0.8), "near_dup")                              # near copy
    # best-of-n: the sampled answer is listed first, the greedy one must win
    add(_row(Q.format(a=a4, b=b4), f"The sum is {a4 + b4}.", sample_index=2, temperature=0.8,
             prompt_id="p4"), "best_of_n")
    add(_row(Q.format(a=a4, b=b4), f"{a4} + {b4} = {a4 + b4}", prompt_id="p4"))        # greedy, kept
    # code, verified in the sandbox
    code_prompt = "def double(x):\n    \"\"\"Return 2 * x.\"\"\"\n"
    tests = "def check(candidate):\n    assert candidate(3) == 6\n    assert candidate(0) == 0\n"
    add(_row("Complete:\n" + code_prompt, "```python\ndef double(x):\n    return 2 * x\n```",
             tests=tests, entry_point="double", prompt=code_prompt))                    # good code
    add(_row("Complete:\n" + code_prompt + " ", "```python\ndef double(x):\n    return x + 2\n```",
             tests=tests, entry_point="double", prompt=code_prompt), "verify")          # wrong code
    add(_row("Complete:\n" + code_prompt + "  ", "```python\ndef double(x)\n    return 2 * x\n```",
             tests=tests, entry_point="double", prompt=code_prompt), "format")          # syntax error
    return rows, expect


EVAL = [EvalText("gsm8k-test", "gsm8k-test-00042", GSM_Q)]


def test_each_bad_row_is_dropped_at_its_step_and_counts_add_up() -> None:
    rows, expect = constructed_rows()
    cfg = CurateConfig(eval_sets=(), keep_per_prompt=1, sandbox_timeout_s=3)
    res = curate_rows(rows, cfg, eval_texts=EVAL)
    got = {d["id"]: d["step"] for d in res.dropped}
    assert got == expect
    kept_ids = {r["id"] for r in res.kept}
    assert kept_ids == {r["id"] for r in rows} - set(expect)
    assert "r12" in kept_ids and "r11" not in kept_ids   # greedy preferred in best-of-n
    # accounting: every step balances, the chain is connected, nothing is lost
    for prev, step in zip(res.steps, res.steps[1:]):
        assert step.rows_in == prev.rows_out
    for step in res.steps:
        assert step.rows_in == step.rows_out + sum(step.reasons.values())
    assert res.steps[0].rows_in == len(rows) == len(res.kept) + len(res.dropped)
    reasons = {d["id"]: d["reason_code"] for d in res.dropped}
    assert reasons["r3"] == "wrong" and reasons["r4"] == "empty" and reasons["r5"] == "truncated"
    assert reasons["r6"] == "harvest_error" and reasons["r7"] == "contaminated"
    assert reasons["r1"] == reasons["r2"] == "exact_dup" and reasons["r10"] == "near_dup"
    assert reasons["r15"] == "syntax"
    assert all(r["verified"] for r in res.kept)


def test_annotate_keeps_wrong_rows_with_their_verdict() -> None:
    rows, _ = constructed_rows()
    res = curate_rows(rows, CurateConfig(eval_sets=(), verify="annotate", keep_per_prompt=3), eval_texts=EVAL)
    wrong = next(r for r in res.kept if r["id"] == "r3")
    assert wrong["verified"] is False and wrong["verdict"].startswith("wrong")


def test_deterministic() -> None:
    rows, _ = constructed_rows()
    cfg = CurateConfig(eval_sets=())
    a = curate_rows(rows, cfg, eval_texts=EVAL)
    b = curate_rows(rows, cfg, eval_texts=EVAL)
    assert [r["id"] for r in a.kept] == [r["id"] for r in b.kept]
    assert [(d["id"], d["reason"]) for d in a.dropped] == [(d["id"], d["reason"]) for d in b.dropped]


def test_outputs_keep_every_row_and_train_jsonl_is_chat(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from stillhouse.config import load_config

    rows, expect = constructed_rows()
    res = curate_rows(rows, CurateConfig(eval_sets=()), eval_texts=EVAL)
    report = write_outputs(res, tmp_path, source="constructed")
    kept = pq.read_table(tmp_path / "kept.parquet").to_pylist()
    dropped = pq.read_table(tmp_path / "dropped.parquet").to_pylist()
    assert len(kept) + len(dropped) == len(rows)
    assert {d["id"]: d["step"] for d in dropped} == expect
    assert all(d["reason"] for d in dropped)
    lines = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(lines) == len(kept)
    for line in lines:
        assert line["messages"][-1]["role"] == "assistant" and line["record_id"]
    assert report["kept"] == len(kept) and len(report["steps"]) == 7
    assert load_config(CurateConfig, tmp_path / "config.json") == res.config


def test_load_rows_from_jsonl_and_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stillhouse.cli import app

    rows, _ = constructed_rows()
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    assert len(load_rows(src)) == len(rows)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["curate", str(src), "--eval-sets", "", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    # without the small EVAL list the GSM8K-like row survives decontam; the held-out pair does not
    assert report["rows_in"] == len(rows)
    assert report["kept"] + report["dropped"] == len(rows)
    assert "best_of_n" in result.output
    again = CliRunner().invoke(app, ["curate", str(src), "--config", str(out / "config.json"),
                                     "--out", str(tmp_path / "out2")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "out2" / "report.json").read_text())["kept"] == report["kept"]


def test_bad_input_errors_name_the_fix(tmp_path: Path) -> None:
    from stillhouse.distill.curate import CurateError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}], "response": "x"}\n{oops\n')
    with pytest.raises(CurateError, match="bad.jsonl:2"):
        load_rows(bad)
    with pytest.raises(CurateError, match="does not exist"):
        load_rows(tmp_path / "nope")
    with pytest.raises(ValueError, match="keep_per_prompt"):
        CurateConfig(keep_per_prompt=0)


def test_exact_and_near_dedup_units() -> None:
    assert exact_duplicates(["a b", "A  b", "c", "a b"]) == [None, 0, None, 0]
    base = " ".join(f"word{i}" for i in range(60))
    variant = base.replace("word30", "other")
    different = " ".join(f"thing{i}" for i in range(60))
    found = NearDeduper(threshold=0.8, seed=1).fit_predict([base, variant, different])
    assert found[0] is None and found[2] is None
    assert found[1] is not None and found[1].of == 0 and found[1].jaccard > 0.8
    # arithmetic questions that differ in an operand are not near-duplicates
    qs = [Q.format(a=12, b=30) + " 12 + 30 = 42", Q.format(a=12, b=31) + " 12 + 31 = 43"]
    assert NearDeduper(threshold=0.85, seed=1).fit_predict(qs) == [None, None]


def test_decontaminator_13grams_and_short_items() -> None:
    d = Decontaminator(n=13).fit([
        EvalText("gsm8k-test", "g1", GSM_Q),
        EvalText("arith", "a1", "What is 12 + 30?"),
    ])
    assert d.check("Please solve: " + GSM_Q[:120]) is not None      # a 13-gram shared
    assert d.check("A baker makes 24 loaves every morning.") is None  # fewer than 13 shared tokens
    hit = d.check(Q.format(a=12, b=30))
    assert hit is not None and hit.item_id == "a1"
    assert d.check(Q.format(a=12, b=31)) is None or is_heldout_pair(12, 31)


@pytest.mark.skipif(not Path(__file__).resolve().parents[2].joinpath("shared/data/gsm8k/test.jsonl").exists()
                    and not __import__("os").environ.get("STILLHOUSE_SHARED"), reason="GSM8K not present")
def test_real_eval_sets_flag_a_gsm8k_test_question_but_not_train() -> None:
    from stillhouse.distill.decontam import load_eval_texts
    from stillhouse.distill.tasks import gsm8k

    d = Decontaminator().fit(load_eval_texts(["builtin:gsm8k-test", "builtin:humaneval"]))
    test_item = gsm8k(1, "test")[0]
    train_items = gsm8k(200, "train")
    assert d.check(test_item.messages[0]["content"]) is not None
    flagged = sum(d.check(it.messages[0]["content"]) is not None for it in train_items)
    assert flagged <= 2   # the template is not indexed; train questions do not collide


def test_curate_a_real_harvest_run_directory(tmp_path: Path) -> None:
    """Harvest the fake teacher (3 sampled answers per prompt, ~30% wrong), then curate the run
    directory: exactly the prompts with at least one right answer survive, one row each."""
    from typer.testing import CliRunner

    from stillhouse.cli import app
    from stillhouse.distill.store import HarvestStore

    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["harvest", "--prompts", "builtin:arithmetic:40", "--teacher", "fake",
                                   "--out", str(run), "--samples", "3", "--temperature", "0.8",
                                   "--logprobs", "--top-logprobs", "5"])
    assert res.exit_code == 0, res.output
    with HarvestStore(run, readonly=True) as store:
        recs = list(store.records())
    assert len(recs) == 120
    solvable = {r.prompt_id for r in recs if r.text.split("=")[-1].strip() == str(r.meta["answer"])}
    assert 0 < len(solvable) < 40   # the fake teacher is wrong sometimes, right mostly

    out = CliRunner().invoke(app, ["curate", str(run), "--eval-sets", "builtin:arithmetic-heldout:50"])
    assert out.exit_code == 0, out.output
    report = json.loads((run / "curated" / "report.json").read_text())
    assert report["rows_in"] == 120 and report["kept"] + report["dropped"] == 120
    kept = [json.loads(x) for x in (run / "curated" / "train.jsonl").read_text().splitlines()]
    assert {k["prompt_id"] for k in kept} == solvable
    assert len(kept) == len(solvable)
    keys = {r.key for r in recs}
    assert all(k["record_id"] in keys for k in kept)   # pointers back into the store
    by_key = {r.key: r for r in recs}
    for k in kept:   # the teacher's top-k travels into train.jsonl for top-k KD
        rec = by_key[k["record_id"]]
        assert len(k["top_logprobs"]) == len(rec.top_logprobs) and len(k["top_logprobs"][0]) == 5
        assert k["top_tokens"] == rec.top_tokens


def test_normalize_row_accepts_exported_chat_and_aliases() -> None:
    row = normalize_row({"messages": [{"role": "user", "content": "What is 1 + 2?"},
                                      {"role": "assistant", "content": "1 + 2 = 3"}],
                         "completion": "1 + 2 = 3", "sample": 2, "temperature": 0.8, "top_ids": [[1, 2]]})
    assert row["response"] == "1 + 2 = 3" and row["sample_index"] == 2
    assert row["messages"] == [{"role": "user", "content": "What is 1 + 2?"}]   # the answer is not in the prompt
    assert row["top_ids"] == [[1, 2]]


def test_heldout_split_rule_can_be_turned_off() -> None:
    (ha, hb), = _pairs(True, 1)
    rows = [_row(Q.format(a=ha, b=hb), f"{ha} + {hb} = {ha + hb}")]
    on = curate_rows(rows, CurateConfig(eval_sets=()), eval_texts=[])
    off = curate_rows(rows, CurateConfig(eval_sets=(), arithmetic_split_rule=False), eval_texts=[])
    assert [d["reason_code"] for d in on.dropped] == ["contaminated"] and len(off.kept) == 1


def test_near_dup_threshold_one_turns_the_step_off() -> None:
    """Two answers worded alike are near-duplicates at 0.5 and both kept at 1.0 (the documented off switch)."""
    (a, b), = _pairs(False, 1)
    rows = [_row(Q.format(a=a, b=b), f"{a} + {b} = {a + b}"),
            _row(Q.format(a=a, b=b), f"{a} + {b} = {a + b}, I think", sample_index=1)]
    cfg = CurateConfig(eval_sets=(), keep_per_prompt=2)
    assert [d["step"] for d in curate_rows(rows, cfg, eval_texts=[]).dropped] == ["near_dup"]
    off = curate_rows(rows, CurateConfig(eval_sets=(), keep_per_prompt=2, near_dup_threshold=1.0), eval_texts=[])
    assert len(off.kept) == 2 and not off.dropped


def test_default_eval_sets_skip_data_this_machine_lacks_but_named_sets_must_exist(tmp_path, monkeypatch) -> None:
    """Without ../shared (GSM8K) curation with the default sets still runs and names what it skipped; a set the
    user names must be there."""
    from stillhouse.distill.tasks import TaskDataMissing

    monkeypatch.setenv("STILLHOUSE_SHARED", str(tmp_path))  # holds no data/gsm8k
    rows = [_row("What is 12 + 30?", "42"), _row("What is 7 + 8?", "15")]
    res = curate_rows(rows, CurateConfig(verify="annotate"))
    assert len(res.kept) == 2
    assert [s.split(":", 2)[:2] for s in res.eval_sets_skipped] == [["builtin", "gsm8k-test"]]
    assert "gsm8k" in res.summary()["eval_sets_skipped"][0]
    with pytest.raises(TaskDataMissing, match="GSM8K test split not found"):
        curate_rows(rows, CurateConfig(verify="annotate", eval_sets=("builtin:gsm8k-test",)))
