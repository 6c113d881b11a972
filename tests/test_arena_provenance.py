"""The arena's provenance stage on a tiny random model: a campaign harvests through a real guard in
front of a watermarking ``serve``, a student trains on what leaked, and the radioactivity test runs
over every key id in the guard's log. A random tiny model's answers share no contexts with the text
the student reads, so no key is expected to be named here (and no decoy may be); whether the real
teacher's student is named is measured in docs/results.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stillhouse.arena.provenance import ProvenanceArenaConfig, run_provenance


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="campaign_accounts"):
        ProvenanceArenaConfig(campaign_accounts=0)
    with pytest.raises(ValueError, match="gamma"):
        ProvenanceArenaConfig(gamma=1.0)


def test_provenance_stage_names_the_campaign(tmp_path: Path, smol_tokenizer: Any,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import build_tiny_model

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", "arena-provenance-test-secret")
    model = build_tiny_model(smol_tokenizer, max_positions=512)
    cfg = ProvenanceArenaConfig(student="self", campaign_accounts=1, requests_per_account=16, decoys=15,
                                decoy_requests=1, max_tokens=32, temperature=1.0, delta=4.0, epochs=3, lr=3e-3, reading=200,
                                batch_size=4)
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


def test_student_answering_the_logged_questions_names_the_campaign(tmp_path: Path, smol_tokenizer: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervised test (``own_answers``): the student answers the questions in the guard's log and
    writes the campaign's watermarked answers again; the campaign's key is named and no decoy's."""
    from conftest import build_tiny_model

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", "arena-provenance-test-secret")
    model = build_tiny_model(smol_tokenizer, max_positions=512)
    cfg = ProvenanceArenaConfig(student="self", campaign_accounts=1, requests_per_account=16, decoys=15,
                                decoy_requests=1, max_tokens=32, temperature=1.0, delta=4.0, epochs=12, lr=1e-2,
                                own_answers=True, answer_tokens=32, batch_size=4)
    m = run_provenance(cfg, tmp_path / "prov", loaded=(model, smol_tokenizer, "tiny-0"))
    print({k: m[k] for k in ("named_accounts", "best", "scored")})
    assert m["named_accounts"] == ["camp-0"] and m["best"]["key_id"].startswith("account/camp-0/")
    rows = [json.loads(x) for x in (tmp_path / "prov" / "reading.jsonl").read_text().splitlines()]
    assert len(rows) == 16 + 15 and all(r["messages"][0]["role"] == "user" for r in rows)
