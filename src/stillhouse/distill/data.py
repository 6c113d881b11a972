"""Training data for the student: rows -> token ids, assistant-only labels and teacher top-k.

Input rows are JSON objects (one per line in a ``.jsonl`` file: a curated file or a
harvest export). What a row needs:

* ``messages``: the chat, ending with the assistant's answer (the teacher's text), or
  ``prompt`` + ``completion`` strings (a single user turn and its answer).
* optionally ``token_ids``: the completion's token ids as the teacher produced them
  (a local teacher gives them; otherwise the completion text is tokenized).
* optionally top-k logprobs for ``--loss topk``, either flat (``top_ids``,
  ``top_logprobs``) or nested as a harvested ``logprobs`` object with ``top_ids`` /
  ``top_tokens`` and ``top_logprobs``. Position j holds the teacher's distribution for
  completion token j; one extra position (the end of turn) may follow. When only token
  strings are present they are mapped to ids with the student's tokenizer (teacher and
  student must share it); a string that is not exactly one token is dropped from that
  position (its mass goes to the tail bucket).
* rows with ``correct: false`` are kept or skipped by the caller, not here.

The sequence is the chat template's prompt (with the generation header) followed by the
completion ids and the tokenizer's EOS (``<|im_end|>`` for SmolLM2-Instruct), so the
student learns to stop. Labels are -100 on the prompt; teacher top-k tensors are aligned
with labels, and positions without teacher data hold a one-hot on the label, for which
top-k KD reduces to cross-entropy.

Conversations (a harvest export's rows, OpenAI messages): the loss falls on every assistant turn and on
nothing else (system, user and tool turns are masked), except assistant turns marked ``"weight": 0``
(context the export did not take from the teacher). An earlier assistant turn's labels are its tokens
as the template renders them, through its end-of-turn token; the template must render earlier turns
the same way whether or not later ones follow (a DataError says when it does not).

Reasoning (``reasoning_content`` / ``reasoning`` fields, or a ``<think>`` block leading the content):
``reasoning="keep"`` trains on it, in the field the student's template renders when it has one,
else inline before the answer (:data:`~stillhouse.teacher.message.DEFAULT_REASONING_TEMPLATE`; a
block that came inline stays as it came); ``"drop"`` trains on the bare answers.

Tools: a row's ``tools`` (a list, or its JSON string) and its assistant turns' ``tool_calls`` are
written by the student's template when it renders them (:func:`stillhouse.teacher.template.traits`);
a template without tools (SmolLM2's) gets the Hermes form as text instead: the tools in the system
turn and each call as a ``<tool_call>`` block in the content, what a Hermes-format parser reads back.
When a turn's text changes this way, its harvested ``token_ids`` and top-k no longer spell it and are
not used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stillhouse.distill.losses import IGNORE_INDEX
from stillhouse.jsonl import TOO_DEEP, iter_jsonl
from stillhouse.teacher.message import (
    DEFAULT_REASONING_TEMPLATE,
    REASONING_FIELDS,
    THINK_OPEN,
    answer_of,
    format_tool_calls,
    inline_reasoning,
    reasoning_of,
)
from stillhouse.teacher.template import TemplateTraits, hermes_tools_system, render_ids, traits

ReasoningUse = Literal["keep", "drop"]


class DataError(ValueError):
    """A training row or file is unusable; the message names the row and the fix."""


@dataclass
class Example:
    """One tokenized training example."""

    input_ids: list[int]
    labels: list[int]
    top_ids: list[list[int]] | None = None
    """Per position of ``input_ids``: teacher top-k ids (None where no teacher data)."""
    top_logprobs: list[list[float]] | None = None


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.jsonl`` file (or a ``.json`` list), with errors that give the line number."""
    return [row for _, row in read_numbered_rows(path)]


def read_numbered_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line, row) for each row of a ``.jsonl`` file (a ``.json`` list: its position from 1), so that errors
    found after a shuffle still name the row's place in the file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"training data {p} does not exist: pass a curated .jsonl file or a harvest export")
    if p.suffix == ".json":
        try:
            rows = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: not valid JSON ({exc}); a .json data file holds one list of rows") from exc
        except RecursionError:
            raise DataError(f"{p}: {TOO_DEEP}; fix or remove the row") from None
        if not isinstance(rows, list):
            raise DataError(f"{p}: a .json data file must hold a list of rows")
        return list(enumerate(rows, 1))
    numbered = list(iter_jsonl(p, DataError, "one training row (a JSON object) per line", objects=False))
    if not numbered:
        raise DataError(f"{p} holds no rows")
    return numbered


def _chat(row: dict[str, Any], where: str) -> tuple[list[dict[str, Any]], str]:
    if "messages" in row:
        msgs = row["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise DataError(f"{where}: 'messages' must end with the assistant's answer")
        return msgs[:-1], str(msgs[-1].get("content") or "")
    if "prompt" in row and "completion" in row:
        return [{"role": "user", "content": str(row["prompt"])}], str(row["completion"])
    raise DataError(f"{where}: a row needs 'messages' (ending with the assistant turn) or 'prompt' + 'completion'")


def _teacher_topk(row: dict[str, Any], tok: Any) -> tuple[list[list[int]], list[list[float]]] | None:
    nested = row.get("logprobs")
    src: dict[str, Any] = nested if isinstance(nested, dict) else row
    lps = src.get("top_logprobs")
    if not lps:
        return None
    ids = src.get("top_ids")
    if ids is None:
        tokens = src.get("top_tokens")
        if not tokens:
            return None
        ids, kept = [], []
        for pos_tokens, pos_lps in zip(tokens, lps):
            pi, pl = [], []
            for t, lp in zip(pos_tokens, pos_lps):
                enc = tok.encode(t, add_special_tokens=False)
                if len(enc) == 1:
                    pi.append(enc[0])
                    pl.append(lp)
            ids.append(pi)
            kept.append(pl)
        lps = kept
    return [list(map(int, r)) for r in ids], [list(map(float, r)) for r in lps]


def prompt_ids(tok: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of the chat prompt up to and including the assistant header."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def with_system(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """``messages`` with ``system_prompt`` as the system turn when they have none (None = leave as is,
    so the chat template's default system prompt applies)."""
    if system_prompt is None or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def _tools(row: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as exc:
            raise DataError(f"{where}: 'tools' is a string but not JSON ({exc})") from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise DataError(f"{where}: 'tools' must be a list of OpenAI tool objects (or its JSON string)")
    return tools


def prepare_message(m: dict[str, Any], tr: TemplateTraits, reasoning: ReasoningUse = "keep") -> dict[str, Any]:
    """One message as the student's template should see it: reasoning kept (in the template's field,
    else inline) or dropped, tool calls in the template's form or as Hermes text, no ``weight`` key."""
    out = {k: v for k, v in m.items() if k != "weight"}
    if m.get("role") != "assistant":
        return out
    content = m.get("content")
    text = content if isinstance(content, str) else ""
    thought = reasoning_of(text, m)
    if thought is not None:
        answer = answer_of(text, m)
        for key in REASONING_FIELDS:
            out.pop(key, None)
        if reasoning == "drop":
            text = answer
        elif tr.reasoning_field is not None:
            text = answer
            out[tr.reasoning_field] = thought
        elif not any(m.get(k) for k in REASONING_FIELDS):
            pass  # it came inline: trained as it came
        else:
            text = inline_reasoning(thought, answer, DEFAULT_REASONING_TEMPLATE)
    calls = m.get("tool_calls")
    if calls and not tr.tool_calls:
        out.pop("tool_calls")
        text = f"{text}\n{format_tool_calls(calls)}" if text else format_tool_calls(calls)
    out["content"] = text
    return out


def _with_tools_text(msgs: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tools shown in the system turn as Hermes text (for a template that renders no tools)."""
    text = hermes_tools_system(tools)
    if msgs and msgs[0].get("role") == "system":
        return [{**msgs[0], "content": f"{msgs[0].get('content') or ''}\n\n{text}"}, *msgs[1:]]
    return [{"role": "system", "content": text}, *msgs]


def _turn_span(tok: Any, before: list[int], through: list[int], where: str) -> list[int]:
    """The tokens an assistant turn adds (``through`` less ``before``), up to and including its EOS."""
    if through[:len(before)] != before:
        raise DataError(f"{where}: the chat template does not render this conversation as its prompt plus the "
                        "answer (the rendered prefix changes); train on rows of one turn (export "
                        "--conversations turns) or drop the reasoning (--reasoning drop)")
    span = through[len(before):]
    eos = tok.eos_token_id
    return span[:span.index(eos) + 1] if eos in span else span


def encode_row(row: dict[str, Any], tok: Any, max_len: int = 512, where: str = "row",
               system_prompt: str | None = None, reasoning: ReasoningUse = "keep") -> Example:
    """Tokenize one row into an :class:`Example`: labels on the assistant turns only (see the module doc)."""
    msgs, answer = _chat(row, where)
    if tok.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token to its end-of-turn token")
    msgs = with_system(msgs, system_prompt)
    last = dict(row["messages"][-1]) if "messages" in row else {"role": "assistant", "content": answer}
    tools = _tools(row, where)
    special = (bool(tools) or len(last) > 2 or THINK_OPEN in answer
               or any(len(m) > 2 or m.get("role") in ("assistant", "tool") for m in msgs))
    if not special:  # one plain answer (the common row): the prompt then the answer, as it always was
        return _finish(row, tok, prompt_ids(tok, msgs), answer, True, max_len, where, [], [])
    tr = traits(tok)
    prep = [prepare_message(m, tr, reasoning) for m in msgs]
    last_p = prepare_message(last, tr, reasoning)
    weights = [m.get("weight", 1) for m in msgs]
    t_tools = tools if tr.tools else None
    if tools and not tr.tools:
        prep = _with_tools_text(prep, tools)
        weights = [1] * (len(prep) - len(weights)) + weights
    try:
        before = render_ids(tok, prep, tools=t_tools, add_generation_prompt=True)
        earlier = []  # (start, tokens) of each earlier assistant turn that carries loss
        for i, m in enumerate(prep):
            if m.get("role") == "assistant" and weights[i] != 0:
                b = render_ids(tok, prep[:i], tools=t_tools, add_generation_prompt=True)
                span = _turn_span(tok, b, render_ids(tok, prep[:i + 1], tools=t_tools), where)
                if before[len(b):len(b) + len(span)] != span:
                    raise DataError(f"{where}: the chat template renders the assistant turn messages[{i}] "
                                    "differently once later turns follow it (e.g. it drops earlier reasoning); train "
                                    "on rows of one turn (export --conversations turns) or with --reasoning drop")
                earlier.append((len(b), span))
        trained_last = last.get("weight", 1) != 0
        if set(last_p) <= {"role", "content"}:  # the answer is text: tokens of the text, then EOS
            same = last_p["content"] == answer
            return _finish(row, tok, before, last_p["content"], same, max_len, where, earlier, [],
                           trained=trained_last)
        span = _turn_span(tok, before, render_ids(tok, [*prep, last_p], tools=t_tools), where)
    except DataError:
        raise
    except Exception as exc:  # the template refused the conversation (a role it has no place for, ...)
        raise DataError(f"{where}: the student's chat template cannot render this row ({type(exc).__name__}: "
                        f"{exc})") from exc
    return _finish(row, tok, before, None, False, max_len, where, earlier, span, trained=trained_last)


def _finish(row: dict[str, Any], tok: Any, p: list[int], answer: str | None, same: bool, max_len: int, where: str,
            earlier: list[tuple[int, list[int]]], span: list[int], trained: bool = True) -> Example:
    """The example: prompt ``p``, then the answer (its harvested ``token_ids`` when ``same`` text, else the
    tokens of ``answer``, then EOS; or the template's ``span``), labels on it and on the ``earlier`` turns."""
    if answer is not None:
        use = same and row.get("token_ids")
        comp = [int(t) for t in row["token_ids"]] if use else tok.encode(answer, add_special_tokens=False)
        comp = comp + [tok.eos_token_id]
    else:
        comp = span
    ids = (p + comp)[:max_len]
    labels = [IGNORE_INDEX] * len(p) + (comp if trained else [IGNORE_INDEX] * len(comp))
    for start, toks in earlier:
        labels[start:start + len(toks)] = toks
    labels = labels[:max_len]
    if all(x == IGNORE_INDEX for x in labels):
        if not trained and not earlier:
            raise DataError(f"{where}: no assistant turn carries loss (every one has weight 0)")
        raise DataError(f"{where}: the prompt fills max_len={max_len}; raise max_len")
    ex = Example(ids, labels)
    topk = _teacher_topk(row, tok) if answer is not None and same and trained else None
    if topk is not None:
        t_ids: list[list[int]] = [[] for _ in ids]
        t_lps: list[list[float]] = [[] for _ in ids]
        for j, (pi, pl) in enumerate(zip(*topk)):
            pos = len(p) + j
            if j >= len(comp) or pos >= len(ids):
                break
            t_ids[pos], t_lps[pos] = pi, pl
        ex.top_ids, ex.top_logprobs = t_ids, t_lps
    return ex


def encode_rows(rows: list[dict[str, Any]], tok: Any, max_len: int = 512, source: str = "data",
                system_prompt: str | None = None, reasoning: ReasoningUse = "keep",
                lines: list[int] | None = None) -> list[Example]:
    """Tokenize every row; errors name the row: ``SOURCE:LINE`` with the rows' ``lines`` in the file (from
    read_numbered_rows), else ``SOURCE row I``, its index in ``rows``."""
    return [encode_row(r, tok, max_len, where=f"{source}:{lines[i]}" if lines else f"{source} row {i}",
                       system_prompt=system_prompt, reasoning=reasoning)
            for i, r in enumerate(rows)]


def encode_file(path: str | Path, tok: Any, max_len: int = 512) -> list[Example]:
    """Every row of a data file tokenized, in file order; errors name ``PATH:LINE``."""
    numbered = read_numbered_rows(path)
    return encode_rows([row for _, row in numbered], tok, max_len, source=str(path),
                       lines=[line for line, _ in numbered])


def collate(examples: list[Example], pad_id: int, k: int = 0) -> dict[str, Any]:
    """Right-padded batch tensors; with ``k > 0`` also ``top_ids``/``top_logprobs`` of shape (B, T, k).

    Positions without teacher top-k hold a one-hot on the label (top-k KD = CE there);
    padding and prompt positions hold a one-hot on token 0 and are masked out by labels.
    """
    import torch

    width = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attn[i, : len(e.input_ids)] = 1
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attn, "labels": labels}
    if k:
        top_ids = torch.zeros((n, width, k), dtype=torch.long)
        top_lps = torch.full((n, width, k), -math.inf)
        top_lps[..., 0] = 0.0
        top_ids[..., 0] = labels.clamp(min=0)
        for i, e in enumerate(examples):
            if e.top_ids is None or e.top_logprobs is None:
                continue
            for pos, (pi, pl) in enumerate(zip(e.top_ids, e.top_logprobs)):
                if not pi:
                    continue
                m = min(k, len(pi))
                top_ids[i, pos, :m] = torch.tensor(pi[:m])
                top_lps[i, pos, :] = -math.inf
                top_lps[i, pos, :m] = torch.tensor(pl[:m])
        batch["top_ids"], batch["top_logprobs"] = top_ids, top_lps
    return batch
