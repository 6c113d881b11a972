"""A deterministic fake teacher for tests and dry runs.

Answers depend only on (seed, messages, sampling params, completion index), so reruns
reproduce byte for byte. Arithmetic questions ("What is 12 + 30?") get the right sum
most of the time and a near miss otherwise, which gives verifiers something to reject.
Tokens are whitespace-separated words; logprobs are derived from a hash.

Like a reasoning model with tools, it can also answer with

- a chain of thought (:func:`reasoning_text`), in a ``reasoning_content`` or ``reasoning`` field or
  as a ``<think>`` block leading the content (``reasoning=``; a request that sends
  ``reasoning_effort`` gets ``reasoning_content`` when ``reasoning="off"``);
- a tool call (:func:`fake_tool_call`) when the request sends ``tools`` (and ``tool_choice`` is not
  "none") and the last message is not a tool's result; the answer to a tool's result is text again.
  A tool call has a null content and finish_reason ``tool_calls``, as OpenAI's API sends it.

The fake OpenAI server (:mod:`stillhouse.testing.fakeserver`) answers the same way with the helpers
here, so both cover reasoning and tools byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from typing import Any, Literal, TypeGuard

from stillhouse.teacher.base import (
    ChatResult,
    Completion,
    Message,
    Prompt,
    SamplingParams,
    ScoreResult,
    TokenLogprobs,
)

ReasoningForm = Literal["off", "reasoning_content", "reasoning", "think"]
REASONING_FORMS: tuple[str, ...] = ("off", "reasoning_content", "reasoning", "think")

_SUM = re.compile(r"(-?\d+)\s*([+\-*])\s*(-?\d+)")


def _is_chat(prompt: Prompt) -> TypeGuard[list[Message]]:
    """Whether ``prompt`` is chat messages: empty, or not starting with a token id."""
    return not (prompt and isinstance(prompt[0], int))


def _digest(*parts: object) -> int:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def reasoning_text(question: str, answer: str) -> str:
    """The fake chain of thought for a question and its answer. It carries the bytes that a careless
    pipeline changes (quotes, backslash, tab, newlines, U+2028, non-ASCII, an emoji), so a byte-exact
    test fails if any of them is altered."""
    return (f"The question: \u00ab{question}\u00bb.\nStep by step \u2192 \"{answer}\"; a tab\there, a "
            f"backslash \\ and a slash /,\u2028then a check \u2713 \U0001f9ee.\n")


def fake_tool_call(tools: list[Any], tool_choice: Any, question: str, index: int) -> dict[str, Any] | None:
    """The tool call the fakes make for a request with ``tools`` (None for tool_choice "none").

    The named function of a ``{"type": "function", "function": {"name": ...}}`` choice, else the first
    tool; its first parameter gets the question, the others their position. ``arguments`` is JSON with
    unusual spacing (``" , "`` and ``" :"``), so re-encoding it anywhere changes its bytes."""
    if tool_choice == "none" or not tools:
        return None
    fns = [t.get("function") or {} for t in tools if isinstance(t, dict)]
    fn = fns[0] if fns else {}
    if isinstance(tool_choice, dict):
        want = (tool_choice.get("function") or {}).get("name")
        fn = next((f for f in fns if f.get("name") == want), fn)
    props = list((fn.get("parameters") or {}).get("properties") or {})
    args: dict[str, Any] = {p: question if i == 0 else i for i, p in enumerate(props)} or {"input": question}
    h = hashlib.sha256(f"{index}|{question}|{fn.get('name')}".encode()).hexdigest()
    return {"id": f"call_{h[:24]}", "type": "function",
            "function": {"name": str(fn.get("name") or "tool"),
                         "arguments": json.dumps(args, ensure_ascii=False, separators=(" , ", " :"))}}


def fake_message(text: str, question: str, extra: dict[str, Any], messages: list[Any], form: str,
                 index: int) -> tuple[str | None, dict[str, Any] | None, str]:
    """``(content, further message fields, finish_reason)`` of a fake answer ``text`` to ``question``,
    with reasoning in ``form`` and a tool call when ``extra`` (the request's further fields) has tools."""
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if last.get("role") != "tool":
        call = fake_tool_call(extra.get("tools") or [], extra.get("tool_choice"), question, index)
        if call is not None:
            return None, {"content": None, "tool_calls": [call]}, "tool_calls"
    if form == "off" and extra.get("reasoning_effort"):
        form = "reasoning_content"
    if form == "off":
        return text, None, "stop"
    thought = reasoning_text(question, text)
    if form == "think":
        return f"<think>\n{thought}</think>\n\n{text}", None, "stop"
    return text, {form: thought}, "stop"


class FakeTeacher:
    """Deterministic teacher; ``error_rate`` of answers to arithmetic are off by one.

    ``reasoning``: how answers carry a chain of thought (off, reasoning_content, reasoning, think)."""

    def __init__(self, seed: int = 0, error_rate: float = 0.3, name: str = "fake-teacher",
                 reasoning: ReasoningForm = "off"):
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate={error_rate}: must be between 0 and 1")
        if reasoning not in REASONING_FORMS:
            raise ValueError(f"reasoning={reasoning!r}: choose from {', '.join(REASONING_FORMS)}")
        self.seed = seed
        self.error_rate = error_rate
        self.reasoning = reasoning
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    @property
    def revision(self) -> str:
        return f"fake-{self.seed}"

    def answer(self, messages: list[Message], params: SamplingParams, index: int) -> str:
        """The text this teacher gives for one completion."""
        last = str(messages[-1].get("content", "")) if messages else ""
        p = asdict(params)
        if not p["extra"]:
            del p["extra"]  # answers as before the field existed
        h = _digest(self.seed, messages, p, index if params.temperature > 0 else 0)
        m = _SUM.search(last)
        if m:
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            value = a + b if op == "+" else a - b if op == "-" else a * b
            if (h % 1000) / 1000 < self.error_rate:
                value += 1 if h % 2 else -1
            return f"{a} {op} {b} = {value}"
        words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
        count = 3 + h % 8
        return " ".join(words[(h >> (3 * i)) % len(words)] for i in range(count))

    async def chat(self, messages: list[Message], params: SamplingParams) -> ChatResult:
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages) + 3 * len(messages)
        completions = []
        extra = params.extra_fields()
        question = str(messages[-1].get("content", "")) if messages else ""
        for i in range(params.n):
            text = self.answer(messages, params, i)
            content, message, finish = fake_message(text, question, extra, messages, self.reasoning, i)
            if content != text:  # a tool call (null content) or an inline chain of thought
                completions.append(Completion(
                    text=content or "", finish_reason=finish,  # type: ignore[arg-type]
                    prompt_tokens=prompt_tokens, completion_tokens=len((content or "").split()) + 1,
                    message=message))
                continue
            words = text.split()
            finish = "stop"
            if len(words) > params.max_tokens:
                words, finish = words[: params.max_tokens], "length"
            lp = None
            if params.logprobs:
                h = _digest(self.seed, words, i)
                logprobs = [-((h >> j) % 50) / 100 for j in range(len(words))]
                k = params.top_logprobs
                lp = TokenLogprobs(
                    tokens=[w + " " for w in words],
                    logprobs=logprobs,
                    top_tokens=[[w + " "] + [f"alt{r} " for r in range(1, k)] for w in words] if k else [],
                    top_logprobs=[[x] + [x - r for r in range(1, k)] for x in logprobs] if k else [],
                )
            completions.append(
                Completion(
                    text=" ".join(words),
                    finish_reason=finish,  # type: ignore[arg-type]
                    prompt_tokens=prompt_tokens,
                    completion_tokens=len(words) + sum(len(v.split()) for v in (message or {}).values()
                                                       if isinstance(v, str)),
                    logprobs=lp,
                    message=message,
                )
            )
        return ChatResult(completions=completions, model=self.name)

    async def resolve(self) -> str:
        return self.name

    async def chat_json(self, messages_json: str, params: SamplingParams) -> ChatResult:
        return await self.chat(json.loads(messages_json), params)

    async def score(self, prompt: Prompt, completion: list[int] | str, top_logprobs: int = 0) -> ScoreResult:
        """Deterministic logprobs from a hash of (seed, prompt, completion so far); tokens are the
        completion's words (text) or ids (``tok<ID>``)."""
        if not 0 <= top_logprobs <= 20:
            raise ValueError(f"top_logprobs={top_logprobs}: must be between 0 and 20")
        tokens = completion.split() if isinstance(completion, str) else [f"tok{t}" for t in completion]
        if not tokens:
            raise ValueError("completion is empty: give at least one token to score")
        ids = None if isinstance(completion, str) else list(completion)
        lps = [-((_digest(self.seed, prompt, tokens[:j + 1]) % 400) / 100) - 0.01 for j in range(len(tokens))]
        lp = TokenLogprobs(tokens=tokens, logprobs=lps, token_ids=ids)
        if top_logprobs:  # the scored token first, then made-up alternatives, each less likely
            lp.top_tokens = [[t] + [f"alt{r}" for r in range(1, top_logprobs)] for t in tokens]
            lp.top_logprobs = [[x - 0.5 * r for r in range(top_logprobs)] for x in lps]
            if ids is not None:
                lp.top_ids = [[t] + [(t + r) % 50_000 for r in range(1, top_logprobs)] for t in ids]
        n_prompt = sum(len(str(m.get("content", "")).split()) for m in prompt) + 3 * len(prompt) \
            if _is_chat(prompt) else len(prompt)
        return ScoreResult(lp, n_prompt, self.name)

    async def aclose(self) -> None:
        return None
