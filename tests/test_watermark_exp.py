"""EXP sampling (``scheme="exp"``): distortion-free draws, the first-window rule, the Gamma test, and the batcher.

The statistics are checked against scipy and the chi-square law; the sampler against the model's own distribution
over many keys; the batcher on the tiny model (greedy rows as under kgw, sampled rows detectable by their key).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from scipy.special import gammaincc
from scipy.stats import chi2

from stillhouse.provenance.detect import exp_keep, exp_score, score_key, select, unique_tuples
from stillhouse.provenance.stats import log_fisher2, log_gamma_sf
from stillhouse.watermark.green import RowWatermark, WatermarkParams, first_windows, token_hashes, uniform

EXP = WatermarkParams(gamma=0.25, delta=4.0, context=1, entropy=0.0, scheme="exp")
KGW = WatermarkParams(gamma=0.25, delta=4.0, context=1, entropy=0.0)


def test_scheme_is_checked() -> None:
    with pytest.raises(ValueError, match="scheme='aar'.*kgw, exp"):
        WatermarkParams(scheme="aar")


def test_gamma_tail_matches_scipy_and_stays_finite_far_out() -> None:
    for n, x in [(1, 0.3), (1, 7.0), (5, 2.0), (40, 70.0), (300, 420.0), (2000, 2100.0)]:
        assert math.exp(log_gamma_sf(n, x)) == pytest.approx(float(gammaincc(n, x)), rel=1e-9)
    assert log_gamma_sf(3, 0.0) == 0.0 and log_gamma_sf(0, 1.0) == -math.inf
    far = log_gamma_sf(100, 2000.0) / math.log(10)  # gammaincc underflows to 0 here
    assert float(gammaincc(100, 2000.0)) == 0.0 and -800 < far < -600


def test_fisher_combination_of_two_is_the_chi2_tail() -> None:
    for p1, p2 in [(0.5, 0.5), (0.01, 0.3), (1e-6, 0.9), (1.0, 1.0)]:
        want = float(chi2.sf(-2 * math.log(p1 * p2), 4))
        assert math.exp(log_fisher2(math.log(p1), math.log(p2))) == pytest.approx(want, rel=1e-9)


def test_exp_p_values_of_clean_text_are_uniform_or_conservative() -> None:
    rng = np.random.default_rng(5)
    ps = np.array([exp_score(int(rng.integers(0, 2**63)), unique_tuples([rng.integers(0, 300, 120).tolist()], 1),
                             EXP).p for _ in range(600)])
    for a in (0.01, 0.05, 0.1, 0.25, 0.5):
        assert (ps <= a).mean() <= a + 3 * math.sqrt(a * (1 - a) / len(ps))
    assert (ps <= 0.5).mean() > 0.35  # not trivially conservative


def test_exp_draws_follow_the_model_over_keys() -> None:
    """Distortion-free: over random keys the token drawn has the model's distribution at the temperature."""
    vocab, temperature = 6, 0.7
    scores = torch.tensor([2.0, 1.5, 0.3, 0.0, -1.0, -3.0])
    want = torch.softmax(scores / temperature, -1).numpy()
    hashes = token_hashes(vocab)
    rng = np.random.default_rng(0)
    n = 6000
    counts = np.zeros(vocab)
    for _ in range(n):
        wm = RowWatermark(int(rng.integers(0, 2**63)), EXP, hashes)
        counts[wm.choose([1, 2, 3], 1, scores.clone(), temperature)] += 1
    stat = ((counts - n * want) ** 2 / (n * want)).sum()
    assert stat < chi2.ppf(0.999, vocab - 1), (counts / n, want)


def test_exp_keys_a_window_only_at_its_first_occurrence() -> None:
    hashes = token_hashes(50)
    wm = RowWatermark(12345, EXP, hashes)
    scores = torch.zeros(50)
    assert wm.choose([9, 4], 1, scores, 1.0) is not None        # window [4]: first in the answer
    assert wm.choose([9, 4, 7, 4], 1, scores, 1.0) is None      # [4] again: sampled as usual
    assert wm.choose([4, 9, 4], 2, scores, 1.0) is not None     # the earlier 4 is the prompt's
    top = torch.full((50,), -1e9)
    top[3] = 0.0
    assert wm.choose([9, 4], 1, top, 1.0) == 3                  # a token of probability 0 is never drawn
    # position i's window is ids[i-h:i]; positions before h reach into the prompt
    assert first_windows([5, 4, 7, 4, 7, 4], 1) == [True, True, True, True, False, False]
    assert first_windows([5, 4, 7, 4, 7, 4, 7], 2) == [True, True, True, True, True, False, False]


@pytest.mark.parametrize("h", [1, 2, 3])
def test_generation_and_detection_agree_on_which_windows_were_keyed(h: int) -> None:
    """The sampler's rule (``_seen_before`` on prompt + answer so far) and the detector's (``first_windows`` on the
    answer) are written twice, for speed on each side: they must name the same positions on any sequence."""
    from stillhouse.watermark.green import _seen_before

    rng = np.random.default_rng(h)
    for _ in range(200):
        prompt = rng.integers(0, 4, size=int(rng.integers(0, 5))).tolist()
        answer = rng.integers(0, 3 + h, size=int(rng.integers(1, 30))).tolist()
        ids = prompt + answer
        start = len(prompt)
        sampler = [not (n - h >= start and _seen_before(ids[:n], start, h)) for n in range(start, len(ids))]
        assert sampler == first_windows(answer, h), (prompt, answer)


def test_exp_keep_scores_first_windows_the_teacher_was_unsure_of() -> None:
    ids = [5, 4, 7, 4, 7]
    assert exp_keep(ids, [float("nan"), 0.2, 0.9, 0.1, 0.1], 1) == [False, True, False, True, False]


def test_mixed_bodies_combine_exp_and_green_list_tests() -> None:
    rng = np.random.default_rng(1)
    tuples = unique_tuples([rng.integers(0, 5000, 300).tolist()], 1)
    flags = [i % 2 == 0 for i in range(len(tuples))]
    both = score_key(77, tuples, KGW, exp=flags)
    alone_exp = exp_score(77, [t for t, f in zip(tuples, flags) if f], KGW)
    alone_kgw = score_key(77, [t for t, f in zip(tuples, flags) if not f], KGW)
    assert both.test == "exp+binomial" and both.scored == len(tuples)
    assert both.log10_p == pytest.approx(log_fisher2(alone_exp.log10_p * math.log(10),
                                                     alone_kgw.log10_p * math.log(10)) / math.log(10))
    assert score_key(77, tuples, KGW, exp=[True] * len(tuples)).test == "exp"
    sel = select([[1, 2, 3], [4, 5, 6]], [0, 1], 1, exp=[True, False])
    assert sel.exp == [True, True, False, False]
    assert select([[1, 2, 3]], [0], 1, exp=[False]).exp is None


def _key(i: int) -> int:
    return (i * 0x9E3779B97F4A7C15 + 99) & (2**64 - 1)


def test_batcher_greedy_rows_are_the_same_and_sampled_rows_carry_the_key(tiny_teacher: Any) -> None:
    from stillhouse.teacher.base import SamplingParams
    from stillhouse.watermark.green import vocab_hashes

    vocab = int(tiny_teacher.model.get_output_embeddings().weight.shape[0])
    hashes = vocab_hashes(vocab)
    prompts = [tiny_teacher.encode([{"role": "user", "content": t}]) for t in ("Hi there", "What is 2+2?", "Tell")]

    def run(params: WatermarkParams, sp: Any) -> list[list[int]]:
        handles = [tiny_teacher.submit(p, sp, index=i, row_processor=RowWatermark(_key(i), params, hashes))
                   for i, p in enumerate(prompts)]
        return [h.future.result(timeout=60).token_ids for h in handles]

    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    assert run(EXP, greedy) == run(KGW, greedy)  # greedy rows: the green-list bias either way
    sampled = SamplingParams(max_tokens=48, temperature=1.0, seed=3)
    answers = run(EXP, sampled)
    assert answers == run(EXP, sampled)  # reproducible with the request's seed
    agree = total = 0  # every keyed token is the EXP draw from the model's own (unbiased) logits
    for i, ids in enumerate(answers):
        full = prompts[i] + ids
        with torch.inference_mode():
            logits = tiny_teacher.model(input_ids=torch.tensor([full])).logits[0].float()
        wm = RowWatermark(_key(i), EXP, hashes)
        for j, keyed in enumerate(first_windows(ids, 1)):
            if keyed:
                n = len(prompts[i]) + j
                total += 1
                agree += wm.choose(full[:n], len(prompts[i]), logits[n - 1], 1.0) == ids[j]
    assert total > 40 and agree / total > 0.9, (agree, total)
    for i, ids in enumerate(answers):
        prompt = prompts[i]
        full = prompt + ids
        keyed = first_windows(ids, 1)
        us = [uniform(_key(i), full[len(prompt) + j - 1:len(prompt) + j + 1]) for j in range(len(ids)) if keyed[j]]
        assert np.mean([-math.log(u) for u in us]) > 1.8  # Exp(1) (mean 1) without the key; the tiny model is unsure
        other = [uniform(_key(i + 7), full[len(prompt) + j - 1:len(prompt) + j + 1]) for j in range(len(ids))]
        assert np.mean([-math.log(u) for u in other]) < 1.6


def test_provenance_text_scheme_exp_end_to_end(tmp_path: Any, monkeypatch: pytest.MonkeyPatch,
                                               tiny_model: Any, tiny_teacher: Any, smol_tokenizer: Any) -> None:
    """Answers drawn by the batcher under EXP (sampled) and KGW (greedy), written as a JSONL dataset with their
    temperatures: ``provenance text --scheme exp`` names the key on each sampled answer (EXP test), on the greedy
    one (green-list test) and on the body (both, combined), and nothing on a clean answer."""
    import json

    from stillhouse.provenance.run import ProvenanceConfig, text_provenance
    from stillhouse.teacher.base import SamplingParams
    from stillhouse.watermark.green import vocab_hashes
    from stillhouse.watermark.keys import derive_key, key_u64

    secret = "exp-test-secret-0123456789abcdef"
    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", secret)
    teacher_dir = tmp_path / "teacher"  # the detecting teacher is the generating one
    tiny_model.save_pretrained(teacher_dir)
    smol_tokenizer.save_pretrained(teacher_dir)
    key = key_u64(derive_key(secret.encode(), "account/camp/0"))
    vocab = int(tiny_teacher.model.get_output_embeddings().weight.shape[0])
    wm = RowWatermark(key, EXP, vocab_hashes(vocab), "account/camp/0")
    asks = [("Tell me a story.", 1.0, wm), ("Write a poem.", 0.8, wm), ("Hello there!", 0.0, wm),
            ("Say something.", 1.0, None)]
    rows = []
    for i, (q, t, proc) in enumerate(asks):
        prompt = tiny_teacher.encode([{"role": "user", "content": q}])
        out = tiny_teacher.submit(prompt, SamplingParams(max_tokens=60, temperature=t, seed=i), index=i,
                                  row_processor=proc).future.result(timeout=60)
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": out.text}],
                     "token_ids": out.token_ids, "temperature": t})
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ProvenanceConfig(source=str(src), key_ids=("account/camp/0", "account/a/0", "account/b/0"), per_sample=True,
                           entropy=0.0, delta=EXP.delta, scheme="exp", tokenizer=f"hf:{teacher_dir}")
    report = text_provenance(cfg)
    assert report["exp_samples"] == 3  # the three sampled answers (the clean one included: it is tested alike)
    assert report["named"] and report["best"]["key_id"] == "account/camp/0" and report["test"] == "exp+weighted"
    per = report["per_sample"]
    assert [p["test"] for p in per] == ["exp", "exp", "weighted", "exp"]
    assert all(p["named"] and p["best"]["key_id"] == "account/camp/0" for p in per[:3]), [p["verdict"] for p in per]
    assert not per[3]["named"]
    kgw_only = text_provenance(ProvenanceConfig(**{**cfg.__dict__, "scheme": "kgw", "per_sample": False}))
    assert kgw_only["test"] == "weighted"
    # a guard's log records the scheme its upstream confirmed: the test follows it without --scheme
    from stillhouse.guard.events import TrafficRecord
    from stillhouse.guard.store import open_store

    url = f"sqlite:///{tmp_path / 'guard.db'}"
    store = open_store(url)
    store.write_records([TrafficRecord(f"r{i}", float(i), "camp", "k", messages=r["messages"][:1],
                                       response_text=r["messages"][1]["content"], params={"temperature": r["temperature"]},
                                       watermark_key_id="account/camp/0", watermark_scheme="exp")
                         for i, r in enumerate(rows[:3])])
    store.close()
    logged = text_provenance(ProvenanceConfig(**{**cfg.__dict__, "source": url, "scheme": "kgw", "per_sample": False}))
    assert logged["schemes_recorded"] == {"exp": 3} and logged["exp_samples"] == 2  # the greedy one: green lists
    assert logged["test"] == "exp+weighted" and logged["best"]["key_id"] == "account/camp/0" and logged["named"]
    with pytest.raises(ValueError, match="scheme='gumbel'"):
        ProvenanceConfig(**{**cfg.__dict__, "scheme": "gumbel"})


def test_exp_answers_depend_on_key_and_context_not_on_the_seed(tiny_teacher: Any) -> None:
    """EXP's known cost, stated in serve's help: the draw is a function of the key and the window, so the same
    prompt under the same key gives the same answer whatever the request's seed (until a window repeats and plain
    sampling takes over); the green lists, and another key, still vary."""
    from stillhouse.teacher.base import SamplingParams
    from stillhouse.watermark.green import vocab_hashes

    hashes = vocab_hashes(int(tiny_teacher.model.get_output_embeddings().weight.shape[0]))
    prompt = tiny_teacher.encode([{"role": "user", "content": "Tell me something."}])

    def answer(params: WatermarkParams, key: int, seed: int) -> list[int]:
        sp = SamplingParams(max_tokens=12, temperature=1.0, seed=seed)
        return tiny_teacher.submit(prompt, sp, row_processor=RowWatermark(key, params, hashes)).future.result(
            timeout=60).token_ids

    first = answer(EXP, _key(0), 1)
    assert len(set(first)) == len(first)  # no window repeats in these 12 tokens: every one keyed
    assert answer(EXP, _key(0), 2) == first
    assert answer(EXP, _key(1), 1) != first
    assert answer(KGW, _key(0), 1) != answer(KGW, _key(0), 2)
