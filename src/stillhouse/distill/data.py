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
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stillhouse.distill.losses import IGNORE_INDEX


class DataError(ValueError):
    """A training row or file is unusable; the message names the row and the fix."""


TOO_DEEP = "nested too deeply to parse (about 1,000 levels of arrays/objects); fix or remove the row"


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
    p = Path(path)
    if not p.exists():
        raise DataError(f"training data {p} does not exist: pass a curated .jsonl file or a harvest export")
    text = p.read_text()
    if p.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}: not valid JSON ({exc}); a .json data file holds one list of rows") from exc
        except RecursionError:
            raise DataError(f"{p}: {TOO_DEEP}") from None
        if not isinstance(rows, list):
            raise DataError(f"{p}: a .json data file must hold a list of rows")
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{n}: not valid JSON ({exc})") from exc
        except RecursionError:
            raise DataError(f"{p}:{n}: {TOO_DEEP}") from None
    if not rows:
        raise DataError(f"{p} holds no rows")
    return rows


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


def encode_row(row: dict[str, Any], tok: Any, max_len: int = 512, where: str = "row",
               system_prompt: str | None = None) -> Example:
    """Tokenize one row into an :class:`Example` (assistant-only labels)."""
    msgs, answer = _chat(row, where)
    msgs = with_system(msgs, system_prompt)
    p = prompt_ids(tok, msgs)
    comp = [int(t) for t in row["token_ids"]] if row.get("token_ids") else tok.encode(answer, add_special_tokens=False)
    if tok.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token to its end-of-turn token")
    comp = comp + [tok.eos_token_id]
    ids = (p + comp)[:max_len]
    labels = ([IGNORE_INDEX] * len(p) + comp)[:max_len]
    if all(x == IGNORE_INDEX for x in labels):
        raise DataError(f"{where}: the prompt fills max_len={max_len}; raise max_len")
    ex = Example(ids, labels)
    topk = _teacher_topk(row, tok)
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
                system_prompt: str | None = None) -> list[Example]:
    """Tokenize every row; errors name the row."""
    return [encode_row(r, tok, max_len, where=f"{source} row {i}", system_prompt=system_prompt)
            for i, r in enumerate(rows)]


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
