"""scripts/exp_provenance.py's development tools: the soft suspect test (not adopted: the suspect's whole
next-token distribution, scored with binned EXP scores). The counterfactual test moved into the product
(tests/test_provenance_counterfactual.py).

The tail (``lattice_sf``) is checked against enumeration and against the weighted-Bernoulli tail it
generalises; validity is the share of random keys below each level on fixed tuples and weights; the selection is
checked for its weights, dedup and prompt filter, and the suspect's distribution against a softmax.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from stillhouse.provenance.stats import log_weighted_sf
from stillhouse.watermark.green import WatermarkParams, uniform

_spec = importlib.util.spec_from_file_location(
    "exp_provenance", Path(__file__).resolve().parents[1] / "scripts" / "exp_provenance.py")
assert _spec is not None and _spec.loader is not None
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)
P = WatermarkParams(gamma=0.25, context=1, scheme="exp")


def test_lattice_tail_matches_enumeration() -> None:
    rng = np.random.default_rng(0)
    for _ in range(10):
        pmf = rng.dirichlet(np.ones(4))
        counts = [0, *(int(c) for c in rng.integers(0, 3, size=3))]
        items = [u for u, c in enumerate(counts) for _ in range(c)]
        dist: dict[int, float] = {}
        for combo in itertools.product(range(4), repeat=len(items)):
            s = sum(u * b for u, b in zip(items, combo))
            dist[s] = dist.get(s, 0.0) + float(np.prod([pmf[b] for b in combo]))
        for s in range(1, 3 * sum(items) + 1, 2):
            want = sum(v for k, v in dist.items() if k >= s)
            assert math.exp(script.lattice_sf(counts, pmf, s)) == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_lattice_tail_with_a_green_bit_is_the_weighted_tail() -> None:
    counts = [0, 40, 0, 25, 0, 0, 0, 0, 12]
    for greens in ([0, 10, 0, 6, 0, 0, 0, 0, 3], [0, 30, 0, 20, 0, 0, 0, 0, 11], [0, 40, 0, 25, 0, 0, 0, 0, 12]):
        s = sum(u * g for u, g in enumerate(greens))
        assert script.lattice_sf(counts, [0.75, 0.25], s) == pytest.approx(log_weighted_sf(counts, greens, 0.25),
                                                                         rel=1e-9, abs=1e-12)
    assert script.lattice_sf(counts, [0.75, 0.25], 0) == 0.0
    assert script.lattice_sf(counts, [0.75, 0.25], 10**6) == -math.inf
    with pytest.raises(ValueError, match="pmf"):
        script.lattice_sf(counts, [0.5, 0.4], 3)


def test_soft_p_values_are_valid_on_tuples_no_key_saw() -> None:
    """Fixed tuples and key-independent weights, 800 random keys: P(p <= alpha) <= alpha, and not far below."""
    rng = np.random.default_rng(1)
    tuples = [(int(a), int(b)) for a, b in rng.integers(0, 49152, size=(150, 2))]
    levels = [int(u) for u in rng.choice([1, 1, 2, 3, 5, 8, 16], size=len(tuples))]
    ps = np.array([script.soft_score(int(k), tuples, levels, P).p for k in rng.integers(0, 2**63, size=800)])
    for alpha in (0.01, 0.05, 0.2, 0.5):
        share = float(np.mean(ps <= alpha))
        assert share <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / len(ps)), (alpha, share)
    assert float(np.mean(ps <= 0.5)) > 0.4


def test_soft_score_is_the_binned_statistic_and_finds_a_key_that_chose_the_tokens() -> None:
    rng = np.random.default_rng(2)
    key = 12345
    # tokens a key-biased suspect would put mass on: after each window the lowest-u token of 20 candidates
    tuples, levels = [], []
    for w in rng.integers(0, 49152, size=60):
        cands = [int(t) for t in rng.integers(0, 49152, size=20)]
        best = min(cands, key=lambda t: uniform(key, (int(w), t)))
        tuples += [(int(w), best), (int(w), cands[0])]
        levels += [8, 8]
    right = script.soft_score(key, tuples, levels, P)
    wrong = script.soft_score(key + 1, tuples, levels, P)
    assert right.p < 1e-6 < wrong.p
    assert right.test == "soft" and right.scored == len(tuples)
    # the statistic: level times the capped bin of -log u, its tail exact
    total = sum(lv * min(int(-math.log(uniform(key, t)) / script.SOFT_BIN), script.SOFT_CAP)
                for t, lv in zip(tuples, levels))
    j = np.arange(script.SOFT_CAP + 1)
    pmf = np.exp(-script.SOFT_BIN * j) * -math.expm1(-script.SOFT_BIN)
    pmf[-1] = math.exp(-script.SOFT_BIN * script.SOFT_CAP)
    counts = [0] * 9
    counts[8] = len(tuples)
    assert right.log10_p == pytest.approx(script.lattice_sf(counts, pmf, total) / math.log(10))
    with pytest.raises(ValueError, match="levels"):
        script.soft_score(key, tuples, levels[:-1], P)


def test_soft_select_weights_each_distinct_tuple_once_and_drops_the_prompts() -> None:
    seqs = [[5, 6, 7, 6], [9, 6]]
    tops = [[[], [(1, 0.6), (2, 0.3), (3, 0.01)], [(4, 0.9)], [(1, 0.5), (8, 0.5)]],
            [[], [(1, 0.7)]]]
    tuples, levels = script.soft_select(seqs, tops, 1, exclude={(5, 2)}, levels=16)
    # position 1 (window 5): (5,1) at 0.6 -> 10; (5,2) dropped (prompt); (5,3) below 1/32
    # position 2 (window 6): (6,4); position 3 (window 7): (7,1), (7,8); second answer: (9,1)
    assert tuples == [(5, 1), (6, 4), (7, 1), (7, 8), (9, 1)]
    assert levels == [10, 14, 8, 8, 11]
    gated = script.soft_select(seqs, tops, 1, keep=[[True, False, True, True], [True, True]], levels=4)
    assert gated == ([(6, 4), (7, 1), (7, 8), (9, 1)], [4, 2, 2, 3])
    again = script.soft_select([[5, 6], [5, 6]], [[[], [(1, 0.5)]], [[], [(1, 0.9)]]], 1)
    assert again == ([(5, 1)], [8])  # the first occurrence's weight


def test_suspect_tops_are_the_softmax_above_the_floor() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    model.eval()
    rows = [([1, 2, 3], [4, 5, 6, 7]), ([], [8, 9]), ([3], [10])]
    tops = script.suspect_tops(model, rows, 0.03, batch_size=2)
    assert [len(t) for t in tops] == [4, 2, 1]
    assert tops[1][0] == []  # nothing before the first token of an answer without a prompt
    with torch.inference_mode():
        probs = torch.softmax(model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7]])).logits[0], -1)
    for i in range(4):  # answer token i is predicted at position 2 + i
        want = [(v, float(probs[2 + i, v])) for v in range(40) if probs[2 + i, v] >= 0.03]
        got = tops[0][i]
        assert sorted(v for v, _ in got) == sorted(v for v, _ in want)
        assert [q for _, q in got] == sorted((q for _, q in got), reverse=True)
        assert dict(got) == pytest.approx(dict(want), rel=1e-4)


def test_ranks_pools_reports_under_a_label_and_refuses_other_tests(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    def report(name: str, ranks: list[int], test: str = "counterfactual") -> str:
        hyp = [{"kind": "account", "ranks": ranks, "p": 0.5}, {"kind": "group", "ranks": ranks, "p": 0.5}]
        (tmp_path / name).write_text(json.dumps({"test": test, "k": 3, "hypotheses": hyp}))
        return str(tmp_path / name)

    a, b = report("a.json", [1, 1, 2, 4]), report("b.json", [1, 3, 3, 3])
    png = tmp_path / "ranks.png"
    script.cmd_ranks(argparse.Namespace(plot=str(png), points=[f"both={a},{b}", f"one={a}"]))
    out = capsys.readouterr().out
    assert "| both | 2 | 8 | 0.38 | 2.25 (2.5) |" in out  # 3 of 8 first; the group's ranks are not counted twice
    assert "| one | 1 | 4 | 0.50 | 2.00 (2.5) |" in out
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit, match="not a counterfactual report"):
        script.cmd_ranks(argparse.Namespace(plot=str(png), points=[f"x={report('c.json', [1], 'tuples')}"]))


def test_score_variants_rank_each_candidate_under_each_score(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    monkeypatch.setattr(script, "OUT", tmp_path)
    (tmp_path / "variants").mkdir()

    def cand(deltas: list[float]) -> dict[str, list[float] | list[int]]:
        return {"ids": list(range(len(deltas))), "lp": deltas, "h": [3.0] * len(deltas)}

    # ours: the suspect likes its first 64 tokens (+1 each) and dislikes a long tail (-5 each); the others: 0
    ours = cand([1.0] * 64 + [-5.0] * 36)
    flat = cand([0.0] * 100)
    keys = [f"account/a/r{i}" for i in range(3)]
    (tmp_path / "variants" / "sus-s.json").write_text(json.dumps({"keys": keys, "candidates": [[ours, flat, flat]] * 3}))
    (tmp_path / "variants" / "teacher-s.json").write_text(json.dumps({"keys": keys, "candidates": [[flat] * 3] * 3}))
    script.cmd_score_variants(argparse.Namespace(reference="teacher", points=["sus:s"]))
    head, _, row = capsys.readouterr().out.splitlines()
    p = dict(zip(head.strip("| ").split(" | ")[1:], row.strip("| ").split(" | ")[1:]))
    assert p["sum"] == "1"  # ranked last of 3, three times: the tail outweighs the opening
    assert p["first64"] == p["sign"] == "0.037"  # first of 3, three times: (1/3)^3


def test_closed_variants_rank_the_answer_the_suspect_writes_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import json

    monkeypatch.setattr(script, "OUT", tmp_path)
    (tmp_path / "variants").mkdir()
    ours = ["the quick brown fox jumps over the lazy dog", "seven green apples sit in a wooden bowl today",
            "rain falls softly on the old tin roof at night"]
    others = [["a completely different sentence about cats and mice", "numbers like one two three four five six"],
              ["music plays loudly from the small red radio now", "birds sing early in the cold spring morning"],
              ["trains leave the station every ten minutes or so", "paper boats float down the narrow stream fast"]]
    keys = [f"account/a/r{i}" for i in range(3)]
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": a}], "key_id": k}
            for i, (a, k) in enumerate(zip(ours, keys))]
    (tmp_path / "data-s-wm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cf-s.jsonl").write_text("".join(json.dumps({"key_id": k, "answers": o}) + "\n"
                                                 for k, o in zip(keys, others)))
    # greedy: ours again; four sampled answers: the first counterfactual's words each time
    dump = {"keys": keys, "answers": [[a, *[o[0]] * 4] for a, o in zip(ours, others)]}
    (tmp_path / "variants" / "closed-sus-s.json").write_text(json.dumps(dump))
    script.cmd_closed_variants(argparse.Namespace(cache=str(tmp_path / "cf-{set}.jsonl"), k=2, only="",
                                                  points=["sus:s"]))
    p = dict(line.strip("| ").split(" | ") for line in capsys.readouterr().out.splitlines()[2:])
    assert p["share-n4-s0"] == p["idf-n4-s0"] == p["uniqcount-n4-s0"] == "0.037"  # ours first of 3, 3 times
    # pooled, ours and the first counterfactual are both held whole: a tie the seeded coin breaks (rank 1 or 2)
    assert p["share-n4-s4"] in ("0.037", "0.15", "0.37", "0.63")
    # counted answer by answer, the counterfactual written four times outranks ours written once: second of 3,
    # three times: S = 3 of at most 6, P(S >= 3) = 17/27
    assert p["uniqcount-n4-s4"] == "0.63"
