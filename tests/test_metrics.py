"""Metrics against naive references on seeded inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stillhouse.distill.metrics import (
    accuracy,
    agreement,
    bootstrap_ci,
    ceiling_ratio,
    kl_per_position,
    mean_kl,
    wilson_interval,
    z_value,
)


def test_z_value() -> None:
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert z_value(0.99) == pytest.approx(2.575829, abs=1e-6)


def test_wilson_hand_checked() -> None:
    # Worked by hand: p=0.3, n=100, z=1.96 -> centre (0.3 + 0.019208)/1.038416 = 0.307404,
    # half 1.96*sqrt(0.0021 + 0.00009604)/1.038416 = 0.088457  ->  [0.2190, 0.3959]
    lo, hi = wilson_interval(30, 100)
    assert lo == pytest.approx(0.2189, abs=2e-4)
    assert hi == pytest.approx(0.3958, abs=2e-4)
    # Edge cases: 0/n has lower bound 0 and a positive upper bound; n/n mirrors it
    lo0, hi0 = wilson_interval(0, 20)
    lo1, hi1 = wilson_interval(20, 20)
    assert lo0 == 0.0 and hi0 == pytest.approx(1 - lo1) and hi1 == pytest.approx(1.0)
    assert hi0 == pytest.approx(0.1611, abs=2e-4)
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_wilson_against_naive_formula_random() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(1, 500))
        k = int(rng.integers(0, n + 1))
        z = 1.959963984540054
        p = k / n
        # naive: solve |p - q| = z sqrt(q(1-q)/n) for q (quadratic)
        a = 1 + z * z / n
        b = -(2 * p + z * z / n)
        c = p * p
        disc = math.sqrt(b * b - 4 * a * c)
        ref = ((-b - disc) / (2 * a), (-b + disc) / (2 * a))
        got = wilson_interval(k, n)
        assert got[0] == pytest.approx(max(0.0, ref[0]), abs=1e-9)
        assert got[1] == pytest.approx(min(1.0, ref[1]), abs=1e-9)


def test_accuracy_and_coverage() -> None:
    est = accuracy([True, False, True, True])
    assert est.value == 0.75 and est.n == 4 and est.lo < 0.75 < est.hi
    # coverage of the Wilson interval on simulated data is near 95%
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(400):
        draws = rng.random(200) < 0.3
        e = accuracy(draws)
        hits += e.lo <= 0.3 <= e.hi
    assert 0.91 <= hits / 400 <= 0.99


def test_bootstrap_mean_matches_normal_approx() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 2.0, size=400)
    lo, hi = bootstrap_ci(np.mean, x, n_boot=2000, seed=0)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.05)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.05)
    assert bootstrap_ci(np.mean, x, seed=0) == bootstrap_ci(np.mean, x, seed=0)  # seeded
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_ci(lambda a, b: 0.0, x, x[:3])


def test_ceiling_ratio() -> None:
    rng = np.random.default_rng(0)
    teacher = rng.random(300) < 0.4
    student = rng.random(300) < 0.3
    est = ceiling_ratio(student, teacher, seed=1)
    assert est.value == pytest.approx(student.mean() / teacher.mean())
    assert est.lo < est.value < est.hi
    assert math.isnan(ceiling_ratio([True], [False]).value)


def test_agreement() -> None:
    est = agreement(["12 + 3 = 15", " 7"], ["12 + 3  = 15", "8"])
    assert est.value == 0.5 and est.n == 2


def test_kl_against_direct_torch() -> None:
    import torch

    torch.manual_seed(0)
    t = torch.randn(3, 5, 11)
    s = torch.randn(3, 5, 11)
    p = torch.softmax(t, -1)
    q = torch.softmax(s, -1)
    ref = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(kl_per_position(t, s), ref, atol=1e-5)
    # torch's own KL (input = log q, target = p) agrees
    ref2 = torch.nn.functional.kl_div(q.log(), p, reduction="none").sum(-1)
    assert torch.allclose(kl_per_position(t, s), ref2, atol=1e-5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, :2] = True
    mask[2, 4] = True
    assert mean_kl(t, s, mask) == pytest.approx(float(ref[mask].mean()), rel=1e-5)
    assert mean_kl(t, t) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same vocabulary"):
        kl_per_position(t, s[..., :10])
