"""Labels into detection: analysts' review verdicts reweight the detector's evidence families.

The calibrated detector scores an account as the *sum* over its seven evidence families
(``account.FAMILIES``) of each family's largest surprisal. With labels (``DetectConfig.mode =
"supervised"``, ``stillhouse detect --fit --labels FILE``) the score becomes a weighted sum
``w . family_surprisals`` with non-negative weights fitted by logistic regression on the labelled
accounts:

- non-negative, so more surprising traffic never lowers a score (no family can be gamed downwards);
- pulled toward equal weights by ``DetectConfig.label_prior`` (a penalty on ``||w - mean(w)||^2``
  next to the summed, class-balanced log loss, and a small ridge ``RIDGE`` that bounds their scale),
  so a few labels move the weights a little and many labels move them more; with no usable signal
  the weights stay equal, i.e. the calibrated score;
- rescaled to mean 1, then thresholds are set exactly as before, from the held-out benign half of
  the calibration traffic: the benign false-positive rate stays a calibrated quantity, labels only
  change which accounts rank above it.

Each labelled account contributes one vector: its families at the end of the labelled traffic, or
its cluster's pooled families when those score higher (as the verdict would use them). Accounts
labelled 1 (campaign) are removed from the benign calibration traffic.

Labels come as JSON lines ``{"account_id": ..., "label": 1 | 0, ...}`` (the console's
``labels.jsonl``, or ``GET /admin/labels``), or straight from a guard store URL (its reviews).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stillhouse.guard.detect.account import FAMILY_INDEX, features
from stillhouse.guard.events import AccountInfo, TrafficRecord
from stillhouse.jsonl import iter_jsonl

if TYPE_CHECKING:
    from stillhouse.guard.detect.detector import WindowDetector


class LabelError(ValueError):
    """A labels file or source cannot be used; the message says which line or what to fix."""


def read_labels(source: str | Path) -> dict[str, int]:
    """account id -> 1 (campaign) or 0 (benign), from a JSONL file or a guard store URL (its latest reviews)."""
    src = str(source)
    if src.startswith(("sqlite:///", "postgresql://", "postgres://")):
        from stillhouse.guard.store import open_store

        store = open_store(src, init=False)
        try:
            return {r.account_id: int(r.label) for r in store.labels()}
        finally:
            store.close()
    path = Path(src)
    if not path.exists():
        raise LabelError(f"labels {src!r} not found: give the console's labels.jsonl or the guard's DB URL")
    out: dict[str, int] = {}
    expect = '{"account_id": ..., "label": 0 or 1} per line'
    for lineno, d in iter_jsonl(path, LabelError, expect):
        try:
            aid, label = d["account_id"], d["label"]
        except KeyError as exc:
            raise LabelError(f"{path}:{lineno}: no {exc} field; expected {expect}") from None
        if not isinstance(aid, str) or label not in (0, 1) or isinstance(label, bool):
            raise LabelError(f"{path}:{lineno}: account_id must be a string and label 0 or 1, got {label!r}")
        out[aid] = int(label)
    return out


def family_max(values: Sequence[float]) -> list[float]:
    """Each family's largest surprisal (the terms the calibrated score sums)."""
    return [max(values[i] for i in members) for members in FAMILY_INDEX]


def weighted_families(values: Sequence[float], weights: np.ndarray) -> float:
    """The supervised score: ``weights . family_max(values)``."""
    return float(np.dot(weights, family_max(values)))


def labelled_vectors(det: WindowDetector, records: Iterable[TrafficRecord], accounts: dict[str, AccountInfo],
                     labels: dict[str, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X family vectors, y labels, account ids) of the labelled accounts that have traffic in ``records``.

    ``det`` must hold its benign tables (stage 1 of ``fit``); the records are replayed through an
    unweighted copy of it."""
    scorer = det._clone_unscored()
    scorer.tables_, scorer.tail_scales_ = det.tables_, det.tail_scales_
    cfg, lay = det.config, scorer.layout
    for r in sorted(records, key=lambda r: r.ts):
        scorer.observe(r, accounts.get(r.account_id))
    scorer.refresh_clusters()
    xs, ys, ids = [], [], []
    for aid in sorted(labels):
        st = scorer.accounts_.get(aid)
        if st is None:
            continue
        f = features(st.sums, lay, cfg.rate_prior_weight, scorer.mu_ref_, scorer.ref_sq_, full=cfg.rate_full_requests)
        vec = family_max(scorer._surprisals(f, st.sums))
        cid = scorer.cluster_of_.get(aid)
        if cid:
            group = scorer.clusters_[cid]["members"]
            pooled, _ = scorer.pooled_sums(group)
            fc = features(pooled, lay, cfg.rate_prior_weight, scorer.mu_ref_, scorer.ref_sq_, members=len(group),
                          full=cfg.rate_full_requests)
            cvec = family_max(scorer._surprisals(fc, pooled))
            if sum(cvec) > sum(vec):
                vec = cvec
        xs.append(vec)
        ys.append(labels[aid])
        ids.append(aid)
    return np.array(xs, dtype=np.float64).reshape(len(xs), len(FAMILY_INDEX)), np.array(ys, dtype=np.float64), ids


RIDGE = 1.0
"""The penalty ``RIDGE/2 ||w||^2`` that bounds the weights' scale. Without it, labels that the equal-weight
score already separates let the fit grow the scale forever and ignore the hardest labelled accounts (those
near the other class) that should tilt the weights. Fixed before any measurement, not tuned."""


def fit_family_weights(x: np.ndarray, y: np.ndarray, prior: float) -> np.ndarray:
    """Non-negative family weights (mean 1) from labelled vectors (see the module docstring).

    Minimizes ``sum_i s_i logloss(sigmoid(x_i . w + b), y_i) + prior/2 ||w - mean(w)||^2 + RIDGE/2 ||w||^2``
    over w >= 0 and b, with class-balanced ``s_i`` (each class weighs half of n). Raises LabelError
    without both classes."""
    from scipy.optimize import minimize

    n, k = x.shape
    pos = int((y == 1).sum())
    if pos == 0 or pos == n:
        raise LabelError(f"labels need both classes (campaign and benign) among accounts with traffic; got "
                         f"{pos} campaign and {n - pos} benign")
    s = np.where(y == 1, n / (2.0 * pos), n / (2.0 * (n - pos)))

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:k], theta[k]
        z = x @ w + b
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))
        ll = np.sum(s * (np.logaddexp(0.0, z) - y * z))
        dev = w - w.mean()
        value = float(ll + 0.5 * prior * dev @ dev + 0.5 * RIDGE * w @ w)
        g = s * (p - y)
        grad_w = x.T @ g + prior * (dev - dev.mean()) + RIDGE * w
        return value, np.r_[grad_w, g.sum()]

    theta0 = np.r_[np.full(k, 0.1), 0.0]
    res = minimize(loss, theta0, jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * k + [(None, None)])
    w = np.maximum(res.x[:k], 0.0)
    if not np.isfinite(w).all() or w.sum() <= 1e-9:
        return np.ones(k)
    return w * (k / w.sum())
