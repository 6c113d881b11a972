"""Training on a tiny random-init Llama built from a config, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import math
import re

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stillhouse.distill import data as D
from stillhouse.distill.student import count_parameters, kept_layers, make_student, parse_student
from stillhouse.distill.train import TrainConfig, TrainConfigError, train


def _tiny_teacher(tok, layers: int = 4):
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _rows(tok, n: int = 8, topk: int = 3):
    rows = []
    for i in range(n):
        a, b = 10 + i, 20 + 2 * i
        ans = f"{a} + {b} = {a + b}"
        ids = tok.encode(ans, add_special_tokens=False)
        g = torch.Generator().manual_seed(i)
        top_ids = [[t] + torch.randint(0, len(tok), (topk - 1,), generator=g).tolist() for t in ids + [tok.eos_token_id]]
        top_lps = [[-0.2, -2.5, -3.0][:topk] for _ in top_ids]
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": ans}],
                     "token_ids": ids, "top_ids": top_ids, "top_logprobs": top_lps, "correct": i % 2 == 0})
    return rows


def _write(tmp_path, rows):
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_student_specs_and_pruning(tok):
    teacher = _tiny_teacher(tok, layers=6)
    assert kept_layers(30, parse_student("pruned:10")) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert kept_layers(6, parse_student("every:2")) == [0, 2, 4]
    s = make_student(teacher, "pruned:3")
    assert s.config.num_hidden_layers == 3
    keep = kept_layers(6, parse_student("pruned:3"))
    for new, old in enumerate(keep):
        assert torch.equal(s.model.layers[new].mlp.up_proj.weight, teacher.model.layers[old].mlp.up_proj.weight)
    assert torch.equal(s.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert count_parameters(s) < count_parameters(teacher)
    fresh = make_student(teacher, "fresh:2", seed=1)
    assert not torch.equal(fresh.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    selfcopy = make_student(teacher, "self")
    assert selfcopy.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()
    for bad in ("pruned", "pruned:x", "self:3", "half"):
        with pytest.raises(ValueError):
            parse_student(bad)
    with pytest.raises(ValueError, match="only 6 layers"):
        make_student(teacher, "pruned:9")
    ends = make_student(teacher, "layers:0,1,5")
    assert str(parse_student("layers:0,1,5")) == "layers:0,1,5" and ends.config.num_hidden_layers == 3
    assert torch.equal(ends.model.layers[2].mlp.up_proj.weight, teacher.model.layers[5].mlp.up_proj.weight)
    for bad in ("layers:", "layers:2,1", "layers:1,1", "layers:a,b"):
        with pytest.raises(ValueError, match="layer indices"):
            parse_student(bad)
    with pytest.raises(ValueError, match="layers 0..5"):
        make_student(teacher, "layers:0,6")


def test_encode_masks_prompt_and_aligns_topk(tok):
    row = _rows(tok, 1)[0]
    ex = D.encode_row(row, tok)
    n_prompt = sum(1 for x in ex.labels if x == D.IGNORE_INDEX)
    comp = [x for x in ex.labels if x != D.IGNORE_INDEX]
    assert comp == row["token_ids"] + [tok.eos_token_id]
    assert ex.input_ids[n_prompt:] == comp
    assert ex.top_ids[n_prompt] == row["top_ids"][0] and ex.top_ids[n_prompt - 1] == []
    batch = D.collate([ex, D.encode_row(_rows(tok, 2)[1], tok)], tok.pad_token_id, k=3)
    assert batch["top_ids"].shape[-1] == 3
    lab = batch["labels"][0, n_prompt]
    assert batch["top_ids"][0, n_prompt, 0] == lab  # teacher's top-1 is the label in these rows
    with pytest.raises(D.DataError, match="assistant"):
        D.encode_row({"messages": [{"role": "user", "content": "hi"}]}, tok)


def _cfg(tmp_path, data, **kw):
    base = {"data": str(data), "out": str(tmp_path / "out"), "student": "pruned:2", "loss": "sft",
            "batch_size": 4, "lr": 1e-2, "threads": 1, "device": "cpu"}
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("loss", ["sft", "topk", "fkl", "jsd"])
def test_one_step_changes_every_trainable_parameter(tmp_path, tok, loss):
    teacher = _tiny_teacher(tok)
    data = _write(tmp_path, _rows(tok))
    cfg = _cfg(tmp_path, data, loss=loss, alpha=0.5 if loss != "sft" else 0.0)
    before = {n: p.detach().clone() for n, p in make_student(teacher, "pruned:2").named_parameters()}
    res = train(cfg, teacher=(teacher, tok, "test"), progress=False, stop_after_steps=1)
    assert res.steps == 1
    ckpt = max((tmp_path / "out" / "checkpoints").iterdir())
    state = torch.load(ckpt / "state.pt", weights_only=False)["model"]
    for name, old in before.items():
        assert not torch.equal(state[name], old), f"{name} did not change after one step ({loss})"
    m = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(m["ce"]) and (loss == "sft" or math.isfinite(m["kd"]))


@pytest.mark.parametrize("loss", ["sft", "topk"])
def test_frozen_embeddings_stay_and_everything_else_trains(tmp_path, tok, loss):
    teacher = _tiny_teacher(tok)
    data = _write(tmp_path, _rows(tok))
    cfg = _cfg(tmp_path, data, loss=loss, alpha=0.0, freeze_embeddings=True)  # topk: pure KD, CE only logged
    before = {n: p.detach().clone() for n, p in make_student(teacher, "pruned:2").named_parameters()}
    train(cfg, teacher=(teacher, tok, "test"), progress=False, stop_after_steps=1)
    state = torch.load(max((tmp_path / "out" / "checkpoints").iterdir()) / "state.pt", weights_only=False)["model"]
    emb = "model.embed_tokens.weight"
    assert torch.equal(state[emb], before[emb]), "frozen embeddings (tied to the head) changed"
    for name, old in before.items():
        if name != emb:
            assert not torch.equal(state[name], old), f"{name} did not change after one step"
    m = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(m["ce"]) and m["ce"] > 0


def test_eager_and_sdpa_attention_train_alike_and_the_export_keeps_no_choice(tmp_path, tok):
    teacher = _tiny_teacher(tok)
    data = _write(tmp_path, _rows(tok))  # rows of different lengths: the batches are padded
    first = {}
    for attention in ("eager", "sdpa"):
        cfg = _cfg(tmp_path, data, attention=attention, precision="fp32", out=str(tmp_path / attention))
        train(cfg, teacher=(teacher, tok, "test"), progress=False)
        log = [json.loads(x) for x in (tmp_path / attention / "metrics.jsonl").read_text().splitlines()]
        first[attention] = log[0]["loss"]
        info = json.loads((tmp_path / attention / "run_info.json").read_text())
        assert info["attention"] == attention
        exported = json.loads((tmp_path / attention / "final" / "config.json").read_text())
        assert exported.get("_attn_implementation") in (None, "sdpa"), "the training kernel leaked into the export"
    assert first["eager"] == pytest.approx(first["sdpa"], rel=1e-4)
    assert _cfg(tmp_path, data).attention == "auto"
    with pytest.raises(TrainConfigError, match="attention"):
        _cfg(tmp_path, data, attention="flash")


def test_gradient_checkpointing_keeps_fewer_activations_and_trains_the_same(tmp_path, tok):
    teacher = _tiny_teacher(tok)
    data = _write(tmp_path, _rows(tok))
    saved, states, losses = {}, {}, {}
    for on in (False, True):
        out = tmp_path / f"checkpointing-{on}"
        cfg = _cfg(tmp_path, data, gradient_checkpointing=on, precision="fp32", out=str(out))
        saved[on] = 0

        def pack(t, on=on):  # counts the tensors the forward passes keep for backward (none inside a checkpoint)
            saved[on] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            train(cfg, teacher=(teacher, tok, "test"), progress=False, stop_after_steps=2)
        states[on] = torch.load(max((out / "checkpoints").iterdir()) / "state.pt", weights_only=False)["model"]
        losses[on] = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert saved[True] < saved[False] / 2, f"checkpointing kept {saved[True]} tensors for backward, {saved[False]} without"
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    for name, weight in states[False].items():
        assert torch.allclose(states[True][name], weight, atol=1e-6), f"{name} differs with checkpointing"


@pytest.mark.parametrize("loss", ["sft", "fkl"])
def test_micro_batches_give_the_whole_batch_gradient(tmp_path, tok, monkeypatch, loss):
    import stillhouse.distill.train as T

    teacher = _tiny_teacher(tok)
    data = _write(tmp_path, _rows(tok))  # rows of different lengths: each part is padded on its own
    grads: dict[int, list] = {}
    real_optimizer = T.make_optimizer

    def recording_optimizer(params, cfg):  # keeps the gradient each step applies
        opt = real_optimizer(params, cfg)
        apply = opt.step

        def step(*args, **kwargs):
            grads.setdefault(cfg.micro_batch, []).append([p.grad.clone() for p in params])
            return apply(*args, **kwargs)

        opt.step = step
        return opt

    monkeypatch.setattr(T, "make_optimizer", recording_optimizer)
    logs = {}
    for micro in (0, 3, 1):  # 0: the batch of 4 at once; 3: parts of 3 and 1; 1: four parts
        out = tmp_path / f"micro-{micro}"
        cfg = _cfg(tmp_path, data, loss=loss, alpha=0.5, micro_batch=micro, precision="fp32", out=str(out))
        train(cfg, teacher=(teacher, tok, "test"), progress=False, stop_after_steps=2)
        logs[micro] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for micro in (3, 1):
        assert [m["loss"] for m in logs[micro]] == pytest.approx([m["loss"] for m in logs[0]], rel=1e-5)
        assert [m["examples_seen"] for m in logs[micro]] == [4, 8]
        # the first step's gradient, from the same weights (after it, Adam's first update, about lr * sign(g),
        # turns rounding differences in gradients near 0 into visible ones)
        for g0, g1 in zip(grads[0][0], grads[micro][0]):
            assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-7), f"micro_batch={micro}: the gradient differs"
    with pytest.raises(TrainConfigError, match="micro_batch=8 is larger than batch_size=4"):
        _cfg(tmp_path, data, micro_batch=8)


def test_resume_continues_and_final_export_loads(tmp_path, tok):
    teacher = _tiny_teacher(tok)
    data = _write(tmp_path, _rows(tok))
    cfg = _cfg(tmp_path, data, epochs=2, save_every=1)
    train(cfg, teacher=(teacher, tok, "test"), progress=False, stop_after_steps=3)
    with (tmp_path / "out" / "metrics.jsonl").open("a") as f:  # logged after the checkpoint, then killed mid-line
        f.write('{"step": 4, "loss": 9.9}\n{"step": 5, "lo')
    seen = []
    res = train(cfg, teacher=(teacher, tok, "test"), progress=False, on_step=lambda m: seen.append(m["step"]))
    assert seen == [4], "resume must continue from step 3, not start over"
    logged = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4] and logged[-1]["loss"] != 9.9
    assert res.steps == 4 and res.examples_seen == 16
    # An uninterrupted run lands on the same weights (the data order and RNG are restored).
    cfg2 = _cfg(tmp_path, data, epochs=2, out=str(tmp_path / "out2"))
    train(cfg2, teacher=(teacher, tok, "test"), progress=False)
    a = transformers.AutoModelForCausalLM.from_pretrained(str(res.final_dir))
    b = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out2" / "final"))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    assert (res.final_dir / "train_config.json").exists()
    import resource

    peak_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak so far (MiB)
    assert 100 < res.peak_memory_mib <= peak_now, "the run's peak is this process's RSS peak at its end"
    result = json.loads((res.final_dir / "train_result.json").read_text())
    assert result["peak_memory_mib"] == round(res.peak_memory_mib)
    assert transformers.AutoTokenizer.from_pretrained(str(res.final_dir)).eos_token_id == tok.eos_token_id
    from stillhouse.teacher.bundled import load_model  # what `stillhouse serve --teacher hf:DIR` loads

    served, _tok, rev = load_model(f"hf:{res.final_dir}")
    assert rev.startswith("sha256:") and served.config.num_hidden_layers == 2
    # A half-written checkpoint directory (no progress.json) is ignored.
    (tmp_path / "out" / "checkpoints" / "step-9999999").mkdir()
    from stillhouse.distill.train import _checkpoints

    assert _checkpoints(tmp_path / "out")[-1].name != "step-9999999"


def test_resume_refuses_a_changed_recipe_and_takes_a_changed_run_setting(tmp_path, tok):
    teacher = _tiny_teacher(tok)
    data = _write(tmp_path, _rows(tok))
    train(_cfg(tmp_path, data, epochs=2, save_every=1), teacher=(teacher, tok, "t"), progress=False,
          stop_after_steps=1)
    for change, named in (({"lr": 3e-4}, "lr: 0.01 -> 0.0003"), ({"seed": 1}, "seed: 0 -> 1"),
                          ({"loss": "fkl"}, "loss: 'sft' -> 'fkl'")):
        with pytest.raises(TrainConfigError, match=re.escape(named)):
            train(_cfg(tmp_path, data, epochs=2, save_every=1, **change), teacher=(teacher, tok, "t"),
                  progress=False)
    import typer
    from typer.testing import CliRunner

    from stillhouse.distill import train_commands

    app = typer.Typer()
    train_commands.register(app)
    app.command("noop")(lambda: None)  # a second verb keeps typer in multi-command mode
    r = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "out"), "--student", "pruned:2",
                                 "--batch-size", "4", "--lr", "3e-4", "--epochs", "2", "--save-every", "1",
                                 "--threads", "1", "--device", "cpu"])
    assert r.exit_code == 2 and "lr: 0.01 -> 0.0003" in r.output and "new --out" in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    seen = []  # how it runs and how far it goes may change: one more epoch, another thread count
    train(_cfg(tmp_path, data, epochs=3, save_every=1, threads=1), teacher=(teacher, tok, "t"), progress=False,
          on_step=lambda m: seen.append(m["step"]), stop_after_steps=3)
    assert seen == [2, 3], "the run resumes after step 1"


def test_snapshots_equal_separate_runs_on_prefix(tmp_path, tok):
    teacher = _tiny_teacher(tok)
    data = _write(tmp_path, _rows(tok))
    res = train(_cfg(tmp_path, data, snapshot_at=(4,)), teacher=(teacher, tok, "t"), progress=False)
    sep = train(_cfg(tmp_path, data, max_examples=4, out=str(tmp_path / "sep")), teacher=(teacher, tok, "t"),
                progress=False)
    a = transformers.AutoModelForCausalLM.from_pretrained(str(res.snapshots[4]))
    b = transformers.AutoModelForCausalLM.from_pretrained(str(sep.final_dir))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_lora_trains_adapters_only_and_exports_merged(tmp_path, tok):
    pytest.importorskip("peft")
    teacher = _tiny_teacher(tok)
    data = _write(tmp_path, _rows(tok))
    cfg = _cfg(tmp_path, data, lora_r=4, student="self", only_correct=True)
    res = train(cfg, teacher=(teacher, tok, "t"), progress=False)
    assert res.examples_seen == 4  # only the rows marked correct
    info = json.loads((tmp_path / "out" / "run_info.json").read_text())
    assert 0 < info["trainable_parameters"] < info["student_parameters"] / 5
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(res.final_dir))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    diff = sum(float((p - q).detach().abs().sum()) for p, q in zip(merged.parameters(), teacher.parameters()))
    assert diff > 0, "merged LoRA weights must differ from the base"


def test_bad_config_and_data_errors(tmp_path, tok):
    with pytest.raises(TrainConfigError, match="loss"):
        TrainConfig(data="x", out="y", loss="kl")  # type: ignore[arg-type]
    with pytest.raises(TrainConfigError, match="student"):
        TrainConfig(data="x", out="y", student="half")
    with pytest.raises(TrainConfigError, match="alpha"):
        TrainConfig(data="x", out="y", alpha=2)
    rows = _rows(tok)
    for r in rows:
        del r["top_ids"], r["top_logprobs"]
    data = _write(tmp_path, rows)
    with pytest.raises(D.DataError, match="top-k"):
        train(_cfg(tmp_path, data, loss="topk"), teacher=(_tiny_teacher(tok), tok, "t"), progress=False)


def test_a_bad_row_is_named_by_its_line_in_the_file_after_the_shuffle(tmp_path, tok):
    rows = _rows(tok)
    rows[2]["messages"][0]["content"] = "What is " + " + ".join(str(i) for i in range(60)) + "?"
    data = _write(tmp_path, rows)
    for shuffle in (True, False):  # the shuffle moves row 3 elsewhere; the error names the file's line 3
        with pytest.raises(D.DataError, match=r"data\.jsonl:3: the prompt fills max_len=64"):
            train(_cfg(tmp_path, data, max_len=64, shuffle=shuffle, seed=1), teacher=(_tiny_teacher(tok), tok, "t"),
                  progress=False)
    with pytest.raises(D.DataError, match=r"data\.jsonl:3: the prompt fills max_len=64"):
        D.encode_file(data, tok, 64)  # what the training bench reads its data with
    assert [e.input_ids for e in D.encode_file(data, tok)] == [e.input_ids for e in D.encode_rows(rows, tok)]


def test_answer_logits_equal_full_forward_at_selected_positions(tok):
    from stillhouse.distill.train import answer_logits, loss_positions

    model = _tiny_teacher(tok)
    batch = D.collate([D.encode_row(r, tok) for r in _rows(tok, 3)], tok.pad_token_id)
    sel = loss_positions(batch["labels"])
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        part = answer_logits(model, batch["input_ids"], batch["attention_mask"], sel)
    assert part.shape == (1, len(sel[0]), full.shape[-1])
    assert torch.allclose(part[0], full[sel], atol=1e-5)
    # col t predicts label t+1: every selected target is an answer token
    assert (batch["labels"][sel[0], sel[1] + 1] != D.IGNORE_INDEX).all()


def test_frozen_head_is_cast_once_and_again_after_it_changes(tok):
    from stillhouse.distill.train import head_logits

    head = _tiny_teacher(tok).get_output_embeddings()
    head.weight.requires_grad_(False)
    hidden = torch.randn(5, head.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = head(hidden)
        first = head_logits(head, hidden)
        copy = head._stillhouse_cast[1]
        head_logits(head, hidden)
        assert head._stillhouse_cast[1] is copy  # reused, not recast
        with torch.no_grad():
            head.weight.mul_(2.0)
        again = head_logits(head, hidden)
        assert torch.equal(again, head(hidden))  # the changed weight, not the stale copy
    assert first.dtype == torch.bfloat16 and torch.equal(first, expected)
    assert not torch.equal(again, first)


def test_train_cli_reports_bad_input_clearly(tmp_path):
    import typer
    from typer.testing import CliRunner

    from stillhouse.distill import train_commands

    app = typer.Typer()
    train_commands.register(app)

    @app.command("noop")
    def _noop() -> None:  # a second verb keeps typer in multi-command mode
        pass

    runner = CliRunner()
    assert "topk" in runner.invoke(app, ["train", "--help"]).output
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                            "--student", "half"])
    assert r.exit_code == 2 and "pruned:N" in r.output
    r = runner.invoke(app, ["train", "--config", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_bf16_mixed_precision_trains_close_to_fp32(tok, tmp_path):
    """bf16 autocast keeps fp32 weights and fp32 losses; its first loss is near the fp32 one."""
    data = _write(tmp_path, _rows(tok, 8))
    runs = {}
    for prec in ("fp32", "bf16"):
        cfg = TrainConfig(data=str(data), out=str(tmp_path / prec), student="self", loss="sft", batch_size=4,
                          lr=1e-3, precision=prec, shuffle=False)
        res = train(cfg, teacher=(_tiny_teacher(tok), tok, "tiny"), progress=False)
        info = json.loads((tmp_path / prec / "run_info.json").read_text())
        assert info["precision"] == prec
        rows = [json.loads(x) for x in (tmp_path / prec / "metrics.jsonl").read_text().splitlines()]
        runs[prec] = rows
        served = transformers.AutoModelForCausalLM.from_pretrained(str(res.final_dir))
        assert all(p.dtype == torch.float32 for p in served.parameters())
    first32, first16 = runs["fp32"][0]["loss"], runs["bf16"][0]["loss"]
    assert math.isfinite(first16) and abs(first16 - first32) < 0.05 * first32
    assert runs["bf16"][-1]["loss"] < first16


def test_precision_is_validated():
    with pytest.raises(TrainConfigError, match="precision"):
        TrainConfig(data="d.jsonl", out="o", precision="fp16")  # type: ignore[arg-type]


def test_bench_train_arms_on_a_tiny_student(tok, tmp_path):
    """The bench's plumbing end to end on a tiny model: same tokens in every arm, MFU from the peak."""
    from stillhouse.bench.train import BenchTrainConfig, run_bench

    tdir = tmp_path / "tiny"
    _tiny_teacher(tok).save_pretrained(tdir)
    tok.save_pretrained(tdir)
    cfg = BenchTrainConfig(teacher=f"hf:{tdir}", student="self", examples=16, batch_size=4, threads=1,
                           arms=("peak-fp32", "plain-fp32", "ours-fp32", "trl-fp32"),
                           peer_python=(f"trl={tmp_path / 'no-such-python'}",), out=str(tmp_path / "bench"),
                           peak_size=256)
    res = run_bench(cfg)["arms"]
    assert res["plain-fp32"]["tokens"] == res["ours-fp32"]["tokens"] > 16 * 10
    assert res["plain-fp32"]["steps"] == res["ours-fp32"]["steps"] == 4
    assert 0 < res["ours-fp32"]["hfu"] < res["ours-fp32"]["mfu"]
    assert "no such file" in res["trl-fp32"]["skipped"]  # a missing peer python: the arm says why


def test_export_epochs_writes_one_model_per_epoch(tok, tmp_path):
    data = _write(tmp_path, _rows(tok, 8))
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), student="self", loss="sft", batch_size=4,
                      lr=1e-3, epochs=3, export_epochs=True, precision="fp32")
    res = train(cfg, teacher=(_tiny_teacher(tok), tok, "tiny"), progress=False)
    dirs = sorted(p.name for p in (tmp_path / "run" / "epochs").iterdir())
    assert dirs == ["e1", "e2", "e3"]
    e1, e3, final = (transformers.AutoModelForCausalLM.from_pretrained(str(d)) for d in
                     (tmp_path / "run" / "epochs" / "e1", tmp_path / "run" / "epochs" / "e3", res.final_dir))
    w = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(e3.state_dict()[w], final.state_dict()[w])
    assert not torch.equal(e1.state_dict()[w], final.state_dict()[w])
