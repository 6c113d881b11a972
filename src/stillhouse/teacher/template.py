"""What a tokenizer's chat template can write: tools, tool calls, a reasoning field, a thinking prompt.

Chat templates differ in what they render. SmolLM2-135M-Instruct's writes ``role`` and ``content``
and nothing else: no tools, no tool calls, no reasoning. Qwen2.5/3, SmolLM3 and Hermes templates
render ``tools`` into the system turn and ``tool_calls`` as ``<tool_call>`` blocks; Qwen3 and
DeepSeek-R1 render ``reasoning_content`` and may open ``<think>`` in the generation prompt. Rather
than guess from a model's name, :func:`traits` *renders* probe conversations and looks at the text,
so any template is judged by what it does.

Used by ``serve`` (refuse ``tools`` a template cannot take; parse tool calls where it defines a
format; split a ``<think>`` block the prompt opened) and by training data (format tool-call and
reasoning turns the way the student's template writes them, or as text when it cannot).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from stillhouse.teacher.message import THINK_OPEN, TOOL_OPEN

ToolCallFormat = Literal["hermes"]

_PROBE_NAME = "stillhouse_probe_fn"
_PROBE_TOOL = {"type": "function", "function": {"name": _PROBE_NAME, "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}
_PROBE_REASONING = "stillhouse-probe-reasoning"


@dataclass(frozen=True)
class TemplateTraits:
    """What one chat template renders (found by rendering probes, see :func:`traits`)."""

    tools: bool
    """``apply_chat_template(tools=...)`` changes the prompt: the template shows the model its tools."""
    tool_calls: bool
    """An assistant message's ``tool_calls`` appear in the text."""
    tool_call_format: ToolCallFormat | None
    """How the model writes a call, where the template defines it (hermes: ``<tool_call>{json}</tool_call>``)."""
    reasoning_field: str | None
    """The assistant message key whose text the template renders as reasoning (reasoning_content), or None."""
    opens_think: bool
    """The generation prompt ends inside an open ``<think>`` block (the model's text starts as reasoning)."""


_CACHE: dict[str, TemplateTraits] = {}


def render(tok: Any, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
           add_generation_prompt: bool = False) -> str:
    """The template's text for ``messages`` (and ``tools`` when given)."""
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    if tools:
        kwargs["tools"] = tools
    return str(tok.apply_chat_template(for_template(messages), **kwargs))


def render_ids(tok: Any, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = False) -> list[int]:
    """Token ids of :func:`render`'s text (no special tokens added: the template writes its own)."""
    text = render(tok, messages, tools=tools, add_generation_prompt=add_generation_prompt)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as HF chat templates expect them: a tool call's ``arguments`` as an object (OpenAI sends
    a JSON string; templates write ``arguments | tojson``), a null content as ""."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if m.get("content") is None or calls:
            m = dict(m)
            if m.get("content") is None:
                m["content"] = ""
            if calls:
                m["tool_calls"] = [_decoded_call(c) for c in calls]
        out.append(m)
    return out


def _decoded_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args)
        except ValueError:
            pass  # not JSON: the template gets the string
    return {**call, "function": fn}


def traits(tok: Any) -> TemplateTraits:
    """Render probes through ``tok``'s chat template and say what it writes (cached per template)."""
    template = getattr(tok, "chat_template", None)
    if not template:
        return TemplateTraits(False, False, None, None, False)
    if not isinstance(template, str):  # a dict of named templates: the default one decides
        template = json.dumps(template, sort_keys=True)
    found = _CACHE.get(template)
    if found is not None:
        return found
    user = [{"role": "user", "content": "hi"}]
    try:
        plain = render(tok, user, add_generation_prompt=True)
    except Exception:  # a template that cannot render a plain user turn: it can do nothing more either  # noqa: BLE001
        found = TemplateTraits(False, False, None, None, False)
        _CACHE[template] = found
        return found
    tools = _renders(lambda: _PROBE_NAME in render(tok, user, tools=[_PROBE_TOOL], add_generation_prompt=True)
                     and _PROBE_NAME not in plain)
    call = {"id": "call_0", "type": "function", "function": {"name": _PROBE_NAME, "arguments": "{}"}}
    tool_calls = _renders(lambda: _PROBE_NAME in render(
        tok, [*user, {"role": "assistant", "content": "", "tool_calls": [call]}]))
    fmt: ToolCallFormat | None = "hermes" if TOOL_OPEN in template else None
    field = None
    for key in ("reasoning_content", "reasoning", "thinking"):
        if _renders(lambda key=key: _PROBE_REASONING in render(
                tok, [*user, {"role": "assistant", "content": "ok", key: _PROBE_REASONING}])):
            field = key
            break
    opens = plain.rstrip().endswith(THINK_OPEN)
    found = TemplateTraits(tools, tool_calls, fmt if (tools or tool_calls) else None, field, opens)
    _CACHE[template] = found
    return found


def _renders(check: Any) -> bool:
    try:
        return bool(check())
    except Exception:  # a template that raises on the probe does not render that  # noqa: BLE001
        return False


def hermes_tools_system(tools: list[dict[str, Any]]) -> str:
    """The Hermes/Qwen system text that shows a model its tools, for a student whose template has none."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{lines}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
            "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
