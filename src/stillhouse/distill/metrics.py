"""Evaluation maths as plain functions: accuracy with a Wilson 95% interval, a seeded
bootstrap, the ceiling ratio with its paired-bootstrap interval, agreement, and
KL(teacher ‖ student) over token positions.

Every function here is checked against a naive reference in ``tests/test_metrics.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_Z_CACHE: dict[float, float] = {}


def z_value(confidence: float) -> float:
    """The two-sided normal quantile: 1.959964 for 0.95."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: must be in (0, 1), e.g. 0.95")
    if confidence not in _Z_CACHE:
        from statistics import NormalDist

        _Z_CACHE[confidence] = NormalDist().inv_cdf(0.5 + confidence / 2)
    return _Z_CACHE[confidence]


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (good at p near 0 or 1 and small n)."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"successes={successes}, n={n}: need 0 <= successes <= n")
    if n == 0:
        return (0.0, 1.0)
    z = z_value(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the edges, no 1e-17 residue
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval; ``n`` is the number of items behind it."""

    value: float
    lo: float
    hi: float
    n: int

    def overlaps(self, other: Estimate) -> bool:
        """Do the two intervals overlap?"""
        return not (self.hi < other.lo or other.hi < self.lo)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}] (n={self.n})"


def accuracy(correct: Sequence[bool] | np.ndarray, confidence: float = 0.95) -> Estimate:
    """Share of True with its Wilson interval."""
    arr = np.asarray(correct, dtype=bool)
    k, n = int(arr.sum()), int(arr.size)
    lo, hi = wilson_interval(k, n, confidence)
    return Estimate(k / n if n else 0.0, lo, hi, n)


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: Sequence[Any] | np.ndarray,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)``, resampling items jointly
    (paired): the same indices are drawn from every array. NaN statistics are skipped."""
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    data = [np.asarray(a) for a in arrays]
    n = len(data[0])
    if any(len(a) != n for a in data):
        raise ValueError(f"arrays differ in length: {[len(a) for a in data]}; a paired bootstrap needs equal")
    if n == 0:
        return (math.nan, math.nan)
    if n_boot < 10:
        raise ValueError(f"n_boot={n_boot}: use at least 10 (2000 is the usual)")
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        stats[b] = statistic(*(a[idx] for a in data))
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return (math.nan, math.nan)
    alpha = (1 - confidence) / 2
    return (float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha)))


def _ratio(student: np.ndarray, teacher: np.ndarray) -> float:
    t = float(np.mean(teacher))
    return float(np.mean(student)) / t if t > 0 else math.nan


def ceiling_ratio(
    student_correct: Sequence[bool] | np.ndarray,
    teacher_correct: Sequence[bool] | np.ndarray,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Student score ÷ teacher score on the same items, with a paired-bootstrap interval.

    NaN when the teacher scored zero (the ratio is undefined, not infinite)."""
    s = np.asarray(student_correct, dtype=float)
    t = np.asarray(teacher_correct, dtype=float)
    if s.shape != t.shape:
        raise ValueError(f"student has {s.size} items, teacher {t.size}: score both on the same items")
    value = _ratio(s, t) if s.size else math.nan
    lo, hi = bootstrap_ci(_ratio, s, t, n_boot=n_boot, confidence=confidence, seed=seed)
    return Estimate(value, lo, hi, int(s.size))


def normalize_answer(text: str) -> str:
    """Whitespace-normalized text, for exact-match agreement."""
    return " ".join(str(text).split())


def agreement(a: Sequence[str], b: Sequence[str], confidence: float = 0.95) -> Estimate:
    """Share of items where the two outputs match exactly (after whitespace normalization)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} outputs: agreement needs the same items")
    return accuracy([normalize_answer(x) == normalize_answer(y) for x, y in zip(a, b)], confidence)


def kl_per_position(teacher_logits: Any, student_logits: Any, temperature: float = 1.0) -> Any:
    """KL(p_teacher ‖ p_student) at each position: tensors ``[..., V]`` → ``[...]`` (nats)."""
    import torch

    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"logit shapes differ: teacher {tuple(teacher_logits.shape)}, student {tuple(student_logits.shape)}; "
            "KL needs the same vocabulary (same tokenizer)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def mean_kl(teacher_logits: Any, student_logits: Any, mask: Any = None, temperature: float = 1.0) -> float:
    """Mean per-position KL(teacher ‖ student) over positions where ``mask`` is true."""
    import torch

    kl = kl_per_position(teacher_logits, student_logits, temperature)
    if mask is None:
        return float(kl.mean())
    m = mask.to(kl.dtype)
    total = float(m.sum())
    if total == 0:
        return math.nan
    return float((kl * m).sum() / torch.tensor(total))
