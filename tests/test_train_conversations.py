"""Training on conversations: loss on the assistant turns only, reasoning in or out, tool calls in the student's form.

The real SmolLM2 tokenizer (its chat template renders no tools and no reasoning) and a Hermes-style
template that renders both; a tiny random Llama for the gradient checks.
"""

from __future__ import annotations

import copy
import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from stillhouse.distill import data as D
from stillhouse.distill.losses import IGNORE_INDEX
from stillhouse.distill.train import TrainConfig, compute_losses, loss_positions, train

CALL = {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": '{"expr" :"6 * 7"}'}}
TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {
    "type": "object", "properties": {"expr": {"type": "string"}}}}}]
ROW = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5", "reasoning_content": "two plus three is five"},
    {"role": "user", "content": "And 6 * 7? Use the tool."},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    {"role": "assistant", "content": "<think>the tool said 42</think>\n\nIt is 42."},
], "tools": TOOLS}
HERMES = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n"
    "{% endif %}{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def hermes(tok):
    t = copy.deepcopy(tok)
    t.chat_template = HERMES
    return t


def labelled(tok, ex) -> list[str]:
    """The text of each run of labelled tokens (labels equal the input there)."""
    out, run = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            assert lab == t
            run.append(t)
        elif run:
            out.append(tok.decode(run))
            run = []
    if run:
        out.append(tok.decode(run))
    return out


def test_loss_on_assistant_turns_only_smollm2_template(tok):
    ex = D.encode_row(ROW, tok, 1024)
    spans = labelled(tok, ex)
    call = '<tool_call>\n{"name": "calc", "arguments": {"expr": "6 * 7"}}\n</tool_call>'
    assert spans == ["<think>\ntwo plus three is five\n</think>\n\n5<|im_end|>", f"{call}<|im_end|>",
                     "<think>the tool said 42</think>\n\nIt is 42.<|im_end|>"]
    text = tok.decode(ex.input_ids)
    assert "# Tools" in text and '"name": "calc"' in text.split("<|im_start|>user")[0]  # tools shown as text
    assert "<|im_start|>tool\n42<|im_end|>" in text
    dropped = labelled(tok, D.encode_row(ROW, tok, 1024, reasoning="drop"))
    assert dropped == ["5<|im_end|>", f"{call}<|im_end|>", "It is 42.<|im_end|>"]
    seeded = {"messages": [{**m, "weight": 0} if i == 2 else m for i, m in enumerate(ROW["messages"])],
              "tools": json.dumps(TOOLS)}  # tools as the JSON string Parquet/hf exports carry
    assert labelled(tok, D.encode_row(seeded, tok, 1024)) == spans[1:]


def test_tool_calls_and_reasoning_through_a_template_that_renders_them(hermes):
    ex = D.encode_row(ROW, hermes, 1024)
    spans = labelled(hermes, ex)
    assert spans == ["<think>two plus three is five</think>5<|im_end|>",
                     '<tool_call>{"name": "calc", "arguments": {"expr": "6 * 7"}}</tool_call><|im_end|>',
                     "<think>the tool said 42</think>It is 42.<|im_end|>"]
    assert hermes.decode(ex.input_ids).startswith("<|im_start|>system\n<tools>")  # the template's own tools


def test_a_template_that_drops_earlier_reasoning_is_refused(hermes):
    t = copy.deepcopy(hermes)  # like Qwen3: reasoning only in the last assistant turn
    t.chat_template = HERMES.replace("{% if m.reasoning_content %}", "{% if m.reasoning_content and loop.last %}")
    with pytest.raises(D.DataError, match=r"renders the assistant turn messages\[2\] differently"):
        D.encode_row(ROW, t, 1024)
    assert len(labelled(t, D.encode_row(ROW, t, 1024, reasoning="drop"))) == 3


def test_masked_positions_contribute_zero_gradient(tok):
    from conftest import build_tiny_model

    model = build_tiny_model(tok, seed=1)
    ex = D.encode_row(ROW, tok, 1024)
    batch = D.collate([ex, D.encode_row({"prompt": "hi", "completion": "hello"}, tok)], tok.pad_token_id)
    cfg = TrainConfig(data="x", out="y", loss="sft")
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full.retain_grad()
    sel = loss_positions(batch["labels"])
    loss, _ = compute_losses(cfg, full[sel].unsqueeze(0), batch)
    loss.backward()
    grad_norm = full.grad.abs().sum(-1)  # (B, T): how much each position's prediction moves the loss
    target = batch["labels"][:, 1:]
    counts = target != IGNORE_INDEX
    assert torch.all(grad_norm[:, :-1][~counts] == 0) and torch.all(grad_norm[:, -1] == 0)
    assert torch.all(grad_norm[:, :-1][counts] > 0)
    # the loss is the plain mean of -log p(label) over the assistant tokens (a naive reference)
    logp = torch.log_softmax(full.detach()[:, :-1].float(), -1)
    ref = -torch.stack([logp[b, t, target[b, t]] for b, t in counts.nonzero().tolist()]).mean()
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    assert int(counts[0].sum()) == sum(len(tok.encode(s, add_special_tokens=False))
                                      for s in labelled(tok, ex))  # exactly the assistant spans


def test_training_on_exported_conversations(tmp_path, tok):
    import asyncio

    from stillhouse.distill.export import ExportConfig, export_run
    from stillhouse.distill.harvest import HarvestConfig, run_harvest
    from stillhouse.teacher.fake import FakeTeacher

    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": f"c{i}", "prompt": f"What is {i} + 2?", "turns": [f"And {i} * 3?"]} for i in range(6)]
        + [{"id": f"t{i}", "prompt": f"Compute {i} * 7", "tools": TOOLS, "turns": [[{"role": "tool", "content": "7"}]]}
           for i in range(2)]))
    asyncio.run(run_harvest(HarvestConfig(prompts=str(src), teacher="fake", out=str(tmp_path / "run")),
                            teacher=FakeTeacher(reasoning="reasoning")))
    export_run(ExportConfig(run_dir=str(tmp_path / "run"), out=str(tmp_path / "e"), heldout=0))
    rows = D.read_rows(tmp_path / "e" / "train.jsonl")
    assert len(rows) == 8 and all(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in rows)
    for mode in ("keep", "drop"):
        exs = D.encode_rows(rows, tok, 1024, reasoning=mode)
        n = [len(labelled(tok, e)) for e in exs]
        assert n == [2] * 8  # both teacher turns of every conversation carry loss
        spans = [s for e in exs for s in labelled(tok, e)]
        calls = [s for s in spans if s.startswith("<tool_call>")]
        assert len(calls) == 2  # the tool conversations' first turns: calls, written as Hermes text
        thoughts = sum("Step by step" in s for s in spans)
        assert thoughts == (len(spans) - len(calls) if mode == "keep" else 0)
    from conftest import build_tiny_model

    teacher = build_tiny_model(tok, seed=2, max_positions=1024)
    cfg = TrainConfig(data=str(tmp_path / "e" / "train.jsonl"), out=str(tmp_path / "out"), student="pruned:1",
                      batch_size=4, lr=1e-2, threads=1, device="cpu", max_len=1024, reasoning="drop")
    res = train(cfg, teacher=(teacher, tok, "t"), progress=False, stop_after_steps=1)
    assert res.steps == 1
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["reasoning"] == "drop"
