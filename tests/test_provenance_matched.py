"""Key-matched and pooled scoring (provenance/matched.py): each key on the answers to its own prompts, a group
of accounts as one exact test, Holm over keys and groups together.

The exactness check draws many random secrets for fixed answers (the null: the answers never depend on the
key) and counts how often the group's p-value falls below 0.05; the pooled count is checked against a naive
triple-by-triple reference; a clean tiny model asked the questions of a guard log names no key and no group;
bad input is a one-line error with exit status 2. The positive case (a tiny student trained on a campaign's
answers names the campaign's group) is tests/test_arena_provenance.py's.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from stillhouse.cli import app
from stillhouse.provenance.detect import adjust, score_key
from stillhouse.provenance.matched import (
    Group,
    check_groups,
    matched_tuples,
    operator_groups,
    pooled_parts,
    score_pooled,
)
from stillhouse.provenance.stats import binom_sf_reference
from stillhouse.watermark.green import WatermarkParams, green_flags
from stillhouse.watermark.keys import derive_key, key_u64

P = WatermarkParams(gamma=0.25, delta=2.0, context=1)
SECRET = "matched-test-secret-0123456789"


def _answers(n: int, length: int, seed: int, vocab: int = 5000) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(vocab, size=length)] for _ in range(n)]


def _keys(secret: str, ids: list[str]) -> dict[str, int]:
    return {k: key_u64(derive_key(secret.encode(), k)) for k in ids}


def test_matched_sets_and_pooled_triples_against_a_naive_reference() -> None:
    seqs = [[1, 2, 3], [2, 3, 4], [1, 2, 3], [9, 8]]
    kids = ["account/a/0", "account/b/0", "account/b/0", "account/c/0"]
    accts = ["a", "b", "b", "c"]
    per = matched_tuples(seqs, kids, 1, exclude={(8, 7)})
    assert {k: v.tuples for k, v in per.items()} == \
        {"account/a/0": [(1, 2), (2, 3)], "account/b/0": [(2, 3), (3, 4), (1, 2)], "account/c/0": [(9, 8)]}
    assert matched_tuples(seqs, kids, 1, exclude={(9, 8)})["account/c/0"].tuples == []  # prompt tuples dropped
    parts = pooled_parts(seqs, kids, accts, ["a", "b"], 1, exclude=set())
    assert parts == {"account/a/0": per["account/a/0"], "account/b/0": per["account/b/0"]}  # (2,3) twice: two keys
    keys = _keys(SECRET, sorted(set(kids)))
    got = score_pooled(parts, keys, P, "group:a+b")
    triples = [(k, t) for k, sel in parts.items() for t in sel.tuples]
    green = sum(green_flags(keys[k], [t], P)[0] for k, t in triples)
    gamma = Fraction(P.threshold, 1 << 53)
    assert (got.scored, got.green) == (5, green)
    assert got.p == pytest.approx(float(binom_sf_reference(green, 5, gamma)), rel=1e-9)
    one = score_pooled({"account/b/0": per["account/b/0"]}, keys, P, "account/b/0")
    plain = score_key(keys["account/b/0"], per["account/b/0"].tuples, P)
    assert (one.scored, one.green, one.p) == (plain.scored, plain.green, plain.p)
    with pytest.raises(ValueError, match="key ids for"):
        matched_tuples(seqs, kids[:2], 1, exclude=set())


def test_group_p_value_under_the_null_is_exact_over_random_keys() -> None:
    """Fixed answers of a 2-account group (its accounts' answers share many tuples), 600 random secrets: the
    share of p < 0.05 is about 0.05 (binomial 99.9% band), for the pooled group (counted and weighted) and for a
    matched key."""
    seqs = _answers(40, 40, seed=0, vocab=40)  # a small vocabulary: tuples repeat across the two keys
    kids = [f"account/a{j % 2}/0" for j in range(40)]
    accts = [f"a{j % 2}" for j in range(40)]
    parts = pooled_parts(seqs, kids, accts, ["a0", "a1"], 1, exclude=set())
    shared = set(parts["account/a0/0"].tuples) & set(parts["account/a1/0"].tuples)
    assert len(shared) > 100 and sum(len(t.tuples) for t in parts.values()) > 1000
    levels = [[int(u) for u in np.random.default_rng(j).integers(0, 17, size=len(s))] for j, s in enumerate(seqs)]
    weighted = pooled_parts(seqs, kids, accts, ["a0", "a1"], 1, exclude=set(), levels=levels)
    assert [len(sel.levels or []) for sel in weighted.values()] == [len(sel.tuples) for sel in parts.values()]
    group, single, wgroup = [], [], []
    for i in range(600):
        keys = _keys(f"null-secret-{i}", ["account/a0/0", "account/a1/0"])
        group.append(score_pooled(parts, keys, P, "g").p)
        single.append(score_pooled({"account/a0/0": parts["account/a0/0"]}, keys, P, "k").p)
        wgroup.append(score_pooled(weighted, keys, P, "g").p)  # weights from the text, never the key: still exact
    for ps in (group, single, wgroup):
        share = sum(p < 0.05 for p in ps) / len(ps)
        assert 0.015 < share < 0.09, share  # 600 draws at 0.05: mean 30, sd 5.3
        assert 0.4 < float(np.mean(ps)) < 0.6


def test_exp_scored_groups_are_exact_over_random_keys() -> None:
    """The EXP test on pooled (key, tuple) triples, alone and mixed with the green-list test (Fisher): under the
    null the share of p < 0.05 is about 0.05 over 600 random secrets."""
    seqs = _answers(40, 40, seed=1, vocab=40)
    kids = [f"account/a{j % 2}/0" for j in range(40)]
    accts = [f"a{j % 2}" for j in range(40)]
    every = pooled_parts(seqs, kids, accts, ["a0", "a1"], 1, exclude=set(), exp=[True] * 40)
    half = pooled_parts(seqs, kids, accts, ["a0", "a1"], 1, exclude=set(), exp=[j % 4 < 2 for j in range(40)])
    assert all(sel.exp is not None and all(sel.exp) for sel in every.values())
    assert {e for sel in half.values() for e in sel.exp or []} == {True, False}
    tests, ps, mixed = set(), [], []
    for i in range(600):
        keys = _keys(f"exp-null-{i}", ["account/a0/0", "account/a1/0"])
        a, b = score_pooled(every, keys, P, "g"), score_pooled(half, keys, P, "g")
        tests |= {a.test, b.test}
        ps.append(a.p)
        mixed.append(b.p)
    assert tests == {"exp", "exp+binomial"}
    for got in (ps, mixed):
        share = sum(p < 0.05 for p in got) / len(got)
        assert 0.015 < share < 0.09, share
        assert 0.4 < float(np.mean(got)) < 0.6


def test_holm_over_keys_and_groups_together() -> None:
    from stillhouse.provenance.detect import KeyScore

    scores = [KeyScore(n, 10, 5, p) for n, p in (("k1", 0.001), ("k2", 0.5), ("group:x+y", 0.0002))]
    adjust(scores)
    assert [s.p_holm for s in scores] == pytest.approx([0.002, 0.5, 0.0006])
    assert [s.p_bonferroni for s in scores] == pytest.approx([0.003, 1.0, 0.0006])


def test_group_specs() -> None:
    assert operator_groups(["camp-0, camp-1"]) == [Group("group:camp-0+camp-1", ("camp-0", "camp-1"), "operator")]
    for bad, needle in (("a,,b", "separated by commas"), ("a,a", "named twice")):
        with pytest.raises(ValueError, match=needle):
            operator_groups([bad])
    with pytest.raises(ValueError, match="ghost have no watermarked answer"):
        check_groups(operator_groups(["a,ghost"]), ["a", "b"])


def _guard_log(tmp_path: Path, accounts: int = 4, per_account: int = 4, clusters: dict[str, str] | None = None
               ) -> str:
    from stillhouse.guard.events import TrafficRecord
    from stillhouse.guard.store import open_store

    url = f"sqlite:///{tmp_path / 'guard.db'}"
    store = open_store(url)
    recs = [TrafficRecord(request_id=f"r{i}", ts=float(i), account_id=f"a{i % accounts}", key_id="k",
                          messages=[{"role": "user", "content": f"Question {i}: what is {i} + {i + 3}?"}],
                          response_text=f"answer {i}", watermark_key_id=f"account/a{i % accounts}/0")
            for i in range(accounts * per_account)]
    store.write_records(recs)
    if clusters:
        store.put_scores([(a, 1.0, 0.9, c, "[]") for a, c in clusters.items()])
    store.close()
    return url


def test_clean_model_names_no_key_and_no_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               smol_tokenizer: Any) -> None:
    """A clean tiny model answers the log's questions: matched keys, an operator's group and the detector's
    cluster are all tested, Holm over the lot, and nothing is named."""
    from conftest import build_tiny_model
    from stillhouse.provenance.run import SuspectConfig, model_provenance

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", SECRET)
    url = _guard_log(tmp_path, clusters={"a2": "c7", "a3": "c7", "a1": "c9"})
    path = tmp_path / "clean"
    build_tiny_model(smol_tokenizer, seed=3, max_positions=512).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    report = model_provenance(SuspectConfig(source=url, log=url, suspect=f"hf:{path}", mode="open", reading="own",
                                            answer_tokens=24, match_keys=True, groups=("a0,a1",), entropy=0.0))
    assert report["match_keys"] and report["keys_tried"] == 4 and report["answers"] == 16
    groups = {g["name"]: g for g in report["groups"]}
    assert set(groups) == {"group:a0+a1", "cluster:c7"}  # c9 has one account: its key is already tested
    assert groups["cluster:c7"]["given_by"] == "cluster" and groups["cluster:c7"]["accounts"] == ["a2", "a3"]
    by = {s["key_id"]: s for s in report["scores"]}
    assert groups["group:a0+a1"]["scored"] == by["account/a0/0"]["scored"] + by["account/a1/0"]["scored"] > 20
    assert report["hypotheses"] == 6 and report["scored"] == sum(s["scored"] for s in report["scores"])
    assert report["named"] is False and report["named_hypotheses"] == [] and "6 hypotheses" in report["verdict"]
    assert min(r["p_holm"] for r in report["scores"] + report["groups"]) > 1e-3
    ps = sorted(r["p"] for r in report["scores"] + report["groups"])
    assert report["best"]["p_holm"] == pytest.approx(min(1.0, 6 * ps[0]))
    assert SECRET not in json.dumps(report)


def test_bad_groups_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        smol_tokenizer: Any) -> None:
    from conftest import build_tiny_model

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", SECRET)
    url = _guard_log(tmp_path, accounts=2, per_account=1)
    path = tmp_path / "clean"
    build_tiny_model(smol_tokenizer, seed=0, max_positions=512).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    base = ["provenance", "model", "--suspect", f"hf:{path}", "--mode", "open", "--log", url, "--answer-tokens", "4",
            "--entropy", "0"]  # every token: no teacher to load for the gate
    runner = CliRunner()
    for args, needle in (
            ([url, "--reading", "own", "--match-keys", "--group", "a0,ghost"], "ghost have no watermarked answer"),
            ([str(prompts), "--reading", "own", "--match-keys", "--group", "a0,a1"], "is not a guard log"),
            ([url, "--reading", "own", "--group", "a0,a1"], "add --match-keys"),
            ([url, "--match-keys"], "use --reading own"),
            ([url, "--reading", "own", "--match-keys", "--group", "a0,a0"], "named twice")):
        res = runner.invoke(app, [*base[:2], *args, *base[2:]])
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, (args, res.output)
    res = runner.invoke(app, [*base[:2], url, *base[2:], "--reading", "own", "--match-keys", "--group", "a0,a1"])
    assert res.exit_code == 0 and "group:a0+a1" in res.output and "(operator)" in res.output, res.output


def test_a_log_that_is_not_there_or_not_a_guards_is_one_line_error(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """--log (and a log as SOURCE) naming a missing SQLite file is refused without creating it (a typo must not
    leave an empty database behind); a file that is no guard's log gets one line naming it, never a traceback."""
    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", SECRET)
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    missing = tmp_path / "typo" / "guard.db"
    empty = tmp_path / "empty.db"
    empty.touch()
    runner = CliRunner()
    for args, needle in (
            (["provenance", "text", str(text), "--log", f"sqlite:///{missing}"], "no such file"),
            (["provenance", "text", str(text), "--log", f"sqlite:///{empty}"], "cannot read the guard's traffic log"),
            (["provenance", "model", f"sqlite:///{empty}", "--log", f"sqlite:///{empty}", "--suspect", "bundled",
              "--reading", "own", "--match-keys"], "cannot read the guard's traffic log")):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, (args, res.output)
    assert not missing.parent.exists()
