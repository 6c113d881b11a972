"""The entropy gate (SWEET): generation biases only high-entropy positions, detection scores only those.

Unit tests on hand-made logits (the gate opens exactly above the threshold), the batched teacher-forced
entropies against a one-row naive reference, and the property detection relies on: the positions the
batcher biased while decoding are the ones ``gate.answer_views`` recomputes from the finished text.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from stillhouse.provenance.detect import score_key, tokens_to_detect, unique_tuples
from stillhouse.provenance.gate import answer_views, gate_masks
from stillhouse.watermark.green import (
    RowWatermark,
    WatermarkParams,
    gate_open,
    green_mask,
    next_token_entropy,
    token_hashes,
)
from stillhouse.watermark.keys import derive_key, key_u64

SECRET = b"gate-secret-0123456789abcdef"


def _naive_entropy(logits: np.ndarray) -> float:
    z = logits.astype(np.float64) - logits.max()
    p = np.exp(z) / np.exp(z).sum()
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def test_entropy_matches_the_definition_and_the_gate_opens_above_the_threshold() -> None:
    import torch

    rng = np.random.default_rng(0)
    for scale in (0.1, 1.0, 5.0, 30.0):
        lg = rng.normal(size=500).astype(np.float32) * scale
        assert float(next_token_entropy(torch.from_numpy(lg))) == pytest.approx(_naive_entropy(lg), abs=1e-4)
    flat = torch.zeros(100)  # entropy log(100) = 4.6 nats
    peaked = torch.full((100,), -20.0)
    peaked[3] = 0.0  # entropy ~ 0
    gated = WatermarkParams(gamma=0.25, delta=2.0, entropy=1.0)
    assert gate_open(flat, gated) and not gate_open(peaked, gated)
    assert gate_open(peaked, WatermarkParams(gamma=0.25, delta=2.0, entropy=0.0))  # no gate: always open
    assert not gate_open(flat, WatermarkParams(gamma=0.25, delta=2.0, entropy=math.log(100) + 0.01))

    hashes = token_hashes(100)
    wm = RowWatermark(12345, gated, hashes)
    mask = green_mask(12345, [7], hashes, gated)
    assert torch.equal(wm([7], peaked.clone()), peaked)  # confident position: left as the model chose
    biased = wm([7], flat.clone())
    assert torch.equal(biased, torch.from_numpy(mask.astype(np.float32)) * 2.0)


def test_entropy_threshold_is_validated_where_it_is_configured() -> None:
    from stillhouse.provenance.run import ProvenanceConfig, SuspectConfig
    from stillhouse.serve.app import ServeConfig

    with pytest.raises(ValueError, match="entropy"):
        WatermarkParams(entropy=-0.5)
    with pytest.raises(ValueError, match="watermark_entropy"):
        ServeConfig(watermark_entropy=25.0)
    with pytest.raises(ValueError, match="entropy"):
        ProvenanceConfig(source="x.jsonl", key_ids=("account/a/0",), entropy=-1.0)
    assert ProvenanceConfig(source="x.jsonl", key_ids=("account/a/0",), entropy=1.5).params.entropy == 1.5
    with pytest.raises(ValueError, match="entropy=1.5: the gate scores answer text"):
        SuspectConfig(source="x.jsonl", key_ids=("account/a/0",), suspect="bundled", entropy=1.5)
    # the suspect's own answers are text: the gate applies to them
    assert SuspectConfig(source="x.jsonl", key_ids=("account/a/0",), suspect="bundled", reading="own",
                         entropy=1.5).entropy == 1.5


def test_batched_answer_views_equal_one_row_at_a_time(tiny_model: Any) -> None:
    """Entropies and the written tokens' probabilities (at a temperature) against a naive one-row reference."""
    import torch

    rng = np.random.default_rng(1)
    rows = [(rng.integers(0, 1000, size=n).tolist(), rng.integers(0, 1000, size=m).tolist())
            for n, m in ((5, 9), (12, 3), (1, 14), (0, 6))]
    batched = answer_views(tiny_model, rows, temperature=0.7, batch_size=3)
    for (prompt, answer), got in zip(rows, batched):
        ids = torch.tensor([prompt + answer])
        with torch.inference_mode():
            logits = tiny_model(input_ids=ids).logits[0].double().numpy()
        want_e, want_p = [], []
        for i, tok in enumerate(answer):
            row = logits[len(prompt) + i - 1] if len(prompt) + i >= 1 else None
            want_e.append(math.nan if row is None else _naive_entropy(row))
            z = None if row is None else np.exp(row / 0.7 - np.max(row / 0.7))
            want_p.append(math.nan if z is None else float(z[tok] / z.sum()))
        assert len(got.entropy) == len(got.prob) == len(answer)
        np.testing.assert_allclose(got.entropy, want_e, atol=2e-3)
        np.testing.assert_allclose(got.prob, want_p, rtol=1e-3, atol=1e-6)
    assert math.isnan(batched[3].entropy[0]) and math.isnan(batched[3].prob[0])
    assert not any(gate_masks(batched, 0.5)[3][:1])
    with pytest.raises(ValueError, match="temperature=0"):
        answer_views(tiny_model, rows, temperature=0.0)
    calls: list[tuple[str, int, int]] = []
    per_row = answer_views(tiny_model, rows, temperature=[0.7, 1.0, 0.7, 2.0], batch_size=3,  # one per answer
                           progress=lambda step, done, total: calls.append((step, done, total)))
    assert [c[1:] for c in calls] == [(3, 4), (4, 4)]  # after each batch
    assert per_row[0].prob == batched[0].prob and per_row[2].prob == batched[2].prob
    assert per_row[1].prob != batched[1].prob and per_row[1].entropy == batched[1].entropy
    with pytest.raises(ValueError, match="3 temperatures for 4 answers"):
        answer_views(tiny_model, rows, temperature=[1.0] * 3)
    assert gate_masks(batched, 0.0) == [[True] * len(a) for _, a in rows]


def test_detection_recomputes_the_positions_generation_gated(tiny_teacher: Any, tiny_model: Any) -> None:
    """Record which steps the batcher biased; the teacher-forced entropies of the finished text agree."""
    from stillhouse.teacher.base import SamplingParams
    from stillhouse.watermark.green import vocab_hashes

    vocab = int(tiny_model.get_output_embeddings().weight.shape[0])
    prompts = [tiny_teacher.encode([{"role": "user", "content": t}]) for t in ("Hi there", "What is 2+2?")]
    probe = answer_views(tiny_model, [(p, []) for p in prompts])  # nothing yet: find a useful threshold
    plain = [tiny_teacher.submit(p, SamplingParams(max_tokens=40, temperature=0.0)).future.result(60).token_ids
             for p in prompts]
    ent = np.concatenate([np.array(v.entropy) for v in answer_views(tiny_model, list(zip(prompts, plain)))])
    assert [v.entropy for v in probe] == [[], []]
    threshold = float(np.median(ent))  # about half the positions gated
    params = WatermarkParams(gamma=0.25, delta=4.0, entropy=threshold)
    key = key_u64(derive_key(SECRET, "account/a/0"))
    opened: list[list[bool]] = [[], []]

    def recorder(j: int) -> Any:
        wm = RowWatermark(key, params, vocab_hashes(vocab))

        def apply(ids: list[int], scores: Any) -> Any:
            opened[j].append(gate_open(scores, params))
            return wm(ids, scores)
        return apply

    handles = [tiny_teacher.submit(p, SamplingParams(max_tokens=40, temperature=0.0), row_processor=recorder(j))
               for j, p in enumerate(prompts)]
    answers = [h.future.result(60).token_ids for h in handles]
    keep = gate_masks(answer_views(tiny_model, list(zip(prompts, answers))), threshold)
    flat_gen = [o for j in range(2) for o in opened[j][:len(answers[j])]]
    flat_det = [k for row in keep for k in row]
    assert len(flat_gen) == len(flat_det) > 40
    agree = np.mean(np.array(flat_gen) == np.array(flat_det))
    assert agree >= 0.95, agree
    assert 0.1 < np.mean(flat_det) < 0.9  # the gate really splits the positions

    # scoring only the gated positions keeps the evidence where the bias was
    full = [p + a for p, a in zip(prompts, answers)]
    keep_full = [[False] * len(p) + k for p, k in zip(prompts, keep)]
    gated = score_key(key, unique_tuples(full, 1, keep=keep_full), params)
    ungated = score_key(key, unique_tuples(full, 1), params)
    assert gated.scored < ungated.scored
    assert gated.rate > ungated.rate


def test_keep_flags_filter_the_scored_tuples() -> None:
    seq = [5, 6, 7, 8, 9]
    assert unique_tuples([seq], 1, keep=[[True, True, False, True, False]]) == [(5, 6), (7, 8)]
    with pytest.raises(ValueError, match="keep\\[0\\] has 3 flags for 5 tokens"):
        unique_tuples([seq], 1, keep=[[True] * 3])
    params = WatermarkParams(gamma=0.25, delta=4.0)
    hashes = token_hashes(2000)
    key = 99
    rng = np.random.default_rng(2)
    ids = [int(rng.integers(2000))]
    for _ in range(120):  # every token green
        ids.append(int(rng.choice(np.flatnonzero(green_mask(key, ids[-1:], hashes, params)))))
    n = tokens_to_detect(ids, key, params, 1e-5)
    assert n is not None and 5 < n < 40
    every_other = [i % 2 == 0 for i in range(len(ids))]
    n2 = tokens_to_detect(ids, key, params, 1e-5, keep=every_other)
    assert n2 is not None and n2 > n  # half the tokens scored: more of them needed
