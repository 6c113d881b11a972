"""scripts/exp_provenance.py's data stages, run as a user would (in a temporary working directory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "exp_provenance.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def _row(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _setup(tmp_path: Path) -> Path:
    out = tmp_path / "runs" / "provenance"
    out.mkdir(parents=True)
    (out / "clean.jsonl").write_text("".join(json.dumps(_row(f"q{i}", f"clean {i}")) + "\n" for i in range(10)))
    gen = [{**_row(f"w{i}", f"marked {i}"), "token_ids": [1, 2], "key_id": "account/a/0"} for i in range(4)]
    (out / "gen-wm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    return out


def test_clean_mix_needs_no_watermarked_file(tmp_path):
    out = _setup(tmp_path)
    (out / "gen-wm.jsonl").unlink()  # a clean mix must not read any generated answers
    proc = _run(tmp_path, "mix", "--share", "0", "--rows", "6", "--seed", "1", "--name", "clean")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in (out / "data-clean.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    assert all(r["messages"][1]["content"].startswith("clean ") for r in rows)


def test_a_mix_larger_than_clean_jsonl_fills_from_the_later_turns_only_then(tmp_path):
    out = _setup(tmp_path)
    (out / "clean-later.jsonl").write_text("".join(json.dumps(_row(f"l{i}", f"later {i}")) + "\n" for i in range(10)))
    assert _run(tmp_path, "mix", "--share", "0", "--rows", "6", "--name", "small").returncode == 0
    small = [json.loads(x)["messages"][1]["content"] for x in (out / "data-small.jsonl").read_text().splitlines()]
    assert all(t.startswith("clean ") for t in small)  # clean.jsonl suffices: the later turns are not drawn
    proc = _run(tmp_path, "mix", "--wm", "wm", "--share", "0.25", "--rows", "16", "--name", "big")
    assert proc.returncode == 0, proc.stderr
    texts = [json.loads(x)["messages"][1]["content"] for x in (out / "data-big.jsonl").read_text().splitlines()]
    assert [sum(t.startswith(p) for t in texts) for p in ("marked ", "clean ", "later ")] == [4, 10, 2]
    too_big = _run(tmp_path, "mix", "--share", "0", "--rows", "21", "--name", "huge")
    assert too_big.returncode != 0 and "21 clean (have 20)" in too_big.stderr


def test_watermarked_share_without_wm_is_one_line_error(tmp_path):
    _setup(tmp_path)
    proc = _run(tmp_path, "mix", "--share", "0.5", "--rows", "6", "--name", "half")
    assert proc.returncode != 0
    assert "--wm" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "provenance" / "data-half.jsonl").exists()


def test_mix_takes_the_share_from_the_named_answers(tmp_path):
    out = _setup(tmp_path)
    proc = _run(tmp_path, "mix", "--wm", "wm", "--share", "0.5", "--rows", "6", "--name", "half")
    assert proc.returncode == 0, proc.stderr
    texts = [json.loads(x)["messages"][1]["content"] for x in (out / "data-half.jsonl").read_text().splitlines()]
    assert sum(t.startswith("marked ") for t in texts) == 3 and sum(t.startswith("clean ") for t in texts) == 3


def test_mix_takes_a_jsonl_path_such_as_the_paraphrases(tmp_path):
    out = _setup(tmp_path)
    para = tmp_path / "para-x.jsonl"  # a paraphrase stage's rows: messages and key id, no token ids
    para.write_text("".join(json.dumps({**_row(f"w{i}", f"reworded {i}"), "key_id": "account/a/0"}) + "\n"
                            for i in range(4)))
    proc = _run(tmp_path, "mix", "--wm", str(para), "--share", "1", "--rows", "4", "--name", "para")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in (out / "data-para.jsonl").read_text().splitlines()]
    assert sorted(r["messages"][1]["content"] for r in rows) == [f"reworded {i}" for i in range(4)]
    assert all(set(r) == {"messages"} for r in rows)


def _answers(out: Path, n: int, words: int, tokens: int = 8) -> list[dict]:
    rows = [{**_row(f"question {i}", " ".join(f"w{i}x{j}" for j in range(words))), "token_ids": list(range(tokens)),
             "key_id": f"account/a{i % 2}/0"} for i in range(n)]
    (out / "gen-wm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_delete_drops_the_share_of_words_in_order_and_under_a_seed(tmp_path):
    out = _setup(tmp_path)
    rows = _answers(out, 20, 50)
    gen = str(out / "gen-wm.jsonl")
    texts = {}
    for share, seed in ((0.3, 1), (0.3, 2), (0.0, 1)):
        proc = _run(tmp_path, "delete", "--file", gen, "--share", str(share), "--seed", str(seed), "--name", f"s{seed}")
        assert proc.returncode == 0, proc.stderr
        got = [json.loads(x) for x in (out / f"drop{share:g}-s{seed}.jsonl").read_text().splitlines()]
        assert [g["key_id"] for g in got] == [r["key_id"] for r in rows] and all("token_ids" not in g for g in got)
        assert [g["messages"][0] for g in got] == [r["messages"][0] for r in rows]
        texts[share, seed] = [g["messages"][1]["content"] for g in got]
    for r, t in zip(rows, texts[0.3, 1]):
        kept, words = t.split(), r["messages"][1]["content"].split()
        it = iter(words)
        assert all(w in it for w in kept)  # the words left are the original's, in order
    deleted = 1 - sum(len(t.split()) for t in texts[0.3, 1]) / 1000
    assert 0.24 < deleted < 0.36  # 1,000 words each dropped with p 0.3: sd 0.0145
    assert texts[0.0, 1] == [r["messages"][1]["content"] for r in rows]  # share 0: the text alone
    again = _run(tmp_path, "delete", "--file", gen, "--share", "0.3", "--seed", "1", "--name", "again")
    assert again.returncode == 0
    assert [json.loads(x)["messages"][1]["content"] for x in (out / "drop0.3-again.jsonl").read_text().splitlines()] \
        == texts[0.3, 1] != texts[0.3, 2]
    bad = _run(tmp_path, "delete", "--file", gen, "--share", "1.5", "--name", "bad")
    assert bad.returncode != 0 and "--share" in bad.stderr and "Traceback" not in bad.stderr


def test_paraphrase_asks_the_url_once_per_answer_within_the_length_budget(tmp_path):
    from stillhouse.testing.fakeserver import FakeServerConfig, start_in_thread

    out = _setup(tmp_path)
    rows = _answers(out, 6, 12, tokens=3)  # a budget of int(3 * 1.2) + 1 = 4 words: some answers are cut
    srv = start_in_thread(FakeServerConfig(latency_ms=1.0, keep_bodies=True))
    try:
        proc = _run(tmp_path, "paraphrase", "--file", str(out / "gen-wm.jsonl"), "--limit", "5", "--url",
                    srv.base_url, "--seed", "7", "--name", "p")
        sent = {json.loads(body)["seed"]: (json.loads(body), json.loads(ans[0])) for body, ans in srv.server.bodies.items()}
    finally:
        srv.stop()
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(x) for x in (out / "para-p.jsonl").read_text().splitlines()]
    assert len(got) == 5 == len(sent) and [g["source_row"] for g in got] == list(range(5))
    for i, (g, r) in enumerate(zip(got, rows)):
        body, answer = sent[7 + i]
        assert r["messages"][1]["content"] in body["messages"][-1]["content"]  # the answer is what is rewritten
        assert body["max_tokens"] == 4 and body["temperature"] == 0.7
        assert g["messages"][0] == r["messages"][0] and g["key_id"] == r["key_id"] and "token_ids" not in g
        assert g["messages"][1]["content"] == answer["choices"][0]["message"]["content"] != r["messages"][1]["content"]
        assert g["finish_reason"] == answer["choices"][0]["finish_reason"] and g["completion_tokens"] <= 4
    assert {g["finish_reason"] for g in got} == {"stop", "length"}  # the budget binds on some and not others


def test_paraphrase_refuses_answers_without_token_ids(tmp_path):
    out = _setup(tmp_path)
    proc = _run(tmp_path, "paraphrase", "--file", str(out / "clean.jsonl"), "--url", "http://127.0.0.1:9/v1",
                "--name", "p")
    assert proc.returncode != 0 and "token_ids" in proc.stderr and "Traceback" not in proc.stderr


def test_limits_counts_each_answer_and_the_pool(tmp_path):
    def report(log10_ps: list[float], wrong_holm: float) -> dict:
        per = [{"named": lp < -3, "best": {"key_id": "account/a/0" if lp < -1 else "account/b/0"},
                "scores": [{"key_id": "account/a/0", "log10_p": lp, "p_holm": min(1.0, 2 * 10 ** lp)},
                           {"key_id": "account/b/0", "log10_p": -0.5, "p_holm": wrong_holm}]} for lp in log10_ps]
        return {"source": "x.jsonl", "samples": len(per), "empty": 1, "per_sample": per,
                "scores": [{"key_id": "account/b/0", "log10_p": -1.0}, {"key_id": "account/a/0", "log10_p": -42.0}]}

    (tmp_path / "r.json").write_text(json.dumps(report([-7.0, -4.0, -0.2], 0.5)))
    (tmp_path / "w.json").write_text(json.dumps(report([-0.1], 1e-4)))
    proc = _run(tmp_path, "limits", "--key", "account/a/0", "r.json", "w.json", "--plot", "limits.png")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "limits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r, w = ([c.strip() for c in line.strip("| ").split("|")] for line in proc.stdout.splitlines()[2:4])
    # four answers (one empty, p = 1): 1 below 1e-5, 2 below 1e-3, 2 named, median of (-7, -4, -0.2, 0)
    assert r[1:] == ["4", "1/4", "2/4", "2/4", "-2.10", "-42.0", "0/4", "-", "-"]
    assert w[1:] == ["2", "0/2", "0/2", "0/2", "-0.05", "-42.0", "1/2", "-", "-"]
    # with the originals: each attacked row against the answer it came from (source_row), not the one in its place
    (tmp_path / "orig.jsonl").write_text("".join(json.dumps(_row("q", a)) + "\n" for a in ("a b c d e", "p q r s t u")))
    (tmp_path / "att.jsonl").write_text("".join(json.dumps({**_row("q", a), "source_row": i}) + "\n"
                                                for a, i in (("p q r s t u", 1), ("a b c d", 0))))
    (tmp_path / "w.json").write_text(json.dumps({**report([-0.1], 1e-4), "source": "att.jsonl"}))
    proc = _run(tmp_path, "limits", "--key", "account/a/0", "--original", "orig.jsonl", "w.json")
    assert proc.returncode == 0, proc.stderr
    w = [c.strip() for c in proc.stdout.splitlines()[2].strip("| ").split("|")]
    assert w[-2:] == ["0.75", "0.90"]  # 4-grams kept: 3/3 and 1/2; words: 6/6 and 4/5
    (tmp_path / "plain.json").write_text(json.dumps({"source": "x", "samples": 1, "scores": []}))
    bad = _run(tmp_path, "limits", "--key", "account/a/0", "plain.json")
    assert bad.returncode != 0 and "--per-sample" in bad.stderr and "Traceback" not in bad.stderr


def test_gate_sweep_at_the_default_setting_is_the_product_test(tmp_path, monkeypatch, smol_tokenizer):
    """gate-sweep's row at the product's EXP gate (0.7) and answer length is `provenance model --reading own
    --scheme exp` on the same suspect: the same tuples and the same p for every key; a lower gate or fewer
    leading tokens score a subset (a gate of 0 lets nothing through)."""
    from conftest import build_tiny_model
    from stillhouse.provenance.run import SuspectConfig, model_provenance

    monkeypatch.setenv("STILLHOUSE_WATERMARK_SECRET", "gate-sweep-test-secret-0123")
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]})
                           + "\n" for i in range(8)))
    path = tmp_path / "suspect"
    build_tiny_model(smol_tokenizer, seed=3, max_positions=512).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    keys = [f"account/a{i}/0" for i in range(4)]
    r = _run(tmp_path, "gate-sweep", "--suspect", f"hf:{path}", "--tokenizer", f"hf:{path}", "--source", str(src),
             "--key", keys[2], "--keys", ",".join(keys), "--gates", "0.7", "0", "--tokens", "24", "12",
             "--answer-tokens", "24", "--out", str(tmp_path / "sweep.json"))
    assert r.returncode == 0, r.stderr
    rows = {(x["gate"], x["tokens"]): x for x in json.loads((tmp_path / "sweep.json").read_text())["rows"]}
    product = model_provenance(SuspectConfig(source=str(src), key_ids=tuple(keys), answer_tokens=24, scheme="exp",
                                             suspect=f"hf:{path}", mode="open", reading="own", tokenizer=f"hf:{path}"))
    right = next(s for s in product["scores"] if s["key_id"] == keys[2])
    assert product["test"] == "exp" and product["scored"] > 20
    assert rows[(0.7, 24)]["scored"] == product["scored"] and rows[(0.7, 24)]["p"] == pytest.approx(right["p"], rel=1e-9)
    assert rows[(0.7, 24)]["rank"] == [s["key_id"] for s in product["scores"]].index(keys[2]) + 1
    assert rows[(0.0, 24)]["scored"] == 0 and 0 < rows[(0.7, 12)]["scored"] < rows[(0.7, 24)]["scored"]


def test_radioactivity_plots_the_right_key_and_for_clean_models_the_smallest_p(tmp_path):
    def report(name: str, mode: str, test: str, ps: dict[str, float]) -> str:
        scores = sorted(({"key_id": k, "p": p} for k, p in ps.items()), key=lambda s: s["p"])
        (tmp_path / name).write_text(json.dumps({"mode": mode, "test": test, "scores": scores}))
        return str(tmp_path / name)

    student = report("s.json", "open", "exp", {"k0": 1e-6, "k1": 1e-9})  # a wrong key smallest: still k0's p
    closed = report("c.json", "closed", "weighted", {"k0": 0.02, "k1": 0.5})
    clean = report("n.json", "open", "exp", {"k0": 0.4, "k1": 0.05})
    png = tmp_path / "r.png"
    r = _run(tmp_path, "radioactivity", "--key", "k0", "--plot", str(png), f"0.05={student}", f"1.0={closed}",
             f"clean={clean}")
    assert r.returncode == 0, r.stderr
    rows = {line.split("|")[2].strip(): line.split("|") for line in r.stdout.splitlines() if ".json" in line}
    assert rows["s.json"][5].strip() == "k0" and rows["s.json"][6].strip() == "1e-06"
    assert rows["c.json"][3].strip() == "closed" and rows["c.json"][6].strip() == "0.02"
    assert rows["n.json"][5].strip() == "k1" and rows["n.json"][6].strip() == "0.05"
    assert png.stat().st_size > 10_000
