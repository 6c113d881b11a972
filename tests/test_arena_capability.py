"""The capability-leaked stage's plumbing on a tiny random-init model (real tokenizer, real guard,
real served teacher on loopback, real SFT and eval), with a stand-in detector that blocks each
account after its third request; and the gain-ratio maths against a direct computation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stillhouse.arena.campaigns import CampaignConfig, generate_campaign
from stillhouse.arena.capability import CapabilityConfig, CapabilityError, run_capability
from stillhouse.arena.metrics import gain_ratio, rate
from stillhouse.arena.report import capability_lines, merge_capability
from stillhouse.guard.events import Verdict


class _BlockAfter3:
    """Says 'block' from an account's third request on (the guard's policy engine enforces it)."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}
        self.on_refresh = None
        self.cluster_of_: dict[str, str] = {}
        self.max_score_: dict[str, float] = {}

    def observe(self, record: Any, account: Any = None) -> None:
        self.n[record.account_id] = self.n.get(record.account_id, 0) + 1
        self.max_score_[record.account_id] = float(self.n[record.account_id])

    def verdict(self, account_id: str) -> Verdict | None:
        n = self.n.get(account_id, 0)
        return Verdict(account_id, float(n), n >= 3, "block" if n >= 3 else "allow")

    def refresh_clusters(self) -> None:
        pass


def test_gain_ratio_matches_direct_computation() -> None:
    rng = np.random.default_rng(0)
    init = (rng.random(200) < 0.3).astype(float)
    leaked = np.maximum(init, rng.random(200) < 0.35)
    full = np.maximum(leaked, rng.random(200) < 0.6)
    r = gain_ratio(init, leaked, full, n_boot=500, seed=1)
    expect = (leaked.mean() - init.mean()) / (full.mean() - init.mean())
    assert r["value"] == pytest.approx(expect)
    assert r["lo"] <= r["value"] <= r["hi"]
    undefined = gain_ratio(init, leaked, init)  # full gained nothing: no share to take
    assert np.isnan(undefined["value"]) and np.isnan(undefined["lo"]) and np.isnan(undefined["hi"])
    with pytest.raises(ValueError, match="same items"):
        gain_ratio(init, leaked, full[:10])
    assert rate(0, 5000)["hi"] == pytest.approx(7.68e-4, rel=0.01)  # Wilson upper bound of 0/5000


def test_capability_config_errors() -> None:
    with pytest.raises(CapabilityError, match="accounts"):
        CapabilityConfig(accounts=0)
    with pytest.raises(CapabilityError, match="student"):
        CapabilityConfig(student="half")


def test_missing_detector_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(CapabilityError, match="stillhouse arena"):
        run_capability(CapabilityConfig(), tmp_path / "nope", tmp_path / "out")


def test_capability_stage_on_a_tiny_model(tmp_path: Path, smol_tokenizer: Any) -> None:
    from conftest import build_tiny_model

    model = build_tiny_model(smol_tokenizer, max_positions=256)
    cfg = CapabilityConfig(accounts=2, requests_per_account=8, days=0.5, verified_only=False, epochs=1,
                           batch_size=4, eval_limit=6, max_batch=4)
    m = run_capability(cfg, tmp_path / "unused", tmp_path / "cap", loaded=(model, smol_tokenizer, "tiny-0"),
                       detector=_BlockAfter3())
    assert m["planned"] == 16 and m["sent"] == 16
    # the verdict after an account's 3rd request blocks from its 4th on: 3 answers leak per account
    assert m["blocked_accounts"] == 2 and m["leaked"] == 2 * 3
    assert m["train_rows"] == {"leaked": 6, "full": 16} and m["trained"] == {"leaked": True, "full": True}
    leaked = [json.loads(x) for x in (tmp_path / "cap" / "leaked.jsonl").read_text().splitlines()]
    full_rows = [json.loads(x) for x in (tmp_path / "cap" / "full.jsonl").read_text().splitlines()]
    full = {json.dumps(r["messages"]) for r in full_rows}
    assert len(full) == 16 and all(json.dumps(r["messages"]) in full for r in leaked)
    # both files follow the plan's order (the students train in it), not the order concurrent answers came back
    _, turns = generate_campaign(CampaignConfig(shape="harvest", accounts=2, requests_per_account=8, days=0.5,
                                                seed=cfg.seed, name="capability-harvest"))
    plan = [t.user_text for t in sorted(turns, key=lambda t: (t.ts, t.session_id))]
    assert [r["messages"][0]["content"] for r in full_rows] == plan
    leaked_order = [r["messages"][0]["content"] for r in leaked]
    assert leaked_order == [p for p in plan if p in set(leaked_order)]
    for name in ("init", "leaked", "full"):
        assert m["accuracy"][name]["n"] == 6 and 0 <= m["accuracy"][name]["value"] <= 1
    for name in ("leaked", "full"):
        assert (tmp_path / "cap" / name / "student" / "final" / "config.json").exists()
    assert (tmp_path / "cap" / "capability.json").exists()
    assert any("unblocked harvest" in line for line in capability_lines(m))
    # a rerun on the same directory starts over (the old guard store holds the blocks it enforced)
    again = run_capability(cfg, tmp_path / "unused", tmp_path / "cap", loaded=(model, smol_tokenizer, "tiny-0"),
                           detector=_BlockAfter3())
    assert (again["leaked"], again["blocked_accounts"], again["train_rows"]) == (6, 2, {"leaked": 6, "full": 16})
    # --capability-only merges into an earlier run's report and metrics
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("# Arena report\n\n## Capability leaked\n\nnot run (add --capability)\n\n"
                                   "Timings (s): total_s 1.0\n")
    (run / "metrics.json").write_text(json.dumps({"capability_leaked": "not run"}))
    merge_capability(run, m)
    report = (run / "report.md").read_text()
    assert "not run" not in report and "unblocked harvest" in report and report.endswith("total_s 1.0\n")
    assert json.loads((run / "metrics.json").read_text())["capability_leaked"]["planned"] == 16
    assert (run / "capability" / "report.md").exists()


class _NeverBlock(_BlockAfter3):
    def verdict(self, account_id: str) -> Verdict | None:
        return Verdict(account_id, 0.0, False, "allow")


def test_nothing_refused_means_leaked_is_the_full_harvest(tmp_path: Path, smol_tokenizer: Any) -> None:
    from conftest import build_tiny_model

    model = build_tiny_model(smol_tokenizer, max_positions=256)
    cfg = CapabilityConfig(accounts=2, requests_per_account=3, days=0.2, verified_only=False, epochs=1,
                           batch_size=4, eval_limit=4, max_batch=4)
    m = run_capability(cfg, tmp_path / "unused", tmp_path / "cap", loaded=(model, smol_tokenizer, "tiny-0"),
                       detector=_NeverBlock())
    assert m["leaked"] == m["planned"] == 6 and m["blocked_accounts"] == 0
    assert m["accuracy"]["leaked"] == m["accuracy"]["full"]
    assert not (tmp_path / "cap" / "leaked" / "student").exists()  # one training run serves both


class _DegradeAfter3(_BlockAfter3):
    """Sends an account for review (degrade: still served) from its third request on."""

    def verdict(self, account_id: str) -> Verdict | None:
        n = self.n.get(account_id, 0)
        return Verdict(account_id, float(n), n >= 3, "degrade" if n >= 3 else "allow")


def test_an_operator_working_the_queue_stops_a_degraded_harvest(tmp_path: Path, smol_tokenizer: Any) -> None:
    from conftest import build_tiny_model
    from stillhouse.arena.campaigns import CampaignConfig, generate_campaign

    model = build_tiny_model(smol_tokenizer, max_positions=256)
    every_h = 3.0
    cfg = CapabilityConfig(accounts=2, requests_per_account=8, days=0.5, verified_only=False, epochs=1,
                           batch_size=4, eval_limit=4, max_batch=4, concurrency=1, review_every_h=every_h)
    # degraded answers are served, so without review all 16 leak; the operator's first round after an account's
    # 3rd request (rounds every 3 h from the first request) blocks it, and what it sent before that round leaked
    _, turns = generate_campaign(CampaignConfig(shape="harvest", accounts=2, requests_per_account=8, days=0.5,
                                                seed=cfg.seed, name="capability-harvest"))
    t0, step = min(t.ts for t in turns), every_h * 3600
    expect = 0
    for aid in {t.account_id for t in turns}:
        ts = sorted(t.ts for t in turns if t.account_id == aid)
        first_round = t0 + step * (int((ts[2] - t0) // step) + 1)
        expect += sum(x < first_round for x in ts)
    m = run_capability(cfg, tmp_path / "unused", tmp_path / "cap", loaded=(model, smol_tokenizer, "tiny-0"),
                       detector=_DegradeAfter3())
    assert m["planned"] == 16 and 6 <= m["leaked"] == expect < 16
    assert m["review"]["blocked_accounts"] == {"campaign": 2, "benign": 0} and m["review"]["every_h"] == every_h
    assert "oracle operator reviewed the queue every 3 simulated hours" in capability_lines(m)[0]
    with pytest.raises(CapabilityError, match="reviewer"):
        CapabilityConfig(reviewer="nobody")
    with pytest.raises(CapabilityError, match="review_every_h"):
        CapabilityConfig(review_every_h=-1)


def test_the_arenas_operator_works_the_capability_stage_unless_it_names_its_own() -> None:
    from stillhouse.arena.capability import with_operator

    assert with_operator(CapabilityConfig(), 0.0, "rubber-stamp") == CapabilityConfig()
    taken = with_operator(CapabilityConfig(), 24.0, "rubber-stamp")
    assert (taken.review_every_h, taken.reviewer) == (24.0, "rubber-stamp")
    own = CapabilityConfig(review_every_h=6.0)
    assert with_operator(own, 24.0, "rubber-stamp") == own
