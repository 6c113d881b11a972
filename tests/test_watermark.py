"""Watermark keys, the guard-to-server channel, green lists and the detection statistics.

Unit tests on seeded inputs (exact tails against rational arithmetic, Holm against its definition,
green masks against the scalar PRF), a tiny random Llama for the per-row batching property, and
one integration test through the guard and ``stillhouse serve``.
"""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from stillhouse.provenance.detect import prompt_tuples, score_key, score_keys, unique_tuples
from stillhouse.provenance.stats import binom_sf, binom_sf_reference, bonferroni, holm
from stillhouse.watermark.green import (
    RowWatermark,
    WatermarkParams,
    green_mask,
    is_green,
    token_hashes,
)
from stillhouse.watermark.keys import (
    ChannelError,
    KeyId,
    WatermarkKeyError,
    derive_key,
    epoch_of,
    key_u64,
    load_secret,
    sign_header,
    verify_header,
)

SECRET = b"test-secret-0123456789abcdef"
P = WatermarkParams(gamma=0.25, delta=4.0, context=1, entropy=0.0)  # plain KGW: every position biased


# -- keys and the channel ---------------------------------------------------------------------------
def test_keys_derive_per_id_and_rotate_by_epoch() -> None:
    a0, a1 = KeyId("account", "alice", epoch_of(10.0, 100.0)), KeyId("account", "alice", epoch_of(150.0, 100.0))
    assert (a0.epoch, a1.epoch) == (0, 1)
    keys = {str(k): derive_key(SECRET, k) for k in (a0, a1, KeyId("account", "bob", 0), KeyId("cluster", "alice", 0))}
    assert len(set(keys.values())) == 4 and all(len(k) == 32 for k in keys.values())
    assert derive_key(SECRET, "account/alice/0") == keys["account/alice/0"]  # from the id alone
    assert derive_key(b"another-secret-0123456789", a0) != keys["account/alice/0"]
    assert epoch_of(1e9, 0) == 0  # 0 = never rotate
    odd = KeyId("account", "a b/c%d", 7)
    assert KeyId.parse(str(odd)) == odd and "/" not in str(odd).split("/", 1)[1].rsplit("/", 1)[0]
    with pytest.raises(WatermarkKeyError, match="SCOPE/SUBJECT/EPOCH"):
        KeyId.parse("alice")
    per_request = KeyId("account", "alice", 3, "req/1 x")  # keys per request: a key of its own, same account
    assert str(per_request).count("/") == 3 and KeyId.parse(str(per_request)) == per_request
    assert derive_key(SECRET, per_request) != derive_key(SECRET, KeyId("account", "alice", 3))
    for bad in ("account/alice/3/", "account/alice/x/r1", "account/alice/3/r1/extra"):
        with pytest.raises(WatermarkKeyError, match="SCOPE/SUBJECT/EPOCH"):
            KeyId.parse(bad)


def test_secret_must_be_set_and_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WM_TEST_SECRET", raising=False)
    with pytest.raises(WatermarkKeyError, match="WM_TEST_SECRET is not set"):
        load_secret("WM_TEST_SECRET")
    monkeypatch.setenv("WM_TEST_SECRET", "short")
    with pytest.raises(WatermarkKeyError, match="too short"):
        load_secret("WM_TEST_SECRET")


def test_channel_header_authenticates_key_id_and_refuses_forgeries() -> None:
    kid = KeyId("account", "alice", 3)
    value = sign_header(SECRET, kid, "req-1", 1000.0)
    assert verify_header(SECRET, value, now=1010.0) == kid
    assert "alice" in value and derive_key(SECRET, kid).hex() not in value  # the id travels, never the key
    forged = value.replace("alice", "mallory")  # same mac, other key id
    for bad, why in ((forged, "does not verify"), (value, "does not verify"), ("v1 kid=account/x/0", "malformed"),
                     ("v2 " + value[3:], "unknown version")):
        with pytest.raises(ChannelError, match=why):
            verify_header(SECRET if bad is not value else b"another-secret-0123456789", bad, now=1000.0)
    with pytest.raises(ChannelError, match="stale or replayed"):
        verify_header(SECRET, value, now=1000.0 + 301)


# -- green lists --------------------------------------------------------------------------------------
def test_green_mask_matches_the_scalar_prf_and_has_share_gamma() -> None:
    hashes = token_hashes(5000)
    rng = random.Random(0)
    for _ in range(5):
        key, window = rng.getrandbits(64), [rng.randrange(5000) for _ in range(2)]
        params = WatermarkParams(gamma=0.25, context=2)
        mask = green_mask(key, window, hashes, params)
        for t in rng.sample(range(5000), 200):
            assert bool(mask[t]) == is_green(key, window, t, params)
        assert abs(mask.mean() - 0.25) < 0.03
    other = green_mask(1, [7], hashes, P) != green_mask(2, [7], hashes, P)
    assert other.mean() > 0.2  # another key, another list


def test_rows_with_different_keys_decode_as_if_alone(tiny_teacher: Any, smol_tokenizer: Any) -> None:
    """Continuous batching with a different key per row: each row's tokens equal its solo run."""
    from stillhouse.teacher.base import SamplingParams
    from stillhouse.watermark.green import vocab_hashes

    vocab = int(tiny_teacher.model.get_output_embeddings().weight.shape[0])
    wms = [RowWatermark(key_u64(derive_key(SECRET, KeyId("account", f"a{i}", 0))), P, vocab_hashes(vocab))
           for i in range(3)]
    prompts = [tiny_teacher.encode([{"role": "user", "content": t}]) for t in ("Hi there", "What is 2+2?", "Tell")]
    params = SamplingParams(max_tokens=24, temperature=0.0)

    def run(pairs: list[tuple[list[int], Any]]) -> list[list[int]]:
        handles = [tiny_teacher.submit(p, params, row_processor=w) for p, w in pairs]
        return [h.future.result(timeout=60).token_ids for h in handles]

    together = run(list(zip(prompts, wms)))
    alone = [run([(p, w)])[0] for p, w in zip(prompts, wms)]
    plain = run([(p, None) for p in prompts])
    assert together == alone
    assert together != plain  # the watermark changed the greedy answers
    for ids, prompt, wm in zip(together, prompts, wms):
        full = prompt + ids
        green = [is_green(wm.key, full[i - 1:i], full[i], P) for i in range(len(prompt), len(full))]
        assert sum(green) / len(green) > 0.6  # delta=4 on a near-uniform tiny model: mostly green


# -- statistics ----------------------------------------------------------------------------------------
def test_exact_binomial_tail_against_rational_arithmetic() -> None:
    rng = random.Random(1)
    cases = [(rng.randrange(0, n + 2), n, rng.choice([0.1, 0.25, 0.5])) for n in rng.sample(range(1, 400), 40)]
    cases += [(150, 200, 0.25), (200, 200, 0.25), (0, 10, 0.25), (81, 200, 0.25), (400, 1000, 0.25)]
    for k, n, p in cases:
        ref = float(binom_sf_reference(k, n, Fraction(p)))
        got = binom_sf(k, n, p)
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-300), (k, n, p)
    assert binom_sf(150, 200, 0.25) < 1e-30  # far below 1e-6 and still exact (checked above)


def test_holm_and_bonferroni_against_their_definitions() -> None:
    rng = random.Random(2)
    for _ in range(20):
        ps = [rng.random() ** 3 for _ in range(rng.randrange(1, 20))]
        m = len(ps)
        order = sorted(range(m), key=lambda i: ps[i])
        naive = {}
        for rank, i in enumerate(order):
            naive[i] = min(1.0, max(min(1.0, (m - r) * ps[order[r]]) for r in range(rank + 1)))
        assert holm(ps) == pytest.approx([naive[i] for i in range(m)])
        assert bonferroni(ps) == pytest.approx([min(1.0, m * p) for p in ps])
        assert all(h <= b + 1e-15 for h, b in zip(holm(ps), bonferroni(ps)))


def test_repeated_tuples_and_prompt_tuples_are_not_scored() -> None:
    text = [5, 6, 7, 5, 6, 7, 5, 6, 7, 8]
    tuples = unique_tuples([text, text], context=1)
    assert tuples == [(5, 6), (6, 7), (7, 5), (7, 8)]
    assert unique_tuples([text], context=1, exclude=prompt_tuples([[6, 7, 5]], 1)) == [(5, 6), (7, 8)]
    assert len(unique_tuples([text], context=1, dedup=False)) == 9


def test_p_values_of_clean_text_are_uniform_or_conservative() -> None:
    """Random 'texts' against random keys: P(p <= a) <= a at every level (the test is valid)."""
    rng = np.random.default_rng(3)
    ps = []
    for trial in range(600):
        seq = rng.integers(0, 300, size=120).tolist()  # small vocab: many repeated tuples to dedup
        ps.append(score_key(int(rng.integers(0, 2**63)), unique_tuples([seq], 1), P).p)
    ps_arr = np.array(ps)
    for a in (0.01, 0.05, 0.1, 0.25, 0.5):
        assert (ps_arr <= a).mean() <= a + 3 * np.sqrt(a * (1 - a) / len(ps))
    assert (ps_arr <= 0.5).mean() > 0.3  # not trivially conservative either


def test_without_dedup_repetitive_clean_text_looks_watermarked() -> None:
    """Why dedup matters: one green tuple repeated 100 times is one piece of evidence, not 100."""
    key = 12345
    hashes = token_hashes(50)
    pair = next((a, b) for a in range(50) for b in range(50) if green_mask(key, [a], hashes, P)[b])
    seq = [pair[0], pair[1]] * 60
    assert score_key(key, unique_tuples([seq], 1, dedup=False), P).p < 1e-6
    assert score_key(key, unique_tuples([seq], 1), P).scored <= 2


def test_score_keys_names_the_right_key_with_family_wise_correction() -> None:
    hashes = token_hashes(2000)
    keys = {f"account/a{i}/0": key_u64(derive_key(SECRET, f"account/a{i}/0")) for i in range(16)}
    true = keys["account/a7/0"]
    rng = np.random.default_rng(4)
    seq = [int(rng.integers(2000))]
    for _ in range(150):  # every next token drawn from the green list of the true key, half the time
        mask = green_mask(true, seq[-1:], hashes, P)
        pool = np.flatnonzero(mask) if rng.random() < 0.5 else np.arange(2000)
        seq.append(int(rng.choice(pool)))
    scores = score_keys(unique_tuples([seq], 1), keys, P)
    assert scores[0].key_id == "account/a7/0" and scores[0].p_holm < 1e-6
    assert scores[0].p_holm == pytest.approx(min(1.0, 16 * scores[0].p))
    assert all(s.p_holm > 1e-3 for s in scores[1:])


def test_eval_generate_and_the_batcher_watermark_alike(tiny_teacher: Any, tiny_model: Any, smol_tokenizer: Any) -> None:
    """``stillhouse eval --watermark-teacher`` (HF generate + batch_processor) picks the same greedy tokens
    as ``serve --watermark`` (the batcher's per-row processor) for the same key."""
    from stillhouse.teacher.base import SamplingParams
    from stillhouse.teacher.generate import chat_prompt_ids, generate
    from stillhouse.watermark.green import batch_processor, vocab_hashes

    vocab = int(tiny_model.get_output_embeddings().weight.shape[0])
    wm = RowWatermark(key_u64(derive_key(SECRET, "server/eval/0")), P, vocab_hashes(vocab))
    convs = [[{"role": "user", "content": t}] for t in ("Hi there", "What is 2+2?")]
    prompts = [chat_prompt_ids(smol_tokenizer, c) for c in convs]
    via_eval = [g.token_ids for g in generate(tiny_model, smol_tokenizer, prompts, 12, batch_size=2,
                                              logits_processor=batch_processor(wm))]
    plain = [g.token_ids for g in generate(tiny_model, smol_tokenizer, prompts, 12)]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    via_serve = [tiny_teacher.submit(p, params, row_processor=wm).future.result(60).token_ids for p in prompts]
    for a, b in zip(via_eval, via_serve):
        n = min(len(a), len(b))
        assert n > 0 and a[:n] == b[:n]
    assert via_eval != plain


def test_an_older_guard_log_gains_the_watermark_columns(tmp_path: Any) -> None:
    import sqlite3

    from stillhouse.guard.events import TrafficRecord
    from stillhouse.guard.store import _SCHEMA, open_store

    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    traffic = next(s for s in _SCHEMA if "CREATE TABLE IF NOT EXISTS traffic " in s)
    old = traffic.replace(",\n        watermark_key_id TEXT NOT NULL DEFAULT '', watermark_scheme TEXT NOT NULL "
                          "DEFAULT '')", ")")
    assert "watermark" not in old
    conn.execute(old)
    conn.execute("INSERT INTO traffic VALUES ('r0', 1.0, 'a', 'k', '', '', '', 'm', '{}', '[]', '', 0, 0, 0.0, 200, "
                 "'allow', '', '')")
    conn.commit()
    conn.close()
    reader = open_store(f"sqlite:///{db}", init=False)  # a detector fit or provenance reads it as it is
    assert [(r.request_id, r.watermark_key_id, r.watermark_scheme) for r in reader.iter_records()] == [("r0", "", "")]
    assert reader.watermark_key_usage() == []  # provenance's candidates from the log: none, not a failed query
    reader.close()
    store = open_store(f"sqlite:///{db}")  # migrates
    store.write_records([TrafficRecord("r1", 2.0, "a", "k", watermark_key_id="account/a/0", watermark_scheme="exp")])
    assert [(r.watermark_key_id, r.watermark_scheme) for r in store.read_records()] == [("", ""), ("account/a/0", "exp")]
    assert store.watermark_key_usage() == [("account/a/0", "a", 1)]
    store.close()
