"""Eval end to end on tiny random models built from a config (fast, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stillhouse.distill.evaluate import (
    EvalConfig,
    EvalError,
    LoadedModel,
    evaluate_models,
    kl_to_teacher,
    load_items,
    parse_model_args,
    score_outputs,
    write_report,
)
from stillhouse.teacher.generate import chat_prompt_ids as prompt_ids

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(extra: tuple[str, ...] = ()) -> object:
    """A character-level tokenizer with a chat template, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", *extra]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", bos_token="<|im_start|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model_dir(root: Path, name: str, seed: int, layers: int = 2, extra: tuple[str, ...] = ()) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(extra)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    path = root / name
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"teacher": tiny_model_dir(root, "teacher", 0, layers=3),
            "s1": tiny_model_dir(root, "s1", 1), "s2": tiny_model_dir(root, "s2", 2)}


def test_score_outputs_numeric_and_code() -> None:
    items = load_items("arithmetic2", 3)
    texts = [f"{it.meta['a']} + {it.meta['b']} = {int(it.answer)}" for it in items]
    texts[1] = "no idea"
    assert [v.ok for v in score_outputs("arithmetic2", items, texts)] == [True, False, True]
    he = load_items("humaneval", 1)
    good = "```python\n" + he[0].meta["prompt"] + he[0].meta["canonical_solution"] + "```"
    assert score_outputs("humaneval", he, [good])[0].ok
    assert not score_outputs("humaneval", he, ["```python\ndef nope(): pass\n```"])[0].ok


def test_items_are_held_out_and_sized() -> None:
    from stillhouse.distill.tasks import is_heldout_pair

    items = load_items("arithmetic3", 20, seed=3)
    assert len(items) == 20 and all(is_heldout_pair(it.meta["a"], it.meta["b"]) for it in items)
    assert all(100 <= it.meta["a"] <= 999 for it in items)
    with pytest.raises(EvalError):
        load_items("poetry", 3)


def test_evaluate_models_identical_student_agrees_and_has_zero_kl(models: dict[str, Path], tmp_path: Path) -> None:
    teacher = LoadedModel.load(f"hf:{models['teacher']}", label="teacher", device="cpu")
    same = LoadedModel(label="same", model=teacher.model, tokenizer=teacher.tokenizer, revision=teacher.revision)
    other = LoadedModel.load(f"hf:{models['s1']}", label="s1", device="cpu")
    items = load_items("arithmetic2", 6)
    cfg = EvalConfig(students=(), task="arithmetic2", limit=6, max_new_tokens=6, batch_size=4, n_boot=50)
    res = evaluate_models(items, "arithmetic2", teacher, [same, other], cfg, cache_dir=tmp_path / "cache")
    s_same, s_other = res.students
    assert s_same.outputs == res.teacher.outputs
    assert s_same.agreement.value == 1.0
    assert s_same.kl == pytest.approx(0.0, abs=1e-5)
    assert s_other.kl > 0.01
    assert res.teacher.accuracy.n == 6 and len(res.item_ids) == 6
    assert not res.teacher.cached
    # second run: the teacher's outputs come from the cache, identical
    again = evaluate_models(items, "arithmetic2", teacher, [other], cfg, cache_dir=tmp_path / "cache")
    assert again.teacher.cached and again.teacher.outputs == res.teacher.outputs
    # a different item set misses the cache
    third = evaluate_models(items[:3], "arithmetic2", teacher, [other], cfg, cache_dir=tmp_path / "cache")
    assert not third.teacher.cached


def test_kl_matches_direct_computation(models: dict[str, Path]) -> None:
    teacher = LoadedModel.load(f"hf:{models['teacher']}", device="cpu")
    student = LoadedModel.load(f"hf:{models['s2']}", device="cpu")
    msgs = [{"role": "user", "content": "What is 12 + 30?"}]
    p = prompt_ids(teacher.tokenizer, msgs)
    c = teacher.tokenizer.encode("12 + 30 = 42", add_special_tokens=False)
    p2 = prompt_ids(teacher.tokenizer, [{"role": "user", "content": "Hi"}])
    c2 = teacher.tokenizer.encode("ok", add_special_tokens=False)
    mean, per_item = kl_to_teacher(teacher, student, [p, p2], [c, c2], batch_size=2)
    # naive: one sequence at a time, no padding, KL written out
    naive_vals = []
    for pp, cc in ((p, c), (p2, c2)):
        ids = torch.tensor([pp + cc])
        with torch.no_grad():
            lt = torch.log_softmax(teacher.model(ids).logits[0].float(), -1)
            ls = torch.log_softmax(student.model(ids).logits[0].float(), -1)
        rows = range(len(pp) - 1, len(pp) + len(cc) - 1)
        naive_vals.append([float((lt[r].exp() * (lt[r] - ls[r])).sum()) for r in rows])
    assert per_item[0] == pytest.approx(sum(naive_vals[0]) / len(naive_vals[0]), rel=1e-4)
    assert per_item[1] == pytest.approx(sum(naive_vals[1]) / len(naive_vals[1]), rel=1e-4)
    flat = naive_vals[0] + naive_vals[1]
    assert mean == pytest.approx(sum(flat) / len(flat), rel=1e-4)


def test_cli_writes_report_and_plots(models: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stillhouse.cli import app

    out = tmp_path / "eval"
    args = ["eval", "--teacher", f"hf:{models['teacher']}", "--model", f"small=hf:{models['s1']}",
            "--model", f"hf:{models['s2']}", "--task", "arithmetic2", "--limit", "5", "--max-new-tokens", "5",
            "--batch-size", "4", "--train-examples", "250", "--train-examples", "1000", "--out", str(out),
            "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert [s["label"] for s in data["students"]] == ["small", "s2"]
    assert data["students"][0]["train_examples"] == 250
    for name in ("report.md", "samples.jsonl", "config.json"):
        assert (out / name).is_file()
    for png in ("student_vs_teacher.png", "score_vs_examples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "ceiling ratio" in report and "small" in report
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and "kl" in samples[0]["small"] and "output" in samples[0]["teacher"]
    json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    # replay from the saved config
    again = CliRunner().invoke(app, ["eval", "--config", str(out / "config.json"),
                                     "--out", str(tmp_path / "eval2")])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "eval2" / "results.json").read_text())["students"][0]["accuracy"] == \
        data["students"][0]["accuracy"]


def test_config_errors_are_precise() -> None:
    with pytest.raises(ValueError, match="task"):
        EvalConfig(students=("hf:x",), task="poetry")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one size per --model"):
        EvalConfig(students=("hf:x", "hf:y"), train_examples=(1,))
    assert parse_model_args(["a=hf:/x/y", "hf:/p/q"]) == (("a", "q"), ("hf:/x/y", "hf:/p/q"))
    with pytest.raises(EvalError, match="not a local model"):
        LoadedModel.load("fake")


def test_write_report_plots_only_what_it_has(models: dict[str, Path], tmp_path: Path) -> None:
    teacher = LoadedModel.load(f"hf:{models['teacher']}", label="teacher", device="cpu")
    items = load_items("arithmetic2", 3)
    cfg = EvalConfig(students=(), limit=3, max_new_tokens=3, kl=False, n_boot=20)
    res = evaluate_models(items, "arithmetic2", teacher, [teacher], cfg)
    write_report(res, tmp_path)
    assert (tmp_path / "student_vs_teacher.png").exists()
    assert not (tmp_path / "score_vs_examples.png").exists()
    assert res.students[0].kl is None


def test_cli_without_a_model_says_what_to_do() -> None:
    from typer.testing import CliRunner

    from stillhouse.cli import app

    result = CliRunner().invoke(app, ["eval", "--task", "arithmetic2"])
    assert result.exit_code != 0 and "--model" in result.output


@pytest.mark.slow
def test_bundled_teacher_against_itself(tmp_path: Path) -> None:
    """The real bundled teacher, evaluated against itself: agreement 1 and KL 0 by construction,
    and a non-trivial accuracy on held-out additions (DESIGN.md measured about 30/96)."""
    teacher = LoadedModel.load("bundled", label="teacher", device="cpu")
    items = load_items("arithmetic2", 16)
    cfg = EvalConfig(students=(), limit=16, n_boot=100)
    res = evaluate_models(items, "arithmetic2", teacher, [teacher], cfg, cache_dir=tmp_path)
    s = res.students[0]
    assert s.agreement.value == 1.0 and s.kl == pytest.approx(0.0, abs=1e-4)
    assert 0.0 < res.teacher.accuracy.value < 1.0
    assert all(len(o) < 80 for o in res.teacher.outputs)


def test_student_with_another_tokenizer_gets_no_kl(models: dict[str, Path], tmp_path: Path) -> None:
    teacher = LoadedModel.load(f"hf:{models['teacher']}", label="teacher", device="cpu")
    other = LoadedModel.load(f"hf:{tiny_model_dir(tmp_path, 'other', 3, extra=('<x>',))}", label="o", device="cpu")
    with pytest.raises(EvalError, match="share a tokenizer"):
        kl_to_teacher(teacher, other, [[1, 2]], [[3]])
    items = load_items("arithmetic2", 2)
    res = evaluate_models(items, "arithmetic2", teacher, [other],
                          EvalConfig(students=(), limit=2, max_new_tokens=2, n_boot=20))
    assert res.students[0].kl is None and res.students[0].accuracy.n == 2


def test_items_file_and_the_students_system_prompt(models: dict[str, Path], tmp_path: Path) -> None:
    """EvalConfig.items evaluates a split written to a file (the first `limit`); the students get system_prompt,
    the teacher its template's default, and a student's cached outputs are keyed by what it was sent."""
    from stillhouse.distill.tasks import arithmetic_splits, write_items
    from stillhouse.teacher.generate import generate

    split = arithmetic_splits(5, 10, 0, seed=3)["heldout"]
    path = write_items(split, tmp_path / "held.jsonl")
    cfg = EvalConfig(students=(), items=str(path), limit=4, max_new_tokens=5, batch_size=3, n_boot=50,
                     system_prompt="Be brief.", kl=False)
    items = load_items(cfg.task, cfg.limit, cfg.seed, cfg.items)
    assert [it.id for it in items] == [it.id for it in split[:4]]
    teacher = LoadedModel.load(f"hf:{models['teacher']}", label="teacher", device="cpu")
    student = LoadedModel.load(f"hf:{models['teacher']}", label="same weights", device="cpu")
    res = evaluate_models(items, cfg.task, teacher, [student], cfg, cache_dir=tmp_path / "cache")
    tok = teacher.tokenizer

    def answers(system: list[dict[str, str]]) -> list[str]:
        prompts = [prompt_ids(tok, system + it.messages) for it in items]
        return [g.text for g in generate(teacher.model, tok, prompts, 5)]

    assert res.teacher.outputs == answers([])
    assert res.students[0].outputs == answers([{"role": "system", "content": "Be brief."}]) != res.teacher.outputs
    assert not res.students[0].cached
    again = evaluate_models(items, cfg.task, teacher, [student], cfg, cache_dir=tmp_path / "cache")
    assert again.students[0].cached and again.students[0].outputs == res.students[0].outputs
    # without the system turn the same weights are sent the teacher's prompts: its cached answers serve
    plain = evaluate_models(items, cfg.task, teacher, [student], EvalConfig(students=(), max_new_tokens=5, kl=False,
                                                                            n_boot=50), cache_dir=tmp_path / "cache")
    assert plain.students[0].cached and plain.students[0].outputs == res.teacher.outputs
