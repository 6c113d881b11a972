"""Drift of the benign score distribution: the population stability index (PSI), as plain functions.

What is compared: each account's *maximum* score over a replay of one window (the quantity the thresholds
are set on, ``detector.py``), for accounts with at least ``min_requests`` requests. The reference is the
distribution a model was checked on (``check.json``'s ``reference_scores``: the check window's scores, held
out from the fit); a model that was never checked falls back to the quantiles its calibration stored
(``calibration_["benign_max_score_quantiles"]``: 50/90/99/100%, over every held-out account).

PSI (the credit-scoring industry's stability index; Siddiqi, *Credit Risk Scorecards*, 2006): cut the
reference into bins at its own quantiles, then ``PSI = sum_i (a_i - e_i) ln(a_i / e_i)`` with ``e_i`` the
reference's and ``a_i`` the new window's share of accounts in bin ``i`` (empty bins count as ``EPS``). It is
the symmetrised Kullback-Leibler divergence of the binned distributions, 0 for no change, and unlike a
two-sample test it does not become "significant" for tiny shifts just because there are many accounts. The
usual reading: below 0.1 stable, 0.1-0.25 a moderate shift, above 0.25 a significant one (``PSI_ALARM``).
Bins are right-closed, ``(edge_{i-1}, edge_i]``, so ties at an edge (many accounts with the same score)
all fall in one bin, in the reference and in the new window alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

EPS = 1e-4
"""Share given to an empty bin (PSI is infinite otherwise)."""
PSI_ALARM = 0.25
"""The conventional threshold of a significant shift."""


def quantile_edges(reference: Sequence[float] | np.ndarray, bins: int = 10) -> np.ndarray:
    """The interior bin edges: the reference's quantiles at 1/bins .. (bins-1)/bins, duplicates merged."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.size == 0:
        raise ValueError("quantile_edges: the reference is empty")
    if bins < 2:
        raise ValueError(f"bins={bins}: need at least 2")
    return np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))


def bin_shares(values: Sequence[float] | np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each right-closed bin ``(-inf, e_0], (e_0, e_1], ..., (e_last, inf)``."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bin_shares: no values")
    return np.bincount(np.searchsorted(edges, x, side="left"), minlength=edges.size + 1) / x.size


def psi_shares(expected: np.ndarray, actual: np.ndarray, eps: float = EPS) -> float:
    """PSI of two binned distributions (each a vector of shares over the same bins)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), eps)
    a = np.maximum(np.asarray(actual, dtype=np.float64), eps)
    return float(np.sum((a - e) * np.log(a / e)))


def psi(reference: Sequence[float] | np.ndarray, current: Sequence[float] | np.ndarray, bins: int = 10) -> float:
    """PSI of ``current`` against ``reference`` on the reference's quantile bins (see the module docstring)."""
    edges = quantile_edges(reference, bins)
    return psi_shares(bin_shares(reference, edges), bin_shares(current, edges))


def psi_from_quantiles(quantiles: Mapping[float | str, float], current: Sequence[float] | np.ndarray) -> float:
    """PSI against a reference known only by a few quantiles ``{level: value}`` (e.g. 0.5, 0.9, 0.99, 1.0).

    The bins are cut at the quantile values; the reference's share of bin ``(q_a, q_b]`` is taken as
    ``b - a`` and the bin above the largest value gets ``1 - last level`` (0 for the maximum). Ties in the
    reference make this an approximation: prefer :func:`psi` with a reference sample."""
    pairs = sorted((float(k), float(v)) for k, v in quantiles.items())
    if not pairs:
        raise ValueError("psi_from_quantiles: no quantiles")
    edges, shares, prev_level, prev_value = [], [], 0.0, None
    for level, value in pairs:
        if prev_value is not None and value <= prev_value:  # a tie: merge into the bin below
            shares[-1] += level - prev_level
        else:
            edges.append(value)
            shares.append(level - prev_level)
            prev_value = value
        prev_level = level
    shares.append(1.0 - prev_level)
    return psi_shares(np.array(shares), bin_shares(current, np.array(edges)))


def quantiles(values: Sequence[float] | np.ndarray, levels: Sequence[float] = (0.5, 0.9, 0.99, 1.0)) -> dict[str, float]:
    """``{"0.5": q50, ...}`` of ``values`` (JSON-friendly keys); empty values give an empty dict."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {}
    return {f"{q:g}": float(np.quantile(x, q)) for q in levels}
