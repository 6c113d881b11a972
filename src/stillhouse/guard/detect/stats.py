"""The detector's maths, as plain functions of arrays.

- :func:`tail_surprisal` — ``-ln p`` with ``p`` the benign upper-tail probability of a value
  (empirical, add-one smoothed, so it is never infinite and a value at the benign mode scores 0;
  beyond the benign maximum, an exponential tail fitted by :func:`tail_scale`).
- :func:`binomial_tail_surprisal` — ``-ln P(X >= k)`` for X ~ Binomial(n, p0), from its union
  bound (a lower bound on the surprisal, tight when p0 is small): the count evidence of a rare ask.
- :func:`combine_families` — score = sum over feature families of each family's largest surprisal.
- :func:`combine_top` — the ``k`` largest surprisals (the verdict's reasons).
- :func:`rff_params`, :func:`rff` — random Fourier features of the RBF kernel, so that kernel
  means are additive sums (the MMD against benign traffic can be kept as running sums).
- :func:`mmd2_unbiased_from_sums` — the unbiased MMD^2 estimate from those sums; checked in the
  tests against :func:`mmd2_unbiased_naive` (the textbook pairwise formula on the same features).
- :func:`mean_pair_cosine` — mean cosine over distinct pairs of unit vectors, from their sum.
- :func:`normalized_entropy`, :func:`cv` — spread of hours of day, regularity of gaps.
- :func:`quantile_threshold` — the score a benign fraction ``fpr`` of accounts exceeds (split-conformal);
  :func:`exp_tail_threshold` — the same from an exponential tail fitted to the largest scores;
  :func:`benign_threshold` — the detector's thresholds: the first, or the larger of both for small ``fpr``.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Callable
from functools import lru_cache
from operator import itemgetter

import numpy as np

EXTRA_CAP = 10.0
"""Most surprisal (nats) a value can earn beyond the benign maximum."""


def tail_scale(sorted_benign: np.ndarray) -> float:
    """Exponential tail scale: the mean excess over the benign 99th percentile (its MLE), floored
    at a tenth of the benign range, so that a tail made of many near-identical snapshots (one
    busy account) does not turn a hair past the maximum into an extreme surprisal."""
    if sorted_benign.size == 0:
        return 1.0
    q = float(np.quantile(sorted_benign, 0.99))
    excess = sorted_benign[sorted_benign > q] - q
    span = float(sorted_benign[-1] - sorted_benign[0])
    mle = float(excess.mean()) if excess.size else 0.0
    return max(mle, 0.1 * span, 1e-3)


def tail_surprisal(sorted_benign: np.ndarray, value: float, scale: float | None = None) -> float:
    """-ln((1 + #{benign >= value}) / (N + 1)) for a sorted benign sample.

    Beyond the benign maximum the empirical tail is flat, so a value far outside
    benign traffic would score no higher than one just past its edge; with ``scale``
    the tail is extended exponentially (peaks over threshold): ``+ (value - max) / scale``,
    capped at :data:`EXTRA_CAP`.
    """
    n = sorted_benign.size
    at_least = n - int(np.searchsorted(sorted_benign, value, side="left"))
    s = float(-np.log((1 + at_least) / (n + 1)))
    if scale is not None and n and value > sorted_benign[-1]:
        s += min((value - float(sorted_benign[-1])) / scale, EXTRA_CAP)
    return s


def tail_surprisals(sorted_benign: list[np.ndarray], values: np.ndarray,
                    scales: list[float] | None = None) -> np.ndarray:
    """:func:`tail_surprisal` for each feature j of ``values`` against ``sorted_benign[j]``."""
    return TailTables(sorted_benign, scales).surprisals(values)


class TailTables:
    """Benign tables prepared once for :func:`tail_surprisal` of every feature on every request.

    Bit for bit the scalar function's values (the tests check it), in plain Python: per feature a
    ``bisect`` over the distinct benign values (an ``array('d')``, as compact as the numpy table)
    gives how many benign values lie below, and a precomputed list holds ``-ln p`` for each such
    count (one vectorized ``np.log``, elementwise the same as the scalar calls). Columns or values
    with NaN take numpy's ``searchsorted`` (which sorts NaN last). ``source`` keeps the lists it was
    built from, so a caller can tell when to rebuild.
    """

    def __init__(self, sorted_benign: list[np.ndarray], scales: list[float] | None = None):
        self.source = (sorted_benign, scales)
        self.cols = [np.asarray(c, dtype=np.float64) for c in sorted_benign]
        self.sizes = [int(c.size) for c in self.cols]
        self.last = [float(c[-1]) if c.size else None for c in self.cols]
        self.scales = None if scales is None else [float(x) for x in scales]
        self.nan = [bool(np.isnan(c).any()) for c in self.cols]
        self.distinct: list[array] = []
        self.surprisal: list[array] = []  # [j][i]: the surprisal of a value with i distinct benign values below it
        for col, n in zip(self.cols, self.sizes):
            values, first = np.unique(col, return_index=True)  # col is sorted: first[i] values lie below values[i]
            below = np.append(first, n).astype(np.float64)
            self.distinct.append(array("d", values.tolist()))
            self.surprisal.append(array("d", (-np.log((1.0 + (n - below)) / (n + 1.0))).tolist()))
        scales_or_none = self.scales if self.scales is not None else [None] * len(self.cols)
        self.columns = list(zip(self.cols, self.distinct, self.surprisal, self.sizes, self.last, scales_or_none,
                                self.nan))
        self.memo: list[dict[float, float]] = [{} for _ in self.cols]

    def surprisals(self, values: np.ndarray) -> np.ndarray:
        return np.array(self.surprisal_list(np.asarray(values, dtype=np.float64).tolist()), dtype=np.float64)

    def surprisal_list(self, values: list[float]) -> list[float]:
        """:meth:`surprisals` of Python floats, as a list. Memoized per feature on the value: rates
        and counts repeat across requests and accounts, and a value's surprisal never changes."""
        out: list[float | None] = list(map(dict.get, self.memo, values))
        if None in out:
            for j, s in enumerate(out):
                if s is None:
                    out[j] = self._surprisal(j, values[j])
        return out  # type: ignore[return-value]  # no None left

    def _surprisal(self, j: int, value: float) -> float:
        col, distinct, surprisal, n, last, scale, nan = self.columns[j]
        if nan or math.isnan(value):
            below = int(col.searchsorted(value, side="left"))
            s = float(-np.log((1 + (n - below)) / (n + 1)))
        else:
            s = surprisal[bisect_left(distinct, value)]
        if scale is not None and last is not None and value > last:
            s += min((value - last) / scale, EXTRA_CAP)
        if not math.isnan(value):  # NaN is never found again: not worth keeping
            memo = self.memo[j]
            if len(memo) >= 8192:  # bounded: ~0.6 MB per feature at most
                memo.clear()
            memo[value] = s
        return s


def binomial_tail_surprisal(n: int, k: int, log_p0: float) -> float:
    """A lower bound on ``-ln P(X >= k)``, X ~ Binomial(n, p0): ``-ln(C(n, k) p0^k)``, floored at 0.

    ``P(X >= k) <= C(n, k) p0^k`` (the union bound over which k of the n trials hit), so this never
    overstates the evidence; for the rare asks it is used on (p0 ~ 1e-5) the two agree to well under a
    nat. Cheap: three ``lgamma`` calls, no scipy on the request path.
    """
    if k <= 0:
        return 0.0
    k = min(k, n)
    log_tail = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p0
    return max(0.0, -log_tail)


def combine_top(surprisals: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """(sum of the k largest surprisals, their indices largest first)."""
    k = min(k, surprisals.size)
    order = np.argsort(-surprisals, kind="stable")[:k]
    return float(surprisals[order].sum()), order


def combine_families(surprisals: np.ndarray | list[float], families: tuple[tuple[int, ...], ...]) -> float:
    """Sum over families of the largest surprisal among each family's members."""
    s = surprisals.tolist() if isinstance(surprisals, np.ndarray) else surprisals
    known = _PICKERS.get(id(families))
    if known is None or known[0] is not families:
        known = _PICKERS[id(families)] = (families, tuple(_picker(m) for m in families))
    return float(sum(max(pick(s)) for pick in known[1]))


_PICKERS: dict[int, tuple[tuple[tuple[int, ...], ...], tuple[Callable[[list[float]], tuple[float, ...]], ...]]] = {}


def _picker(members: tuple[int, ...]) -> Callable[[list[float]], tuple[float, ...]]:
    """A C-level picker of ``members`` from a sequence, always returning a tuple."""
    pick = itemgetter(*members)
    return pick if len(members) > 1 else (lambda seq: (pick(seq),))


def rff_params(dim: int, features: int, gamma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with phi(x) = sqrt(2/D) cos(W x + b) approximating exp(-gamma ||x - y||^2)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0.0, np.sqrt(2.0 * gamma), size=(features, dim)).astype(np.float32)
    b = rng.uniform(0.0, 2.0 * np.pi, size=features).astype(np.float32)
    return w, b


def rff(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Random Fourier features of one vector (or rows of a matrix)."""
    return (_rff_scale(w.shape[0]) * np.cos(x @ w.T + b)).astype(np.float32)


@lru_cache(maxsize=64)
def _rff_scale(features: int) -> np.float64:
    return np.sqrt(2.0 / features)


def mmd2_unbiased_from_sums(n: int, sum_phi: np.ndarray, sum_sq: float, mu_ref: np.ndarray,
                            ref_sq: float) -> float:
    """Unbiased MMD^2 between n samples (as sums of their features) and a reference.

    ``sum_phi`` = sum_i phi(x_i), ``sum_sq`` = sum_i ||phi(x_i)||^2, ``mu_ref`` = mean reference
    feature, ``ref_sq`` = the reference's own mean pairwise kernel. Needs n >= 2 (else 0).
    """
    if n < 2:
        return 0.0
    within = (float(sum_phi @ sum_phi) - sum_sq) / (n * (n - 1))
    cross = float(sum_phi @ mu_ref) / n
    return within - 2.0 * cross + ref_sq


def mmd2_unbiased_naive(phi_x: np.ndarray, phi_y: np.ndarray) -> float:
    """Textbook unbiased MMD^2 with kernel k(x, y) = phi(x) . phi(y) (reference for the tests)."""
    kxx = phi_x @ phi_x.T
    kyy = phi_y @ phi_y.T
    kxy = phi_x @ phi_y.T
    n, m = len(phi_x), len(phi_y)
    xx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def mean_pair_cosine(n: int, sum_x: np.ndarray, sum_sq: float) -> float:
    """Mean x_i . x_j over i != j from sum_i x_i and sum_i ||x_i||^2 (0 when n < 2)."""
    if n < 2:
        return 0.0
    return (float(sum_x @ sum_x) - sum_sq) / (n * (n - 1))


def normalized_entropy(counts: np.ndarray, bins: int | None = None) -> float:
    """Shannon entropy of a histogram divided by log(bins): 0 = one bin, 1 = uniform.

    ``bins``: the histogram's number of bins when ``counts`` holds only its nonzero bins.
    """
    total = float(counts.sum())
    if total <= 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / log_int(counts.size if bins is None else bins))


_LOGS: dict[int, float] = {}


def log_int(n: int) -> float:
    """np.log(n), memoized (the same value: one call's result, reused)."""
    v = _LOGS.get(n)
    if v is None:
        v = _LOGS[n] = float(np.log(n))
    return v


def cv(n: int, total: float, total_sq: float) -> float:
    """Coefficient of variation from a count, sum and sum of squares (inf when undefined)."""
    if n < 2 or total <= 0:
        return float("inf")
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0)
    return float(np.sqrt(var) / mean)


TAIL_SHARE = 0.05
"""The exponential tail is fitted to this share of the largest benign scores (at least ``TAIL_MIN`` of them)."""
TAIL_MIN = 20
TAIL_BELOW = 5
"""A target that leaves fewer than this many calibration accounts above the conformal threshold also
consults the fitted tail (:func:`benign_threshold`)."""


def exp_tail_threshold(benign_scores: np.ndarray, fpr: float) -> float:
    """The score a benign fraction ``fpr`` of accounts exceeds, from an exponential tail (peaks over a
    threshold) fitted to the ``k`` largest of N benign scores, k = max(TAIL_MIN, TAIL_SHARE * N):
    P(score > u + x) = (k / N) exp(-x / beta), u the (k+1)-th largest score, beta the mean excess of
    the k over u (its maximum-likelihood estimate), so the threshold is u + beta ln(k / (fpr N)).

    Scores are sums of surprisals (negative log tail probabilities), whose tails are exponential
    when each term's is, so this is the natural tail model; it uses the k largest scores instead of
    the single largest one, and reaches below the resolution 1/(N + 1) of an order statistic.
    """
    s = np.sort(np.asarray(benign_scores, dtype=np.float64))[::-1]
    n = s.size
    if n < 2:
        raise ValueError(f"an exponential tail needs at least 2 benign scores, got {n}")
    k = min(max(TAIL_MIN, round(TAIL_SHARE * n)), n - 1)
    u = float(s[k])
    beta = max(float((s[:k] - u).mean()), 1e-9)
    return u + beta * max(math.log(k / (fpr * n)), 0.0)


def benign_threshold(benign_scores: np.ndarray, fpr: float) -> float:
    """The threshold for flagging at benign FPR ``fpr``: the split-conformal order statistic
    (:func:`quantile_threshold`); when ``fpr`` leaves fewer than ``TAIL_BELOW`` calibration accounts above
    it, the larger of that and the fitted exponential tail's quantile (:func:`exp_tail_threshold`).

    With N = 1,050 calibration accounts, the conformal threshold for 1e-3 is the single largest score:
    right on average, but a new population exceeds it more often than 1e-3 whenever the calibration
    draw's largest score came out low. The tail, fitted to the 50 largest scores, does not hinge on one
    account; taking the larger of the two keeps the conformal guarantee (FPR <= fpr on average) and
    errs on the side of fewer false positives.
    """
    t = quantile_threshold(benign_scores, fpr)
    if fpr * (benign_scores.size + 1) < TAIL_BELOW and benign_scores.size >= 2:
        t = max(t, exp_tail_threshold(benign_scores, fpr))
    return t


def quantile_threshold(benign_scores: np.ndarray, fpr: float) -> float:
    """The split-conformal threshold for flagging when score > t: the j-th largest of the N benign
    scores, j = floor(fpr * (N + 1)).

    A new account from the same benign population exceeds the j-th largest of N with probability
    j / (N + 1) (over calibration draws; ties only lower it), so the expected FPR is at most ``fpr``.
    The in-sample choice (the (floor(fpr * N) + 1)-th largest: fpr * N calibration accounts above it)
    runs (floor(fpr * N) + 1) / (N + 1): 4/3001 = 1.33e-3 for fpr 1e-3 on 3,000 accounts. When
    fpr * (N + 1) < 1 no order statistic has the guarantee; the maximum is used (1 / (N + 1)).
    """
    if benign_scores.size == 0:
        raise ValueError("no benign scores to calibrate on: give the detector benign traffic first")
    s = np.sort(benign_scores)[::-1]
    j = int(np.floor(fpr * (s.size + 1)))
    return float(s[min(max(j, 1), s.size) - 1])
