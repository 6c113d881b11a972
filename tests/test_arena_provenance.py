"""The arena's provenance stage on a tiny random model: a campaign harvests through a real guard in
front of a watermarking ``serve``, a student trains on what leaked, and the radioactivity test runs
over every key id in the guard's log. A random tiny model's answers share no contexts with the text
the student reads, so no key is expected to be named here (and no decoy may be); whether the real
teacher's student is named is measured in docs/results.md."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stillhouse.arena.provenance import ProvenanceArenaConfig, run_provenance


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="campaign_accounts"):
        ProvenanceArenaConfig(campaign_accounts=0)
    with pytest.raises(ValueError, match="gamma"):
        ProvenanceArenaConfig(gamma=1.0)
    with pytest.raises(ValueError, match="scheme=exp needs own_answers"):
        ProvenanceArenaConfig(scheme="exp", own_answers=False, match_keys=False, entropy=0.0)
    with pytest.raises(ValueError, match="give --test counterfactual or drop --prefix-tokens"):
        ProvenanceArenaConfig(prefix_tokens=64)  # the default test reads green lists, not likelihoods
    with pytest.raises(ValueError, match="N >= 0"):
        ProvenanceArenaConfig(test="counterfactual", prefix_tokens=-1)
    assert ProvenanceArenaConfig(test="counterfactual", prefix_tokens=0).prefix_tokens == 0


def test_provenance_stage_names_the_campaign(tmp_path: Path, smol_tokenizer: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import build_tiny_model

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", "arena-provenance-test-secret")
    model = build_tiny_model(smol_tokenizer, max_positions=512)
    cfg = ProvenanceArenaConfig(student="self", campaign_accounts=1, requests_per_account=16, decoys=15,
                                decoy_requests=1, max_tokens=32, temperature=1.0, delta=4.0, epochs=3, lr=3e-3, reading=200,
                                batch_size=4, own_answers=False, match_keys=False, entropy=0.0)
    m = run_provenance(cfg, tmp_path / "prov", loaded=(model, smol_tokenizer, "tiny-0"))
    assert m["requests"] == 16 + 15 and m["answered"] == m["requests"] and m["leaked_rows"] == 16
    assert m["keys_in_log"] == 16  # one key id per account: the campaign's and the 15 decoys'
    assert {s["key_id"].rsplit("/", 1)[0] for s in m["scores"]} == {f"account/{a}" for a in
                                                                      ["camp-0", *(f"user-{i}" for i in range(15))]}
    assert not set(m["named_accounts"]) - {"camp-0"}  # no benign account is ever named
    assert m["scored"] > 300 and all(s["scored"] == m["scored"] for s in m["scores"])
    rows = [json.loads(x) for x in (tmp_path / "prov" / "leaked.jsonl").read_text().splitlines()]
    assert {r["account"] for r in rows} == {"camp-0"}
    assert "arena-provenance-test-secret" not in (tmp_path / "prov" / "provenance.json").read_text()
    assert not (tmp_path / "prov" / "watermark.secret").exists() and "not written" in m["secret"]
    # A rerun into the same directory starts over: its student learns this harvest alone, from the init.
    m2 = run_provenance(replace(cfg, epochs=1), tmp_path / "prov", loaded=(model, smol_tokenizer, "tiny-0"))
    steps = [json.loads(x)["step"] for x in (tmp_path / "prov" / "student" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and m2["config"]["epochs"] == 1


@pytest.mark.parametrize("scheme", ["kgw", "exp"])
def test_student_answering_the_logged_questions_names_the_campaign(tmp_path: Path, smol_tokenizer: Any,
                                                                   monkeypatch: pytest.MonkeyPatch, scheme: str) -> None:
    """The supervised test (``own_answers``): the student answers the questions in the guard's log and
    writes the campaign's watermarked answers again; the campaign's key is named and no decoy's (under EXP, the
    campaign's sampled answers were drawn by the key and the student's answers take the EXP test)."""
    from conftest import build_tiny_model

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", "arena-provenance-test-secret")
    model = build_tiny_model(smol_tokenizer, max_positions=512)
    cfg = ProvenanceArenaConfig(student="self", campaign_accounts=1, requests_per_account=16, decoys=15,
                                decoy_requests=1, max_tokens=32, temperature=1.0, delta=4.0, epochs=12, lr=1e-2,
                                own_answers=True, answer_tokens=32, batch_size=4, match_keys=False, entropy=0.0,
                                scheme=scheme)  # type: ignore[arg-type]
    m = run_provenance(cfg, tmp_path / "prov", loaded=(model, smol_tokenizer, "tiny-0"))
    assert m["named_accounts"] == ["camp-0"] and m["best"]["key_id"].startswith("account/camp-0/")
    assert m["best"]["test"] == ("exp" if scheme == "exp" else "weighted")
    assert not (tmp_path / "prov" / "reading.jsonl").exists()  # the questions came from the guard's log


def test_guard_log_as_a_source(tmp_path: Path) -> None:
    """A guard's traffic log is a text source: its watermarked answers with their prompts, one account's alone
    on request; a missing log or an account without a log is a clear error."""
    from stillhouse.guard.events import TrafficRecord
    from stillhouse.guard.store import open_store
    from stillhouse.provenance.texts import TextSourceError, load_samples

    url = f"sqlite:///{tmp_path / 'guard.db'}"
    store = open_store(url)
    recs = [TrafficRecord(request_id=f"r{i}", ts=float(i), account_id=f"a{i % 2}", key_id="k",
                          messages=[{"role": "user", "content": f"q{i}"}], response_text=f"answer {i}",
                          status=200 if i != 3 else 429, watermark_key_id="" if i == 4 else f"account/a{i % 2}/0")
            for i in range(6)]
    store.write_records(recs)
    store.close()
    got = load_samples(url)
    assert [s.text for s in got] == ["answer 0", "answer 1", "answer 2", "answer 5"]  # 3 refused, 4 not watermarked
    assert got[0].prompt == [{"role": "user", "content": "q0"}]
    assert [s.text for s in load_samples(url, account="a1")] == ["answer 1", "answer 5"]
    assert len(load_samples(url, limit=2)) == 2
    with pytest.raises(TextSourceError, match="no such file"):
        load_samples(f"sqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(TextSourceError, match="only a guard log"):
        load_samples(str(tmp_path / "x.jsonl"), account="a1")


def test_provenance_arena_cli_errors(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stillhouse.cli import app

    runner = CliRunner()
    for args, needle in ((["--no-own-answers", "--no-match-keys"], "needs own_answers"),
                         (["--no-own-answers", "--entropy", "0"], "--no-match-keys"),
                         (["--campaign-accounts", "0"], "campaign_accounts"), (["--gamma", "1.5"], "gamma")):
        res = runner.invoke(app, ["provenance", "arena", "--out", str(tmp_path / "run"), *args])
        assert res.exit_code != 0 and needle in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "run" / "provenance.json").exists()


def test_matched_keys_and_the_campaign_group(tmp_path: Path, smol_tokenizer: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``match_keys`` (the default): each key is scored on the answers to its own questions, the campaign's two
    accounts are one pooled group beside two decoy groups of the same size; the campaign's group is named, no
    decoy and no decoy group is, and Holm runs over the 16 keys and 3 groups together. Without
    $STILLHOUSE_WATERMARK_SECRET the run makes a secret, keeps it in OUT/watermark.secret (0600) only, and the
    report's re-test command, run later with that file, gives the same scores."""
    import os
    import shlex

    from typer.testing import CliRunner

    from conftest import build_tiny_model
    from stillhouse.cli import app

    monkeypatch.delenv("STILLHOUSE_WATERMARK_SECRET", raising=False)
    # the run makes its own secret; a fixed one here keeps the tiny student (and so every count below) the same from
    # run to run: with a fresh random secret a decoy's one answer came out empty about once in seven runs
    monkeypatch.setattr("secrets.token_urlsafe", lambda nbytes=32: "arena-test-secret-" + "x" * 25)
    model = build_tiny_model(smol_tokenizer, max_positions=512)
    cfg = ProvenanceArenaConfig(student="self", campaign_accounts=2, requests_per_account=8, decoys=14,
                                decoy_requests=1, max_tokens=32, temperature=1.0, delta=4.0, epochs=12, lr=1e-2,
                                answer_tokens=32, batch_size=4, entropy=0.0)
    m = run_provenance(cfg, tmp_path / "prov", loaded=(model, smol_tokenizer, "tiny-0"))
    secret_file = tmp_path / "prov" / "watermark.secret"
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32 and secret_file.stat().st_mode & 0o777 == 0o600 and "0600" in m["secret"]
    assert "STILLHOUSE_WATERMARK_SECRET" not in os.environ  # set for the run only
    for name in ("provenance.json", "guard.db", "leaked.jsonl"):
        assert secret.encode() not in (tmp_path / "prov" / name).read_bytes(), name
    argv = shlex.split(m["retest"].split(") ", 1)[1])  # after the STILLHOUSE_WATERMARK_SECRET=$(cat FILE) prefix
    assert argv[:3] == ["stillhouse", "provenance", "model"] and str(secret_file) in m["retest"]
    res = CliRunner().invoke(app, [*argv[1:], "--out", str(tmp_path / "again.json")],
                             env={"STILLHOUSE_WATERMARK_SECRET": secret})
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "again.json").read_text())
    assert {s["key_id"]: s["p"] for s in again["scores"]} == {s["key_id"]: s["p"] for s in m["scores"]}
    assert {g["name"]: g["p"] for g in again["groups"]} == {g["name"]: g["p"] for g in m["groups"]}
    groups = {g["name"]: g for g in m["groups"]}
    assert set(groups) == {"group:camp-0+camp-1", "group:user-0+user-1", "group:user-2+user-3"}
    camp = groups["group:camp-0+camp-1"]
    assert camp["given_by"] == "operator" and "arena" in m["group_given_by"]
    assert camp["keys"] == sorted(s["key_id"] for s in m["scores"] if s["accounts"][0] in ("camp-0", "camp-1"))
    by_key = {s["accounts"][0]: s for s in m["scores"]}
    # matched: a key is scored on its own answers only, and the group's triples are its members' tuples
    assert camp["scored"] == by_key["camp-0"]["scored"] + by_key["camp-1"]["scored"]
    assert camp["green"] == by_key["camp-0"]["green"] + by_key["camp-1"]["green"]
    assert 0 < by_key["user-5"]["scored"] < by_key["camp-0"]["scored"]
    ps = sorted([s["p"] for s in m["scores"]] + [g["p"] for g in m["groups"]])
    assert min(s["p_holm"] for s in m["scores"] + m["groups"]) == pytest.approx(min(1.0, 19 * ps[0]))
    assert "group:camp-0+camp-1" in m["named_groups"] and m["goal_met"]
    assert set(m["named_accounts"]) <= {"camp-0", "camp-1"}


def test_counterfactual_arena_keys_each_request_and_names_the_campaign(tmp_path: Path, smol_tokenizer: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """test=counterfactual: the guard keys every request on its own, the student reads each logged answer beside
    the teacher's redraws under other keys, and the campaign (all its answers ranked first) is named; no decoy is."""
    from conftest import build_tiny_model

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", "arena-provenance-test-secret")
    model = build_tiny_model(smol_tokenizer, max_positions=512)
    cfg = ProvenanceArenaConfig(student="self", campaign_accounts=1, requests_per_account=8, decoys=4,
                                decoy_requests=1, max_tokens=24, temperature=1.0, epochs=12, lr=1e-2, batch_size=4,
                                entropy=0.0, scheme="exp", test="counterfactual", counterfactuals=3, decoy_groups=2)
    m = run_provenance(cfg, tmp_path / "prov", loaded=(model, smol_tokenizer, "tiny-0"))
    assert m["keys_in_log"] == 8 + 4  # a key per request
    by = {h["name"]: h for h in m["hypotheses"]}
    assert set(by) == {"camp-0", "user-0", "user-1", "user-2", "user-3", "group:camp-0", "group:user-0",
                       "group:user-1"}
    assert by["camp-0"]["first"] == 8 and by["camp-0"]["p"] == pytest.approx(4.0 ** -8)
    assert m["named_accounts"] == ["camp-0"] and m["goal_met"]
    drawn = (tmp_path / "prov" / "counterfactuals.jsonl").read_text().splitlines()
    assert len(drawn) == 12 and "--test counterfactual" in m["retest"]
