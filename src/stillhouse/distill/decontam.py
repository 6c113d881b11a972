"""Decontamination: drop training rows that overlap the evaluation sets.

A row is contaminated when its text shares a word 13-gram with an evaluation item
(tokens as in :func:`stillhouse.distill.dedup.tokenize`: lowercased, numbers and symbols
separate). Evaluation items shorter than 13 tokens — an arithmetic question is about 12 —
are matched whole (when they have at least 5 tokens): the row is contaminated when it contains the item's full token
sequence.

Only the item-specific part of an evaluation item is indexed (the GSM8K question, the
HumanEval prompt, the arithmetic question), never the instruction template around it,
because a template shared by train and test prompts would flag every row.

Generated arithmetic has a second, exact rule: a pair (a, b) belongs to the held-out split
by a hash (:func:`stillhouse.distill.tasks.is_heldout_pair`), so any training question
about a held-out pair is contaminated whichever held-out items an evaluation drew.

    from stillhouse.distill.decontam import Decontaminator, load_eval_texts
    d = Decontaminator(n=13).fit(load_eval_texts(["builtin:gsm8k-test", "builtin:humaneval"]))
    d.check("Janet's ducks lay 16 eggs per day ...")   # Contamination(...) or None
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from stillhouse.distill.dedup import tokenize

_ARITH = re.compile(r"what is (\d+) \+ (\d+)\?", re.IGNORECASE)


@dataclass(frozen=True)
class EvalText:
    """One evaluation item's text to index."""

    set_name: str
    item_id: str
    text: str


@dataclass(frozen=True)
class Contamination:
    """Why a row is contaminated."""

    set_name: str
    item_id: str
    ngram: str
    """The shared n-gram (or the whole short item)."""

    def reason(self) -> str:
        return f"contaminated: shares {self.ngram[:60]!r} with {self.set_name} {self.item_id}"


def item_text(item: Any) -> str:
    """The item-specific text of a :class:`~stillhouse.distill.tasks.TaskItem` (no template)."""
    meta = getattr(item, "meta", {}) or {}
    if item.task == "gsm8k" and meta.get("question"):
        return str(meta["question"])
    if item.task == "humaneval" and meta.get("prompt"):
        return str(meta["prompt"])
    if item.task == "arithmetic" and "a" in meta and "b" in meta:
        return f"What is {meta['a']} + {meta['b']}?"
    return " ".join(str(m.get("content", "")) for m in item.messages if m.get("role") == "user")


def load_eval_texts(specs: Sequence[str], seed: int = 0, missing: list[str] | None = None) -> list[EvalText]:
    """The texts of built-in evaluation sets named by spec strings (``builtin:gsm8k-test``...).

    A set whose data is not on this machine raises TaskDataMissing, unless ``missing`` is a list: then the
    set is skipped and its message appended there (curation's default sets, which a machine without
    ../shared lacks in part)."""
    from stillhouse.distill.tasks import TaskDataMissing, load_builtin

    out: list[EvalText] = []
    for spec in specs:
        name = spec.split(":")[1] if spec.startswith("builtin:") else spec
        try:
            items = load_builtin(spec, seed=seed)
        except TaskDataMissing as exc:
            if missing is None:
                raise
            missing.append(f"{spec}: {exc}")
            continue
        for item in items:
            out.append(EvalText(name, item.id, item_text(item)))
    return out


def heldout_arithmetic(text: str) -> Contamination | None:
    """A question about an arithmetic pair from the held-out split (by the split's hash)."""
    from stillhouse.distill.tasks import is_heldout_pair

    for m in _ARITH.finditer(text):
        a, b = int(m.group(1)), int(m.group(2))
        if is_heldout_pair(a, b):
            return Contamination("arithmetic-heldout", f"arith-{a}+{b}", m.group(0))
    return None


class Decontaminator:
    """An n-gram index of evaluation texts; ``check`` finds the first shared n-gram.

    ``__init__`` stores parameters; ``fit`` builds ``index_`` (n-gram → item) and
    ``short_`` (length → whole short items).
    """

    def __init__(self, n: int = 13, arithmetic_split_rule: bool = True, min_short_tokens: int = 5):
        if n < 1:
            raise ValueError(f"n={n}: the n-gram length must be >= 1 (13 is the usual)")
        if min_short_tokens < 1:
            raise ValueError(f"min_short_tokens={min_short_tokens}: must be >= 1")
        self.n = n
        self.min_short_tokens = min_short_tokens
        self.arithmetic_split_rule = arithmetic_split_rule

    def fit(self, texts: Iterable[EvalText]) -> Decontaminator:
        self.index_: dict[tuple[str, ...], tuple[str, str]] = {}
        self.short_: dict[int, dict[tuple[str, ...], tuple[str, str]]] = {}
        self.n_items_ = 0
        for et in texts:
            self.n_items_ += 1
            toks = tokenize(et.text)
            if len(toks) < self.min_short_tokens:
                continue  # too generic to match whole ("yes", "42")
            if len(toks) < self.n:
                self.short_.setdefault(len(toks), {}).setdefault(tuple(toks), (et.set_name, et.item_id))
                continue
            for i in range(len(toks) - self.n + 1):
                self.index_.setdefault(tuple(toks[i : i + self.n]), (et.set_name, et.item_id))
        return self

    def check(self, text: str) -> Contamination | None:
        """The first overlap of ``text`` with the indexed evaluation items, or None."""
        if not hasattr(self, "index_"):
            raise RuntimeError("Decontaminator.check before fit: call fit(load_eval_texts([...])) first")
        if self.arithmetic_split_rule:
            hit = heldout_arithmetic(text)
            if hit is not None:
                return hit
        toks = tokenize(text)
        for i in range(len(toks) - self.n + 1):
            gram = tuple(toks[i : i + self.n])
            if gram in self.index_:
                name, item = self.index_[gram]
                return Contamination(name, item, " ".join(gram))
        for length, grams in self.short_.items():
            for i in range(len(toks) - length + 1):
                gram = tuple(toks[i : i + length])
                if gram in grams:
                    name, item = grams[gram]
                    return Contamination(name, item, " ".join(gram))
        return None
