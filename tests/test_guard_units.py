"""Unit tests of the guard's pieces: config loader, bucket maths (against a naive reference),
degrade transforms (whole and streamed, with tags split across chunks), policy precedence,
redaction and key format."""

from __future__ import annotations

import json
import random

import pytest

from stillhouse.config import ConfigError, config_to_dict
from stillhouse.guard.config import (
    GuardConfig,
    PolicyRule,
    guard_config_from_dict,
    load_guard_config,
    sha256_hex,
)
from stillhouse.guard.degrade import SSEReasoningStripper, degrade_request, strip_reasoning, strip_think
from stillhouse.guard.events import AccountInfo, TrafficRecord, Verdict
from stillhouse.guard.keys import hash_key, key_id_of, new_key
from stillhouse.guard.limits import Limits, RateLimiter, bucket_refill
from stillhouse.guard.policy import PolicyEngine
from stillhouse.guard.redact import Redactor

TOKEN_HASH = sha256_hex("t")


def full_config(**kw) -> dict:
    cfg = GuardConfig(upstream_url="http://127.0.0.1:9", admin_token_sha256=TOKEN_HASH, **kw)
    return config_to_dict(cfg)


# -- config -------------------------------------------------------------------------------
def test_config_round_trip_and_loud_failures(tmp_path):
    rule = {"name": "r", "field": "country", "equals": "XX", "action": "block"}
    data = full_config(rules=(rule,), redact_patterns=("secret-\\d+",))
    p = tmp_path / "g.json"
    p.write_text(json.dumps(data))
    cfg = load_guard_config(p)
    assert cfg.rules == (PolicyRule(**rule),) and cfg.redact_patterns == ("secret-\\d+",)

    missing = dict(data)
    del missing["max_body_bytes"]
    p.write_text(json.dumps(missing))
    with pytest.raises(ConfigError, match="missing field.*max_body_bytes"):
        load_guard_config(p)
    for field, bad, msg in [("port", "80", "integer"), ("shadow", 1, "true or false"),
                            ("on_store_failure", "maybe", "one of"), ("bogus", 1, "unknown field"),
                            ("upstream_timeout_s", "x", "number")]:
        p.write_text(json.dumps({**data, field: bad}))
        with pytest.raises(ConfigError, match=msg):
            load_guard_config(p)


@pytest.mark.parametrize("kw,msg", [
    ({"upstream_url": "localhost:8000"}, "upstream_url"),
    ({"admin_token_sha256": "plain-token"}, "admin_token_sha256"),
    ({"db_url": "mysql://x"}, "db_url"),
    ({"throttle_factor": 0}, "throttle_factor"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"redact_patterns": ("([",)}, "redact_patterns"),
    ({"rules": ({"name": "r", "field": "country", "action": "block"},)}, "equals"),
    ({"rules": ({"name": "r", "field": "score", "action": "nuke"},)}, "action"),
    ({"watermark_per_request": True}, "add --watermark"),
])
def test_config_validation_names_the_field(kw, msg):
    base = {"upstream_url": "http://127.0.0.1:9", "admin_token_sha256": TOKEN_HASH}
    base.update(kw)
    with pytest.raises((ValueError, ConfigError), match=msg):
        guard_config_from_dict(base, require_all=False)


def test_admin_token_check():
    cfg = GuardConfig(upstream_url="http://x:1", admin_token_sha256=sha256_hex("right"))
    assert cfg.check_admin_token("right") and not cfg.check_admin_token("wrong")
    assert "right" not in json.dumps(config_to_dict(cfg))


# -- limits -------------------------------------------------------------------------------
def naive_allowed(times: list[float], per_min: int) -> list[bool]:
    """Reference: a continuous token bucket simulated in 1 ms steps."""
    level, t, out = float(per_min), times[0], []
    for now in times:
        while t + 0.001 <= now:
            t += 0.001
            level = min(per_min, level + per_min / 60.0 * 0.001)
        if level >= 1.0 - 1e-6:
            level -= 1.0
            out.append(True)
        else:
            out.append(False)
    return out


def test_request_bucket_matches_naive_reference():
    rng = random.Random(0)
    times, t = [], 0.0
    for _ in range(120):
        t += round(rng.expovariate(1.0), 3)
        times.append(t)
    clock = [0.0]
    lim = RateLimiter(lambda: clock[0])
    got = []
    for now in times:
        clock[0] = now
        got.append(lim.admit("a", Limits(20, 0, 0), stream=False) is None)
    ref = naive_allowed(times, 20)
    mismatches = sum(a != b for a, b in zip(got, ref))
    assert mismatches <= 2, (mismatches, got, ref)   # 1 ms discretisation at the boundaries
    assert 0 < sum(got) < len(got)


def test_bucket_refill_is_capped_and_linear():
    assert bucket_refill(0, 0, 30, 60) == 30
    assert bucket_refill(50, 0, 30, 60) == 60
    assert bucket_refill(-10, 0, 10, 60) == 0


def test_tokens_bucket_goes_negative_and_retry_after_says_when():
    clock = [0.0]
    lim = RateLimiter(lambda: clock[0])
    limits = Limits(0, 600, 0)          # 10 tokens/s
    assert lim.admit("a", limits, False) is None
    lim.charge_tokens("a", limits, 1200)  # 600 over
    refusal = lim.admit("a", limits, False)
    assert refusal and refusal.which == "tokens_per_min" and refusal.retry_after_s == 61
    clock[0] = 61.0
    assert lim.admit("a", limits, False) is None


def test_daily_bucket_starts_full_when_it_first_applies_and_refills_over_a_day():
    """A paced client (one request an hour, far under any per-minute limit) is held to requests_per_day."""
    clock = [0.0]
    lim = RateLimiter(lambda: clock[0])
    free, daily = Limits(60, 0, 0), Limits(60, 0, 0, requests_per_day=5)
    for h in range(10):                        # 10 requests with no daily limit: nothing is counted
        clock[0] = h * 3600.0
        assert lim.admit("a", free, False) is None
    got = []
    for h in range(10, 21):                    # then 5 a day: full at first, refilled by 5/24 an hour
        clock[0] = h * 3600.0
        refusal = lim.admit("a", daily, False)
        got.append(refusal is None)
        if refusal is not None:
            assert refusal.which == "requests_per_day" and "5 requests/day" in refusal.message
    # Levels before each request: 5, 4.21, 3.42, 2.63, 1.83, 1.04 (served), 0.25 .. 0.88 (refused), 1.08 (served)
    assert got == [True] * 6 + [False] * 4 + [True]
    clock[0] = 21 * 3600.0
    refusal = lim.admit("a", daily, False)  # 0.29: a whole request in 0.71 / (5/24) h = 12,240 s
    assert refusal is not None and abs(refusal.retry_after_s - 12_240) <= 1
    assert refusal.message.endswith("retry in 3.4 h")
    assert lim.admit("b", daily, False) is None                           # per account
    assert Limits(30, 0, 0, 400).capped_per_day(50).requests_per_day == 50
    assert Limits(30, 0, 0, 20).capped_per_day(50).requests_per_day == 20  # a tighter limit stays
    assert Limits(30, 0, 0, 20).capped_per_day(0).requests_per_day == 20   # 0 = no cap
    assert Limits(30, 1000, 4, 100).scaled(0.1) == Limits(3, 100, 1, 10)


def test_stream_slots_are_released():
    lim = RateLimiter(lambda: 0.0)
    limits = Limits(0, 0, 2)
    assert lim.admit("a", limits, True) is None and lim.admit("a", limits, True) is None
    assert lim.admit("a", limits, True).which == "max_concurrent_streams"
    assert lim.admit("b", limits, True) is None
    lim.release_stream("a")
    assert lim.admit("a", limits, True) is None
    assert Limits(30, 1000, 4).scaled(0.1) == Limits(3, 100, 1)


# -- degrade ------------------------------------------------------------------------------
def test_degrade_request():
    body = {"model": "m", "messages": [], "max_tokens": 4000}
    out, refusal = degrade_request(body, 256, True, True)
    assert refusal is None and out["max_tokens"] == 256 and body["max_tokens"] == 4000
    assert degrade_request({"model": "m"}, 64, True, True)[0]["max_tokens"] == 64
    assert degrade_request({"max_tokens": 10}, 64, True, True)[0]["max_tokens"] == 10
    assert degrade_request({"max_completion_tokens": 999}, 64, True, True)[0]["max_completion_tokens"] == 64
    assert degrade_request({"logprobs": True}, 64, True, True)[1]
    assert degrade_request({"top_logprobs": 3}, 64, True, True)[1]
    assert degrade_request({"n": 2}, 64, True, True)[1]
    assert degrade_request({"n": 2, "logprobs": True}, 64, False, False)[1] is None


def test_strip_reasoning_whole_response():
    resp = {"choices": [{"message": {"role": "assistant", "reasoning_content": "secret chain",
                                     "content": "<think>step 1, step 2</think>\nThe answer is 5."}},
                        {"text": "a<think>x</think>b"}]}
    out = strip_reasoning(resp)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "The answer is 5."}
    assert out["choices"][1]["text"] == "ab"
    assert strip_think("no tags") == "no tags" and strip_think("x<think>unclosed") == "x"


def _sse(pieces: list[str], reasoning: bool = False) -> bytes:
    out = b""
    for p in pieces:
        delta = {"content": p}
        if reasoning:
            delta["reasoning_content"] = "hidden"
        out += b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta}]}).encode() + b"\n\n"
    return out + b"data: [DONE]\n\n"


@pytest.mark.parametrize("seed", range(5))
def test_sse_stripper_handles_tags_split_anywhere(seed):
    text = "Sure. <think>let me reason about 2+3 carefully</think> The answer is 5. <think>more</think>Done."
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    raw = _sse(pieces, reasoning=True)
    s = SSEReasoningStripper()
    out = b""
    pos = 0
    while pos < len(raw):                       # network chunking independent of events
        step = rng.randint(1, 40)
        out += s.feed(raw[pos:pos + step])
        pos += step
    out += s.flush()
    got = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                  for line in out.decode().split("\n") if line.startswith("data: {"))
    assert got == strip_think(text) == "Sure. The answer is 5. Done."
    assert b"hidden" not in out and out.endswith(b"data: [DONE]\n\n")


# -- policy -------------------------------------------------------------------------------
def _verdict(aid: str, score: float, flagged: bool, action: str = "block", cluster: str | None = None) -> Verdict:
    return Verdict(aid, score, flagged, action if flagged else "allow", cluster, [("template_rate", 0.8)])


def test_policy_precedence_and_persistence_callback():
    persisted = []
    rules = (PolicyRule("embargo", "country", "degrade", equals="XX"), PolicyRule("hot", "score", "throttle",
                                                                                   min_score=0.5))
    eng = PolicyEngine(rules, clock=lambda: 1.0, persist=persisted.append)
    a = AccountInfo("a", country="XX")
    b = AccountInfo("b", country="FR")
    assert eng.decide(a).action == "degrade" and eng.decide(a).source == "rule"
    assert eng.decide(b).action == "allow"
    assert eng.take_verdict(_verdict("b", 0.6, False)).action == "throttle"   # score rule
    assert eng.decide(b).action == "throttle"
    assert eng.take_verdict(_verdict("b", 0.6, False)) is None                # no change, no new row
    row = eng.take_verdict(_verdict("b", 0.9, True, "block", cluster="c7"))
    assert row.action == "block" and eng.decide(b).action == "block"
    assert ["cluster_id", "c7"] in row.signals
    # manual account > manual cluster > automatic
    m = eng.manual("cluster", "c7", "degrade", "ring", "admin")
    eng.apply_row(m)
    assert eng.decide(b).action == "degrade"
    m2 = eng.manual("account", "b", "allow", "vip", "admin")
    eng.apply_row(m2)
    assert eng.decide(b).action == "allow" and eng.decide(b).source == "manual"
    # persisted: rule row for a, detector rows (+ the superseded one cleared) for b
    kinds = [(r.source, r.action, r.cleared_at is not None) for r in persisted]
    assert ("rule", "degrade", False) in kinds and ("detector", "throttle", True) in kinds
    assert ("detector", "block", False) in kinds
    # a fresh engine loaded from the persisted rows (a restart) reaches the same automatic state
    eng2 = PolicyEngine(rules, clock=lambda: 2.0)
    eng2.load(persisted)
    assert eng2.decide(b).action == "block" and eng2.cluster_of("b") == "c7"


def test_a_verdict_sent_for_review_is_degraded_and_says_why():
    eng = PolicyEngine((), clock=lambda: 1.0)
    note = "degraded for review, not blocked: no rare ask and no coordinated cluster behind the block score"
    row = eng.take_verdict(Verdict("j", 40.0, True, "degrade", None, [("volume", 10.0)], 5e-4, note=note))
    assert row is not None and row.action == "degrade" and note in row.reason and "top signals: volume" in row.reason
    assert eng.decide(AccountInfo("j")).action == "degrade"


def test_a_later_manual_decision_wins_at_the_same_clock_tick_also_after_a_restart():
    # an analyst confirms a decision and then blocks, within one tick of the clock: the block stands,
    # whatever the random decision ids (the tie used to go to the larger id: half the time the confirm won)
    for _ in range(20):
        eng = PolicyEngine((), clock=lambda: 5.0)
        rows = []
        for action in ("degrade", "block"):
            rows.append(eng.manual("account", "a", action, "review", "ann"))
            eng.apply_row(rows[-1])
        assert eng.decide(AccountInfo("a")).action == "block"
        assert rows[1].created_at > rows[0].created_at
        fresh = PolicyEngine((), clock=lambda: 6.0)
        fresh.load(rows)
        assert fresh.decide(AccountInfo("a")).action == "block"


def test_a_confirmed_decision_is_a_floor_and_an_explicit_one_is_exact():
    # an analyst confirms the detector's throttle: the detector's later block still applies, and when its
    # score falls the account keeps the confirmed throttle; a throttle set by hand overrides the block
    eng = PolicyEngine((), clock=lambda: 1.0)
    a, b = AccountInfo("a"), AccountInfo("b")
    for acct in ("a", "b"):
        eng.take_verdict(_verdict(acct, 0.6, True, "throttle"))
    confirm = eng.manual("account", "a", "throttle", "confirmed", "ann", floor="d-1")
    eng.apply_row(confirm)
    eng.apply_row(eng.manual("account", "b", "throttle", "by hand", "ann"))
    assert [eng.decide(x).action for x in (a, b)] == ["throttle", "throttle"]
    for acct in ("a", "b"):
        eng.take_verdict(_verdict(acct, 0.9, True, "block"))
    ea = eng.decide(a)
    assert ea.action == "block" and ea.source == "detector" and "above the manual floor, throttle" in ea.reason
    assert eng.decide(b).action == "throttle" and eng.decide(b).source == "manual"
    eng.take_verdict(_verdict("a", 0.1, False))
    assert eng.decide(a).action == "throttle" and eng.decide(a).source == "manual"
    # after a restart: the floor is in the stored row, not in memory only
    eng.take_verdict(_verdict("a", 0.9, True, "degrade"))
    fresh = PolicyEngine((), clock=lambda: 2.0)
    fresh.load([confirm, *[r for r in eng.active() if r.source == "detector"]])
    assert fresh.decide(a).action == "degrade"
    # in shadow mode the confirmed floor is enforced and the escalation is only what the policy would do
    shadow = PolicyEngine((), shadow=True, clock=lambda: 1.0)
    shadow.apply_row(shadow.manual("account", "a", "throttle", "confirmed", "ann", floor="d-1"))
    shadow.take_verdict(_verdict("a", 0.9, True, "block"))
    eff = shadow.decide(a)
    assert (eff.action, eff.would) == ("throttle", "block")


def test_a_floor_on_an_account_does_not_hide_its_clusters_manual_decision():
    # confirming a member's throttle must not lift a block set by hand on its cluster, nor undo a cluster allow
    eng = PolicyEngine((), clock=lambda: 1.0)
    a = AccountInfo("a")
    eng.take_verdict(_verdict("a", 0.6, True, "throttle", cluster="c9"))
    eng.apply_row(eng.manual("account", "a", "throttle", "confirmed", "ann", floor="d-1"))
    blocked = eng.manual("cluster", "c9", "block", "ring", "admin")
    eng.apply_row(blocked)
    eff = eng.decide(a)
    assert (eff.action, eff.source, eff.decision_id) == ("block", "manual", blocked.decision_id)
    eng.apply_row(eng.manual("cluster", "c9", "allow", "a lab's accounts", "admin"))
    assert (eng.decide(a).action, eng.decide(a).source) == ("throttle", "manual")    # the floor still holds
    eng.apply_row(eng.manual("account", "a", "allow", "false positive", "ann"))        # an exact one wins
    assert eng.decide(a).action == "allow"


def test_shadow_policy_never_enforces_automatic_but_does_manual():
    eng = PolicyEngine((), shadow=True, clock=lambda: 1.0)
    eng.take_verdict(_verdict("a", 1.0, True))
    eff = eng.decide(AccountInfo("a"))
    assert eff.action == "allow" and eff.would == "block" and eff.reason.startswith("shadow: would block")
    eng.apply_row(eng.manual("account", "a", "block", "by hand", "admin"))
    assert eng.decide(AccountInfo("a")).action == "block"


# -- redaction and keys -------------------------------------------------------------------
def test_redaction_modes():
    rec = TrafficRecord("r", 0, "a", "k", messages=[{"role": "user", "content": "call +1 415 555 0100 or "
                                                     "x.y@z.org, card 4111 1111 1111 1111, code ZX-99"}],
                        response_text="ok x.y@z.org")
    pat = Redactor("patterns", ("ZX-\\d+",)).record(rec)
    c = pat.messages[0]["content"]
    assert "415" not in c and "x.y@z.org" not in c and "4111" not in c and "ZX-99" not in c
    assert pat.response_text == "ok [REDACTED]" and rec.response_text == "ok x.y@z.org"
    h = Redactor("hash").record(rec)
    assert h.response_text == "sha256:" + sha256_hex("ok x.y@z.org")
    assert Redactor("drop").record(rec).messages[0]["content"] == ""
    assert Redactor("none").record(rec) is rec


def test_key_format():
    kid, key = new_key()
    assert key_id_of(key) == kid and len(kid) == 12 and key.startswith("sk-sh-")
    assert key_id_of("sk-sh-zz") is None and key_id_of("sk-sh-" + kid) is None
    assert hash_key(key) != hash_key(new_key()[1]) and len(hash_key(key)) == 64
    assert len({new_key()[1] for _ in range(200)}) == 200


def test_check_request_accepts_both_openai_shapes():
    from stillhouse.guard.request import BadRequest, check_request

    check_request("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": None}],
                                           "logprobs": True, "top_logprobs": 2, "stream": False})
    check_request("/v1/chat/completions", {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    check_request("/v1/completions", {"model": "m", "prompt": "x", "logprobs": 5})
    check_request("/v1/completions", {"model": "m", "prompt": ["a", "b"]})
    for path, body, param in [
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user"}], "logprobs": 3}, "logprobs"),
        ("/v1/completions", {"model": "m", "prompt": 3}, "prompt"),
        ("/v1/completions", {"model": "m", "prompt": "x", "logprobs": 99}, "logprobs"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": 1}]}, "messages[0]"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "u", "content": 5}]}, "messages[0].content"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "u"}], "max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "u"}], "temperature": "hot"}, "temperature"),
    ]:
        with pytest.raises(BadRequest) as err:
            check_request(path, body)
        assert err.value.param == param


def test_response_parsers_never_raise_on_odd_upstream_bodies():
    from stillhouse.guard.response import parse_json_response, parse_sse

    for body in (b'{"choices": 5}', b"[1,2]", b'{"choices": [{"message": 3}], "usage": 7}', b"\xff\xfe", b"null"):
        text, _, _ = parse_json_response(body)
        assert isinstance(text, str)
        assert isinstance(parse_sse(b"data: " + body + b"\n\n")[0], str)
    s = SSEReasoningStripper()
    odd = b'data: {"choices": 5}\n\ndata: [1]\n\ndata: {"choices": [{"index": "x", "delta": {"content": "a"}}]}\n\n'
    assert b'"a"' in s.feed(odd) + s.flush()
    assert strip_reasoning({"choices": {"x": 1}}) == {"choices": {"x": 1}}
