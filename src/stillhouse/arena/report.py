"""The arena's report: ``report.md`` with the metrics tables, ``roc.png`` and ``leak_curve.png``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stillhouse.arena.simulate import RunResult


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def plot_roc(path: Path, benign: np.ndarray, attack: np.ndarray, thresholds: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stillhouse.arena.metrics import roc

    fpr, tpr, _ = roc(benign, attack)
    floor = 0.5 / max(benign.size, 1)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.step(np.maximum(fpr, floor), tpr, where="post", label="all campaign accounts")
    for name, t in thresholds.items():
        f = max(float((benign > t).mean()), floor)
        ax.scatter([f], [float((attack > t).mean())], marker="o", zorder=3, label=f"{name} threshold (calibrated)")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0, 1.02)
    ax.axvline(1e-3, color="grey", lw=0.6, ls="--")
    ax.axvline(1e-2, color="grey", lw=0.6, ls=":")
    ax.set_xlabel(f"benign FPR (eval accounts, n={benign.size}; left edge = below 1/n)")
    ax.set_ylabel(f"campaign TPR (n={attack.size})")
    ax.set_title("Per-account ROC, max score over the run")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_leak(path: Path, result: RunResult, planned: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.set_prop_cycle(color=[plt.get_cmap("tab20")(i / 20) for i in range(0, 20, 2)] +
                      [plt.get_cmap("tab20")(i / 20) for i in range(1, 20, 2)])  # 20 distinct colours
    t0 = min((pts[0][0] for pts in result.leak_curve.values() if pts), default=0.0)
    for cid, pts in sorted(result.leak_curve.items()):
        if not pts or not planned.get(cid):
            continue
        xs = [(t - t0) / 86400 for t, _ in pts]
        ys = [n / planned[cid] for _, n in pts]
        ax.plot(xs, ys, label=cid, lw=1.2)
    ax.set_xlabel("simulated days")
    ax.set_ylabel("leaked examples / planned (unblocked harvest)")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_ylim(0, 1.05)
    ax.set_title("What leaked before enforcement")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fractions(path: Path, fractions: dict[str, dict[str, Any]]) -> None:
    """TPR (with Wilson intervals) against the attacker fraction, one line per tier."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(fractions.values(), key=lambda r: r["attacker_fraction"])
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    xs = [r["attacker_fraction"] for r in rows]
    for tier, marker in (("throttle", "s"), ("block", "o")):
        if not rows or tier not in rows[0]:
            continue
        ys = np.array([r[tier]["value"] for r in rows])
        err = np.array([[y - r[tier]["lo"] for y, r in zip(ys, rows)], [r[tier]["hi"] - y for y, r in zip(ys, rows)]])
        ax.errorbar(xs, ys, yerr=np.maximum(err, 0), marker=marker, capsize=3, label=f"{tier} threshold")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("attacker fraction of the account's requests")
    ax.set_ylabel(f"campaign TPR (n={rows[0]['accounts'] if rows else 0} accounts each)")
    ax.set_title("TPR by attacker fraction (Wilson 95%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _capability_review(review: Any) -> str:
    """Who worked the capability stage's review queue, for its first sentence."""
    if not isinstance(review, dict):
        return " (nobody reviewed the queue)"
    return (f" (the {review['reviewer']} operator reviewed the queue every {review['every_h']:g} simulated hours and "
            f"blocked {review['blocked_accounts']['campaign']} of them)")


def capability_lines(cap: Any) -> list[str]:
    """The capability-leaked section (a sentence when the stage did not run)."""
    if not isinstance(cap, dict):
        return [str(cap)]
    acc = cap["accuracy"]
    r = cap["gain_ratio"]
    cfg = cap["config"]

    def est(e: dict[str, Any]) -> str:
        return f"{e['value']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]"

    out = [f"A `harvest` campaign ({cap['accounts']} accounts, {cap['planned']} planned additions over "
           f"{cfg['days']:g} simulated days) through the guard with the fitted detector to the real teacher "
           f"(`{cfg['teacher']}`, revision {str(cap['teacher_revision'])[:24]}): {cap['leaked']} answers leaked "
           f"({cap['leaked_share']:.1%} of plan), {cap['blocked_accounts']}/{cap['accounts']} accounts blocked"
           f"{_capability_review(cap.get('review'))}. "
           f"Students: `{cfg['student']}` init, SFT {cfg['epochs']} epochs, batch {cfg['batch_size']}, lr {cfg['lr']:g}"
           f"{', verified rows only' if cfg['verified_only'] else ''} (leaked: {cap['train_rows']['leaked']} rows, "
           f"full harvest: {cap['train_rows']['full']} rows). Eval: {cap['eval_items']} held-out 2-digit additions, "
           "greedy; Wilson 95% intervals.", "",
           "| model | accuracy [95% CI] |", "|---|---|",
           f"| init ({cfg['student']}) | {est(acc['init'])} |",
           f"| trained on what leaked before the block | {est(acc['leaked'])} |",
           f"| trained on the unblocked harvest | {est(acc['full'])} |", ""]
    if r["value"] == r["value"]:
        out.append(f"Gain ratio (leaked gain / full gain over the init): {r['value']:.3f} "
                   f"[{r['lo']:.3f}, {r['hi']:.3f}] (paired bootstrap over items); gains "
                   f"{r['gain_leaked']:+.3f} vs {r['gain_full']:+.3f}. Goal <= 0.5: "
                   f"{'met' if cap['goal_met'] else 'not met'}.")
    else:
        out.append(f"Gain ratio undefined: the full-harvest student gained {r['gain_full']:+.3f} over its init.")
    return out


def review_lines(review: Any) -> list[str]:
    """The review queue's operator in the report (``arena/review.py``), when one worked it."""
    if not isinstance(review, dict):
        return []
    acts = review["actions"]

    def counts(side: str) -> str:
        return ", ".join(f"{n} {what}" for what, n in sorted(acts[side].items())) or "none"

    benign = review["blocked_accounts"]["benign"]
    named = f" ({', '.join(review['benign_blocked'])})" if review["benign_blocked"] else ""
    return ["## The review queue: an operator works it", "",
            f"The **{review['reviewer']}** operator read the console's review queue every {review['every_h']:g} "
            f"simulated hours ({review['rounds']} rounds) and acted through the console's actions: on campaign "
            f"accounts' decisions {counts('campaign')}; on benign accounts' {counts('benign')}. Blocked by the "
            f"operator (not blocked by the policy before): **{review['blocked_accounts']['campaign']} campaign "
            f"accounts, {benign} benign**{named}. "
            "The leaks in the campaign table below are what went out before each block; its 'blocked' and "
            "'degraded' columns are the detector's verdicts, and an account the operator blocked stops scoring.",
            ""]


def operator_lines(op: dict[str, Any] | None) -> list[str]:
    """The operator's path in the report: the fit window and the check before enforcing (``arena/operator.py``)."""
    if not op:
        return []
    lines = ["## The operator's path: fit on a shadow window, check on the next before enforcing", "",
             "The calibration and check populations went through a shadow-mode guard into one log; the detector was "
             "fitted on the first window (`stillhouse detect --fit --since --until`) and checked on the second "
             "(`stillhouse detect check`), disjoint populations, before the evaluation enforced it.", "",
             f"- fit: {op['fit_summary']}"]
    if not op.get("check"):
        return [*lines, "- check: not run (check_accounts = 0)", ""]
    lines += [f"- check: {op['check_summary']}", "", "```", *op["check_lines"], "```", ""]
    refit = op.get("refit")
    if refit:
        def thr(t: dict[str, float]) -> str:
            return f"throttle {t['throttle']:.2f}, block {t['block']:.2f}"

        lines += [(f"The check failed, so the detector was refitted on both windows ({refit['summary']}) and that "
                   f"model was enforced: thresholds {thr(refit['first_thresholds'])} -> {thr(refit['thresholds'])}. "
                   "It was not checked on a further window; the evaluation below is its check."), ""]
    return lines


def write_report(out: Path, metrics: dict[str, Any], result: RunResult, thresholds: dict[str, float]) -> Path:
    from stillhouse.arena.metrics import split_scores

    benign, attack = split_scores(result)
    plot_roc(out / "roc.png", benign, attack, thresholds)
    planned = {row["campaign"]: row["planned"] for row in metrics["campaigns"]}
    plot_leak(out / "leak_curve.png", result, planned)
    if metrics["tpr_by_attacker_fraction"]:
        plot_fractions(out / "fractions.png", metrics["tpr_by_attacker_fraction"])
    op = metrics["operational"]
    cal = metrics["calibration"]
    def ci(r: dict[str, Any], digits: int = 3) -> str:
        return f"{r['value']:.{digits}g} [{r['lo']:.{digits}g}, {r['hi']:.{digits}g}] ({r['k']}/{r['n']})"

    seed_set = metrics.get("seed_set", "unnamed development seeds")
    which = ("a test seed set: run to report, never to choose anything" if "(test)" in seed_set else
             "development: tuning on it is allowed, so its figures are not held-out results")
    lines = [
        "# Arena report", "",
        f"**Seed set: {seed_set}.** Every figure below comes from this seed set ({which}).", "",
        f"Simulated {metrics['config']['days']} days; gateway `{metrics['config']['gateway']}`; "
        f"population `{metrics['config'].get('population', 'synthetic')}` (calibrated on "
        f"`{metrics['config'].get('calib_population') or metrics['config'].get('population', 'synthetic')}`, "
        f"split `{metrics['config'].get('split', 'dev')}`; campaign topics "
        f"`{metrics['config'].get('campaign_topics', 'math')}`); "
        f"upstream `{metrics['config']['upstream']}`. Calibration: {cal['accounts_half_a']} + "
        f"{cal['accounts_half_b']} benign accounts (seed {metrics['config']['calib_seed']}), "
        f"{metrics['requests']['calibration']} requests. Evaluation: {op['benign_accounts']} benign accounts "
        f"(seed {metrics['config']['eval_seed']}; {op['active_benign_accounts']} of them active, i.e. with "
        f">= {op['active_min_requests']} requests) + {op['campaign_accounts']} campaign accounts, "
        f"{metrics['requests']['evaluation']} requests. Wall time {metrics['timings_s']['total_s']:.0f} s.", "",
        "## Per-account TPR at the calibrated FPR targets (what the guard enforced)", "",
        "Thresholds are benign quantiles of the calibration seed's held-out half; the campaigns and the "
        "evaluation accounts never touch them. Intervals are Wilson 95%.", "",
        "| tier | goal: benign FPR at most | detector's target | threshold | campaign TPR (accounts) | "
        "benign FPR, all eval accounts | benign FPR, active accounts |",
        "|---|---|---|---|---|---|---|",
    ]
    goals = {"throttle": 1e-2, "block": 1e-3}
    targets = metrics.get("detector_targets") or goals
    for name in ("throttle", "block"):
        row = op[name]
        lines.append(f"| {name} | {goals[name]:g} | {targets[name]:g} | {row['threshold']:.2f} | "
                     f"{ci(row['tpr_ci'])} | {ci(row['fpr_ci'])} | {ci(row['active_fpr_ci'])} |")
    lines += ["", f"Calibration FPR resolution: 1/{cal['accounts_half_b'] + 1} = {cal['fpr_resolution']:.2g} "
              "(for a target below a few calibration accounts the threshold also consults an exponential tail "
              "fitted to the largest benign scores).", ""]
    lines += operator_lines(metrics.get("operator"))
    lines += review_lines(metrics.get("review"))
    lines += ["TPR by campaign shape (share of the shape's accounts over each threshold):", "",
              "| shape | accounts | TPR at throttle | TPR at block |", "|---|---|---|---|"]
    for shape, row in metrics["tpr_by_shape"].items():
        lines.append(f"| {shape} | {row['block']['n']} | {ci(row['throttle'])} | {ci(row['block'])} |")
    by_kind = metrics.get("fpr_by_archetype") or {}
    n_min = next(iter(by_kind.values()))["min_requests"] if by_kind else 3
    lines += ["", f"Benign FPR by archetype, over the accounts with at least {n_min} requests (eligible):", "",
              "| archetype | accounts | eligible | requests | FPR at throttle | FPR at block |", "|---|---|---|---|---|---|"]
    for kind, row in by_kind.items():
        lines.append(f"| {kind} | {row['accounts']} | {row['eligible']} | {row['requests']} | "
                     f"{ci(row['throttle'])} | {ci(row['block'])} |")
    enforcement = metrics.get("enforcement_by_kind") or {}
    if enforcement:
        lines += ["", ("What the detector told the guard to do, per archetype and campaign shape (accounts with at "
                       "least 3 requests): block, or degrade and list for review (a block score without a rare ask "
                       "or a coordinated cluster behind it, `DetectConfig.block_requires`):"), "",
                  "| archetype or shape | eligible | blocked | degraded for review |", "|---|---|---|---|"]
        for kind, row in enforcement.items():
            lines.append(f"| {kind} | {row['eligible']} | {ci(row['blocked'])} | {ci(row['reviewed'])} |")
    lines += ["", "Eval-set oracle (threshold chosen on these benign accounts; for the ROC only):", ""]
    for f, row in metrics["eval_oracle_tpr_at_fpr"].items():
        lines.append(f"- TPR at FPR {float(f):g}: {row['tpr']:.3f} (threshold {row['threshold']:.2f})")
    lines += ["", "![ROC](roc.png)", ""]
    if metrics["tpr_by_attacker_fraction"]:
        lines += ["## TPR by attacker fraction", "",
                  "The `cot` shape diluted with benign-looking cover questions, so that only this share of each "
                  "account's requests is distillation traffic:", "",
                  "| attacker fraction | accounts | TPR at throttle | TPR at block |", "|---|---|---|---|"]
        for row in metrics["tpr_by_attacker_fraction"].values():
            lines.append(f"| {row['attacker_fraction']:g} | {row['accounts']} | {ci(row['throttle'])} | "
                         f"{ci(row['block'])} |")
        lines += ["", "![TPR by attacker fraction](fractions.png)", ""]
    lines += ["## Campaigns", "",
              "| campaign | shape | accts | planned | sent | leaked | leaked/planned | over block threshold | blocked | "
              "degraded, not blocked | median queries to flag | median tokens to flag | volume at 1st flag | "
              "volume at half flagged |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in metrics["campaigns"]:
        lines.append(
            f"| {r['campaign']} | {r['shape']} | {r['accounts']} | {r['planned']} | {r['sent']} | {r['leaked']} | "
            f"{r['leaked_share']:.3f} | {r['detected_accounts']}/{r['accounts']} | {r['blocked_accounts']}/{r['accounts']} | "
            f"{r['degraded_accounts']}/{r['accounts']} | {_fmt(r['median_queries_to_flag'])} | "
            f"{_fmt(r['median_tokens_to_flag'])} | {_fmt(r['volume_share_at_first_flag'])} | "
            f"{_fmt(r['volume_share_at_half_flagged'])} |")
    lines += ["", "'leaked' = distillation requests answered, degraded answers included (cover traffic is not "
              "counted). 'over block threshold': accounts whose score ever passed it; 'blocked': those the policy "
              "blocked; 'degraded, not blocked': a block score without the evidence a block needs "
              "(`DetectConfig.block_requires`), so the account was degraded and listed for review, and kept being "
              "answered, up to the guard's `degrade_requests_per_day` (429 past it). 'volume at …' = share of the "
              "campaign's planned requests it had sent when its first account (or half its accounts) was first "
              "flagged.", "",
              f"Cluster recovery (ARI): all accounts {metrics['ari']['all_accounts']:.3f}, "
              f"campaign accounts {metrics['ari']['campaign_accounts']:.3f}.", "",
              "![leak curve](leak_curve.png)", "",
              f"Online == offline on the guard's log: {metrics['offline_equals_online']}", "",
              "## Capability leaked", ""]
    lines += capability_lines(metrics["capability_leaked"])
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["timings_s"].items()), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def merge_capability(out: Path, cap: dict[str, Any]) -> None:
    """Put a capability stage run later (``--capability-only``) into an earlier run's ``metrics.json``
    and the Capability section of its ``report.md``; writes ``capability/report.md`` either way."""
    import json

    section = capability_lines(cap)
    (out / "capability").mkdir(parents=True, exist_ok=True)
    (out / "capability" / "report.md").write_text("\n".join(["# Capability leaked", "", *section, ""]))
    if (out / "metrics.json").exists():
        metrics = json.loads((out / "metrics.json").read_text())
        metrics["capability_leaked"] = cap
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    report = out / "report.md"
    if report.exists():
        text = report.read_text()
        head, sep, rest = text.partition("## Capability leaked\n\n")
        if sep:
            _, tsep, tail = rest.partition("\n\nTimings (s): ")
            report.write_text(head + sep + "\n".join(section) + (tsep + tail if tsep else "\n"))

