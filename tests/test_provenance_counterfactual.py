"""The counterfactual test (provenance/counterfactual.py): its exact tail, its uniform null, its refusals, and the
whole ``provenance model --test counterfactual`` on a tiny model, where a suspect that writes our answers again
is named and the drawn answers come back from the cache."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from stillhouse.provenance import counterfactual as cf
from stillhouse.provenance.stats import log_rank_sum_sf
from stillhouse.provenance.texts import Sample

SECRET = "counterfactual-secret-0123456789"


# -- the tail and the null ----------------------------------------------------------------------------------------
def test_rank_sum_tail_is_exact_against_enumeration() -> None:
    for n, k in [(1, 9), (2, 3), (3, 4), (5, 2)]:
        for s in range(-1, n * k + 2):
            count = sum(1 for t in itertools.product(range(k + 1), repeat=n) if sum(t) >= s)
            assert math.exp(log_rank_sum_sf(n, k, s)) == pytest.approx(count / (k + 1) ** n, rel=1e-12, abs=0)
    assert log_rank_sum_sf(32, 9, 32 * 9) == pytest.approx(-32 * math.log(10))  # every answer first
    deep = log_rank_sum_sf(2000, 9, 10_000)  # far in the tail, where floats alone would underflow
    assert math.isfinite(deep) and deep / math.log(10) < -14
    with pytest.raises(ValueError, match="k >= 1"):
        log_rank_sum_sf(3, 0, 1)


def test_ranks_are_uniform_and_p_values_valid_under_exchangeable_scores() -> None:
    rng = random.Random(7)
    k, n, trials = 4, 6, 3000
    samples = [Sample("a", [{"role": "user", "content": "q"}], account="acct", key_id=f"account/acct/0/r{i}")
               for i in range(n)]
    ranks_seen, small = [], 0
    for t in range(trials):
        ranks = []
        for i in range(n):
            scores = [rng.choice([0.0, 1.0, rng.random()]) for _ in range(k + 1)]  # ties too
            ranks.append(cf.rank(scores, f"t{t}/{i}"))
        ranks_seen += ranks
        (h, _), = cf.hypotheses(samples, ranks, k)
        small += math.exp(h.log_p) <= 0.1
    counts = [ranks_seen.count(r) for r in range(1, k + 2)]
    expect = len(ranks_seen) / (k + 1)
    assert all(abs(c - expect) < 5 * math.sqrt(expect) for c in counts), counts
    # P(p <= 0.1) <= 0.1 (discrete, so at most; 5 sd of slack for 3,000 trials)
    assert small / trials <= 0.1 + 5 * math.sqrt(0.09 / trials), small / trials


def test_rank_is_ours_among_all_and_ties_break_by_the_key_alone() -> None:
    assert cf.rank([5.0, 1.0, 2.0, 3.0], "x") == 1
    assert cf.rank([0.0, 1.0, 2.0, 3.0], "x") == 4
    assert cf.rank([2.0, 1.0, 3.0, 0.5], "x") == 2
    tied = [cf.rank([1.0, 1.0, 1.0], f"k{i}") for i in range(300)]
    assert tied == [cf.rank([1.0, 1.0, 1.0], f"k{i}") for i in range(300)]  # reproducible
    assert min(tied.count(r) for r in (1, 2, 3)) > 60  # each of the three tied places, about 100 times


def test_hypotheses_per_account_and_group_with_holm() -> None:
    samples = [Sample("a", [{"role": "user", "content": "q"}], account=a, key_id=f"account/{a}/0/r{i}")
               for i, a in enumerate(["x", "x", "x", "y", "y", "z"])]
    ranks = [1, 1, 1, 5, 3, 2]
    out = cf.hypotheses(samples, ranks, 9, [("group:x+z", "operator", ("x", "z"))])
    by = {h.name: (h, p_holm) for h, p_holm in out}
    assert set(by) == {"x", "y", "z", "group:x+z"}
    assert math.exp(by["x"][0].log_p) == pytest.approx(1e-3)  # three firsts of ten: (1/10)^3
    assert by["group:x+z"][0].ranks == (1, 1, 1, 2)
    ps = sorted(math.exp(h.log_p) for h, _ in out)
    assert out[0][1] == pytest.approx(min(1.0, 4 * ps[0]))  # Holm over all four
    assert [h.name for h, _ in out][0] in ("x", "group:x+z")


def test_refuses_answers_without_keys_or_sharing_one() -> None:
    q = [{"role": "user", "content": "q"}]
    with pytest.raises(cf.CounterfactualError, match="carry no key id"):
        cf.check_keys([Sample("a", q, key_id="account/x/0/r1"), Sample("b", q)])
    with pytest.raises(cf.CounterfactualError, match="--watermark-per-request"):
        cf.check_keys([Sample("a", q, key_id="account/x/0"), Sample("b", q, key_id="account/x/0")])
    with pytest.raises(cf.CounterfactualError, match="give the row an 'account'"):
        cf.check_keys([Sample("a", q, key_id="not-a-key-id")])
    cf.check_keys([Sample("a", q, key_id="not-a-key-id", account="x")])  # the row says who asked


def test_sampling_follows_the_recorded_request() -> None:
    s = Sample("a", [], temperature=0.7, params={"max_tokens": 40, "top_p": 0.9, "seed": 3, "stop": "\n\n"})
    sp = cf.sampling(s, 512, 1.0)
    assert (sp.temperature, sp.top_p, sp.max_tokens, sp.seed, sp.stop) == (0.7, 0.9, 40, 3, ("\n\n",))
    bare = cf.sampling(Sample("a", []), 512, 1.0)  # nothing recorded: serve's defaults
    assert (bare.temperature, bare.max_tokens, bare.seed) == (1.0, 512, None)
    with pytest.raises(cf.CounterfactualError, match="cannot be replayed"):
        cf.sampling(Sample("a", [], key_id="k", params={"max_tokens": "many"}), 512, 1.0)


def test_redraws_are_shaped_as_serve_answers_them() -> None:
    # a reasoning model's answer is logged without its <think> block (serve moves it to reasoning_content), so its
    # counterfactuals must lose theirs too, or the logged answer would stand out by form alone
    assert cf.served_text("<think>step 1</think>\n\nThe answer is 4.") == "The answer is 4."
    assert cf.served_text("The answer is 4.") == "The answer is 4."


def test_overlap_counts_the_candidates_4grams_in_the_suspects_answer(smol_tokenizer: Any) -> None:
    ours = "the quick brown fox jumps over the lazy dog"
    other = "a completely different sentence about cats and mice"
    got = cf.overlaps(smol_tokenizer, [ours], [[ours, other, "hi"]])[0]
    assert got[0] == 1.0 and got[1] == 0.0 and got[2] == 0.0  # "hi" has no 4-gram


def test_idf_overlap_weighs_each_4gram_by_the_candidates_that_hold_it() -> None:
    vocab: dict[str, int] = {}

    def tok(text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:  # one id per word
        return {"input_ids": [vocab.setdefault(w, len(vocab)) for w in text.split()]}

    a, b = "w1 w2 w3 w4 w5", "w1 w2 w3 w4 x5"  # (w1..w4) in both, one 4-gram of their own each
    assert cf.overlaps(tok, [b], [[a, b]]) == [[0.5, 1.0]]
    # idf: the shared 4-gram weighs 1/2, each own one 1, so a's score is 0.5 / 1.5 and b's (0.5 + 1) / 1.5
    assert cf.overlaps(tok, [b], [[a, b]], idf=True) == [[pytest.approx(1 / 3), pytest.approx(1.0)]]
    assert cf.overlaps(tok, [a], [[a, b]], idf=True) == [[pytest.approx(1.0), pytest.approx(1 / 3)]]
    # a suspect that writes only what every candidate shares: share gives each 0.5, idf each 1/3
    assert cf.overlaps(tok, ["w1 w2 w3 w4"], [[a, b]], idf=True) == [[pytest.approx(1 / 3)] * 2]


# -- the whole test on a tiny model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: Any, smol_tokenizer: Any) -> Path:
    from conftest import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-cf")
    build_tiny_model(smol_tokenizer, seed=5, max_positions=512).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return Path(path)


def test_likelihoods_sum_the_answer_tokens_of_each_model(tiny_dir: Path) -> None:
    import torch

    from stillhouse.teacher.bundled import load_model
    from stillhouse.teacher.local import encode_chat

    samples = [Sample("x", [{"role": "user", "content": "Say something."}]),
               Sample("y", [{"role": "user", "content": "A much longer question, to pad the batch with."}])]
    answers = [["hello there", "a longer answer than the first one"], ["ok", "fine"]]
    got = cf.likelihoods(f"hf:{tiny_dir}", samples, answers, batch_size=3)  # a batch mixes rows of both
    model, tok, _ = load_model(f"hf:{tiny_dir}")
    for s, alts, row in zip(samples, answers, got):
        p = encode_chat(tok, s.prompt)
        for text, lp in zip(alts, row):
            a = tok(text, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + a])).logits[0], -1)
            want = sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(a))  # prompt tokens not counted
            assert lp == pytest.approx(want, abs=1e-3)


def _greedy_source(tiny_dir: Path, path: Path, n: int) -> None:
    """A source whose answers are what the tiny model itself writes greedily: a suspect that "learned" them."""
    from stillhouse.teacher.base import SamplingParams
    from stillhouse.teacher.local import LocalTeacher

    teacher = LocalTeacher.from_spec(f"hf:{tiny_dir}", max_batch=8)
    prompts = [[{"role": "user", "content": f"Question number {i}: tell me about topic {i}."}] for i in range(n)]
    try:
        out = teacher.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))
    finally:
        teacher.close()
    path.write_text("".join(json.dumps({"messages": m + [{"role": "assistant", "content": r.completions[0].text}],
                                        "key_id": f"account/lab/0/r{i}", "temperature": 1.0, "max_tokens": 16})
                            + "\n" for i, (m, r) in enumerate(zip(prompts, out))))


def test_model_command_names_a_suspect_that_writes_our_answers(tiny_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from stillhouse.provenance.run import SuspectConfig, model_provenance

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", SECRET)
    src, cache = tmp_path / "ours.jsonl", tmp_path / "cf.jsonl"
    _greedy_source(tiny_dir, src, 4)
    spec = f"hf:{tiny_dir}"
    cfg = SuspectConfig(source=str(src), suspect=spec, tokenizer=spec, reading="own", mode="open", answer_tokens=16,
                        test="counterfactual", counterfactuals=9, cache=str(cache), scheme="exp", entropy=0.0,
                        alpha=0.01)
    report = model_provenance(cfg)
    (h,) = report["hypotheses"]
    assert report["score"] == "overlap" and h["name"] == "lab" and h["answers"] == 4
    assert h["first"] == 4 and h["p"] == pytest.approx(1e-4) and report["named_accounts"] == ["lab"]
    drawn = [json.loads(x) for x in cache.read_text().splitlines()]
    assert len(drawn) == 4 and all(len(d["answers"]) == 9 for d in drawn)
    # a kill mid-write leaves a torn line: the rerun keeps what is whole, redraws nothing kept, and the same answers
    # give the same ranks
    cache.write_text(cache.read_text() + '{"key_id": "account/lab/0/r9", "rec')
    again = model_provenance(cfg)
    assert again["hypotheses"][0]["ranks"] == h["ranks"]
    assert len([x for x in cache.read_text().splitlines() if x.strip()]) == 5  # the torn line, nothing new
    from typer.testing import CliRunner

    from stillhouse.cli import app

    res = CliRunner().invoke(app, ["provenance", "model", str(src), "--suspect", spec, "--tokenizer", spec,
                                   "--reading", "own", "--mode", "open", "--answer-tokens", "16", "--test",
                                   "counterfactual", "--cache", str(cache), "--scheme", "exp", "--entropy", "0",
                                   "--alpha", "0.01"])
    assert res.exit_code == 0, res.output
    assert "lab (4 of 4 answers ranked first)" in res.output and "rank among 10 (overlap)" in res.output


def test_model_command_refuses_one_key_per_account(tiny_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from stillhouse.cli import app

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", SECRET)
    src = tmp_path / "shared.jsonl"
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
           "key_id": "account/lab/0"}
    src.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    res = CliRunner().invoke(app, ["provenance", "model", str(src), "--suspect", f"hf:{tiny_dir}", "--test",
                                   "counterfactual", "--tokenizer", f"hf:{tiny_dir}"])
    assert res.exit_code == 2 and "--watermark-per-request" in res.output and "Traceback" not in res.output


def test_redraws_use_the_served_recipe_whatever_the_suspect_reads(tiny_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading text, the tuple tests score with no gate; the redraws must still use serve's gate and the recorded
    sampling, or our answer and its counterfactuals would come from different samplers."""
    from stillhouse.provenance.run import SuspectConfig, model_provenance
    from stillhouse.watermark.green import DEFAULT_PARAMS

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", SECRET)
    src = tmp_path / "ours.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                               "key_id": "account/lab/0/r1", "temperature": 0.7, "max_tokens": 5}) + "\n")
    seen: dict[str, Any] = {}

    def fake_draw(spec: str, samples: Any, k: int, params: Any, secret: bytes, recipes: Any, *_: Any) -> Any:
        seen.update(params=params, recipes=recipes, k=k)
        return [["b"] * k for _ in samples]

    monkeypatch.setattr(cf, "draw", fake_draw)
    spec = f"hf:{tiny_dir}"
    model_provenance(SuspectConfig(source=str(src), suspect=spec, tokenizer=spec, test="counterfactual",
                                   counterfactuals=3, scheme="exp"))
    (p,), (sp,) = seen["params"], seen["recipes"]
    assert p.entropy == DEFAULT_PARAMS.entropy and p.scheme == "exp" and seen["k"] == 3
    assert (sp.temperature, sp.max_tokens) == (0.7, 5)


def test_cache_must_be_a_file_for_the_counterfactual_test(tiny_dir: Path, tmp_path: Path) -> None:
    from stillhouse.provenance.run import SuspectConfig

    spec = f"hf:{tiny_dir}"
    base = dict(source=str(tmp_path / "ours.jsonl"), suspect=spec, tokenizer=spec)
    with pytest.raises(ValueError, match="is a directory: give a JSONL file in it"):
        SuspectConfig(**base, test="counterfactual", cache=str(tmp_path))
    with pytest.raises(ValueError, match="does not exist; create it first"):
        SuspectConfig(**base, test="counterfactual", cache=str(tmp_path / "no" / "cf.jsonl"))
    with pytest.raises(ValueError, match="add --test counterfactual or drop it"):
        SuspectConfig(**base, key_ids=("account/a/0",), cache=str(tmp_path / "cf.jsonl"))
    assert SuspectConfig(**base, test="counterfactual", cache=str(tmp_path / "cf.jsonl")).cache.endswith("cf.jsonl")


def test_sampled_answers_pool_a_closed_suspects_answers(tiny_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from stillhouse.provenance import radioactive
    from stillhouse.provenance.run import SuspectConfig, _suspect_answers

    calls: list[tuple[float, int]] = []

    async def fake_closed(url: str, samples: Any, max_tokens: int, runs: list[tuple[float, int]],
                          concurrency: int, timeout_s: float) -> list[list[str]]:
        assert (concurrency, timeout_s) == (32, 600.0)
        calls.extend(runs)
        return [[f"{s.text} T{t} s{seed}" for s in samples] for t, seed in runs]

    monkeypatch.setattr(radioactive, "closed_texts", fake_closed)
    base = dict(source=str(tmp_path / "ours.jsonl"), suspect="http://127.0.0.1:9/v1", tokenizer=f"hf:{tiny_dir}",
                test="counterfactual")
    cfg = SuspectConfig(**base, sampled_answers=2)
    got = _suspect_answers(cfg, [Sample(text="a"), Sample(text="b")], None)
    assert calls == [(0.0, 0), (0.7, 0), (0.7, 1000)]  # the one answer, then two sampled with their own seeds
    assert got == ["a T0.0 s0\n\na T0.7 s0\n\na T0.7 s1000", "b T0.0 s0\n\nb T0.7 s0\n\nb T0.7 s1000"]
    with pytest.raises(ValueError, match="pools answers a closed suspect writes"):
        SuspectConfig(**{**base, "suspect": f"hf:{tiny_dir}"}, mode="open", sampled_answers=2)
    with pytest.raises(ValueError, match="must be >= 0"):
        SuspectConfig(**base, sampled_answers=-1)
    with pytest.raises(ValueError, match="add it or drop --sampled-answers"):
        SuspectConfig(**{**base, "test": "tuples"}, key_ids=("account/a/0",), sampled_answers=2)
    with pytest.raises(ValueError, match="must be > 0 seconds"):
        SuspectConfig(**base, request_timeout=0)
    with pytest.raises(ValueError, match="drop --overlap"):
        SuspectConfig(**{**base, "suspect": f"hf:{tiny_dir}"}, mode="open", overlap="idf")
    with pytest.raises(ValueError, match="use share or idf"):
        SuspectConfig(**base, overlap="tfidf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="add it or drop --overlap"):
        SuspectConfig(**{**base, "test": "tuples"}, key_ids=("account/a/0",), overlap="idf")
    SuspectConfig(**{**base, "suspect": f"hf:{tiny_dir}"}, mode="open", reading="own", overlap="idf")  # its answers
    # a test that named nobody says what would take it further
    from stillhouse.provenance.run import _counterfactual_hint
    few = [{"name": "acct-0", "answers": 2}]  # 10^-2 at best with K = 9: never below alpha 1e-3
    assert "reach p = 0.01 at best, above 0.001" in _counterfactual_hint(SuspectConfig(**base, alpha=1e-3), few)
    six = [{"name": "acct-0", "answers": 6}]
    assert "--sampled-answers 64 --overlap idf (about 13x" in _counterfactual_hint(SuspectConfig(**base, alpha=1e-3),
                                                                                  six)
    assert _counterfactual_hint(SuspectConfig(**base, alpha=1e-3, sampled_answers=64), six) == ""
    assert _counterfactual_hint(SuspectConfig(**base, alpha=1e-3), [{"name": "a", "answers": 32}]) == ""
    # unless given: 4 for a closed suspect under the counterfactual test, none elsewhere
    assert SuspectConfig(**base).pooled_answers == 4
    assert SuspectConfig(**base, sampled_answers=0).pooled_answers == 0
    assert SuspectConfig(**{**base, "suspect": f"hf:{tiny_dir}"}).pooled_answers == 0
    assert SuspectConfig(**{**base, "test": "tuples"}, key_ids=("account/a/0",)).pooled_answers == 0


def test_prefix_tokens_score_only_each_answers_opening(tiny_dir: Path) -> None:
    from stillhouse.provenance.run import SuspectConfig

    samples = [Sample("x", [{"role": "user", "content": "Say something."}])]
    answers = [["one two three four five six seven eight", "nine"]]
    every = cf.likelihoods(f"hf:{tiny_dir}", samples, answers)
    head = cf.likelihoods(f"hf:{tiny_dir}", samples, answers, prefix=3)
    assert head[0][1] == pytest.approx(every[0][1])  # shorter than the prefix: the whole answer
    assert head[0][0] > every[0][0]  # the tail's log p (each < 0) no longer added
    # reading causally, the first n tokens of the long answer score as the short answer made of them
    from stillhouse.teacher.bundled import load_model

    _, tok, _ = load_model(f"hf:{tiny_dir}")
    n = len(tok("one two three", add_special_tokens=False)["input_ids"])
    short = cf.likelihoods(f"hf:{tiny_dir}", samples, [["one two three"]])
    assert cf.likelihoods(f"hf:{tiny_dir}", samples, answers, prefix=n)[0][0] == pytest.approx(short[0][0], abs=1e-3)
    # reading only the first n tokens gives their log p read within the whole answer (a causal model)
    whole = cf.readings(f"hf:{tiny_dir}", samples, answers)[0][0][1]
    assert sum(cf.log_probs(whole)[:n]) == pytest.approx(
        cf.likelihoods(f"hf:{tiny_dir}", samples, answers, prefix=n)[0][0], abs=1e-3)
    assert len(cf.readings(f"hf:{tiny_dir}", samples, answers, prefix=n)[0][0][0]) == n
    base = dict(source="ours.jsonl", tokenizer=f"hf:{tiny_dir}", test="counterfactual")
    assert SuspectConfig(**base, suspect=f"hf:{tiny_dir}", prefix_tokens=32).scored_prefix == 32
    # unless given: the first 64 tokens when the suspect reads our texts, every token otherwise
    assert SuspectConfig(**base, suspect=f"hf:{tiny_dir}").scored_prefix == 64
    assert SuspectConfig(**base, suspect=f"hf:{tiny_dir}", prefix_tokens=0).scored_prefix == 0
    assert SuspectConfig(**base, suspect=f"hf:{tiny_dir}", reading="own").scored_prefix == 0
    assert SuspectConfig(**base, suspect="http://127.0.0.1:9/v1").scored_prefix == 0
    with pytest.raises(ValueError, match="applies to the likelihood score"):
        SuspectConfig(**base, suspect="http://127.0.0.1:9/v1", prefix_tokens=64)
    with pytest.raises(ValueError, match="must be >= 0"):
        SuspectConfig(**base, suspect=f"hf:{tiny_dir}", prefix_tokens=-1)
    with pytest.raises(ValueError, match="add it or drop --prefix-tokens"):
        SuspectConfig(**{**base, "test": "tuples"}, suspect=f"hf:{tiny_dir}", key_ids=("account/a/0",),
                      prefix_tokens=64)
