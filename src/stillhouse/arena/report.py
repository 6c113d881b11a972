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


def write_report(out: Path, metrics: dict[str, Any], result: RunResult, thresholds: dict[str, float]) -> Path:
    from stillhouse.arena.metrics import split_scores

    benign, attack = split_scores(result)
    plot_roc(out / "roc.png", benign, attack, thresholds)
    planned = {row["campaign"]: row["planned"] for row in metrics["campaigns"]}
    plot_leak(out / "leak_curve.png", result, planned)
    op = metrics["operational"]
    cal = metrics["calibration"]
    lines = [
        "# Arena report", "",
        f"Simulated {metrics['config']['days']} days; gateway `{metrics['config']['gateway']}`; "
        f"upstream `{metrics['config']['upstream']}`. Calibration: {cal['accounts_half_a']} + "
        f"{cal['accounts_half_b']} benign accounts (seed {metrics['config']['calib_seed']}), "
        f"{metrics['requests']['calibration']} requests. Evaluation: {op['benign_accounts']} benign accounts "
        f"(seed {metrics['config']['eval_seed']}) + {op['campaign_accounts']} campaign accounts, "
        f"{metrics['requests']['evaluation']} requests. Wall time {metrics['timings_s']['total_s']:.0f} s.", "",
        "## Detection at the calibrated thresholds (what the guard enforced)", "",
        "| tier | target benign FPR | threshold | campaign TPR | realized benign FPR (eval) | benign flagged |",
        "|---|---|---|---|---|---|",
    ]
    targets = {"throttle": metrics["config"].get("throttle_fpr", 1e-2), "block": 1e-3}
    targets["throttle"] = 1e-2
    for name in ("throttle", "block"):
        row = op[name]
        lines.append(f"| {name} | {targets[name]:g} | {row['threshold']:.2f} | {row['tpr']:.3f} | "
                     f"{row['benign_fpr']:.4f} | {row['benign_flagged']} / {op['benign_accounts']} |")
    lines += ["", f"Calibration FPR resolution: 1/{cal['accounts_half_b']} = {cal['fpr_resolution']:.2g} "
              "(a target below it is set at the benign maximum).", "",
              "Benign accounts over the thresholds, by archetype:", "",
              "| archetype | accounts | over throttle | over block |", "|---|---|---|---|"]
    for kind, row in op["benign_flagged_by_kind"].items():
        lines.append(f"| {kind} | {row['accounts']} | {row['over_throttle']} | {row['over_block']} |")
    lines += ["", "Eval-set oracle (threshold chosen on these benign accounts; for the ROC only):", ""]
    for f, row in metrics["eval_oracle_tpr_at_fpr"].items():
        lines.append(f"- TPR at FPR {float(f):g}: {row['tpr']:.3f} (threshold {row['threshold']:.2f})")
    lines += ["", "![ROC](roc.png)", "", "## Campaigns", "",
              "| campaign | shape | accts | planned | sent | leaked | leaked/planned | blocked accts | "
              "median queries to flag | median tokens to flag | volume at 1st flag | volume at half flagged |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in metrics["campaigns"]:
        lines.append(
            f"| {r['campaign']} | {r['shape']} | {r['accounts']} | {r['planned']} | {r['sent']} | {r['leaked']} | "
            f"{r['leaked_share']:.3f} | {r['detected_accounts']}/{r['accounts']} | {_fmt(r['median_queries_to_flag'])} | "
            f"{_fmt(r['median_tokens_to_flag'])} | {_fmt(r['volume_share_at_first_flag'])} | "
            f"{_fmt(r['volume_share_at_half_flagged'])} |")
    lines += ["", "'volume at …' = share of the campaign's planned requests it had sent when its first account "
              "(or half its accounts) was first flagged.", "",
              "TPR by attacker fraction (mixed campaigns, share of accounts over the block threshold): " +
              ", ".join(f"{k}: {v:.2f}" for k, v in metrics["tpr_by_attacker_fraction"].items()), "",
              f"Cluster recovery (ARI): all accounts {metrics['ari']['all_accounts']:.3f}, "
              f"campaign accounts {metrics['ari']['campaign_accounts']:.3f}.", "",
              "![leak curve](leak_curve.png)", "",
              f"Online == offline on the guard's log: {metrics['offline_equals_online']}", "",
              f"Capability leaked: {metrics['capability_leaked']}", "",
              "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["timings_s"].items()), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
