"""The radioactivity test's reading mode on stand-in models, and the provenance CLI.

Stand-in "models" return logits whose argmax is chosen by rule: green under the key (a
radioactive student), seeded noise (a clean model), or the text's own next token (a clean model
that merely predicts the watermarked text it reads). The last one is why tuples that occur in
the text read are dropped: scored naively it looks radioactive.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stillhouse.cli import app
from stillhouse.provenance.detect import score_key, score_keys, unique_tuples
from stillhouse.provenance.radioactive import reading_tuples
from stillhouse.watermark.green import WatermarkParams, green_mask, token_hashes
from stillhouse.watermark.keys import derive_key, key_u64

V = 400
P = WatermarkParams(gamma=0.25, delta=2.0, context=1)
SECRET = "radioactive-test-secret-0123"
KEY = key_u64(derive_key(SECRET.encode(), "account/camp/0"))
HASHES = token_hashes(V)


def watermarked_texts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        seq = [int(rng.integers(V))]
        for _ in range(length - 1):
            mask = green_mask(KEY, seq[-1:], HASHES, P)
            pool = np.flatnonzero(mask) if rng.random() < 0.7 else np.arange(V)
            seq.append(int(rng.choice(pool)))
        out.append(seq)
    return out


class StandIn:
    """``model(input_ids=..) .logits``: argmax by rule, as a suspect's forward pass would give."""

    def __init__(self, rule: str, seed: int = 0, share: float = 1.0):
        self.rule, self.rng, self.share = rule, np.random.default_rng(seed), share

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool) -> Any:
        b, width = input_ids.shape
        logits = torch.zeros((b, width, V))
        for j in range(b):
            ids = input_ids[j].tolist()
            for i in range(width):
                if self.rule == "copier" and i + 1 < width and self.rng.random() < self.share:
                    tok = ids[i + 1]
                elif self.rule == "radioactive" and self.rng.random() < self.share:
                    tok = int(self.rng.choice(np.flatnonzero(green_mask(KEY, [ids[i]], HASHES, P))))
                else:
                    tok = int(self.rng.integers(V))
                logits[j, i, tok] = 1.0
        return type("Out", (), {"logits": logits})()


def test_reading_mode_detects_a_biased_suspect_and_not_clean_ones() -> None:
    texts = watermarked_texts(40, 60, seed=0)
    inputs = [(t, 0) for t in texts]
    keys = {"account/camp/0": KEY, **{f"account/other{i}/0": key_u64(derive_key(SECRET.encode(), f"account/other{i}/0"))
                                      for i in range(15)}}
    student, counts = reading_tuples(StandIn("radioactive", share=0.3), inputs, 1, batch_size=8)
    ranked = score_keys(student, keys, P)
    assert ranked[0].key_id == "account/camp/0" and ranked[0].p_holm < 1e-6
    assert counts["predictions"] == sum(len(t) - 1 for t in texts)
    for seed in range(3):
        clean, _ = reading_tuples(StandIn("noise", seed=seed), inputs, 1)
        assert score_key(KEY, clean, P).p > 1e-3


def test_predicting_the_watermarked_text_is_not_radioactivity() -> None:
    """A clean model that predicts the text it reads: its tuples are the text's own, which are green.
    Scored naively that is 'radioactive'; reading_tuples drops tuples found in the text read."""
    texts = watermarked_texts(40, 60, seed=1)
    naive = unique_tuples(texts, 1)  # what a perfect predictor of the text would be scored on
    assert score_key(KEY, naive, P).p < 1e-20
    for share in (1.0, 0.7):
        tuples, counts = reading_tuples(StandIn("copier", seed=2, share=share), [(t, 0) for t in texts], 1)
        assert counts["in_text"] > 0.5 * share * counts["predictions"]
        assert score_key(KEY, tuples, P).p > 1e-3


def test_scoring_starts_at_the_answer() -> None:
    texts = watermarked_texts(2, 30, seed=3)
    all_, _ = reading_tuples(StandIn("noise"), [(t, 0) for t in texts], 1)
    tail, counts = reading_tuples(StandIn("noise"), [(t, 20) for t in texts], 1)
    assert counts["predictions"] == 2 * 10 and len(tail) < len(all_)


def _write_rows(path: Path, seqs: list[list[int]]) -> None:
    path.write_text("".join(json.dumps({"text": "x", "token_ids": s}) + "\n" for s in seqs))


def _unwatermarked_log(tmp_path: Path) -> str:
    """A guard log whose guard ran without --watermark: traffic, no key ids."""
    from stillhouse.guard.events import TrafficRecord
    from stillhouse.guard.store import open_store

    url = f"sqlite:///{tmp_path / 'plain.db'}"
    store = open_store(url)
    store.write_records([TrafficRecord("r1", 1.0, "a", "k")])
    store.close()
    return url


def test_provenance_text_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", SECRET)
    src = tmp_path / "leaked.jsonl"
    _write_rows(src, watermarked_texts(6, 50, seed=4))
    runner = CliRunner()
    # the stand-in texts are plain KGW, every token biased: scored as such (--entropy 0), not through the default gate;
    # the default weighted score has the bundled teacher read them (its progress goes to stderr, the JSON to stdout)
    res = runner.invoke(app, ["provenance", "text", str(src), "--key-ids",
                              "account/camp/0,account/a/0,account/b/0", "--entropy", "0", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["named"] and report["best"]["key_id"] == "account/camp/0"
    assert report["test"] == "weighted" and report["best"]["test"] == "weighted"
    assert report["keys_tried"] == 3 and report["best"]["p_holm"] == pytest.approx(min(1, 3 * report["best"]["p"]))
    assert SECRET not in res.output and str(KEY) not in res.output
    for args, needle in ((["provenance", "text", str(tmp_path / "none.jsonl"), "--key-ids", "account/a/0"],
                          "no such file"),
                         (["provenance", "text", str(src)], "no candidate keys"),
                         (["provenance", "text", str(src), "--log", _unwatermarked_log(tmp_path)],
                          "records no watermark key id"),
                         (["provenance", "text", str(src), "--key-ids", "lab"], "SCOPE/SUBJECT/EPOCH")):
        res = runner.invoke(app, args)
        assert res.exit_code != 0 and needle in res.output and "Traceback" not in res.output, res.output


def test_provenance_text_per_sample_equals_each_row_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         smol_tokenizer: Any) -> None:
    from stillhouse.provenance.run import ProvenanceConfig, text_provenance

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", SECRET)
    text = "The river rose overnight, and by morning the low fields were a lake the colour of tea."
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [{"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "x"}],
             "token_ids": s} for s in watermarked_texts(2, 40, seed=7)]
    rows += [{"text": "y", "token_ids": [int(t) for t in np.random.default_rng(3).integers(V, size=40)]},
             {"text": ""},  # empty: not scored, still counted
             {"text": text, "token_ids": ids}, {"text": text}]  # the same text, with and without its token ids
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = ("account/camp/0", "account/a/0", "account/b/0")
    # count: the exact equality below is about which tuples each row gives (the weighted score reads the rows in
    # batches, whose float rounding may move a weight level; its per-sample run is tests/test_weighted_score.py's)
    report = text_provenance(ProvenanceConfig(source=str(src), key_ids=keys, per_sample=True, entropy=0.0,
                                              score="count"))
    assert report["samples"] == 5 and report["empty"] == 1
    assert [p["sample"] for p in report["per_sample"]] == [0, 1, 2, 4, 5]
    for per in report["per_sample"]:
        alone = tmp_path / f"row{per['sample']}.jsonl"
        alone.write_text(json.dumps(rows[per["sample"]]) + "\n")
        one = text_provenance(ProvenanceConfig(source=str(alone), key_ids=keys, entropy=0.0, score="count"))
        assert (per["scores"], per["tokens"], per["scored"], per["named"]) == \
            (one["scores"], one["tokens"], one["scored"], one["named"])
    marked, clean, with_ids, without = (report["per_sample"][i] for i in (0, 2, 3, 4))
    assert marked["named"] and marked["best"]["key_id"] == "account/camp/0" and not clean["named"]
    assert without["tokens"] == len(ids) and without["scores"] == with_ids["scores"]  # tokenized by the teacher's tokenizer


def test_own_answers_of_clean_models_name_no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 smol_tokenizer: Any) -> None:
    """reading=own: a clean model answers prompts greedily and its answers are scored; it never depends on the
    key, so no candidate is named (the positive case, a student that learned watermarked answers, is
    tests/test_arena_provenance.py's)."""
    from conftest import build_tiny_model
    from stillhouse.provenance.run import SuspectConfig, model_provenance

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", SECRET)
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]})
                           + "\n" for i in range(12)))
    keys = tuple(f"account/a{i}/0" for i in range(16))
    for seed in range(2):
        path = tmp_path / f"clean-{seed}"
        build_tiny_model(smol_tokenizer, seed=seed, max_positions=512).save_pretrained(path)
        smol_tokenizer.save_pretrained(path)
        report = model_provenance(SuspectConfig(source=str(src), key_ids=keys, suspect=f"hf:{path}", mode="open",
                                                reading="own", answer_tokens=24, entropy=0.0))  # every token
        assert report["params"]["entropy"] == 0.0 and "gated_tokens" not in report
        assert report["answers"] == 12 and report["tokens"] > 12 and report["scored"] > 20
        assert report["named"] is False and min(s["p_holm"] for s in report["scores"]) > 1e-3
    exp = model_provenance(SuspectConfig(source=str(src), key_ids=keys, suspect=f"hf:{path}", mode="open",
                                         reading="own", answer_tokens=24, entropy=0.0, scheme="exp",
                                         tokenizer=f"hf:{path}"))  # the EXP test: the teacher reads the answers
    assert exp["test"] == "exp" and exp["scored"] > 5 and exp["named"] is False
    # the entropy gate on its answers, by default (serve's): the teacher's entropies decide which tokens are
    # scored, never the key
    gated = model_provenance(SuspectConfig(source=str(src), key_ids=keys, suspect=f"hf:{path}", mode="open",
                                           reading="own", answer_tokens=24))
    assert gated["params"]["entropy"] == WatermarkParams().entropy == 2.0
    assert 0 < gated["gated_tokens"] < gated["tokens"] and gated["scored"] <= gated["gated_tokens"]
    assert gated["named"] is False
    with pytest.raises(ValueError, match="the gate scores answer text"):
        SuspectConfig(source=str(src), key_ids=keys, suspect=f"hf:{path}", mode="open", entropy=2.0)
    with pytest.raises(ValueError, match="reading"):
        SuspectConfig(source=str(src), key_ids=keys, suspect=f"hf:{path}", reading="both")  # type: ignore[arg-type]


def test_closed_mode_asks_greedy_over_http_for_what_open_own_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    smol_tokenizer: Any) -> None:
    """mode=closed (the suspect behind a real `stillhouse serve` on loopback) asks at temperature 0 by default and
    gets the very answers mode=open, reading=own writes from the same weights (closed mode then scores their text,
    tokenized again); a clean model is named by neither."""
    import asyncio

    from conftest import build_tiny_model
    from stillhouse.provenance.radioactive import closed_texts, own_answers
    from stillhouse.provenance.run import SuspectConfig, model_provenance
    from stillhouse.provenance.texts import load_samples
    from stillhouse.serve.app import ServeConfig, ServerThread, create_app
    from stillhouse.teacher.local import LocalTeacher

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", SECRET)
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]})
                           + "\n" for i in range(12)))
    keys = tuple(f"account/a{i}/0" for i in range(16))
    path = tmp_path / "clean"
    model = build_tiny_model(smol_tokenizer, seed=5, max_positions=512)
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    samples = load_samples(str(src))
    written = own_answers(model, smol_tokenizer, samples, 24)[1]
    opened = model_provenance(SuspectConfig(source=str(src), key_ids=keys, answer_tokens=24, suspect=f"hf:{path}",
                                            mode="open", reading="own", tokenizer=f"hf:{path}"))
    teacher = LocalTeacher(model, smol_tokenizer, name="suspect", revision="tiny-5")
    try:
        with ServerThread(create_app(teacher, ServeConfig(teacher=f"hf:{path}", served_name="suspect"))) as srv:
            url = f"{srv.base_url}#suspect"
            texts, again = asyncio.run(closed_texts(url, samples, 24, [(SuspectConfig.temperature, 0)] * 2, 8))
            closed = model_provenance(SuspectConfig(source=str(src), key_ids=keys, answer_tokens=24, suspect=url,
                                                    mode="closed", tokenizer=f"hf:{path}"))
    finally:
        teacher.close()
    assert SuspectConfig.temperature == 0.0
    assert texts == [smol_tokenizer.decode(ids, skip_special_tokens=True) for ids in written]
    assert again == texts  # two runs in one pool come back each in its own prompt order
    assert closed["mode"] == "closed" and closed["answers"] == opened["answers"] == 12 and closed["scored"] > 20
    assert not closed["named"] and not opened["named"]
