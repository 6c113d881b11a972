"""The weighted score of ``provenance text``: its exact tail, its weights, its validity on clean text, its power.

The tail is checked against rational enumeration and against the binomial (equal weights); validity is the
share of random keys below each level on fixed text (never above the level, up to sampling slack); power is the
property the weights exist for: on text a watermarked sampler wrote, where some positions are near-certain, the
weighted p-value is smaller than the count's.
"""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stillhouse.provenance.detect import (
    GREEDY_TEMPERATURE,
    llr_weight,
    score_key,
    tokens_to_detect,
    unique_positions,
    unique_tuples,
    weight_levels,
    weighted_score,
)
from stillhouse.provenance.stats import log_binom_sf, log_weighted_sf
from stillhouse.watermark.green import WatermarkParams, green_flags, green_mask, token_hashes

P = WatermarkParams(gamma=0.25, delta=1.5, context=1, entropy=0.0)


def _enumerate(counts: list[int], greens: list[int], gamma: Fraction) -> Fraction:
    """P(S >= s) by summing over every assignment of green bits (the naive reference)."""
    items = [u for u, c in enumerate(counts) for _ in range(c)]
    s = sum(u * g for u, g in enumerate(greens))
    total = Fraction(0)
    for bits in itertools.product((0, 1), repeat=len(items)):
        if sum(u * b for u, b in zip(items, bits)) >= s:
            k = sum(bits)
            total += gamma**k * (1 - gamma) ** (len(items) - k)
    return total


def test_weighted_tail_matches_enumeration() -> None:
    rng = np.random.default_rng(0)
    for gamma in (Fraction(1, 4), Fraction(1, 2)):
        for _ in range(12):
            counts = [int(c) for c in rng.integers(0, 4, size=5)]
            greens = [int(rng.integers(0, c + 1)) for c in counts]
            want = float(_enumerate(counts, greens, gamma))
            assert math.exp(log_weighted_sf(counts, greens, float(gamma))) == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_weighted_tail_with_equal_weights_is_the_binomial_tail_far_out() -> None:
    for n, k in ((200, 81), (200, 90), (60, 30), (7647, 4083), (50, 10), (10, 10), (10, 3)):
        assert log_weighted_sf([0, n], [0, k], 0.25) == pytest.approx(log_binom_sf(k, n, 0.25), rel=1e-9, abs=1e-12)
        assert log_weighted_sf([0, 0, 0, n], [0, 0, 0, k], 0.25) == pytest.approx(log_binom_sf(k, n, 0.25), rel=1e-9)
    # every weighted tuple green: only one way to get there, gamma ** n
    assert log_weighted_sf([5, 3, 0, 2], [0, 3, 0, 2], 0.25) == pytest.approx(5 * math.log(0.25), rel=1e-9)
    assert log_weighted_sf([4, 3], [4, 0], 0.25) == 0.0  # weight-0 tuples carry nothing
    with pytest.raises(ValueError, match="greens"):
        log_weighted_sf([1, 2], [0, 3], 0.25)


def test_llr_weight_is_delta_for_surprising_tokens_and_zero_for_certain_ones() -> None:
    assert llr_weight(0.0, 1.5, 0.25) == pytest.approx(1.5)
    assert llr_weight(1.0, 1.5, 0.25) == pytest.approx(0.0, abs=1e-12)
    ws = [llr_weight(q, 1.5, 0.25) for q in np.linspace(0, 1, 21)]
    assert all(a > b for a, b in zip(ws, ws[1:]))
    # the naive definition at the mean-field green mass: P(t | t green) / P(t | t red)
    a, g, q = math.exp(1.5), 0.25, 0.4
    green = a * q / (a * (q + g * (1 - q)) + (1 - g) * (1 - q))
    red = q / (a * g * (1 - q) + (1 - g) * (1 - q) + q)
    assert llr_weight(q, 1.5, g) == pytest.approx(math.log(green / red))
    assert weight_levels([0.0, 1.0, math.nan], 1.5, 0.25) == [16, 0, 0]
    with pytest.raises(ValueError, match="delta"):
        weight_levels([0.5], 0.0, 0.25)


def test_weighted_p_values_are_valid_on_text_no_key_saw() -> None:
    """Fixed text and fixed (key-independent) weights, 2,000 random keys: P(p <= alpha) <= alpha."""
    rng = np.random.default_rng(1)
    seq = [int(t) for t in rng.integers(0, 5000, size=160)]
    pos = unique_positions([seq], 1)
    tuples = [tuple(seq[i - 1:i + 1]) for _, i in pos]
    levels = [int(u) for u in rng.integers(0, 17, size=len(tuples))]
    ps = np.array([weighted_score(green_flags(int(k), tuples, P), levels, P).p
                   for k in rng.integers(0, 2**63, size=2000)])
    for alpha in (0.01, 0.05, 0.2, 0.5):
        share = float(np.mean(ps <= alpha))
        assert share <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / len(ps)), (alpha, share)
    assert float(np.mean(ps <= 0.5)) > 0.4  # not conservative to the point of uselessness


def _sampled(key: int, steps: int, rng: np.random.Generator, certain: float = 0.6,
             greedy: bool = False) -> tuple[list[int], list[float]]:
    """A watermarked sampler (delta added to the green logits) over a 2,000-token vocabulary whose positions are
    near-certain (one token at ~0.92; a share ``certain`` of them, at random) or flat; returns the tokens and each
    token's probability without the watermark. ``greedy``: the argmax of the biased logits (plain logits drawn
    at random, a clear first choice where certain), probabilities at :data:`GREEDY_TEMPERATURE`."""
    vocab = 2000
    hashes = token_hashes(vocab)
    ids, probs = [int(rng.integers(vocab))], [math.nan]
    for _ in range(steps):
        logits = rng.normal(size=vocab) if greedy else np.zeros(vocab)
        if rng.random() < certain:
            logits[int(rng.integers(vocab))] = 10.0
        green = green_mask(key, ids[-1:], hashes, P)
        if greedy:
            tok = int(np.argmax(logits + P.delta * green))
            z = logits / GREEDY_TEMPERATURE
        else:
            z = logits
        plain = np.exp(z - z.max())
        plain /= plain.sum()
        if not greedy:
            biased = plain * np.exp(P.delta * green)
            tok = int(rng.choice(vocab, p=biased / biased.sum()))
        ids.append(tok)
        probs.append(float(plain[tok]))
    return ids, probs


def test_weights_add_power_where_some_positions_are_near_certain() -> None:
    rng = np.random.default_rng(2)
    key = 12345
    count_logs, weighted_logs = [], []
    for _ in range(12):
        ids, probs = _sampled(key, 120, rng)
        tuples = unique_tuples([ids], 1)
        levels = weight_levels(probs, P.delta, P.gamma)
        pos = unique_positions([ids], 1)
        count_logs.append(score_key(key, tuples, P).log10_p)
        weighted_logs.append(score_key(key, tuples, P, levels=[levels[i] for _, i in pos]).log10_p)
    assert np.median(weighted_logs) < np.median(count_logs) - 1.0, (weighted_logs, count_logs)
    # greedy decoding: a token that is not the plain first choice was written because it is green
    count_logs, weighted_logs = [], []
    for _ in range(12):
        ids, probs = _sampled(key, 120, rng, certain=0.3, greedy=True)
        pos = unique_positions([ids], 1)
        tuples = [tuple(ids[i - 1:i + 1]) for _, i in pos]
        levels = weight_levels(probs, P.delta / GREEDY_TEMPERATURE, P.gamma)
        count_logs.append(score_key(key, tuples, P).log10_p)
        weighted_logs.append(score_key(key, tuples, P, levels=[levels[i] for _, i in pos]).log10_p)
    assert np.median(weighted_logs) < np.median(count_logs) - 1.0, (weighted_logs, count_logs)
    # equal weights are the count test, token by token
    ids, _ = _sampled(key, 120, rng)
    assert tokens_to_detect(ids, key, P, 1e-3, levels=[16] * len(ids)) == tokens_to_detect(ids, key, P, 1e-3)


def test_provenance_text_weighted_per_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             smol_tokenizer: Any) -> None:
    """The default score through ``text_provenance`` with a (tiny) teacher from a directory: each sample's
    report matches the sample tested alone, and a clean sample names nobody."""
    from conftest import build_tiny_model
    from stillhouse.provenance.run import ProvenanceConfig, text_provenance
    from stillhouse.watermark.keys import derive_key, key_u64

    secret = "weighted-test-secret-0123456789"
    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", secret)
    teacher = tmp_path / "teacher"
    build_tiny_model(smol_tokenizer, seed=0, max_positions=512).save_pretrained(teacher)
    smol_tokenizer.save_pretrained(teacher)
    key = key_u64(derive_key(secret.encode(), "account/camp/0"))
    rng = np.random.default_rng(3)
    marked, _ = _sampled(key, 80, rng, certain=0.0)  # the tiny teacher cannot tell certain positions: all flat
    clean = [int(t) for t in rng.integers(0, 2000, size=80)]
    rows = [{"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "x"}],
             "token_ids": ids} for ids in (marked, clean)]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = ("account/camp/0", "account/a/0", "account/b/0")
    cfg = {"key_ids": keys, "entropy": 0.0, "tokenizer": f"hf:{teacher}"}
    report = text_provenance(ProvenanceConfig(source=str(src), per_sample=True, **cfg))
    assert report["test"] == "weighted" and report["named"] and report["best"]["key_id"] == "account/camp/0"
    for per, row in zip(report["per_sample"], rows):
        alone = tmp_path / f"row{per['sample']}.jsonl"
        alone.write_text(json.dumps(row) + "\n")
        one = text_provenance(ProvenanceConfig(source=str(alone), **cfg))
        assert per["scored"] == one["scored"] and per["named"] == one["named"]
        for a, b in zip(per["scores"], one["scores"]):
            assert a["key_id"] == b["key_id"] and a["log10_p"] == pytest.approx(b["log10_p"], rel=0.05, abs=0.05)
    assert report["per_sample"][0]["named"] and not report["per_sample"][1]["named"]
    with pytest.raises(ValueError, match="score='z'"):
        ProvenanceConfig(source=str(src), score="z", **cfg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature=-1"):
        ProvenanceConfig(source=str(src), temperature=-1.0, **cfg)
    with pytest.raises(ValueError, match="delta=0"):
        ProvenanceConfig(source=str(src), delta=0.0, **cfg)


def test_suspect_scoring_defaults_weighted_for_answers_and_count_for_reading_text() -> None:
    from stillhouse.provenance.run import SuspectConfig

    base = {"source": "x.jsonl", "key_ids": ("account/a/0",), "suspect": "bundled"}
    assert SuspectConfig(**base, reading="own").weighted
    assert SuspectConfig(**base, reading="own", score="count").weighted is False
    assert SuspectConfig(source="x.jsonl", key_ids=("account/a/0",), suspect="http://127.0.0.1:9/v1").weighted
    assert not SuspectConfig(**base).weighted  # reading text scores predictions: counted
    with pytest.raises(ValueError, match="score=weighted weighs answer tokens"):
        SuspectConfig(**base, score="weighted")
    with pytest.raises(ValueError, match="delta=0"):
        SuspectConfig(**base, reading="own", delta=0.0)
    assert SuspectConfig(**base, reading="own", delta=0.0, score="count").params.delta == 0.0


def test_sources_carry_the_temperature_their_answers_were_sampled_at(tmp_path: Path) -> None:
    """The weighted score's weights use each answer's own temperature where the source recorded it."""
    from stillhouse.guard.events import TrafficRecord
    from stillhouse.guard.store import open_store
    from stillhouse.provenance.texts import load_samples

    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in (
        {"text": "a", "temperature": 0.7}, {"text": "b"}, {"text": "c", "temperature": "hot"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "d"}], "temperature": 0})))
    assert [s.temperature for s in load_samples(src)] == [0.7, None, None, 0.0]
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    store = open_store(url)
    store.write_records([TrafficRecord(request_id=f"r{i}", ts=float(i), account_id="a", key_id="k",
                                       messages=[{"role": "user", "content": "q"}], response_text="x",
                                       watermark_key_id="account/a/0", params=params)
                         for i, params in enumerate(({"temperature": 0.2}, {}, {"temperature": 0}))])
    store.close()
    assert [s.temperature for s in load_samples(url)] == [0.2, 1.0, 0.0]  # absent: the API's default, 1
