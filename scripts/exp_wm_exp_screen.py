"""The development screen behind EXP (docs/results.md, "(e) EXP"): 96 dev answers at T 0.7, 200 tokens, 16 keys.

Generates the dev answers under each variant, then scores each answer against its own key on its first 200
tokens, with every scoring gate of the screen's table, and reports the answers' distinct-bigram share (repetition
loops). Dev data only (the 24 ``dev`` prompts plus 72 of the training pool, as the weighted score's screen); the
keys are fixed integers, not derived from a secret::

    python scripts/exp_provenance.py prompts                     # once: runs/provenance/prompts.json
    python scripts/exp_wm_exp_screen.py generate plain
    python scripts/exp_wm_exp_screen.py generate kgw             # green lists, delta 1.5, gate 2.0
    python scripts/exp_wm_exp_screen.py generate exp-every       # EXP keying every window (h 1)
    python scripts/exp_wm_exp_screen.py generate exp --context 1 # EXP keying a window's first occurrence
    python scripts/exp_wm_exp_screen.py generate exp --context 2
    python scripts/exp_wm_exp_screen.py score plain kgw exp-every exp-h1 exp-h2

The product path draws EXP in :meth:`stillhouse.watermark.green.RowWatermark.choose`; ``exp-every`` (keying
every window, the variant that loops) exists only here.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

OUT = Path("runs/provenance/exp-screen")
T = 0.7
KGW = dict(gamma=0.25, delta=1.5, context=1, entropy=2.0)


def _keys() -> list[int]:
    return [(i * 0x9E3779B97F4A7C15 + 12345) & 0xFFFFFFFFFFFFFFFF for i in range(16)]


def _dev() -> list[str]:
    prompts = json.loads(Path("runs/provenance/prompts.json").read_text())
    return prompts[0:24] + prompts[120 + 1100:120 + 1100 + 72]


class _EveryWindow:
    """EXP keying every window (no first-occurrence rule): the screen's looping variant."""

    samples = True

    def __init__(self, wm: Any):
        self.wm = wm

    def choose(self, ids: list[int], answer_start: int, scores: Any, temperature: float, top_p: float = 1.0) -> int:
        return int(self.wm.choose(ids, len(ids), scores, temperature, top_p))  # the window counts as the prompt's


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from stillhouse.teacher.base import SamplingParams
    from stillhouse.teacher.local import LocalTeacher
    from stillhouse.watermark.green import RowWatermark, WatermarkParams, vocab_hashes

    torch.set_num_threads(1)
    teacher = LocalTeacher.from_spec("bundled", max_batch=32)
    hashes = vocab_hashes(int(teacher.model.get_output_embeddings().weight.shape[0]))
    kind = args.variant
    params = WatermarkParams(**{**KGW, "context": args.context, "scheme": "kgw" if kind == "kgw" else "exp"})
    name = f"exp-h{args.context}" if kind == "exp" else kind

    def proc(i: int) -> Any:
        if kind == "plain":
            return None
        wm = RowWatermark(_keys()[i % 16], params, hashes)
        return _EveryWindow(wm) if kind == "exp-every" else wm

    sp = SamplingParams(max_tokens=200, temperature=T, seed=0)
    t0 = time.perf_counter()
    asks = [teacher.encode([{"role": "user", "content": p}]) for p in _dev()]
    handles = [teacher.submit(ids, sp, index=i, row_processor=proc(i)) for i, ids in enumerate(asks)]
    rows = [{"prompt_ids": ids, "ids": h.future.result().token_ids, "key": i % 16, "context": args.context}
            for i, (ids, h) in enumerate(zip(asks, handles))]
    teacher.close()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{name}: {len(rows)} answers, {sum(len(r['ids']) for r in rows)} tokens in {time.perf_counter() - t0:.0f}s")


def cmd_score(args: argparse.Namespace) -> None:
    import torch

    from stillhouse.provenance.detect import exp_score, score_key, select, weight_levels
    from stillhouse.provenance.gate import answer_views
    from stillhouse.teacher.local import LocalTeacher
    from stillhouse.watermark.green import WatermarkParams, first_windows

    torch.set_num_threads(1)
    teacher = LocalTeacher.from_spec("bundled", max_batch=8)
    keys, kgw = _keys(), WatermarkParams(**KGW)
    for name in args.names:
        rows = [json.loads(x) for x in (OUT / f"{name}.jsonl").read_text().splitlines()]
        views = answer_views(teacher.model, [(r["prompt_ids"], r["ids"][:200]) for r in rows], T)
        res: dict[str, list[float]] = {}
        for r, v in zip(rows, views):
            ids, h = r["ids"][:200], r["context"]
            fw = first_windows(ids, h)
            gates = {"every token": None, "first windows": fw,
                     "first windows, p < 0.7": [a and q < 0.7 for a, q in zip(fw, v.prob)],
                     "first windows, p < 0.9": [a and q < 0.9 for a, q in zip(fw, v.prob)],
                     "first windows, entropy > 1": [a and e > 1 for a, e in zip(fw, v.entropy)],
                     "p < 0.7": [q < 0.7 for q in v.prob]}
            for k in ([r["key"]] if name != "plain" else range(16)):
                for gate, keep in gates.items():
                    sel = select([ids], [0], h, keep=None if keep is None else [keep])
                    res.setdefault(f"EXP test, {gate}", []).append(exp_score(keys[k], sel.tuples, kgw).p)
                levels = weight_levels(v.prob, kgw.delta / T, kgw.gamma)
                sel = select([ids], [0], 1, keep=[[e > 2 for e in v.entropy]], levels=[levels])
                res.setdefault("green-list test, weighted, gate 2.0", []).append(
                    score_key(keys[k], sel.tuples, kgw, levels=sel.levels).p)
        share = [len(set(zip(r["ids"][:200], r["ids"][1:200]))) / max(1, len(r["ids"][:200]) - 1) for r in rows]
        print(f"== {name}: {len(rows)} answers; distinct bigram share median {statistics.median(share):.3f}, "
              f"{sum(s < 0.3 for s in share)} under 0.3")
        for test, ps in res.items():
            print(f"  {test:42s} p<1e-5 {sum(p < 1e-5 for p in ps):4d}/{len(ps)}  p<1e-3 {sum(p < 1e-3 for p in ps):4d}"
                  f"  median log10 p {statistics.median(math.log10(max(p, 1e-300)) for p in ps):7.2f}")
    teacher.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("variant", choices=("plain", "kgw", "exp-every", "exp"))
    g.add_argument("--context", type=int, default=1)
    s = sub.add_parser("score")
    s.add_argument("names", nargs="+")
    args = ap.parse_args()
    {"generate": cmd_generate, "score": cmd_score}[args.cmd](args)


if __name__ == "__main__":
    main()
