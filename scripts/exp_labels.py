"""How much do analysts' labels move detection? TPR at the target FPR with 0, 50, 200 and 1,000 labels.

Arena traffic, development seeds only (the held-out sets 11/15/700 and 21/23/900 are never touched):

1. calibration: a benign population (seed ``calib_seed``) -> the calibrated detector (no labels);
2. labelled development traffic: another benign population (seed ``dev_seed``) plus the arena's
   campaigns with their own seed (``dev_campaign_seed``): every account there is a candidate label,
   its truth known (what an analyst's verdict would say);
3. evaluation: the arena's default evaluation population and campaigns (``eval_seed`` /
   ``campaign_seed``), sent with no enforcement, so every account sends all it planned;
4. for N labels, two ways of choosing which development accounts were reviewed:
   ``queue``: the N highest-scoring ones under the calibrated detector (what a review queue shows:
   its flags and near-misses, false positives included); ``random``: N/2 campaign and N/2 benign
   accounts at random (all campaign accounts when fewer; ``draws`` draws). Then the supervised
   family weights (``detect/supervised.py``) and thresholds from the same held-out benign half of
   the calibration traffic as the calibrated detector;
5. each detector replays the evaluation traffic offline; reported: the operational block tier
   (campaign TPR and benign FPR at the calibrated block threshold, target FPR ``block_fpr``), and
   the ranking (TPR at evaluation FPR <= 1e-3 and 1e-2).

Traffic is generated with the arena's populations and campaigns through its direct gateway (the same
TrafficRecord the guard logs, without HTTP) to keep the run short on 2 cores.

Run: ``nice python scripts/exp_labels.py --out runs/exp-labels.json`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np


def traffic(accounts: list[Any], turns: list[Any]) -> list[Any]:
    from stillhouse.arena.simulate import DirectGateway, SimClock, run_traffic

    clock = SimClock()
    gw = DirectGateway(None, clock, keep_log=True)
    asyncio.run(run_traffic(accounts, turns, gw, None, clock))
    return gw.log


def population(cfg: Any, n: int, seed: int) -> tuple[list[Any], list[Any]]:
    from stillhouse.arena.population import generate_population
    from stillhouse.arena.run import population_config

    return generate_population(population_config(cfg, n, seed))


def thresholds(det: Any, calib: list[Any], infos: dict[str, Any]) -> dict[str, float]:
    """Stage 2 of ``WindowDetector.fit`` for the detector's current family weights: benign quantiles of the
    held-out half-B accounts' maximum scores."""
    from stillhouse.guard.detect.stats import benign_threshold

    scorer = det._clone_unscored()
    scorer.tables_, scorer.tail_scales_ = det.tables_, det.tail_scales_
    scorer.family_weights_ = det.family_weights_
    half_b = [r for r in calib if det._half(r.account_id) == 1]
    for r in half_b:
        scorer.observe(r, infos.get(r.account_id))
    ids = sorted({r.account_id for r in half_b})
    maxima = np.array([scorer.max_score_.get(a, 0.0) for a in ids])
    return {"throttle": benign_threshold(maxima, det.config.throttle_fpr),
            "block": benign_threshold(maxima, det.config.block_fpr)}


def evaluate(det: Any, records: list[Any], infos: dict[str, Any], truth: dict[str, str]) -> dict[str, Any]:
    """Replay the evaluation traffic; ``truth`` maps every account to its campaign ("" = benign)."""
    from stillhouse.arena.metrics import rate, tpr_at_fpr
    from stillhouse.guard.detect.offline import replay

    det.reset()
    replay(det, records, infos)
    det.refresh_clusters()
    scores = {a: det.max_score_.get(a, 0.0) for a in truth}
    benign = np.array([s for a, s in scores.items() if not truth[a]])
    attack = np.array([s for a, s in scores.items() if truth[a]])
    t = det.thresholds_["block"]
    return {"block_tpr": rate(int((attack > t).sum()), attack.size),
            "block_fpr": rate(int((benign > t).sum()), benign.size),
            "roc_tpr_at_fpr_1e-3": tpr_at_fpr(benign, attack, 1e-3)[0],
            "roc_tpr_at_fpr_1e-2": tpr_at_fpr(benign, attack, 1e-2)[0],
            "missed_at_block": dict(Counter(truth[a] for a, s in scores.items() if truth[a] and s <= t))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib-accounts", type=int, default=3000)
    ap.add_argument("--dev-accounts", type=int, default=3000)
    ap.add_argument("--eval-accounts", type=int, default=3000)
    ap.add_argument("--days", type=float, default=4.0)
    ap.add_argument("--labels", default="50,200,1000")
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--dev-seed", type=int, default=7)
    ap.add_argument("--dev-campaign-seed", type=int, default=450)
    ap.add_argument("--out", type=Path, default=Path("runs/exp-labels.json"))
    args = ap.parse_args()

    from stillhouse.arena.run import ArenaConfig, build_campaigns
    from stillhouse.guard.detect import DetectConfig, WindowDetector
    from stillhouse.guard.detect.supervised import LabelError, fit_family_weights, labelled_vectors

    t_all = time.perf_counter()
    cfg = ArenaConfig(days=args.days, calib_accounts=args.calib_accounts, eval_accounts=args.eval_accounts)
    timings: dict[str, float] = {}

    def phase(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {timings[name]} s", flush=True)

    t = time.perf_counter()
    ca, ct = population(cfg, cfg.calib_accounts, cfg.calib_seed)
    calib = traffic(ca, ct)
    infos = {a.info.account_id: a.info for a in ca}
    phase(f"calibration traffic ({len(calib)} records)", t)
    t = time.perf_counter()
    dcfg = DetectConfig(max_tokens_limit=cfg.max_tokens_limit, embedder=cfg.embedder, cluster_every=cfg.cluster_every)
    base = WindowDetector(dcfg).fit(calib, infos)
    phase("calibrated fit", t)

    t = time.perf_counter()
    da, dt_ = population(cfg, args.dev_accounts, args.dev_seed)
    dca, dct = build_campaigns(replace(cfg, campaign_seed=args.dev_campaign_seed))
    dev = traffic([*da, *dca], [*dt_, *dct])
    dev_truth = {a.info.account_id: a.malicious for a in [*da, *dca]}
    infos |= {a.info.account_id: a.info for a in [*da, *dca]}
    phase(f"development traffic ({len(dev)} records, {sum(dev_truth.values())} campaign accounts)", t)
    t = time.perf_counter()
    x_all, y_all, _ = labelled_vectors(base, dev, infos, {a: int(m) for a, m in dev_truth.items()})
    phase("development family vectors", t)

    t = time.perf_counter()
    ea, et = population(cfg, cfg.eval_accounts, cfg.eval_seed)
    eca, ect = build_campaigns(cfg)
    ev = traffic([*ea, *eca], [*et, *ect])
    truth = {a.info.account_id: (a.campaign or "") if a.malicious else "" for a in [*ea, *eca]}
    infos |= {a.info.account_id: a.info for a in [*ea, *eca]}
    phase(f"evaluation traffic ({len(ev)} records, {sum(map(bool, truth.values()))} campaign accounts)", t)

    rows: list[dict[str, Any]] = []
    t = time.perf_counter()
    rows.append({"labels": 0, "sampling": "", "draw": 0, "campaign_labels": 0, "weights": None, "thresholds": base.thresholds_,
                 **evaluate(base, ev, infos, truth)})
    phase("evaluate calibrated", t)
    pos = [i for i, y in enumerate(y_all) if y == 1]
    neg = [i for i, y in enumerate(y_all) if y == 0]
    queue = list(np.argsort(-x_all.sum(axis=1), kind="stable"))  # the calibrated score's review order
    plans = [(n, "queue", 0) for n in map(int, args.labels.split(","))] + \
        [(n, "random", d) for n in map(int, args.labels.split(",")) for d in range(args.draws)]
    for n, how, draw in plans:
        t = time.perf_counter()
        if how == "queue":
            idx = queue[:n]
        else:
            rng = np.random.default_rng(1000 * n + draw)
            k = min(n // 2, len(pos))
            idx = [*rng.choice(pos, k, replace=False), *rng.choice(neg, n - k, replace=False)]
        k_pos = int(y_all[idx].sum())
        det = base._clone_unscored()
        det.tables_, det.tail_scales_ = base.tables_, base.tail_scales_
        try:
            det.family_weights_ = fit_family_weights(x_all[idx], y_all[idx], dcfg.label_prior)
            note = ""
        except LabelError as exc:  # e.g. the top of the queue is all campaign accounts: nothing to fit
            det.family_weights_ = np.ones(x_all.shape[1])
            note = f"calibrated score kept: {exc}"
        det.thresholds_ = thresholds(det, calib, infos)
        res = evaluate(det, ev, infos, truth)
        rows.append({"labels": n, "sampling": how, "draw": draw, "campaign_labels": k_pos,
                     "weights": dict(zip(("content", "sampling", "volume", "automation", "repetition", "topic",
                                          "shift"), map(float, det.family_weights_))),
                     "thresholds": det.thresholds_, "note": note, **res})
        phase(f"labels {n} {how} {draw}: block TPR {res['block_tpr']['value']:.3f} FPR "
              f"{res['block_fpr']['value']:.4f}", t)
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "arena": {"calib_seed": cfg.calib_seed,
           "eval_seed": cfg.eval_seed, "campaign_seed": cfg.campaign_seed, "days": cfg.days},
           "target_fpr": dcfg.block_fpr, "label_prior": dcfg.label_prior, "timings_s": timings,
           "total_s": round(time.perf_counter() - t_all, 1), "rows": rows,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print("| labels | sampling (draw) | campaign labels | block TPR | block FPR | ROC TPR@1e-3 | ROC TPR@1e-2 |")
    for r in rows:
        print(f"| {r['labels']} | {r['sampling']} ({r['draw']}) | {r['campaign_labels']} | {r['block_tpr']['value']:.3f} ({r['block_tpr']['k']}/{r['block_tpr']['n']}) "
              f"| {r['block_fpr']['value']:.4f} ({r['block_fpr']['k']}/{r['block_fpr']['n']}) "
              f"| {r['roc_tpr_at_fpr_1e-3']:.3f} | {r['roc_tpr_at_fpr_1e-2']:.3f} |")


if __name__ == "__main__":
    main()
