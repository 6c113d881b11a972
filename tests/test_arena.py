"""Arena tests: generators, the sim teacher, metrics against naive references, enforcement,
and a tiny end-to-end run through the real guard (online == offline on its log)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import numpy as np
import pytest

from stillhouse.arena.campaigns import SHAPES, CampaignConfig, generate_campaign
from stillhouse.arena.metrics import campaign_table, cluster_ari, roc, tpr_at_fpr
from stillhouse.arena.population import PopulationConfig, generate_population
from stillhouse.arena.simteacher import answer
from stillhouse.arena.simulate import AccountOutcome, DirectGateway, RunResult, SimClock, run_traffic
from stillhouse.arena.traffic import SimAccount
from stillhouse.guard.events import AccountInfo, Verdict


def test_population_shape_and_determinism() -> None:
    cfg = PopulationConfig(accounts=300, days=3, seed=5)
    accounts, turns = generate_population(cfg)
    _, turns2 = generate_population(cfg)
    assert [t.user_text for t in turns] == [t.user_text for t in turns2]
    kinds = {a.kind for a in accounts}
    assert {"benign:casual", "benign:power"} <= kinds
    assert all(cfg.start_ts <= t.ts < cfg.start_ts + 3 * 86400 + 3600 * 6 for t in turns)
    assert any(t.followup for t in turns)  # multi-turn sessions
    volume = np.array([a.planned for a in accounts])
    assert volume.max() > 10 * np.median(volume)  # heavy tail
    other, _ = generate_population(replace(cfg, seed=6))
    assert not {a.info.account_id for a in accounts} & {a.info.account_id for a in other}


def test_casual_scale_makes_light_users_and_keeps_the_tail() -> None:
    heavy, _ = generate_population(PopulationConfig(accounts=600, days=7, seed=3))
    light, _ = generate_population(PopulationConfig(accounts=600, days=7, seed=3, casual_scale=0.5))
    casual = lambda accs: np.array([a.planned for a in accs if a.kind == "benign:casual"])
    assert np.median(casual(light)) < np.median(casual(heavy))
    assert casual(light).max() > 10 * np.median(casual(light))  # still heavy-tailed
    power = np.median([a.planned for a in light if a.kind == "benign:power"])
    assert power > 5 * np.median(casual(light))  # the scale is the casual users' only
    with pytest.raises(ValueError, match="casual_scale"):
        PopulationConfig(casual_scale=0)


def test_arena_config_checks_the_population_mix() -> None:
    from stillhouse.arena.run import ArenaConfig

    with pytest.raises(ValueError, match="population mix"):
        ArenaConfig(power_share=0.9, batch_share=0.2)
    with pytest.raises(ValueError, match="calib_seed"):
        ArenaConfig(eval_seed=1)


REFUSED = ["http://10.0.0.1:8000", "https://api.example.com/v1", "http://127.0.0.1@example.com/v1",
           "http://localhost.example.com:8000", "http://0.0.0.0:8000", "http://[::]:8000", "http://[2001:db8::1]/v1",
           "ftp://127.0.0.1/", "127.0.0.1:8000", "http://127.0.0.1:port"]
ALLOWED = ["http://127.0.0.1:8000", "http://127.3.4.5:8000/v1", "http://[::1]:8000", "http://localhost:8000/v1",
           "http://[::ffff:127.0.0.1]:8000"]


@pytest.mark.parametrize("url", REFUSED)
def test_arena_refuses_an_upstream_off_this_machine(url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from stillhouse.arena.run import QUICK, ArenaConfig
    from stillhouse.arena.simulate import GuardGateway
    from stillhouse.config import ConfigError, config_to_dict, load_config

    with pytest.raises(ValueError, match="loopback"):
        ArenaConfig(upstream=url)
    with pytest.raises(ValueError, match="ArenaConfig.upstream.*loopback"):
        replace(QUICK, upstream=url)  # what the CLI's --upstream does
    saved = tmp_path / "arena.json"
    saved.write_text(json.dumps({**config_to_dict(QUICK), "upstream": url}))
    with pytest.raises(ConfigError, match="loopback"):
        load_config(ArenaConfig, saved)  # --config replay
    with pytest.raises(ValueError, match="loopback"):
        GuardGateway(str(tmp_path / "g"), url, None, SimClock(), [])  # the library's own gateway
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("url", ALLOWED)
def test_arena_accepts_a_loopback_upstream(url: str) -> None:
    from stillhouse.arena.run import ArenaConfig

    assert ArenaConfig(upstream=url).upstream == url


def test_arena_cli_refuses_a_remote_upstream_in_one_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys
    from pathlib import Path

    from stillhouse.arena.run import QUICK
    from stillhouse.config import config_to_dict

    src = Path(__file__).resolve().parents[1] / "src"
    (tmp_path / "arena.json").write_text(json.dumps({**config_to_dict(QUICK), "upstream": "http://10.1.2.3:8000"}))
    for args in (["--quick", "--upstream", "http://203.0.113.7:8000"], ["--config", "arena.json"]):
        res = subprocess.run([sys.executable, "-m", "stillhouse", "arena", *args, "--out", "run"], cwd=tmp_path,
                             env={**os.environ, "PYTHONPATH": str(src), "COLUMNS": "250"}, capture_output=True,
                             text=True, timeout=120, check=False)
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "loopback" in out and "Traceback" not in out, out
        assert not (tmp_path / "run").exists()


def test_capability_teacher_must_be_local() -> None:
    from stillhouse.arena.capability import CapabilityConfig, CapabilityError

    with pytest.raises(CapabilityError, match="local model"):
        CapabilityConfig(teacher="http://127.0.0.1:8000/v1")


def test_harvest_shape_asks_the_distill_templates_training_additions() -> None:
    from stillhouse.distill.tasks import ARITHMETIC_TEMPLATE, arithmetic

    _, turns = generate_campaign(CampaignConfig(shape="harvest", accounts=2, requests_per_account=20, seed=9))
    asked = {t.user_text for t in turns}
    train = {it.messages[-1]["content"] for it in arithmetic(40, "train", seed=9)}
    assert asked == train and len(asked) == 40
    assert all(t.params["temperature"] == 0.0 and not t.system for t in turns)
    assert ARITHMETIC_TEMPLATE.split("{")[0] in turns[0].user_text


@pytest.mark.parametrize("shape", SHAPES)
def test_every_campaign_shape_generates(shape: str) -> None:
    cfg = CampaignConfig(shape=shape, accounts=20 if shape == "hydra" else 2, requests_per_account=30, days=2)
    accounts, turns = generate_campaign(cfg)
    assert accounts and turns
    assert all(a.malicious and a.campaign == cfg.campaign_id for a in accounts)
    assert {t.account_id for t in turns} <= {a.info.account_id for a in accounts}
    assert sum(a.planned for a in accounts) == len(turns)


def test_hydra_shares_infrastructure_and_mixed_dilutes() -> None:
    accounts, turns = generate_campaign(CampaignConfig(shape="hydra", accounts=50, requests_per_account=10))
    assert len({a.info.payment_fingerprint for a in accounts}) < 10
    assert len({t.client_ip.rsplit(".", 1)[0] for t in turns}) <= 6
    _, mixed = generate_campaign(CampaignConfig(shape="mixed", accounts=2, requests_per_account=400,
                                                attacker_fraction=0.25))
    share = np.mean([not t.cover for t in mixed])
    assert 0.18 < share < 0.32


def test_campaign_config_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        CampaignConfig(shape="nope")
    with pytest.raises(ValueError, match="attacker_fraction"):
        CampaignConfig(shape="mixed", attacker_fraction=0)


def test_sim_teacher_lengths_follow_the_prompt() -> None:
    msgs = lambda t: [{"role": "user", "content": t}]
    _, _, long = answer(msgs("Explain your full reasoning step by step for 17 * 23"), {"max_tokens": 4096})
    _, _, short = answer(msgs("Respond with JSON only: the topic of 17 * 23"), {"max_tokens": 4096})
    _, _, capped = answer(msgs("Explain your full reasoning step by step for 17 * 23"), {"max_tokens": 10})
    texts, _, _ = answer(msgs("hi"), {"n": 3})
    assert long > 3 * short and capped <= 10 and len(texts) == 3


def test_roc_and_tpr_match_naive() -> None:
    rng = np.random.default_rng(0)
    benign, attack = rng.normal(0, 1, 1000), rng.normal(2, 1, 100)
    fpr, tpr, thr = roc(benign, attack)
    for f, t, th in list(zip(fpr, tpr, thr))[::50]:
        assert f == pytest.approx(np.mean(benign > th)) and t == pytest.approx(np.mean(attack > th))
    got, th = tpr_at_fpr(benign, attack, 0.01)
    assert np.mean(benign > th) <= 0.01 and got == pytest.approx(np.mean(attack > th))


def test_cluster_ari_perfect_and_wrong() -> None:
    accs = {f"x{i}": SimAccount(AccountInfo(f"x{i}"), "campaign:hydra", campaign="h" if i < 3 else "g")
            for i in range(6)}
    accs["b"] = SimAccount(AccountInfo("b"), "benign:casual")
    perfect = RunResult(accs, {a: AccountOutcome() for a in accs}, {}, {a: ("c1" if a < "x3" and a != "b" else
                                                                         "c2" if a != "b" else None) for a in accs})
    assert cluster_ari(perfect)["campaign_accounts"] == pytest.approx(1.0)
    lumped = replace(perfect, clusters={a: "c" for a in accs})
    assert cluster_ari(lumped)["campaign_accounts"] < 0.5


def test_campaign_table_tells_blocked_from_degraded() -> None:
    """Over the block threshold is not blocked: a block score without the evidence a block needs is degraded and
    keeps being answered, and the table says which accounts the policy blocked and which it only degraded."""
    accs = {a: SimAccount(AccountInfo(a), "campaign:harvest", campaign="h", planned=10) for a in ("x", "y", "z")}
    outs = {"x": AccountOutcome(sent=10, leaked=3, first_block=3, first_degrade=None),
            "y": AccountOutcome(sent=10, leaked=10, first_degrade=4),      # degraded, never blocked: all answered
            "z": AccountOutcome(sent=10, leaked=10, first_degrade=2, first_block=8)}
    row, = campaign_table(RunResult(accs, outs, {"x": 50.0, "y": 45.0, "z": 41.0}, {a: None for a in accs}),
                          {"throttle": 10.0, "block": 40.0})
    assert (row["detected_accounts"], row["blocked_accounts"], row["degraded_accounts"]) == (3, 2, 1)
    assert row["leaked"] == 23 and row["leaked_share"] == pytest.approx(23 / 30)


class _BlockAfter:
    """A stand-in detector that says 'block' after an account's third request."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}
        self.on_refresh = None
        self.cluster_of_: dict[str, str] = {}
        self.max_score_: dict[str, float] = {}
        self.seen: list = []

    def observe(self, record, account=None) -> None:  # type: ignore[no-untyped-def]
        self.n[record.account_id] = self.n.get(record.account_id, 0) + 1
        self.seen.append(record)

    def verdict(self, account_id: str) -> Verdict | None:
        n = self.n.get(account_id, 0)
        return Verdict(account_id, float(n), n >= 3, "block" if n >= 3 else "allow")

    def refresh_clusters(self) -> None:
        pass


def test_direct_gateway_enforces_blocks_and_carries_history() -> None:
    accounts, turns = generate_campaign(CampaignConfig(shape="agentic", accounts=1, requests_per_account=10, days=1))
    det = _BlockAfter()
    clock = SimClock()
    result = asyncio.run(run_traffic(accounts, turns, DirectGateway(det, clock), det, clock))
    o = result.outcomes[accounts[0].info.account_id]
    assert o.sent == 10 and o.accepted == 3 and o.refused == 7 and o.leaked == 3 and o.first_block == 3
    followups = [r for r in det.seen if any(m["role"] == "assistant" for m in r.messages)]
    assert followups, "follow-up turns must carry the earlier answers"


@pytest.mark.parametrize("check_fails", [False, True])
def test_tiny_arena_through_the_real_guard(tmp_path, monkeypatch, check_fails: bool) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("stillhouse.guard.app")
    from stillhouse.arena.run import QUICK, run_arena
    from stillhouse.guard.detect.check import CheckReport

    if check_fails:  # the operator's refit path, whatever this tiny check would have said
        monkeypatch.setattr(CheckReport, "passed", property(lambda self: False))

    cfg = replace(QUICK, days=1.0, calib_accounts=80, eval_accounts=40,
                  campaigns=(("cot", 1, 60), ("hydra", 12, 5)), fractions=(0.5,), mixed_accounts=1,
                  mixed_requests=40, cluster_every=100, review_every_h=12.0)
    metrics = run_arena(cfg, tmp_path / "run")
    assert metrics["offline_equals_online"]["checked"] and metrics["offline_equals_online"]["mismatches"] == 0
    assert metrics["offline_equals_online"]["accounts"] > 40
    for name in ("report.md", "roc.png", "leak_curve.png", "fractions.png", "metrics.json", "arena.json",
                 "detector/detector.json"):
        assert (tmp_path / "run" / name).exists(), name
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["operational"]["campaign_accounts"] == 1 + 12 + 1
    cot = next(r for r in saved["campaigns"] if r["shape"] == "cot")
    assert cot["sent"] == 60 and 0 <= cot["leaked"] <= 60
    # the operator's path: a shadow guard's log, fit on the calibration window, check on the next one
    op = saved["operator"]
    fit, check = op["fit_window"], op["check"]
    assert fit["until"] == check["window"]["since"] and fit["since"] < fit["until"] < check["window"]["until"]
    fitted_on = op["refit"]["window"] if "refit" in op else fit  # the enforced model's calibration
    assert fitted_on["accounts"] == saved["calibration"]["accounts_half_a"] + saved["calibration"]["accounts_half_b"]
    assert fit["records"] == saved["requests"]["calibration"] and fit["excluded_accounts"] == 0
    assert check["window"]["records"] == saved["requests"]["check"] and check["accounts"] <= 40   # half of 80
    assert set(check["tiers"]) == {"throttle", "block"} and check["fit_window"] == fit
    assert json.loads((tmp_path / "run" / "detector" / "check.json").read_text())["passed"] == check["passed"]
    assert "## The operator's path" in (tmp_path / "run" / "report.md").read_text()
    enforced = json.loads((tmp_path / "run" / "detector" / "detector.json").read_text())["thresholds"]
    assert check["passed"] is not check_fails or not check["passed"]
    if check["passed"]:
        assert "refit" not in op
    else:  # the operator refits on both windows, as `detect check` advises, and enforces that model
        refit = op["refit"]
        assert refit["window"]["since"] == fit["since"] and refit["window"]["until"] == check["window"]["until"]
        assert refit["window"]["records"] == fit["records"] + check["window"]["records"]
        assert refit["first_thresholds"] == {t: check["tiers"][t]["threshold"] for t in ("throttle", "block")}
        assert "refitted on both windows" in (tmp_path / "run" / "report.md").read_text()
    assert enforced == (op["refit"]["thresholds"] if "refit" in op else
                        {t: check["tiers"][t]["threshold"] for t in ("throttle", "block")})
    block = saved["operational"]["block"]
    assert block["fpr_ci"]["n"] == 40 and block["fpr_ci"]["lo"] <= block["benign_fpr"] <= block["fpr_ci"]["hi"]
    assert block["tpr_ci"]["k"] == round(block["tpr"] * 14)
    frac = saved["tpr_by_attacker_fraction"]["mixed50"]
    assert frac["accounts"] == 1 and frac["block"]["n"] == 1
    assert set(saved["tpr_by_shape"]) == {"cot", "hydra", "mixed"}
    assert "not run" in saved["capability_leaked"]
    assert saved["review"]["reviewer"] == "oracle" and saved["review"]["rounds"] >= 1  # an operator every 12 h
    assert saved["review"]["blocked_accounts"]["benign"] == 0  # the oracle never blocks a benign account
    assert "## The review queue: an operator works it" in (tmp_path / "run" / "report.md").read_text()


def test_named_seed_sets_fix_seeds_and_split_and_test_needs_a_name() -> None:
    from stillhouse.arena.run import REAL, SEED_SETS, ArenaConfig, seed_set_config, seed_set_label

    tests = [n for n, s in SEED_SETS.items() if s.split == "test"]
    devs = [n for n, s in SEED_SETS.items() if s.split == "dev"]
    assert len(tests) == 3 and len(devs) >= 2
    assert len({SEED_SETS[n].calib_seed for n in tests}) == 3  # each test set: its own calibration population
    every = [v for s in SEED_SETS.values() for v in (s.calib_seed, s.eval_seed, s.campaign_seed)]
    assert len(every) == len(set(every))  # no two sets share a seed
    cfg = seed_set_config(REAL, "test2")
    s = SEED_SETS["test2"]
    assert (cfg.calib_seed, cfg.eval_seed, cfg.campaign_seed, cfg.split) == (s.calib_seed, s.eval_seed,
                                                                             s.campaign_seed, "test")
    assert seed_set_label(cfg) == "test2 (test)" and seed_set_label(REAL) == "dev1 (development)"
    assert "unnamed" in seed_set_label(ArenaConfig())
    with pytest.raises(ValueError, match="seeds='dev1'"):
        replace(REAL, calib_seed=REAL.calib_seed + 100)  # the seeds no longer those of the named set
    with pytest.raises(ValueError, match="test seed set"):
        ArenaConfig(split="test")  # the test pools only through a test set's name
    with pytest.raises(ValueError, match="seeds"):
        ArenaConfig(seeds="test9")
    with pytest.raises(ValueError, match="seed set"):
        seed_set_config(REAL, "nope")


def test_arena_cli_seeds_option_selects_the_set(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from stillhouse.arena import run
    from stillhouse.cli import app

    seen = []

    def fake_run(cfg, out, progress=None, capability=None):  # type: ignore[no-untyped-def]
        seen.append(cfg)
        raise SystemExit(0)  # stop before any traffic

    monkeypatch.setattr(run, "run_arena", fake_run)
    CliRunner().invoke(app, ["arena", "--population", "real", "--seeds", "dev2", "--out", str(tmp_path / "a")])
    assert seen[-1].seeds == "dev2" and seen[-1].calib_seed == run.SEED_SETS["dev2"].calib_seed
    assert seen[-1].population == "real" and seen[-1].split == "dev"
    CliRunner().invoke(app, ["arena", "--population", "real", "--calib-seed", "77", "--out", str(tmp_path / "b")])
    assert seen[-1].seeds == "" and seen[-1].calib_seed == 77  # typed seeds: an unnamed development run
    bad = CliRunner().invoke(app, ["arena", "--seeds", "test1", "--calib-seed", "5", "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "seeds='test1'" in bad.output
    bad = CliRunner().invoke(app, ["arena", "--seeds", "nope", "--out", str(tmp_path / "d")])
    assert bad.exit_code == 2 and "seed set" in bad.output


class _DegradeAfter(_BlockAfter):
    """A stand-in detector that sends every account to review (a block score without the evidence a block
    needs: ``degrade``) from its second request on."""

    def verdict(self, account_id: str) -> Verdict | None:
        n = self.n.get(account_id, 0)
        return Verdict(account_id, float(n), n >= 2, "degrade" if n >= 2 else "allow") if n else None


@pytest.mark.parametrize("reviewer", ["oracle", "rubber-stamp"])
def test_an_operator_works_the_review_queue_through_the_real_guard(tmp_path, reviewer: str) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("stillhouse.guard.app")
    from stillhouse.arena.run import QUICK, _send
    from stillhouse.arena.simteacher import SimUpstream
    from stillhouse.arena.traffic import Turn

    accounts = [SimAccount(AccountInfo(f"camp-{i}"), "campaign:harvest", campaign="h", planned=12) for i in range(2)]
    accounts += [SimAccount(AccountInfo(f"user-{i}"), "benign:batch", planned=12) for i in range(2)]
    turns = [Turn(ts=3600.0 * h, account_id=a.info.account_id, session_id=f"{a.info.account_id}-{h}",
                  user_text=f"What is {h} + 7?", params={"max_tokens": 16}) for h in range(12) for a in accounts]
    cfg = replace(QUICK, review_every_h=3.0, reviewer=reviewer)  # type: ignore[arg-type]
    with SimUpstream() as upstream:
        result, _log, review = asyncio.run(_send(cfg, tmp_path / "run", accounts, turns, _DegradeAfter(),
                                                 f"http://127.0.0.1:{upstream.port}", None, "review", review=True))
    assert review is not None
    accepted = {a: o.accepted for a, o in result.outcomes.items()}
    # degraded after 2 requests, served degraded until the first review at 3 h; then the operator acts
    campaign_blocked = {"camp-0": 3, "camp-1": 3}
    if reviewer == "oracle":  # blocks the campaign, dismisses the benign accounts (served from then on)
        assert accepted == {**campaign_blocked, "user-0": 12, "user-1": 12}
        assert review["blocked_accounts"] == {"campaign": 2, "benign": 0}
        assert review["actions"]["benign"].get("dismiss", 0) >= 2 and "block" not in review["actions"]["benign"]
    else:  # blocks whatever the detector degraded for review: the benign batch accounts too
        assert accepted == {**campaign_blocked, "user-0": 3, "user-1": 3}
        assert review["blocked_accounts"] == {"campaign": 2, "benign": 2}
        assert review["benign_blocked"] == ["user-0", "user-1"]
    assert review["rounds"] == 3 and review["reviewer"] == reviewer  # at 3, 6 and 9 h (the last turn is at 11 h)
    with pytest.raises(ValueError, match="review_every_h"):
        replace(QUICK, review_every_h=1.0, gateway="direct")
    with pytest.raises(ValueError, match="reviewer"):
        replace(QUICK, reviewer="nobody")  # type: ignore[arg-type]
