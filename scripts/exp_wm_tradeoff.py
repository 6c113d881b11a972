"""Screen watermark settings on development data: greedy arithmetic kept vs chat answers detected.

A bias watermark changes a greedy answer only where some green token comes within ``delta`` of a red
top-1 token; with an entropy gate (SWEET) only where the teacher's entropy is above the threshold too.
So one teacher-forced pass over the *unwatermarked* greedy answers says exactly which answers a setting
would leave unchanged (greedy decoding is deterministic: no flip anywhere -> the same tokens), for any
key. For chat answers (sampled at temperature T) the pass gives, per position, the probability that the
biased sampler picks a green token; its sum over gated positions estimates the green count, hence the
p-value, of a watermarked answer of the same length (an estimate for screening only: the confirmation
generates real watermarked answers, ``exp_provenance.py generate``/``detect``).

Stages (OUT = runs/provenance)::

    python scripts/exp_wm_tradeoff.py arith --n 300          # dev items: train-split 2-digit additions
    python scripts/exp_wm_tradeoff.py chat --temperature 0.7  # dev prompts (exp_provenance's dev split)
    python scripts/exp_wm_tradeoff.py table                   # both, one row per (delta, entropy)
    python scripts/exp_wm_tradeoff.py arith-wm --settings 0.25:0:0,0.25:1:2.5   # confirm: real watermarked greedy

Development data only: arithmetic items come from the *train* split (disjoint from every held-out pair),
chat prompts from ``exp_provenance.py``'s dev prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path("runs/provenance")
DELTAS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
GATES = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
KEYS = [f"server/screen-{i}/0" for i in range(8)]


def _load(threads: int) -> tuple[Any, Any]:
    import torch

    from stillhouse.teacher.bundled import load_model

    torch.set_num_threads(threads)
    model, tok, _ = load_model("bundled")
    return model, tok


def _forward(model: Any, rows: list[tuple[list[int], list[int]]], batch_size: int = 8) -> Iterator[Any]:
    """Per row, in order: the logits [len(answer), V] that predicted each answer token (float32 numpy)."""
    import torch

    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (p, a) in enumerate(chunk):
            ids[j, :len(p) + len(a)] = torch.tensor(p + a)
            mask[j, :len(p) + len(a)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        for j, (p, a) in enumerate(chunk):
            yield logits[j, len(p) - 1:len(p) + len(a) - 1].numpy()


def _keys() -> list[int]:
    from stillhouse.watermark.keys import derive_key, key_u64, load_secret

    secret = load_secret()
    return [key_u64(derive_key(secret, k)) for k in KEYS]


def _entropy(lg: np.ndarray) -> np.ndarray:
    z = lg - lg.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


def cmd_arith(args: argparse.Namespace) -> None:
    from stillhouse.distill.evaluate import score_outputs
    from stillhouse.distill.tasks import arithmetic, write_items
    from stillhouse.teacher.generate import chat_prompt_ids, generate
    from stillhouse.watermark.green import WatermarkParams, green_mask, vocab_hashes

    items = arithmetic(args.n, split="train", seed=args.seed, digits=(2,))
    write_items(items, OUT / "dev-arith.jsonl")
    model, tok = _load(args.threads)
    prompts = [chat_prompt_ids(tok, it.messages) for it in items]
    t0 = time.perf_counter()
    gens = generate(model, tok, prompts, 16, batch_size=32)
    correct = [v.ok for v in score_outputs("arithmetic2", items, [g.text for g in gens])]
    answers = [g.token_ids + ([g.stop_id] if g.stop_id is not None else []) for g in gens]
    logits = _forward(model, list(zip(prompts, answers)))
    hashes = vocab_hashes(int(model.get_output_embeddings().weight.shape[0]))
    params = WatermarkParams()
    keys = _keys()
    # per item, per key: for each position (entropy, margin needed): the position flips under (delta, gate)
    # when entropy > gate and best green + delta > top red, i.e. delta > top - best green (top red only)
    cases = []
    for p, a, lg in zip(prompts, answers, logits):
        ent = _entropy(lg)
        full = p + a
        per_key = []
        for key in keys:
            need = []
            for i in range(len(a)):
                g = green_mask(key, full[len(p) + i - 1:len(p) + i], hashes, params)[:lg.shape[1]]
                top = int(lg[i].argmax())
                need.append(math.inf if g[top] else float(lg[i, top] - lg[i][g].max()))
            per_key.append(need)
        cases.append({"entropy": ent.tolist(), "need": per_key})
    rows = []
    for d in DELTAS:
        for h in GATES:
            unchanged = np.array([[not any(e > h and n < d for e, n in zip(c["entropy"], nk)) for nk in c["need"]]
                                  for c in cases])  # [items, keys]
            ok = np.array(correct)[:, None]
            rows.append({"delta": d, "entropy": h, "unchanged": float(unchanged.mean()),
                         "acc_low": float((unchanged & ok).mean()),
                         "acc_high": float(((unchanged & ok) | ~unchanged).mean())})
    res = {"n": len(items), "accuracy": float(np.mean(correct)), "seconds": round(time.perf_counter() - t0),
           "answer_entropy_quantiles": np.quantile(np.concatenate([c["entropy"] for c in cases]),
                                                   [0.1, 0.25, 0.5, 0.75, 0.9]).round(3).tolist(),
           "rows": rows}
    (OUT / "screen-arith.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))


def cmd_chat(args: argparse.Namespace) -> None:
    import torch

    from stillhouse.provenance.stats import log_binom_sf
    from stillhouse.teacher.generate import chat_prompt_ids, generate
    from stillhouse.watermark.green import WatermarkParams, green_mask, vocab_hashes

    prompts_text = json.loads((OUT / "prompts.json").read_text())[:24]
    extra = [json.loads(x)["messages"][0]["content"] for x in (OUT / "clean.jsonl").read_text().splitlines()]
    prompts_text += extra[:args.extra]
    model, tok = _load(args.threads)
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in prompts_text]
    t0 = time.perf_counter()
    gens = generate(model, tok, prompts, args.max_tokens, batch_size=24, temperature=args.temperature, seed=1)
    answers = [g.token_ids for g in gens]
    logits = _forward(model, list(zip(prompts, answers)))
    hashes = vocab_hashes(int(model.get_output_embeddings().weight.shape[0]))
    params = WatermarkParams()
    keys = _keys()[:2]
    per = []  # per answer, per key: entropy, p(green | biased) for each delta, and the tuple
    for p, a, lg in zip(prompts, answers, logits):
        ent = _entropy(lg)
        probs = torch.softmax(torch.from_numpy(lg) / args.temperature, -1).numpy()
        full = p + a
        for key in keys:
            qs = {d: [] for d in DELTAS}
            for i in range(len(a)):
                g = green_mask(key, full[len(p) + i - 1:len(p) + i], hashes, params)[:lg.shape[1]]
                pg = float(probs[i][g].sum())
                for d in DELTAS:
                    b = math.exp(d / args.temperature)
                    qs[d].append(pg * b / (pg * b + 1 - pg))
            per.append({"entropy": ent.tolist(), "q": qs, "tuples": [tuple(full[len(p) + i - 1:len(p) + i + 1])
                                                                    for i in range(len(a))]})
    gamma = params.threshold / float(1 << 53)
    rows = []
    for d in DELTAS:
        for h in GATES:
            lp, scored = [], []
            for c in per:
                seen: set[tuple[int, ...]] = set()
                n = exp_green = 0.0
                for e, q, t in zip(c["entropy"], c["q"][d], c["tuples"]):
                    if e > h and t not in seen:
                        seen.add(t)
                        n += 1
                        exp_green += q
                lp.append(log_binom_sf(round(exp_green), int(n), gamma) / math.log(10) if n else 0.0)
                scored.append(n)
            rows.append({"delta": d, "entropy": h, "share_p_below_1e-5": float(np.mean(np.array(lp) < -5)),
                         "median_log10_p": float(np.median(lp)), "median_scored": float(np.median(scored))})
    res = {"answers": len(answers), "temperature": args.temperature, "seconds": round(time.perf_counter() - t0),
           "median_tokens": float(np.median([len(a) for a in answers])),
           "entropy_quantiles": np.quantile(np.concatenate([c["entropy"] for c in per]),
                                            [0.1, 0.25, 0.5, 0.75, 0.9]).round(3).tolist(), "rows": rows}
    (OUT / "screen-chat.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))


def cmd_arith_wm(args: argparse.Namespace) -> None:
    """Confirm on the same dev items: greedy accuracy with the watermark really on, per setting (one key).

    The screen's bounds are loose (a changed answer may still be right: a flip in the wording, not a
    digit), so the candidate settings are generated for real, as ``stillhouse eval`` does."""
    from stillhouse.distill.evaluate import score_outputs
    from stillhouse.distill.metrics import wilson_interval
    from stillhouse.distill.tasks import read_items
    from stillhouse.teacher.generate import chat_prompt_ids, generate
    from stillhouse.watermark.green import RowWatermark, WatermarkParams, batch_processor, vocab_hashes
    from stillhouse.watermark.keys import derive_key, key_u64, load_secret

    items = read_items(OUT / "dev-arith.jsonl")
    model, tok = _load(args.threads)
    prompts = [chat_prompt_ids(tok, it.messages) for it in items]
    hashes = vocab_hashes(int(model.get_output_embeddings().weight.shape[0]))
    key = key_u64(derive_key(load_secret(), args.key))
    path = OUT / "screen-arith-wm.jsonl"
    for setting in args.settings.split(","):
        gamma, delta, gate = (float(x) for x in setting.split(":"))
        t0 = time.perf_counter()
        proc = None
        if delta > 0:
            proc = batch_processor(RowWatermark(key, WatermarkParams(gamma, delta, 1, gate), hashes, args.key))
        gens = generate(model, tok, prompts, 16, batch_size=32, logits_processor=proc)
        ok = [v.ok for v in score_outputs("arithmetic2", items, [g.text for g in gens])]
        lo, hi = wilson_interval(sum(ok), len(ok))
        row = {"gamma": gamma, "delta": delta, "entropy": gate, "key": args.key, "n": len(ok),
               "accuracy": sum(ok) / len(ok), "wilson95": [lo, hi], "correct": ok,
               "seconds": round(time.perf_counter() - t0)}
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "correct"}), flush=True)


def cmd_table(args: argparse.Namespace) -> None:
    a = json.loads((OUT / "screen-arith.json").read_text())
    c = json.loads((OUT / "screen-chat.json").read_text())
    cr = {(r["delta"], r["entropy"]): r for r in c["rows"]}
    print(f"arith: {a['n']} dev items, accuracy {a['accuracy']:.3f}; chat: {c['answers']} dev answers")
    print(f"{'delta':>5} {'gate':>5} {'unchanged':>9} {'acc range':>13} {'chat p<1e-5 (est)':>17} {'med log10p':>10} "
          f"{'med scored':>10}")
    for r in a["rows"]:
        q = cr[(r["delta"], r["entropy"])]
        print(f"{r['delta']:5.1f} {r['entropy']:5.1f} {r['unchanged']:9.3f} {r['acc_low']:6.3f}-{r['acc_high']:.3f} "
              f"{q['share_p_below_1e-5']:17.3f} {q['median_log10_p']:10.1f} {q['median_scored']:10.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("arith")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("chat")
    p.add_argument("--extra", type=int, default=0, help="dev prompts beyond the 24: the first N of clean.jsonl")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("arith-wm")
    p.add_argument("--settings", required=True, help="gamma:delta:entropy,... (delta 0 = no watermark)")
    p.add_argument("--key", default="server/screen-0/0")
    p.add_argument("--threads", type=int, default=1)
    sub.add_parser("table")
    args = ap.parse_args()
    {"arith": cmd_arith, "chat": cmd_chat, "arith-wm": cmd_arith_wm, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    main()
