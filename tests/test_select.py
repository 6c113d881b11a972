"""Choosing the training pass on validation items (TrainConfig.select_on), on a tiny random-init Llama."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stillhouse.distill import select
from stillhouse.distill.tasks import arithmetic_splits, write_items
from stillhouse.distill.train import TrainConfig, TrainConfigError, train


def _teacher(tok):
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _data(tmp_path, n=8):
    rows = [{"messages": [{"role": "user", "content": f"What is {10 + i} + {20 + i}?"},
                          {"role": "assistant", "content": f"{10 + i} + {20 + i} = {30 + 2 * i}"}]} for i in range(n)]
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _fingerprint(model_dir) -> float:
    m = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    return float(m.model.layers[0].mlp.down_proj.weight.detach().double().sum())


def test_the_best_pass_becomes_final_and_the_others_are_deleted(smol_tokenizer, tmp_path, monkeypatch):
    """Scores 1, 3, 2, 3 (faked: a random model answers nothing right): epoch 2 is chosen (earliest of the tie
    with 4), final holds its weights, no other export survives, and a run stopped after epoch 3's checkpoint
    (with a half-written later export left behind, as kill -9 would) resumes without the deleted exports."""
    val = write_items(arithmetic_splits(4, 8, 5)["validation"], tmp_path / "val.jsonl")
    fake = {1: 1, 2: 3, 3: 2, 4: 3}
    prints: dict[int, float] = {}
    seen_dirs: list[set[str]] = []

    def fake_score(model_dir, tok, items, system_prompt, batch_size, device="cpu"):
        k = int(model_dir.name[1:])
        prints[k] = _fingerprint(model_dir)
        seen_dirs.append({d.name for d in model_dir.parent.iterdir()})
        assert len(items) == 5 and system_prompt == "" and batch_size == 3
        return fake[k], [True] * fake[k] + [False] * (5 - fake[k])

    monkeypatch.setattr(select, "score_pass", fake_score)
    cfg = TrainConfig(data=str(_data(tmp_path)), out=str(tmp_path / "run"), student="self", batch_size=4, lr=1e-3,
                      epochs=4, precision="fp32", select_on=str(val), select_batch_size=3, system_prompt="")
    teacher = (_teacher(smol_tokenizer), smol_tokenizer, "tiny")
    train(cfg, teacher=teacher, progress=False, stop_after_steps=6)  # 2 steps an epoch: stops after epoch 3
    run = tmp_path / "run"
    assert sorted(d.name for d in (run / "epochs").iterdir()) == ["e2"], "only the best so far is kept"
    assert seen_dirs == [{"e1"}, {"e1", "e2"}, {"e2", "e3"}]
    (run / "epochs" / "e4").mkdir()  # a killed run's half-written export of the next epoch
    (run / "epochs" / ".tmp-e4-99").mkdir()
    res = train(cfg, teacher=teacher, progress=False)
    assert seen_dirs[3] == {"e2", "e4"}, "the resumed run pruned the stale exports before going on"
    assert res.selection == {"chosen_epoch": 2, "epochs": [
        {"epoch": k, "correct": fake[k], "n": 5, "acc": fake[k] / 5} for k in (1, 2, 3, 4)]}
    assert not (run / "epochs").exists() and res.final_dir == run / "final"
    assert _fingerprint(run / "final") == prints[2] != prints[4]
    saved = json.loads((run / "selection.json").read_text())
    assert saved["chosen_epoch"] == 2 and saved["select_on"] == str(val)
    assert json.loads((run / "final" / "train_result.json").read_text())["selection"]["chosen_epoch"] == 2
    scores = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "select_correct" in x]
    assert [(r["epoch"], r["select_correct"]) for r in scores] == [(0, 1), (1, 3), (2, 2), (3, 3)]
    # resuming a finished run changes nothing
    again = train(cfg, teacher=teacher, progress=False)
    assert again.selection == res.selection and _fingerprint(run / "final") == prints[2]


def test_scoring_is_the_verifier_on_greedy_answers(smol_tokenizer, tmp_path):
    """The real scorer on a real export: the tiny model's greedy answers, checked by the task's verifier."""
    from stillhouse.distill.evaluate import score_outputs
    from stillhouse.teacher.generate import chat_prompt_ids, generate

    items = arithmetic_splits(3, 4, 6)["validation"]
    model = _teacher(smol_tokenizer)
    model.save_pretrained(tmp_path / "m")
    correct, ok = select.score_pass(tmp_path / "m", smol_tokenizer, items, "", 4)
    prompts = [chat_prompt_ids(smol_tokenizer, [{"role": "system", "content": ""}, *it.messages]) for it in items]
    texts = [g.text for g in generate(model, smol_tokenizer, prompts, 16)]
    assert ok == [v.ok for v in score_outputs("arithmetic", items, texts)] and correct == sum(ok)
    assert select.best_epoch([{"epoch": 1, "correct": 0}, {"epoch": 2, "correct": 0}]) == 1


def test_select_on_is_checked_before_training(smol_tokenizer, tmp_path):
    cfg = TrainConfig(data=str(_data(tmp_path)), out=str(tmp_path / "run"), student="self",
                      select_on=str(tmp_path / "missing.jsonl"))
    with pytest.raises(TrainConfigError, match="select_on: task items file .*missing.jsonl not found"):
        train(cfg, teacher=(_teacher(smol_tokenizer), smol_tokenizer, "tiny"), progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(TrainConfigError, match="select_batch_size=0"):
        TrainConfig(data="d", out="o", select_batch_size=0)


def test_export_epochs_keeps_every_pass_beside_the_chosen_final(smol_tokenizer, tmp_path, monkeypatch):
    val = write_items(arithmetic_splits(2, 4, 3)["validation"], tmp_path / "val.jsonl")
    monkeypatch.setattr(select, "score_pass", lambda d, *a, **k: ({"e1": 2, "e2": 1}[d.name], []))
    cfg = TrainConfig(data=str(_data(tmp_path)), out=str(tmp_path / "run"), student="self", batch_size=4, lr=1e-3,
                      epochs=2, precision="fp32", select_on=str(val), export_epochs=True)
    res = train(cfg, teacher=(_teacher(smol_tokenizer), smol_tokenizer, "tiny"), progress=False)
    run = tmp_path / "run"
    assert res.selection["chosen_epoch"] == 1
    assert sorted(d.name for d in (run / "epochs").iterdir()) == ["e1", "e2"]
    assert _fingerprint(run / "final") == _fingerprint(run / "epochs" / "e1") != _fingerprint(run / "epochs" / "e2")
