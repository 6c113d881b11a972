"""`stillhouse serve` answers reasoning and tool calls the way OpenAI-compatible reasoning servers do.

A tiny random Llama over the real SmolLM2 tokenizer is made to write a chosen text (a logits
processor forces its tokens), so the whole path runs for real: chat template, continuous batching,
uvicorn on loopback, JSON and SSE. Two templates: SmolLM2's own (no tools) and a Hermes-style one
that renders tools and tool calls.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from stillhouse.serve.app import ServeConfig, ServerThread, create_app
from stillhouse.teacher.fake import FakeTeacher, fake_tool_call
from stillhouse.teacher.local import LocalTeacher
from stillhouse.teacher.template import traits
from test_serve import post, sse

HERMES = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>\n{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}\n"
    "</tools>\nCall a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% if think %}<think>\n{% endif %}"
    "{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "calc", "description": "Evaluate arithmetic",
                                            "parameters": {"type": "object",
                                                           "properties": {"expr": {"type": "string"}}}}}]
THOUGHT = "\nadd the units: 2 + 3 → 5 \"ok\"\n"
ANSWER = "The answer is 5."


def forcing(tok: Any, text: str) -> Any:
    """A logits processor that makes every row write ``text`` and then end its turn."""
    import torch

    target = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]

    def proc(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = torch.full_like(scores, -1e9)
        for r in range(ids.shape[0]):
            row = ids[r].tolist()
            done = next((j for j in range(min(len(target), len(row)), 0, -1) if row[-j:] == target[:j]), 0)
            out[r, target[min(done, len(target) - 1)]] = 0.0
        return out

    return proc


def serve(model: Any, tok: Any, text: str, **cfg: Any) -> ServerThread:
    teacher = LocalTeacher(model, tok, name="tiny", revision="tiny-0", logits_processors=[forcing(tok, text)])
    return ServerThread(create_app(teacher, ServeConfig(teacher="hf:/tiny", **cfg), close_teacher=True))


@pytest.fixture(scope="module")
def hermes_tok(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = HERMES
    return tok


def test_templates_are_judged_by_what_they_render(smol_tokenizer, hermes_tok):
    smol = traits(smol_tokenizer)
    assert (smol.tools, smol.tool_calls, smol.tool_call_format, smol.opens_think) == (False, False, None, False)
    h = traits(hermes_tok)
    assert (h.tools, h.tool_calls, h.tool_call_format, h.opens_think) == (True, True, "hermes", False)


def test_a_think_block_comes_back_as_reasoning_content(tiny_model, smol_tokenizer):
    text = f"<think>{THOUGHT}</think>\n\n{ANSWER}"
    with serve(tiny_model, smol_tokenizer, text) as srv:
        status, body = post(srv.base_url, {"messages": [{"role": "user", "content": "2 + 3?"}], "max_tokens": 60,
                                           "logprobs": True})
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT}
        assert choice["finish_reason"] == "stop"
        assert "".join(e["token"] for e in choice["logprobs"]["content"]) == text  # logprobs cover every token
        chunks = sse(srv.base_url, {"messages": [{"role": "user", "content": "2 + 3?"}], "max_tokens": 60,
                                    "logprobs": True})
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1] if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THOUGHT
    assert "".join(d.get("content", "") for d in deltas) == ANSWER
    first_answer = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all("content" not in d or not d["content"] for d in deltas[:first_answer])  # reasoning streams first
    entries = [e for c in chunks[:-1] if c["choices"] for e in ((c["choices"][0].get("logprobs") or {})
                                                                 .get("content") or [])]
    assert "".join(e["token"] for e in entries) == text  # every token's logprob streamed once, in order


def test_reasoning_parser_off_and_the_reasoning_field(tiny_model, smol_tokenizer):
    text = f"<think>{THOUGHT}</think>{ANSWER}"
    with serve(tiny_model, smol_tokenizer, text, reasoning_parser="off") as srv:
        _, body = post(srv.base_url, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 60})
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    with serve(tiny_model, smol_tokenizer, text, reasoning_field="reasoning") as srv:
        _, body = post(srv.base_url, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 60})
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER, "reasoning": THOUGHT}


def test_a_think_block_the_prompt_opened(tiny_model, hermes_tok):
    tok = copy.deepcopy(hermes_tok)
    tok.chat_template = HERMES.replace("{% if think %}<think>\n{% endif %}", "<think>\n")
    assert traits(tok).opens_think
    thought = THOUGHT.strip()  # the prompt's own "\n" must not look like the start of the forced text
    with serve(tiny_model, tok, f"{thought}</think>\n{ANSWER}") as srv:
        _, body = post(srv.base_url, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 60})
        chunks = sse(srv.base_url, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 60})
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER, "reasoning_content": thought}
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1] if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == thought
    assert "".join(d.get("content", "") for d in deltas) == ANSWER


def test_tools_for_a_template_without_them_get_a_clear_400(tiny_model, smol_tokenizer):
    with serve(tiny_model, smol_tokenizer, ANSWER) as srv:
        status, body = post(srv.base_url, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
        assert status == 400 and body["error"]["code"] == "tools_unsupported"
        assert "chat template without tool support" in body["error"]["message"] and body["error"]["param"] == "tools"
        call = {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{}"}}
        status, body = post(srv.base_url, {"messages": [
            {"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "5"}]})
        assert status == 400 and "cannot render an assistant turn's 'tool_calls'" in body["error"]["message"]
        status, body = post(srv.base_url, {"messages": [{"role": "user", "content": "x"},
                                                        {"role": "tool", "content": "5"}], "max_tokens": 8})
        assert status == 200  # a tool result alone is a turn SmolLM2's template can write


def test_tool_calls_are_read_out_of_the_text(tiny_model, hermes_tok):
    text = '<tool_call>\n{"name": "calc", "arguments": {"expr": "2 + 3"}}\n</tool_call>'
    with serve(tiny_model, hermes_tok, text) as srv:
        msgs = [{"role": "user", "content": "What is 2 + 3?"}]
        _, plain = post(srv.base_url, {"messages": msgs, "max_tokens": 60})
        status, body = post(srv.base_url, {"messages": msgs, "max_tokens": 60, "tools": TOOLS})
        assert status == 200, body
        assert body["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 10  # the tools are in the prompt
        choice = body["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"] == {"name": "calc", "arguments": json.dumps({"expr": "2 + 3"})}
        assert plain["choices"][0]["message"] == {"role": "assistant", "content": text}  # no tools: no parsing
        _, none = post(srv.base_url, {"messages": msgs, "max_tokens": 60, "tools": TOOLS, "tool_choice": "none"})
        assert none["choices"][0]["message"]["content"] == text
        status, refused = post(srv.base_url, {"messages": msgs, "tools": TOOLS, "tool_choice": "required"})
        assert status == 400 and refused["error"]["param"] == "tool_choice"
        chunks = sse(srv.base_url, {"messages": msgs, "max_tokens": 60, "tools": TOOLS})
        # the call's result goes back in, and the template renders the whole exchange
        follow = [*msgs, choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "5"}]
        status, again = post(srv.base_url, {"messages": follow, "max_tokens": 60, "tools": TOOLS})
        assert status == 200 and again["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1] if c["choices"]]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [{k: v for k, v in tc.items() if k != "index"} for tc in calls] == [call]
    assert not "".join(d.get("content", "") or "" for d in deltas)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"]][-1] == "tool_calls"


def test_the_fake_teacher_behind_serve_answers_tools_and_reasoning():
    with ServerThread(create_app(FakeTeacher(seed=1), ServeConfig(teacher="fake:1"))) as srv:
        msgs = [{"role": "user", "content": "What is 2 + 3?"}]
        _, body = post(srv.base_url, {"messages": msgs, "tools": TOOLS})
        chunks = sse(srv.base_url, {"messages": msgs, "tools": TOOLS})
    assert body["choices"][0]["message"] == {"role": "assistant", "content": None,
                                             "tool_calls": [fake_tool_call(TOOLS, None, msgs[0]["content"], 0)]}
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert any(d.get("tool_calls") for c in chunks[:-1] if c["choices"] for d in [c["choices"][0]["delta"]])
    with ServerThread(create_app(FakeTeacher(seed=1, reasoning="think"), ServeConfig(teacher="fake:1"))) as srv:
        _, split = post(srv.base_url, {"messages": msgs})
    msg = split["choices"][0]["message"]
    assert msg["content"].startswith("2 + 3 = ") and "Step by step" in msg["reasoning_content"]
