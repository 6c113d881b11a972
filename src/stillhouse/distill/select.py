"""Choosing a training pass on validation items (``TrainConfig.select_on``), never on the test set.

After each epoch K, train exports the student to ``OUT/epochs/eK``; :func:`score_pass` loads that
export as ``eval`` would (fp32, transformers' default attention), answers the validation items
greedily (:func:`stillhouse.teacher.generate.generate`, with the run's system prompt) and scores the
answers with the task's verifier (:func:`stillhouse.distill.evaluate.score_outputs`). The best pass so
far is the one with the most correct answers, the earliest on a tie (:func:`best_epoch`).

Disk: once epoch K's score is in a checkpoint, every epoch export but the best so far is deleted
(:func:`prune_epochs`), so a run keeps at most two model exports besides its checkpoint. A resumed
run needs only the best export of the epochs its checkpoint has scored, which is never deleted; at
the end :func:`finish` moves it to ``OUT/final`` and writes ``OUT/selection.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from stillhouse.config import atomic_write_text


def load_items(path: str) -> list[Any]:
    """The validation items of ``select_on`` (:func:`stillhouse.distill.tasks.read_items`)."""
    from stillhouse.distill.tasks import read_items

    return read_items(path)


def score_pass(model_dir: Path, tok: Any, items: list[Any], system_prompt: str | None, batch_size: int,
               device: str = "cpu") -> tuple[int, list[bool]]:
    """``(correct, per-item verdicts)`` of the exported model in ``model_dir`` on ``items``."""
    from transformers import AutoModelForCausalLM

    from stillhouse.distill.data import with_system
    from stillhouse.distill.evaluate import max_new_tokens_for, score_outputs
    from stillhouse.teacher.generate import chat_prompt_ids, generate

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.to(device).eval()
    task = items[0].task
    prompts = [chat_prompt_ids(tok, with_system(list(it.messages), system_prompt)) for it in items]
    gens = generate(model, tok, prompts, max_new_tokens_for(task), batch_size=batch_size)
    ok = [v.ok for v in score_outputs(task, items, [g.text for g in gens])]
    return sum(ok), ok


def best_epoch(scores: list[dict[str, Any]]) -> int:
    """The epoch with the most correct answers; the earliest on a tie."""
    return max(scores, key=lambda s: (s["correct"], -s["epoch"]))["epoch"]


def epoch_dir(out: Path, epoch: int) -> Path:
    return out / "epochs" / f"e{epoch}"


def prune_epochs(out: Path, keep: int) -> None:
    """Delete every epoch export but ``epoch_dir(out, keep)`` (and half-written temporary ones)."""
    root = out / "epochs"
    if not root.is_dir():
        return
    for d in root.iterdir():
        if d != epoch_dir(out, keep):
            shutil.rmtree(d, ignore_errors=True)


def finish(out: Path, scores: list[dict[str, Any]], select_on: str, keep_epochs: bool) -> Path:
    """Make the best epoch's export ``OUT/final`` (moved, or copied when ``keep_epochs``), record the choice
    in its ``train_result.json`` and in ``OUT/selection.json``; idempotent, so a run killed here resumes."""
    best = best_epoch(scores)
    src, tmp, final = epoch_dir(out, best), out / ".final-tmp", out / "final"
    record = {"select_on": select_on, "chosen_epoch": best, "epochs": scores}
    if src.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        if keep_epochs:
            shutil.copytree(src, tmp)
        else:
            os.replace(src, tmp)
    if tmp.is_dir():  # also when a run killed after the move above resumes
        result = tmp / "train_result.json"
        info = json.loads(result.read_text()) if result.is_file() else {}
        atomic_write_text(result, json.dumps({**info, "selection": record}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    elif _chosen_epoch(final) != best:
        raise RuntimeError(f"{src} (epoch {best}, the best on {select_on}) is missing and {final} holds "
                           f"epoch {_chosen_epoch(final)}: delete {out} and train again")
    if not keep_epochs:
        shutil.rmtree(out / "epochs", ignore_errors=True)
    atomic_write_text(out / "selection.json", json.dumps(record, indent=2) + "\n")
    return final


def _chosen_epoch(final: Path) -> int | None:
    try:
        return int(json.loads((final / "train_result.json").read_text())["selection"]["chosen_epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
