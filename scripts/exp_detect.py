"""Iterate on the detector in seconds: save an arena seed set's traffic once, re-score it offline many times.

Development seed sets only (``stillhouse.arena.run.SEED_SETS``: the script refuses test sets).

- ``gen``: build the seed set's benign calibration population, its benign evaluation population and its
  campaigns (the real population by default, as ``stillhouse arena --population real``), and send them
  through the arena's direct gateway (the record the guard logs, no HTTP) with **no detector**, so every
  account sends everything it planned. Writes ``calib.pkl``, ``eval.pkl`` (TrafficRecords and AccountInfos)
  and ``truth.json`` (per account: archetype or campaign shape, campaign id, planned requests) under ``--data``.
- ``score``: fit a detector (``DetectConfig`` defaults, overridden by ``--set key=value``) on ``calib.pkl``,
  replay ``eval.pkl`` through it as the arena does (a first flag is noted after each request and at each
  cluster refresh) and print the dev tables: TPR per shape, FPR per archetype (accounts with >= 3 requests),
  both tiers with Wilson intervals, hydra volume at first flag, slow-and-low within the window, and the
  benign accounts over each threshold with their reasons. ``--json FILE`` writes them.

Enforcement is not simulated (a blocked account keeps sending), so a benign account's maximum score is an
upper bound of what it reaches online, and first flags are exact up to that flag; confirm with
``stillhouse arena --population real --seeds dev1``.

Run: ``nice python scripts/exp_detect.py gen --seeds dev1 --data runs/dev1`` then
``nice python scripts/exp_detect.py score --data runs/dev1``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np


def _traffic(accounts: list[Any], turns: list[Any], book: Any) -> list[Any]:
    from stillhouse.arena.simulate import DirectGateway, SimClock, run_traffic

    clock = SimClock()
    gw = DirectGateway(None, clock, keep_log=True, book=book)
    asyncio.run(run_traffic(accounts, turns, gw, None, clock))
    return gw.log


def gen(args: argparse.Namespace) -> None:
    from stillhouse.arena.replies import book_from_turns
    from stillhouse.arena.run import REAL, ArenaConfig, build_campaigns, build_population, seed_set_config

    base = REAL if args.population == "real" else ArenaConfig()
    cfg = seed_set_config(replace(base, population=args.population), args.seeds)
    if cfg.split != "dev":
        raise SystemExit(f"--seeds {args.seeds}: a test seed set; this script is for development seed sets only")
    t = time.perf_counter()
    ca, ct = build_population(cfg, "calib")
    ea, et = build_population(cfg, "eval")
    xa, xt = build_campaigns(cfg)
    book = book_from_turns(ct + et) if any(x.reply is not None for x in ct + et) else None
    print(f"generated in {time.perf_counter() - t:.0f} s: {len(ct)} calibration, {len(et) + len(xt)} evaluation turns",
          flush=True)
    out = Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    for name, accounts, turns in (("calib", ca, ct), ("eval", ea + xa, et + xt)):
        t = time.perf_counter()
        log = _traffic(accounts, turns, book)
        infos = {a.info.account_id: a.info for a in accounts}
        with (out / f"{name}.pkl").open("wb") as f:
            pickle.dump({"records": log, "infos": infos}, f, protocol=pickle.HIGHEST_PROTOCOL)
        print(f"{name}: {len(log)} records in {time.perf_counter() - t:.0f} s", flush=True)
    truth = {a.info.account_id: {"kind": a.kind.split(":", 1)[1], "campaign": a.campaign or "",
                                 "planned": a.planned} for a in ea + xa}
    (out / "truth.json").write_text(json.dumps({"config": {"seeds": args.seeds, "calib_seed": cfg.calib_seed,
                                                           "eval_seed": cfg.eval_seed,
                                                           "campaign_seed": cfg.campaign_seed,
                                                           "population": cfg.population, "days": cfg.days},
                                                "accounts": truth}) + "\n")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load(data: Path, name: str) -> tuple[list[Any], dict[str, Any]]:
    with (data / f"{name}.pkl").open("rb") as f:
        d = pickle.load(f)
    return d["records"], d["infos"]


def replay_arena(det: Any, records: list[Any], infos: dict[str, Any]) -> dict[str, Any]:
    """Replay as ``run_traffic`` notes flags: after each request, and for clustered accounts at each refresh.
    Returns per account: sent, first flag (requests sent, ts), first block (requests sent, ts)."""
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"sent": 0, "flag": None, "block": None, "degrade": None})
    now = [0.0]

    def note(aid: str) -> None:
        o = out[aid]
        if o["flag"] is not None and o["block"] is not None and o["degrade"] is not None:
            return
        v = det.verdict(aid)
        if v is None:
            return
        if v.flagged and o["flag"] is None:
            o["flag"] = (o["sent"], now[0])
        if v.suggested == "block" and o["block"] is None:
            o["block"] = (o["sent"], now[0])
        if v.suggested == "degrade" and o["degrade"] is None:
            o["degrade"] = (o["sent"], now[0])

    det.on_refresh = lambda d: [note(a) for a in d.cluster_of_ if a in out]
    for r in records:
        now[0] = r.ts
        out[r.account_id]["sent"] += 1
        det.observe(r, infos.get(r.account_id))
        note(r.account_id)
    det.on_refresh = None
    det.refresh_clusters()
    return out


def rate(k: int, n: int) -> str:
    from stillhouse.distill.metrics import wilson_interval

    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} = {k / n if n else float('nan'):.4g} [{lo:.3g}, {hi:.3g}]"


def score(args: argparse.Namespace) -> None:
    from stillhouse.config import config_from_dict, config_to_dict
    from stillhouse.guard.detect import DetectConfig, WindowDetector

    data = Path(args.data)
    truth = json.loads((data / "truth.json").read_text())["accounts"]
    overrides = dict(kv.split("=", 1) for kv in args.set)
    dcfg = config_from_dict(DetectConfig, {**config_to_dict(DetectConfig()), **{k: _value(v) for k, v in
                                                                                  overrides.items()}})
    t = time.perf_counter()
    calib, cinfos = load(data, "calib")
    det = WindowDetector(dcfg)
    if args.model and (Path(args.model) / "detector.json").exists() and not args.refit:
        det = WindowDetector.load(args.model)
    else:
        det.fit(calib, cinfos)
        if args.model:
            det.save(args.model)
    t_fit = time.perf_counter() - t
    thr = det.thresholds_
    t = time.perf_counter()
    ev, einfos = load(data, "eval")
    if args.hydra_own_cards:  # robustness: a hydra that pays with one card per account (no payment links)
        from dataclasses import replace as dc_replace

        einfos = {a: dc_replace(i, payment_fingerprint=f"own-{a}") if truth.get(a, {}).get("kind") == "hydra" else i
                  for a, i in einfos.items()}
    cpu = time.process_time()
    res = replay_arena(det, ev, einfos)
    cpu = time.process_time() - cpu
    t_replay = time.perf_counter() - t
    maxs = det.max_score_
    report: dict[str, Any] = {"config": overrides, "thresholds": thr, "calibration": det.calibration_,
                              "fit_s": round(t_fit, 1), "replay_s": round(t_replay, 1),
                              "observe_cpu_us": round(1e6 * cpu / max(len(ev), 1), 1)}
    print(f"fit {t_fit:.0f} s, replay {t_replay:.0f} s ({report['observe_cpu_us']} us CPU/request); thresholds "
          f"throttle {thr['throttle']:.2f} block {thr['block']:.2f}")
    by_shape: dict[str, list[str]] = defaultdict(list)
    by_kind: dict[str, list[str]] = defaultdict(list)
    for a, tr in truth.items():
        if tr["campaign"]:
            by_shape[tr["kind"]].append(a)
            by_shape["(all)"].append(a)
        elif res[a]["sent"] >= 3:
            by_kind[tr["kind"]].append(a)
            by_kind["(all)"].append(a)
    for key, head, groups in (("tpr", "| shape | n | TPR throttle | TPR block |", by_shape),
                              ("fpr", "| archetype | eligible | FPR throttle | FPR block |", by_kind)):
        print(f"\n{head}\n|---|---|---|---|")
        for s, ids in sorted(groups.items()):
            k_t = sum(maxs.get(a, 0) > thr["throttle"] for a in ids)
            k_b = sum(maxs.get(a, 0) > thr["block"] for a in ids)
            print(f"| {s} | {len(ids)} | {rate(k_t, len(ids))} | {rate(k_b, len(ids))} |")
            report.setdefault(key, {})[s] = {"n": len(ids), "throttle": k_t, "block": k_b}
    print("\n| archetype or shape | eligible | told to block | degraded for review (never blocked) |\n|---|---|---|---|")
    for s, ids in sorted(by_kind.items()) + sorted((f"campaign:{k}", v) for k, v in by_shape.items()):
        blocked = sum(res[a]["block"] is not None for a in ids)
        reviewed = sum(res[a]["block"] is None and res[a]["degrade"] is not None for a in ids)
        if blocked or reviewed:
            print(f"| {s} | {len(ids)} | {blocked} | {reviewed} |")
            report.setdefault("enforcement", {})[s] = {"n": len(ids), "blocked": blocked, "reviewed": reviewed}
    # campaigns: volume at first flag / all blocked
    camp: dict[str, list[str]] = defaultdict(list)
    for a, tr in truth.items():
        if tr["campaign"]:
            camp[tr["campaign"]].append(a)
    print("\n| campaign | accts | planned | flagged | blocked | vol@1st flag | vol@1st block | vol@all blocked |")
    print("|---|---|---|---|---|---|---|---|")
    for cid, ids in sorted(camp.items()):
        planned = sum(truth[a]["planned"] for a in ids)
        sends = sorted(r.ts for r in ev if r.account_id in set(ids))

        def share(ts: float | None, sends: list[float] = sends, planned: int = planned) -> str:
            if ts is None:
                return "–"
            return f"{np.searchsorted(sends, ts, side='right') / planned:.3f}"
        flags = [res[a]["flag"][1] for a in ids if res[a]["flag"]]
        blocks = [res[a]["block"][1] for a in ids if res[a]["block"]]
        all_b = max(blocks) if len(blocks) == len(ids) else None
        print(f"| {cid} | {len(ids)} | {planned} | {len(flags)} | {len(blocks)} | {share(min(flags, default=None))} | "
              f"{share(min(blocks, default=None))} | {share(all_b)} |")
    for tier in ("block", "throttle"):
        fps = sorted(((maxs.get(a, 0), a) for a in by_kind["(all)"] if maxs.get(a, 0) > thr[tier]), reverse=True)
        print(f"\nbenign over {tier} ({len(fps)}):")
        for s, a in fps[: args.show]:
            v = det.verdict(a)
            print(f"  {a} {truth[a]['kind']} sent={res[a]['sent']} max={s:.2f} now={v.score:.2f} "
                  f"cl={v.cluster_id} {[(n, round(x, 1)) for n, x in v.reasons[:6]]}")
    missed = sorted((maxs.get(a, 0), a) for a in by_shape["(all)"] if maxs.get(a, 0) <= thr["block"])
    print(f"\ncampaign accounts under block ({len(missed)}):")
    for s, a in missed[: args.show]:
        v = det.verdict(a)
        print(f"  {a} {truth[a]['kind']} sent={res[a]['sent']} max={s:.2f} cl={v.cluster_id} "
              f"{[(n, round(x, 1)) for n, x in v.reasons[:6]]}")
    if args.json:
        from stillhouse.guard.detect.account import FEATURES, features

        final = {}
        for a in truth:
            st = det.accounts_.get(a)
            if st is None:
                continue
            f = features(st.sums, det.layout, det.config.rate_prior_weight, det.mu_ref_, det.ref_sq_,
                         full=det.config.rate_full_requests)
            final[a] = {"max": maxs.get(a, 0.0), "sent": res[a]["sent"], "cluster": det.cluster_of_.get(a),
                        "surprisal": dict(zip(FEATURES, det._surprisals(f, st.sums))),
                        "evidence": st.sums[det.layout.EVIDENCE: det.layout.EVIDENCE + 2].tolist()}
        report["accounts"] = final
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("--seeds", default="dev1")
    g.add_argument("--population", default="real", choices=("real", "synthetic"))
    g.add_argument("--data", required=True)
    s = sub.add_parser("score")
    s.add_argument("--data", required=True)
    s.add_argument("--set", action="append", default=[], help="DetectConfig field=value (JSON values)")
    s.add_argument("--model", default="", help="save the fitted detector here, or load it when present")
    s.add_argument("--refit", action="store_true")
    s.add_argument("--show", type=int, default=15)
    s.add_argument("--json", default="")
    s.add_argument("--hydra-own-cards", action="store_true", help="give each hydra account its own card")
    args = ap.parse_args()
    {"gen": gen, "score": score}[args.cmd](args)


if __name__ == "__main__":
    main()
