"""The contest's metrics, as plain functions of a run's outcomes.

- :func:`roc` / :func:`tpr_at_fpr` — per-account ROC of the detector's maximum score
  (campaign accounts vs benign accounts of the *evaluation* seed);
- :func:`operational` — TPR and realized benign FPR at the thresholds calibrated on the
  separate benign seed (what the guard actually enforces);
- :func:`campaign_table` — per campaign: accounts, planned, sent, leaked before
  enforcement, detection rate, queries and tokens until the first flag, and the share of
  the campaign's planned volume it had sent when its first account / half its accounts
  were flagged;
- :func:`cluster_ari` — adjusted Rand index of detector clusters against the truth;
- :func:`rate` — a count over a total with its Wilson 95% interval (every TPR and FPR
  in the report carries one, and the number of accounts it rests on);
- :func:`tpr_by_shape` — per campaign shape, the share of accounts over each threshold;
- :func:`fpr_by_kind` — per benign archetype, the share of its accounts with at least 3 requests over each
  threshold (the FPR the issue-16 goals are stated on);
- :func:`enforcement_by_kind` — per archetype and campaign shape, the accounts the detector told to block,
  and those it sent to review (degrade) instead;
- :func:`gain_ratio` — capability leaked: the leaked-data student's gain over its init as a
  share of the full-harvest student's gain, with a paired-bootstrap interval over items.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from typing import Any

import numpy as np

from stillhouse.arena.simulate import RunResult


def roc(benign: np.ndarray, attack: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for 'flag when score > t' over every distinct score."""
    thresholds = np.unique(np.r_[benign, attack, -np.inf])[::-1]
    fpr = np.array([(benign > t).mean() if benign.size else 0.0 for t in thresholds])
    tpr = np.array([(attack > t).mean() if attack.size else 0.0 for t in thresholds])
    return fpr, tpr, thresholds


def tpr_at_fpr(benign: np.ndarray, attack: np.ndarray, fpr: float) -> tuple[float, float]:
    """(TPR, threshold) at the smallest threshold whose benign FPR is <= fpr (eval-set oracle)."""
    if benign.size == 0:
        raise ValueError("no benign accounts to set an FPR on")
    s = np.sort(benign)[::-1]
    k = int(np.floor(fpr * s.size))
    t = float(s[min(k, s.size - 1)])
    return float((attack > t).mean()) if attack.size else float("nan"), t


def split_scores(result: RunResult) -> tuple[np.ndarray, np.ndarray]:
    benign = np.array([result.max_scores.get(a, 0.0) for a, acc in result.accounts.items() if not acc.malicious])
    attack = np.array([result.max_scores.get(a, 0.0) for a, acc in result.accounts.items() if acc.malicious])
    return benign, attack


def rate(k: int, n: int) -> dict[str, float | int]:
    """``k`` of ``n`` as {k, n, value, lo, hi}: the proportion and its Wilson 95% interval."""
    from stillhouse.distill.metrics import wilson_interval

    lo, hi = wilson_interval(int(k), int(n))
    return {"k": int(k), "n": int(n), "value": k / n if n else float("nan"), "lo": lo, "hi": hi}


ACTIVE_MIN_REQUESTS = 10
"""Benign accounts with at least this many requests count as 'active' (their FPR is reported apart:
most accounts are light users that no threshold would flag)."""


def operational(result: RunResult, thresholds: dict[str, float]) -> dict[str, Any]:
    benign, attack = split_scores(result)
    active = np.array([result.max_scores.get(a, 0.0) for a, acc in result.accounts.items()
                       if not acc.malicious and result.outcomes[a].sent >= ACTIVE_MIN_REQUESTS])
    out: dict[str, Any] = {"benign_accounts": int(benign.size), "campaign_accounts": int(attack.size),
                           "active_benign_accounts": int(active.size), "active_min_requests": ACTIVE_MIN_REQUESTS}
    for name, t in thresholds.items():
        out[name] = {"threshold": t, "tpr": float((attack > t).mean()) if attack.size else float("nan"),
                     "benign_fpr": float((benign > t).mean()) if benign.size else float("nan"),
                     "benign_flagged": int((benign > t).sum()),
                     "tpr_ci": rate(int((attack > t).sum()), attack.size),
                     "fpr_ci": rate(int((benign > t).sum()), benign.size),
                     "active_fpr_ci": rate(int((active > t).sum()), active.size)}
    by_kind: dict[str, list[float]] = defaultdict(list)
    for a, acc in result.accounts.items():
        if not acc.malicious:
            by_kind[acc.kind].append(result.max_scores.get(a, 0.0))
    out["benign_flagged_by_kind"] = {k: {"accounts": len(v), "over_block": int(sum(x > thresholds["block"] for x in v)),
                                         "over_throttle": int(sum(x > thresholds["throttle"] for x in v))}
                                     for k, v in sorted(by_kind.items())}
    return out


ELIGIBLE_MIN_REQUESTS = 3
"""The issue-16 goals count benign accounts with at least this many requests (the detector flags no account
before ``DetectConfig.min_requests`` = 3 of them)."""


def fpr_by_kind(result: RunResult, thresholds: dict[str, float],
                min_requests: int = ELIGIBLE_MIN_REQUESTS) -> dict[str, dict[str, Any]]:
    """Benign archetype -> {accounts, eligible (>= ``min_requests`` sent), requests, and per tier the rate of
    eligible accounts over its threshold with its Wilson interval}; '(all)' pools every benign account."""
    groups: dict[str, list[str]] = defaultdict(list)
    for a, acc in result.accounts.items():
        if not acc.malicious:
            groups[acc.kind.split(":", 1)[-1]].append(a)
            groups["(all)"].append(a)
    out: dict[str, dict[str, Any]] = {}
    for kind, ids in sorted(groups.items()):
        eligible = [result.max_scores.get(a, 0.0) for a in ids if result.outcomes[a].sent >= min_requests]
        out[kind] = {"accounts": len(ids), "eligible": len(eligible), "min_requests": min_requests,
                     "requests": sum(result.outcomes[a].sent for a in ids),
                     **{tier: rate(sum(x > t for x in eligible), len(eligible)) for tier, t in thresholds.items()}}
    return out


def enforcement_by_kind(result: RunResult, min_requests: int = ELIGIBLE_MIN_REQUESTS) -> dict[str, dict[str, Any]]:
    """Benign archetype or campaign shape -> of its accounts with at least ``min_requests`` requests, how many
    the detector ever told to block, and how many it sent to review (``degrade``: a block score without the
    evidence a block needs, ``DetectConfig.block_requires``) without ever blocking them."""
    groups: dict[str, list[str]] = defaultdict(list)
    for a, acc in result.accounts.items():
        kind = acc.kind.split(":", 1)[-1]
        groups[f"campaign:{kind}" if acc.malicious else kind].append(a)
    out: dict[str, dict[str, Any]] = {}
    for kind, ids in sorted(groups.items()):
        ids = [a for a in ids if result.outcomes[a].sent >= min_requests]
        blocked = sum(result.outcomes[a].first_block is not None for a in ids)
        reviewed = sum(result.outcomes[a].degraded_only for a in ids)
        out[kind] = {"eligible": len(ids), "blocked": rate(blocked, len(ids)), "reviewed": rate(reviewed, len(ids))}
    return out


def _frac_sent_by(send_ts: list[float], t: float | None, planned: int) -> float | None:
    if t is None or planned <= 0:
        return None
    return bisect.bisect_right(send_ts, t) / planned


def campaign_table(result: RunResult, thresholds: dict[str, float]) -> list[dict[str, Any]]:
    members: dict[str, list[str]] = defaultdict(list)
    for a, acc in result.accounts.items():
        if acc.malicious:
            members[acc.campaign or ""].append(a)
    rows = []
    for cid, accs in sorted(members.items()):
        outs = [result.outcomes[a] for a in accs]
        shape = result.accounts[accs[0]].kind.split(":", 1)[1]
        planned = sum(result.accounts[a].planned for a in accs)
        flag_ts = sorted(o.first_flag_ts for o in outs if o.first_flag_ts is not None)
        first = flag_ts[0] if flag_ts else None
        half = flag_ts[(len(accs) + 1) // 2 - 1] if len(flag_ts) >= (len(accs) + 1) // 2 else None
        q = [o.first_flag for o in outs if o.first_flag is not None]
        tok = [o.first_flag_tokens for o in outs if o.first_flag_tokens is not None]
        send_ts = result.send_ts.get(cid, [])
        rows.append({
            "campaign": cid, "shape": shape, "accounts": len(accs), "planned": planned,
            "sent": sum(o.sent for o in outs), "leaked": sum(o.leaked for o in outs),
            "leaked_share": sum(o.leaked for o in outs) / planned if planned else 0.0,
            "detected_accounts": sum(result.max_scores.get(a, 0.0) > thresholds["block"] for a in accs),
            # what the policy did: a block score without the evidence a block needs is degraded for review instead
            "blocked_accounts": sum(o.first_block is not None for o in outs),
            "degraded_accounts": sum(o.degraded_only for o in outs),
            "flagged_accounts": len(flag_ts),
            "median_queries_to_flag": float(np.median(q)) if q else None,
            "median_tokens_to_flag": float(np.median(tok)) if tok else None,
            "volume_share_at_first_flag": _frac_sent_by(send_ts, first, planned),
            "volume_share_at_half_flagged": _frac_sent_by(send_ts, half, planned),
        })
    return rows


def cluster_ari(result: RunResult) -> dict[str, float]:
    """ARI over all accounts, and over campaign accounts only (truth: campaign id; benign: own id)."""
    from sklearn.metrics import adjusted_rand_score

    ids = sorted(result.accounts)
    truth = [result.accounts[a].campaign or f"benign:{a}" for a in ids]
    pred = [result.clusters.get(a) or f"single:{a}" for a in ids]
    mal = [i for i, a in enumerate(ids) if result.accounts[a].malicious]
    return {"all_accounts": float(adjusted_rand_score(truth, pred)),
            "campaign_accounts": float(adjusted_rand_score([truth[i] for i in mal], [pred[i] for i in mal]))
            if mal else float("nan")}


def tpr_by_shape(result: RunResult, thresholds: dict[str, float]) -> dict[str, dict[str, Any]]:
    """shape -> {tier: rate(accounts of that shape over the tier's threshold, accounts)}."""
    scores: dict[str, list[float]] = defaultdict(list)
    for a, acc in result.accounts.items():
        if acc.malicious:
            scores[acc.kind.split(":", 1)[1] if acc.kind.startswith("campaign:") else acc.kind].append(
                result.max_scores.get(a, 0.0))
    return {shape: {name: rate(sum(x > t for x in xs), len(xs)) for name, t in thresholds.items()}
            for shape, xs in sorted(scores.items())}


def gain_ratio(init: np.ndarray, leaked: np.ndarray, full: np.ndarray, n_boot: int = 2000,
               seed: int = 0) -> dict[str, float]:
    """(leaked - init) / (full - init) of per-item correctness (0/1 arrays over the same items).

    Returns {value, lo, hi, gain_leaked, gain_full}; the interval is the 2.5/97.5 percentiles of
    a paired bootstrap over items (resamples whose full-harvest gain is <= 0 are left out, and
    their share is reported as ``undefined_share``). ``value`` is NaN when the full harvest
    gained nothing (no gain to take a share of).
    """
    init, leaked, full = (np.asarray(x, dtype=float) for x in (init, leaked, full))
    if not (init.shape == leaked.shape == full.shape) or init.ndim != 1 or init.size == 0:
        raise ValueError("gain_ratio: init, leaked and full must be 1-D arrays over the same items")
    g_leak, g_full = float(leaked.mean() - init.mean()), float(full.mean() - init.mean())
    value = g_leak / g_full if g_full > 0 else float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, init.size, size=(n_boot, init.size))
    gl = leaked[idx].mean(1) - init[idx].mean(1)
    gf = full[idx].mean(1) - init[idx].mean(1)
    ok = gf > 0
    ratios = gl[ok] / gf[ok]
    lo, hi = (float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))) if ratios.size and g_full > 0 \
        else (float("nan"), float("nan"))
    return {"value": value, "lo": lo, "hi": hi, "gain_leaked": g_leak, "gain_full": g_full,
            "undefined_share": float(1 - ok.mean())}
