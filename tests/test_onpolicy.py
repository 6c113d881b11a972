"""On-policy distillation (GKD) on a tiny random Llama: white-box and black-box (through a real
``stillhouse serve`` on loopback), every trainable parameter moves, the scores are the teacher's."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stillhouse.distill import onpolicy
from stillhouse.distill.data import encode_rows
from stillhouse.distill.student import make_student
from stillhouse.distill.train import TrainConfig, TrainConfigError, train
from stillhouse.serve.app import ServeConfig, ServerThread, create_app
from stillhouse.teacher.local import LocalTeacher
from test_train import _rows, _tiny_teacher, _write


def _cfg(tmp_path, data, **kw):
    base = {"data": str(data), "out": str(tmp_path / "out"), "student": "pruned:2", "loss": "gkd", "batch_size": 4,
            "lr": 1e-2, "threads": 1, "device": "cpu", "max_new_tokens": 6, "lmbda": 1.0}
    base.update(kw)
    return TrainConfig(**base)


def _changed(tmp_path, before):
    state = torch.load(max((tmp_path / "out" / "checkpoints").iterdir()) / "state.pt", weights_only=False)["model"]
    return [n for n, old in before.items() if torch.equal(state[n], old)]


def test_white_box_gkd_step_on_own_samples_changes_every_parameter(tmp_path, tok):
    teacher = _tiny_teacher(tok)
    data = _write(tmp_path, _rows(tok))
    before = {n: p.detach().clone() for n, p in make_student(teacher, "pruned:2").named_parameters()}
    res = train(_cfg(tmp_path, data), teacher=(teacher, tok, "t"), progress=False, stop_after_steps=1)
    assert res.steps == 1 and _changed(tmp_path, before) == []
    m = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["on_policy"] is True and math.isfinite(m["kd"]) and m["kd"] > 0
    assert 4 <= m["teacher_scored_tokens"] <= 4 * 7  # each of 4 samples: up to 6 tokens and its stop token


@pytest.mark.parametrize("top_k", [5, 0])
def test_black_box_gkd_through_serve_changes_every_parameter(tmp_path, tok, top_k):
    teacher = _tiny_teacher(tok)
    data = _write(tmp_path, _rows(tok))
    before = {n: p.detach().clone() for n, p in make_student(teacher, "pruned:2").named_parameters()}
    served = LocalTeacher(teacher, tok, name="tiny")
    with ServerThread(create_app(served, ServeConfig(teacher="fake"))) as srv:
        cfg = _cfg(tmp_path, data, score_teacher=srv.base_url, score_top_k=top_k)
        train(cfg, teacher=(teacher, tok, "t"), progress=False, stop_after_steps=1)
    served.close()
    assert _changed(tmp_path, before) == []
    m = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["on_policy"] is True and math.isfinite(m["kd"])


def test_black_box_scores_equal_the_teachers_logits_and_bound_the_dense_loss(tmp_path, tok):
    """Off-policy rows scored over HTTP: each row's top-k equals the teacher's own, and the bucketed JSD is a
    lower bound of the dense one that the white-box run computes on the same rows."""
    from stillhouse.distill import losses as L
    from stillhouse.distill.data import collate
    from stillhouse.distill.train import loss_positions

    teacher = _tiny_teacher(tok)
    examples = encode_rows(_rows(tok, n=3), tok, 128)
    served = LocalTeacher(teacher, tok, name="tiny")
    with ServerThread(create_app(served, ServeConfig(teacher="fake"))) as srv:
        scorer = onpolicy.Scorer(srv.base_url, top_k=4)
        scored = scorer.annotate(examples)
        scorer.close()
    served.close()
    assert scorer.tokens_scored == sum(len(onpolicy.completion_ids(e)[1]) for e in examples)
    batch = collate(scored, tok.pad_token_id, scorer.k)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows, cols = loss_positions(batch["labels"])
    t_lp = torch.log_softmax(t_logits[rows, cols], -1)
    top = batch["top_logprobs"][rows, cols + 1]
    ids = batch["top_ids"][rows, cols + 1]
    vals, want = t_lp.topk(4, -1)
    assert torch.equal(ids[:, :4], want) and torch.allclose(top[:, :4], vals, atol=1e-5)
    student = make_student(teacher, "pruned:2")
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s_sel, t_sel = s_logits[rows, cols].unsqueeze(0), t_logits[rows, cols].unsqueeze(0)
    mask = torch.ones(1, len(rows), dtype=torch.bool)
    dense = L.generalized_jsd(s_sel, t_sel, mask, 0.5).item()
    bucket = L.topk_generalized_jsd(s_sel, ids.unsqueeze(0), top.unsqueeze(0), mask, 0.5).item()
    assert 0 < bucket <= dense + 1e-6


def test_on_policy_choice_is_seeded_and_samples_keep_the_prompt(tok):
    picks = [onpolicy.is_on_policy(0, s, 0.5) for s in range(400)]
    assert picks == [onpolicy.is_on_policy(0, s, 0.5) for s in range(400)] and 150 < sum(picks) < 250
    assert not any(onpolicy.is_on_policy(0, s, 0.0) for s in range(50))
    assert all(onpolicy.is_on_policy(0, s, 1.0) for s in range(50))
    teacher = _tiny_teacher(tok)
    exs = encode_rows(_rows(tok, n=2), tok, 128)
    out = onpolicy.sample_completions(teacher, tok, exs, 5, 0.9, seed=3, max_len=128)
    again = onpolicy.sample_completions(teacher, tok, exs, 5, 0.9, seed=3, max_len=128)
    for e, o, a in zip(exs, out, again):
        n = onpolicy.prompt_length(e)
        assert o.input_ids[:n] == e.input_ids[:n] and onpolicy.prompt_length(o) == n
        assert 1 <= len(o.input_ids) - n <= 6 and o.input_ids == a.input_ids


def test_gkd_config_errors(tmp_path):
    for bad, field in [({"lmbda": 1.5}, "lmbda"), ({"gen_temperature": 0.0}, "gen_temperature"),
                       ({"score_top_k": 21}, "score_top_k"), ({"max_new_tokens": 0}, "max_new_tokens"),
                       ({"loss": "sft", "score_teacher": "http://127.0.0.1:1/v1"}, "score_teacher"),
                       ({"score_teacher": "ftp://x"}, "score_teacher"),
                       ({"teacher_temperature": 0.0}, "teacher_temperature"),
                       ({"loss": "sft", "teacher_temperature": 0.5}, "teacher_temperature"),
                       ({"loss": "topk", "teacher_temperature": 0.5}, "teacher_temperature"),
                       ({"score_teacher": "http://127.0.0.1:1/v1", "teacher_temperature": 0.5},
                        "teacher_temperature")]:
        with pytest.raises(TrainConfigError, match=field):
            TrainConfig(data="d", out="o", **{"loss": "gkd", **bad})


@pytest.mark.parametrize("loss", ["gkd", "fkl", "jsd"])
def test_teacher_temperature_sharpens_the_target_toward_the_teachers_greedy_token(loss):
    from stillhouse.distill import losses as L
    from stillhouse.distill.train import compute_losses

    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([[L.IGNORE_INDEX, L.IGNORE_INDEX, 4, 1, 6, 2]])
    n, v = 4, 9  # 4 labelled tokens (positions 1-4 predict them), vocabulary of 9
    s, t = torch.randn(1, n, v, generator=g) * 2, torch.randn(1, n, v, generator=g) * 2
    mask = torch.ones(1, n, dtype=torch.bool)
    cfg = TrainConfig(data="d", out="o", loss=loss, lmbda=1.0, beta=0.5, teacher_temperature=0.5)
    got, _ = compute_losses(cfg, s, {"labels": labels}, t)
    reference = L.forward_kl if loss == "fkl" else lambda a, b, m: L.generalized_jsd(a, b, m, 0.5)
    assert got.item() == pytest.approx(reference(s, t / 0.5, mask).item(), rel=1e-6)
    assert got.item() != pytest.approx(reference(s, t, mask).item(), rel=1e-3)  # it is not the teacher as it is
    # nearly cold: forward KL to the sharpened teacher is cross-entropy on the teacher's argmax (SFT on greedy)
    cold = TrainConfig(data="d", out="o", loss="fkl", teacher_temperature=1e-3)
    greedy_ce = L.sft_loss(s, t.argmax(-1))
    assert compute_losses(cold, s, {"labels": labels}, t)[0].item() == pytest.approx(greedy_ce.item(), rel=1e-4)


def _bench_cfg(tok, tmp_path, **kw):
    from stillhouse.bench.train import BenchTrainConfig

    tdir = tmp_path / "tiny"
    _tiny_teacher(tok).save_pretrained(tdir)
    tok.save_pretrained(tdir)
    base = {"teacher": f"hf:{tdir}", "student": "pruned:2", "examples": 8, "batch_size": 4, "threads": 1,
            "gkd_examples": 8, "gkd_max_new_tokens": 4, "heldout": 4, "out": str(tmp_path / "bench")}
    return BenchTrainConfig(**{**base, **kw})


def test_bench_train_gkd_arms_on_a_tiny_student(tok, tmp_path):
    from stillhouse.bench.train import format_table, run_bench

    cfg = _bench_cfg(tok, tmp_path, arms=("ours_gkd-fp32", "trl_gkd-fp32"),
                     peer_python=(f"trl={tmp_path / 'no-such-python'}",))
    res = run_bench(cfg)
    ours = res["arms"]["ours_gkd-fp32"]
    assert ours["steps"] == 2 and ours["examples_per_s"] > 0 and ours["heldout_n"] == 4
    assert 0 <= ours["on_policy_steps"] <= 2 and len(ours["on_policy_at"]) == ours["on_policy_steps"]
    assert len(ours["step_stamps"]) == 2 and ours["step_stamps"][1] >= ours["step_stamps"][0]
    assert res["arms"]["student-init"]["heldout_n"] == 4
    assert "no such file" in res["arms"]["trl_gkd-fp32"]["skipped"]
    assert "ours_gkd-fp32" in format_table(res)


def test_bench_train_gkd_arms_start_from_the_sft_student(tok, tmp_path):
    """gkd_sft: the cut student learns training-split additions first (none of them held out); student-init and
    both GKD arms start from that student; a second run reuses it."""
    from stillhouse.bench.train import heldout_items, run_bench
    from stillhouse.config import ConfigError

    cfg = _bench_cfg(tok, tmp_path, arms=("ours_gkd-fp32",), gkd_sft=8)
    res = run_bench(cfg)
    sft = tmp_path / "bench" / "gkd-sft" / "final"
    assert res["arms"]["student-init"]["model_dir"] == str(sft)
    ours = json.loads((tmp_path / "bench" / "ours_gkd-fp32" / "final" / "train_config.json").read_text())
    assert ours["student"] == f"model:hf:{sft}" and ours["loss"] == "gkd"
    asked = {json.loads(r)["messages"][1]["content"] for r in (tmp_path / "bench" / "gkd-sft-data.jsonl").open()}
    assert len(asked) == 8 and not asked & {it.messages[0]["content"] for it in heldout_items(200)}
    stamp = (sft / "model.safetensors").stat().st_mtime_ns
    run_bench(cfg)
    assert (sft / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="gkd_sft=2"):
        _bench_cfg(tok, tmp_path, gkd_sft=2)


def test_step_seconds_and_at_lmbda():
    from stillhouse.bench.train import at_lmbda, step_seconds

    # steps 1 and 3 on-policy (3 s, 5 s), step 2 off-policy (1 s); step 0 is the unstamped warm-up
    on, off = step_seconds([10.0, 13.0, 14.0, 19.0], [0, 1, 3])
    assert on == pytest.approx(4.0) and off == pytest.approx(1.0)
    assert at_lmbda(on, off, 16, 0.5) == pytest.approx(16 / 2.5)
    assert at_lmbda(on, off, 16, 1.0) == pytest.approx(4.0)
    assert step_seconds([1.0, 2.0], []) == (None, 1.0) and at_lmbda(None, 1.0, 16, 0.5) is None


@pytest.mark.slow
def test_bench_train_gkd_against_trl_on_a_tiny_student(tok, tmp_path):
    """TRL's GKDTrainer in its pinned virtualenv (skipped when it is not built) on the same tiny student."""
    from stillhouse.bench.peers import PEERS, peers_root, read_marker
    from stillhouse.bench.train import run_bench

    venv = peers_root() / PEERS["trl"].dirname
    if read_marker(venv) is None:
        pytest.skip("TRL's peer virtualenv is not built: stillhouse bench peers --install trl")
    res = run_bench(_bench_cfg(tok, tmp_path, arms=("trl_gkd-fp32",)))["arms"]["trl_gkd-fp32"]
    assert "skipped" not in res, res.get("skipped")
    assert res["steps"] == 2 and res["examples_per_s"] > 0 and res["heldout_n"] == 4
    assert len(res["on_policy_at"]) == res["on_policy_steps"] and len(res["step_stamps"]) == 2


def _word_tokenizer(tmp_path):
    """A tokenizer of another 'family': word-level, its own vocabulary and turn format."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<unk>", "<turn>", "user", "model", "What", "is", "+", "=", "?", "\n"]
    words += [str(i) for i in range(100)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<turn> {{ 'model' if m['role'] == 'assistant' else 'user' }} "
                          "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<turn> model {% endif %}")
    return fast


def test_a_student_of_another_family_learns_from_the_teachers_text(tmp_path, tok):
    """student=model:hf:DIR with its own tokenizer: sequence-level SFT on the teacher's text; the teacher's token
    ids in the rows (another vocabulary) are not used; logit losses are refused."""
    wtok = _word_tokenizer(tmp_path)
    cfg_m = transformers.LlamaConfig(vocab_size=len(wtok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    sdir = tmp_path / "other"
    transformers.AutoModelForCausalLM.from_config(cfg_m).save_pretrained(sdir)
    wtok.save_pretrained(sdir)
    rows = _rows(tok)  # SmolLM2 token ids (up to 49k) that the word vocabulary does not have
    data = _write(tmp_path, rows)
    before = {n: p.detach().clone() for n, p in transformers.AutoModelForCausalLM.from_pretrained(sdir).named_parameters()}
    res = train(_cfg(tmp_path, data, loss="sft", student=f"model:hf:{sdir}", lmbda=0.5),
                teacher=(_tiny_teacher(tok), tok, "t"), progress=False)
    final = transformers.AutoModelForCausalLM.from_pretrained(res.final_dir)
    assert final.config.vocab_size == len(wtok) and res.steps == 2
    assert transformers.AutoTokenizer.from_pretrained(res.final_dir).get_vocab() == wtok.get_vocab()
    assert all(not torch.equal(p, before[n]) for n, p in final.named_parameters())
    with pytest.raises(TrainConfigError, match="another vocabulary.*use loss=sft"):
        train(_cfg(tmp_path, data, loss="gkd", student=f"model:hf:{sdir}", out=str(tmp_path / "gkd")),
              teacher=(_tiny_teacher(tok), tok, "t"), progress=False)
    with pytest.raises(TrainConfigError, match="local model"):
        _cfg(tmp_path, data, loss="sft", student="model:fake")


def test_gkd_goes_on_from_a_student_trained_before(tmp_path, tok):
    """student=model:hf:RUN/final of the teacher's vocabulary (say an SFT'd student) goes on with loss gkd: the
    run starts from those weights, not from a new cut of the teacher, and one on-policy step moves them."""
    teacher = _tiny_teacher(tok)
    saved = make_student(teacher, "pruned:2")
    with torch.no_grad():
        for p in saved.parameters():
            p.add_(0.5)  # far from any cut of the teacher
    sdir = tmp_path / "sft-final"
    saved.save_pretrained(sdir)
    tok.save_pretrained(sdir)
    data = _write(tmp_path, _rows(tok))
    res = train(_cfg(tmp_path, data, student=f"model:hf:{sdir}", lr=1e-4), teacher=(teacher, tok, "t"),
                progress=False)
    final = transformers.AutoModelForCausalLM.from_pretrained(res.final_dir)
    before = dict(saved.named_parameters())
    moved = [(final.state_dict()[n] - p.detach()).abs().max().item() for n, p in before.items()]
    assert max(moved) < 0.05 and sum(m > 0 for m in moved) > len(moved) // 2, moved  # near the saved weights, not a new cut
    m = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["on_policy"] is True and m["teacher_scored_tokens"] > 0
