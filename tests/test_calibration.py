"""Re-calibration transforms (eqs. 3-4, power scaling) and the coefficient search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from first_lib.calibration import (
    CoefficientSearch,
    apply_transform,
    label_smooth,
    power_scale,
    search_coefficient,
    temperature_scale,
)
from first_lib.errors import FirstError
from first_lib.metrics import ece

torch.set_num_threads(2)


def random_topk(rng: np.random.Generator, n: int, k: int, rank_order: bool = True) -> np.ndarray:
    """[n, k] top-k probabilities of random full distributions (rows sum to < 1)."""
    logits = rng.normal(size=(n, 4 * k)) * rng.uniform(0.3, 4.0, size=(n, 1))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p = -np.sort(-p, axis=1)[:, :k]
    if not rank_order:
        p = rng.permuted(p, axis=1)
    return p


def sample_rank(q: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sample one position per row from the rows of q (each summing to 1)."""
    u = rng.random(q.shape[0])[:, None]
    return np.minimum((u > np.cumsum(q, axis=1)).sum(axis=1), q.shape[1] - 1)


def assert_order_kept(p: np.ndarray, q: np.ndarray) -> None:
    """Sorting each row by p leaves q non-increasing (ties in q only from round-off)."""
    order = np.argsort(-p, axis=-1, kind="stable")
    q_sorted = np.take_along_axis(q, order, axis=-1)
    assert (np.diff(q_sorted, axis=-1) <= 1e-12).all()


# --------------------------------------------------------------------------- eq. 4


def test_temperature_scale_reference_example():
    q = temperature_scale(np.array([0.9, 0.05, 0.03, 0.01, 0.01]), 0.28)
    # REFERENCE.md: c = 0.28 gives about (.85, .041, .038, .035, .035)
    np.testing.assert_allclose(q, [0.8503, 0.0408, 0.0380, 0.0354, 0.0354], atol=5e-5)
    assert np.round(q, 3).tolist() == [0.85, 0.041, 0.038, 0.035, 0.035]


@pytest.mark.parametrize("seed", range(30))
def test_temperature_scale_sums_to_one_and_keeps_order(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    p = random_topk(rng, 64, k, rank_order=bool(seed % 2))
    c = float(np.exp(rng.uniform(np.log(0.02), np.log(5.0))))
    q = temperature_scale(p, c)
    np.testing.assert_allclose(q.sum(axis=-1), 1.0, atol=1e-12)
    assert (q >= 0).all()
    assert_order_kept(p, q)
    # the same on torch, any leading shape
    qt = temperature_scale(torch.tensor(p).reshape(8, 8, k), c)
    np.testing.assert_allclose(qt.reshape(64, k).numpy(), q, atol=1e-12)
    # it is never the identity, even for a normalised input
    assert not np.allclose(temperature_scale(p / p.sum(1, keepdims=True), c), p, atol=1e-3)


def test_temperature_scale_limits():
    p = np.array([[0.6, 0.3, 0.1]])
    np.testing.assert_allclose(temperature_scale(p, 1e3), 1 / 3, atol=1e-3)  # flat
    np.testing.assert_allclose(temperature_scale(p, 1e-3), [[1, 0, 0]], atol=1e-12)  # one-hot
    assert temperature_scale(torch.tensor(p, dtype=torch.float16), 0.5).dtype == torch.float32


@pytest.mark.parametrize("c", [0.0, -0.3, float("nan"), float("inf")])
def test_temperature_scale_rejects_bad_c(c):
    with pytest.raises(ValueError, match="c"):
        temperature_scale(np.array([0.5, 0.5]), c)
    with pytest.raises(FirstError):
        apply_transform(np.array([0.5, 0.5]), "ts", c)


# --------------------------------------------------------------------------- p^(1/T)


@pytest.mark.parametrize("seed", range(10))
def test_power_scale_properties(seed):
    rng = np.random.default_rng(seed)
    p = random_topk(rng, 50, 5, rank_order=bool(seed % 2))
    p[0, 3] = 0.0
    np.testing.assert_allclose(power_scale(p, 1.0), p, atol=1e-14)  # identity, even unnormalised
    t = float(rng.uniform(0.1, 4.0))
    q = power_scale(p, t)
    np.testing.assert_allclose(q.sum(-1), p.sum(-1), atol=1e-12)  # mass kept
    assert q[0, 3] == 0.0
    assert_order_kept(p, q)
    # ratios follow (p_i / p_j) ** (1 / T)
    np.testing.assert_allclose(q[:, 1] / q[:, 0], (p[:, 1] / p[:, 0]) ** (1 / t), rtol=1e-9)
    np.testing.assert_allclose(power_scale(torch.tensor(p), t).numpy(), q, atol=1e-12)


def test_power_scale_zeros_and_small_t():
    p = np.array([[0.0, 0.0, 0.0], [0.5, 0.3, 0.0], [1e-3, 1e-4, 1e-5]])
    q = power_scale(p, 0.01)  # (1e-3)^100 would underflow without the log-space form
    assert np.isfinite(q).all()
    np.testing.assert_allclose(q, [[0, 0, 0], [0.8, 0, 0], [1.11e-3, 0, 0]], atol=1e-12)
    assert np.isfinite(power_scale(torch.tensor(p), 0.01).numpy()).all()
    with pytest.raises(ValueError, match="T must be > 0"):
        power_scale(p, 0.0)


# --------------------------------------------------------------------------- eq. 3


def test_label_smooth_matches_eq3_for_k5():
    p = np.array([0.6, 0.2, 0.1, 0.06, 0.04])
    np.testing.assert_allclose(
        label_smooth(p, 0.1), [0.5, 0.225, 0.125, 0.085, 0.065], rtol=0, atol=1e-15
    )
    rng = np.random.default_rng(0)
    p = random_topk(rng, 1000, 5)
    p = p[p[:, 0] >= 0.3]
    for d in (0.0, 0.1, 0.25, 0.3):
        q = label_smooth(p, d)
        np.testing.assert_allclose(q[:, 0], p[:, 0] - d, rtol=0, atol=1e-15)
        np.testing.assert_allclose(q[:, 1:], p[:, 1:] + d / 4, rtol=0, atol=1e-15)
    qt = label_smooth(torch.tensor(p), 0.1)
    np.testing.assert_allclose(qt.numpy(), label_smooth(p, 0.1), atol=1e-15)


def test_label_smooth_generalises_to_k_and_clamps_at_p1():
    np.testing.assert_allclose(label_smooth(np.array([0.7, 0.2, 0.1]), 0.2), [0.5, 0.3, 0.2])
    # p1 < delta: only p1 is moved, nothing goes negative, the mass is kept
    p = np.array([[0.05, 0.04, 0.03, 0.02, 0.01]])
    q = label_smooth(p, 0.1)
    np.testing.assert_allclose(q, [[0.0, 0.0525, 0.0425, 0.0325, 0.0225]], atol=1e-15)
    assert (q >= 0).all() and q.sum() == pytest.approx(p.sum())
    # rank order is not preserved (the paper's criticism of LS)
    assert label_smooth(np.array([0.4, 0.35, 0.25]), 0.1).argmax() == 1


@pytest.mark.parametrize("delta", [-0.1, 1.0, 1.5, float("nan")])
def test_label_smooth_rejects_bad_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        label_smooth(np.array([0.5, 0.5]), delta)


def test_label_smooth_needs_two_tokens():
    with pytest.raises(FirstError, match="2"):
        label_smooth(np.array([[1.0]]), 0.1)


def test_apply_transform_dispatch():
    p = random_topk(np.random.default_rng(1), 10, 5)
    assert apply_transform(p, "none") is p
    np.testing.assert_array_equal(apply_transform(p, "ts", 0.3), temperature_scale(p, 0.3))
    np.testing.assert_array_equal(apply_transform(p, "power", 2.0), power_scale(p, 2.0))
    np.testing.assert_array_equal(apply_transform(p, "ls", 0.1), label_smooth(p, 0.1))
    t = apply_transform(torch.tensor(p, dtype=torch.float32), "ts", 0.3)
    assert isinstance(t, torch.Tensor)
    with pytest.raises(FirstError, match="kind"):
        apply_transform(p, "softmax", 1.0)


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize(
    ("kind", "true_coef", "tol"),
    [("ts", 0.34, 0.021), ("ts", 0.62, 0.021), ("power", 1.7, 0.041), ("ls", 0.14, 0.021)],
)
def test_search_finds_the_known_optimum(kind, true_coef, tol):
    # Labels drawn from the transformed probabilities: the calibrating coefficient is known.
    rng = np.random.default_rng(42)
    p = random_topk(rng, 60_000, 5)
    p /= p.sum(axis=1, keepdims=True)
    gold = sample_rank(apply_transform(p, kind, true_coef), rng)
    res = search_coefficient(p, gold, kind=kind)
    assert isinstance(res, CoefficientSearch) and res.kind == kind
    assert abs(res.best - true_coef) <= tol
    assert res.best_ece < 0.01 < res.baseline_ece
    assert res.best_ece == min(e for _, e in res.coarse + res.fine)


@pytest.mark.parametrize("kind", ["ts", "power", "ls"])
@pytest.mark.parametrize("rank_order", [True, False])
def test_search_curve_equals_direct_ece(kind, rank_order):
    """The vectorised search gives the ECE of explicitly transformed probabilities."""
    rng = np.random.default_rng(3)
    p = random_topk(rng, 5000, 5, rank_order=rank_order or kind == "ls")
    gold = rng.integers(-1, 5, size=5000)  # -1: gold outside the top-k
    res = search_coefficient(p, gold, kind=kind)
    for coef, value in res.coarse + res.fine:
        q = apply_transform(p, kind, coef)
        direct = ece(q.max(axis=1), q.argmax(axis=1) == gold)
        assert value == pytest.approx(direct, abs=1e-6)
    assert res.baseline_ece == pytest.approx(ece(p.max(1), p.argmax(1) == gold), abs=1e-12)


def test_search_grids():
    rng = np.random.default_rng(0)
    p = random_topk(rng, 2000, 5)
    gold = rng.integers(0, 5, size=2000)
    res = search_coefficient(p, gold, kind="ts")
    assert [c for c, _ in res.coarse] == pytest.approx(np.arange(1, 11) / 10)
    fine = np.array([c for c, _ in res.fine])
    assert fine.min() > 0 and np.allclose(np.diff(fine), 0.02)
    assert fine.min() >= res.coarse[0][0] - 0.1 - 1e-9
    # a best at the edge of the valid range: the fine grid is clipped to c > 0
    edge = search_coefficient(p, gold, kind="ts", grid=(0.1, 0.1))
    assert [c for c, _ in edge.fine] == pytest.approx(np.arange(1, 11) * 0.02)
    ls = search_coefficient(p, gold, kind="ls")
    assert [c for c, _ in ls.coarse] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert all(0 <= c < 1 for c, _ in ls.fine)
    assert set(res.to_dict()) >= {"kind", "best", "best_ece", "coarse", "fine"}


def test_search_errors():
    p = np.full((4, 5), 0.2)
    with pytest.raises(ValueError, match="empty"):
        search_coefficient(np.zeros((0, 5)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="gold_rank"):
        search_coefficient(p, np.array([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="NaN"):
        search_coefficient(np.full((4, 5), np.nan), np.zeros(4, dtype=int))
    with pytest.raises(FirstError, match="supports"):
        search_coefficient(p, np.zeros(4, dtype=int), kind="none")
    with pytest.raises(FirstError, match="no valid"):
        search_coefficient(p, np.zeros(4, dtype=int), kind="ts", grid=(-1.0, 0.0))


# The speed of the search on 10^6 positions is measured by `first bench`
# (coefficient_search_seconds, target < 1 s) as a benchmark, not as an absolute-time test
# that fails on a loaded machine.
