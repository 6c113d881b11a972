"""The parts of an assistant message: reasoning splits (whole and streamed), tool-call text, response parsing."""

from __future__ import annotations

import json
import random

import pytest

from stillhouse.teacher.message import (
    ThinkSplitter,
    answer_of,
    format_tool_calls,
    inline_reasoning,
    parse_tool_calls,
    reasoning_of,
    split_think,
)
from stillhouse.teacher.openai import parse_chat_response

TEXTS = [
    "<think>a\nb</think>\n\nanswer", "  <think></think>x", "<think>unclosed to the end", "no block at all",
    "answer first <think>late</think>", "<thin", "<think>a</thi", "\n\n", "", "<think>x</think>", "<<think>>",
    "<think>one</think>two</think>three", "\u2028<think>é\\\"</think> 🧮",
]


@pytest.mark.parametrize("started", [False, True])
def test_streamed_split_equals_the_whole_split_under_any_chunking(started):
    rng = random.Random(7)
    for text in TEXTS:
        want = split_think(text, started)
        for _ in range(60):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(0, 6)))) if len(text) > 1 else []
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
            sp = ThinkSplitter(started)
            r, a = "", ""
            for p in pieces:
                dr, da = sp.feed(p)
                r, a = r + dr, a + da
            dr, da = sp.flush()
            r, a = r + dr, a + da
            assert (r, a) == (want[0] or "", want[1]), (text, pieces)


def test_split_think_cases():
    assert split_think("<think>R</think>\n\nA") == ("R", "A")
    assert split_think("plain") == (None, "plain")
    assert split_think("<think>cut off") == ("cut off", "")
    assert split_think("R</think>A", started=True) == ("R", "A")
    assert reasoning_of("t", {"reasoning": "R"}) == "R" and answer_of("t", {"reasoning": "R"}) == "t"
    assert reasoning_of("<think>R</think>A", None) == "R" and answer_of("<think>R</think>A", None) == "A"
    assert inline_reasoning("r {answer}", "a {reasoning}", "<t>{reasoning}</t>{answer}") == "<t>r {answer}</t>a {reasoning}"
    with pytest.raises(ValueError, match="must contain"):
        inline_reasoning("r", "a", "{reasoning}")


def test_tool_call_text_round_trip():
    calls = [{"id": "x", "type": "function", "function": {"name": "calc", "arguments": '{"expr": "2 + 3", "n": [1]}'}},
             {"id": "y", "type": "function", "function": {"name": "look", "arguments": "{}"}}]
    text = "Let me check.\n" + format_tool_calls(calls)
    content, back = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in back] == \
        [("calc", {"expr": "2 + 3", "n": [1]}), ("look", {})]
    assert len({c["id"] for c in back}) == 2 and back == parse_tool_calls(text)[1]  # ids: distinct, deterministic
    broken = "<tool_call>{not json}</tool_call> and text"
    assert parse_tool_calls(broken) == (broken, [])
    assert parse_tool_calls("no calls") == ("no calls", [])


def test_openai_parsing_keeps_every_message_field_as_sent():
    msg = {"role": "assistant", "content": None, "reasoning_content": "é\u2028\"q\"",
           "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a" :1}'}}],
           "refusal": None, "audio": []}
    raw = json.dumps({"choices": [{"index": 0, "message": msg, "finish_reason": "tool_calls"}],
                      "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    (c,), _, _ = parse_chat_response(raw)
    assert c.text == "" and c.finish_reason == "tool_calls"
    assert c.message == {"content": None, "reasoning_content": msg["reasoning_content"],
                         "tool_calls": msg["tool_calls"]}
    assert c.reasoning == msg["reasoning_content"] and c.tool_calls == msg["tool_calls"]
    plain = json.dumps({"choices": [{"message": {"role": "assistant", "content": "hi", "reasoning_content": None,
                                                 "tool_calls": []}}]}).encode()
    (c,), _, _ = parse_chat_response(plain)
    assert c.message is None and c.text == "hi"
