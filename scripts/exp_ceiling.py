"""The ceiling experiment: how close does a distilled student get to its teacher, and can
verified data take it past the teacher?

Teacher: the bundled SmolLM2-135M-Instruct. Task: 2-digit addition ("What is a + b? Reply
with just the number."), scored by ``stillhouse.distill.verify.check_numeric`` (the number
after "=", as the model echoes the sum). Held-out problems are disjoint from training
problems as unordered pairs {a, b}.

Stages (each reads/writes OUT, default runs/exp_ceiling; finished stages are skipped):

    harvest   teacher greedy on the held-out set (its score) and on the training pool,
              storing completions with top-20 logprobs (what an API would give)
    probe     sampling probe: per-sample accuracy and pass@n at a few temperatures,
              on problems the teacher got wrong greedily
    sample    best-of-n sampling at the chosen temperature on greedy-wrong problems
    grid      pruned student (10 of 30 layers): SFT and top-k KD on the first N greedy
              examples, N = 250, 1000, 4000 (one pass, constant learning rate, so the
              snapshots at N are the models a separate run on N examples would give)
    verified  students trained only on verified-correct teacher answers: the pruned
              student, and the teacher itself (self-distillation)
    report    the markdown tables with 95% Wilson intervals

Run everything (about an hour on 2 CPU cores):

    nice -n 10 .venv/bin/python scripts/exp_ceiling.py --out runs/exp_ceiling

or one stage: ``... --stage grid``. A scaled-down smoke run: ``--small``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "What is {a} + {b}? Reply with just the number."
TOPK = 20


def split_problems(n_heldout: int, n_train: int, seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Held-out and training problems, disjoint as unordered pairs."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    held, held_keys = [], set()
    for a, b in pairs:
        if len(held) == n_heldout:
            break
        if frozenset((a, b)) not in held_keys:
            held.append((a, b))
            held_keys.add(frozenset((a, b)))
    train = [(a, b) for a, b in pairs if frozenset((a, b)) not in held_keys][:n_train]
    return held, train


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def generate_rows(model: Any, tok: Any, problems: list[tuple[int, int]], path: Path, *, temperature: float = 0.0,
                  n: int = 1, topk: int = 0, batch: int = 64, seed: int = 0, meta: dict[str, Any]) -> list[dict]:
    """Generate ``n`` completions per problem, appending verified rows to ``path`` (resumable)."""
    from stillhouse.distill.modelio import chat_prompt_ids, generate_batch
    from stillhouse.distill.verify import check_numeric

    rows = _read_jsonl(path)
    done = {(r["a"], r["b"], r["sample"]) for r in rows}
    todo = [(a, b, s) for a, b in problems for s in range(n) if (a, b, s) not in done]
    t0, toks = time.time(), 0
    with path.open("a") as f:
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            msgs = [[{"role": "user", "content": PROMPT.format(a=a, b=b)}] for a, b, _ in chunk]
            prompts = [chat_prompt_ids(tok, m) for m in msgs]
            gens = generate_batch(model, tok, prompts, max_new_tokens=16, temperature=temperature,
                                  top_k_logprobs=topk, seed=seed + i)
            for (a, b, s), m, g in zip(chunk, msgs, gens):
                ok, reason = check_numeric(g.text, a + b)
                row = dict(a=a, b=b, sample=s, messages=m + [{"role": "assistant", "content": g.text}],
                           completion=g.text, token_ids=g.token_ids, finish_reason=g.finish_reason,
                           correct=ok, reason=reason, temperature=temperature,
                           prompt_tokens=len(prompts[0]), completion_tokens=len(g.token_ids), **meta)
                if topk:
                    row.update(top_ids=g.top_ids, top_logprobs=g.top_logprobs)
                f.write(json.dumps(row) + "\n")
                rows.append(row)
                toks += len(g.token_ids)
            f.flush()
            _log(f"{path.name}: {min(i + batch, len(todo))}/{len(todo)} "
                 f"({toks / (time.time() - t0):.0f} completion tok/s)")
    return rows


def stage_harvest(args: argparse.Namespace, out: Path) -> None:
    from stillhouse.distill.modelio import load_causal_lm

    held, train = split_problems(args.heldout, args.train)
    model, tok, rev = load_causal_lm("bundled")
    meta = {"model": "SmolLM2-135M-Instruct", "revision": rev}
    t0 = time.time()
    rows = generate_rows(model, tok, held, out / "teacher_heldout.jsonl", meta=meta)
    _log(f"teacher held-out greedy accuracy {sum(r['correct'] for r in rows)}/{len(rows)}")
    rows = generate_rows(model, tok, train, out / "harvest_greedy.jsonl", topk=TOPK, meta=meta)
    _log(f"teacher train-pool greedy accuracy {sum(r['correct'] for r in rows)}/{len(rows)}; "
         f"harvest wall {time.time() - t0:.0f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/exp_ceiling"))
    p.add_argument("--stage", default="all",
                   choices=["all", "harvest", "probe", "sample", "grid", "verified", "report"])
    p.add_argument("--heldout", type=int, default=300, help="held-out problems")
    p.add_argument("--train", type=int, default=4000, help="training-pool problems harvested greedily")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = {"harvest": stage_harvest}
    for name, fn in stages.items():
        if args.stage in ("all", name):
            _log(f"stage {name}")
            fn(args, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
