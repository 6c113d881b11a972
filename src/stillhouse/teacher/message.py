"""The parts of an assistant message: its answer, its chain of thought, its tool calls.

OpenAI-compatible reasoning servers return a chain of thought in one of three places:

- a ``reasoning_content`` field beside ``content`` (DeepSeek's API, vLLM's reasoning parsers);
- a ``reasoning`` field (OpenRouter, Ollama and others);
- a ``<think>...</think>`` block leading the ``content`` (a reasoning model served without a parser).

Tool calls come as OpenAI ``tool_calls`` (``[{"id", "type": "function", "function": {"name",
"arguments"}}]``, ``arguments`` a JSON *string*); a local model writes them as text in its chat
template's format, which :func:`parse_tool_calls` reads for the Hermes format (``<tool_call>{"name":
..., "arguments": {...}}</tool_call>``, what Qwen2.5/3, SmolLM3 and Hermes templates define).

Pure functions on strings and dicts (plus :class:`ThinkSplitter`, the streaming form of
:func:`split_think`); no model, no I/O. Used by ``serve`` (splitting a model's text), the harvest
store and export (reading what a server sent), and training data (formatting turns).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

REASONING_FIELDS = ("reasoning_content", "reasoning")
"""Message fields that carry a chain of thought, in the order they are looked for."""
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_REASONING_TEMPLATE = "<think>\n{reasoning}\n</think>\n\n{answer}"
"""How a reasoning that came in a field is written into the content (the DeepSeek-R1 / Qwen3 layout)."""
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


def split_think(text: str, started: bool = False) -> tuple[str | None, str]:
    """``(reasoning, answer)`` of a text that may lead with a ``<think>`` block; ``(None, text)`` without one.

    The block may follow whitespace. ``reasoning`` is exactly what lies between the tags; ``answer`` is
    what follows ``</think>``, less its leading whitespace (the layout between the two). An unclosed block
    (a completion cut by max_tokens) is all reasoning, with answer "". ``started``: the prompt itself
    opened the block (a chat template whose generation prompt ends with ``<think>``), so the text is
    reasoning up to the first ``</think>``.
    """
    if started:
        body = text
    else:
        s = text.lstrip()
        if not s.startswith(THINK_OPEN):
            return None, text
        body = s[len(THINK_OPEN):]
    end = body.find(THINK_CLOSE)
    if end < 0:
        return body, ""
    return body[:end], body[end + len(THINK_CLOSE):].lstrip()


def field_reasoning(message: dict[str, Any] | None) -> tuple[str, str] | None:
    """``(field name, text)`` of the reasoning field a message carries, or None."""
    if message:
        for name in REASONING_FIELDS:
            value = message.get(name)
            if isinstance(value, str) and value:
                return name, value
    return None


def reasoning_of(text: str | None, message: dict[str, Any] | None) -> str | None:
    """The chain of thought: a reasoning field, else a ``<think>`` block leading ``text``; None if none."""
    found = field_reasoning(message)
    if found is not None:
        return found[1]
    if text and THINK_OPEN in text:
        return split_think(text)[0]
    return None


def answer_of(text: str | None, message: dict[str, Any] | None) -> str:
    """The answer without its chain of thought: ``text`` less a leading ``<think>`` block (when the
    reasoning came in a field, ``text`` is the answer as it is)."""
    text = text or ""
    if field_reasoning(message) is None and THINK_OPEN in text:
        return split_think(text)[1]
    return text


def inline_reasoning(reasoning: str, answer: str, template: str) -> str:
    """``template`` with ``{reasoning}`` and ``{answer}`` filled in (plain replacement, so braces in
    either text stay as they are)."""
    if "{reasoning}" not in template or "{answer}" not in template:
        raise ValueError(f"reasoning template {template!r} must contain {{reasoning}} and {{answer}}")
    head, _, rest = template.partition("{reasoning}")
    mid, _, tail = rest.partition("{answer}")
    return head + reasoning + mid + answer + tail


class ThinkSplitter:
    """:func:`split_think` for a stream: feed text pieces, get ``(reasoning piece, answer piece)`` back.

    Text that might still turn out to be a tag (``<thi`` at the end of a piece) is held back until
    the next piece decides it. Joining everything :meth:`feed` and :meth:`flush` return gives exactly
    what :func:`split_think` gives for the whole text (``None`` reasoning as "").
    """

    def __init__(self, started: bool = False):
        self._state = "reasoning" if started else "start"
        self._buf = ""

    def feed(self, piece: str) -> tuple[str, str]:
        self._buf += piece
        reasoning, answer = "", ""
        while self._buf:
            buf = self._buf
            if self._state == "start":
                s = buf.lstrip()
                if s.startswith(THINK_OPEN):
                    self._state, self._buf = "reasoning", s[len(THINK_OPEN):]
                    continue
                if not s or THINK_OPEN.startswith(s):
                    break  # whitespace, or a prefix of the tag: wait for more
                self._state, self._buf = "answer", ""
                answer += buf
            elif self._state == "reasoning":
                end = buf.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += buf[:end]
                    self._state, self._buf = "gap", buf[end + len(THINK_CLOSE):]
                    continue
                keep = _partial_suffix(buf, THINK_CLOSE)
                reasoning += buf[:len(buf) - keep]
                self._buf = buf[len(buf) - keep:]
                break
            elif self._state == "gap":
                s = buf.lstrip()
                self._buf = s
                if not s:
                    break
                self._state = "answer"
            else:
                answer += buf
                self._buf = ""
        return reasoning, answer

    def flush(self) -> tuple[str, str]:
        """What is held back, at the end of the stream."""
        buf, self._buf = self._buf, ""
        if self._state == "start":
            return "", buf
        if self._state == "reasoning":
            return buf, ""
        return "", "" if self._state == "gap" else buf


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def tool_call_id(seed_text: str, index: int) -> str:
    """A deterministic OpenAI-style tool-call id (``call_`` + 24 hex digits) for call ``index`` of a text."""
    return "call_" + hashlib.sha256(f"{index}\x00{seed_text}".encode()).hexdigest()[:24]


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Hermes-format tool calls in a model's text: ``(content, tool_calls)``.

    Each ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` block whose body is a JSON object
    with a string ``name`` becomes an OpenAI tool call (``arguments`` encoded as a JSON string, as the
    API sends it); ``content`` is the text outside the blocks, stripped. A block that does not parse
    stays in the content. No blocks: ``(text, [])``.
    """
    if TOOL_OPEN not in text:
        return text, []
    calls: list[dict[str, Any]] = []
    rest: list[str] = []
    pos = 0
    while True:
        start = text.find(TOOL_OPEN, pos)
        if start < 0:
            rest.append(text[pos:])
            break
        end = text.find(TOOL_CLOSE, start)
        stop = len(text) if end < 0 else end + len(TOOL_CLOSE)
        body = text[start + len(TOOL_OPEN):end if end >= 0 else len(text)]
        call = _hermes_call(body)
        rest.append(text[pos:start])
        if call is None:
            rest.append(text[start:stop])
        else:
            name, args = call
            calls.append({"id": tool_call_id(text, len(calls)), "type": "function",
                          "function": {"name": name, "arguments": args}})
        pos = stop
        if end < 0:
            break
    if not calls:
        return text, []
    return "".join(rest).strip(), calls


def _hermes_call(body: str) -> tuple[str, str] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def format_tool_calls(tool_calls: list[dict[str, Any]]) -> str:
    """OpenAI tool calls as Hermes-format text (what :func:`parse_tool_calls` reads back): the form a
    student whose chat template has no tool calls is trained on."""
    blocks = []
    for call in tool_calls:
        fn = call.get("function") or {}
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass  # not JSON: kept as the string it is
        blocks.append(f"{TOOL_OPEN}\n{json.dumps({'name': fn.get('name'), 'arguments': args}, ensure_ascii=False)}"
                      f"\n{TOOL_CLOSE}")
    return "\n".join(blocks)


def assistant_message(text: str, message: dict[str, Any] | None) -> dict[str, Any]:
    """The OpenAI assistant message of an answer: role, content (None when it was null), other fields."""
    out: dict[str, Any] = {"role": "assistant", "content": text}
    if message:
        out.update(message)
    return out
