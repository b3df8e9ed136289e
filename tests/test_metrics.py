"""Metrics: hand-computed cases, edge cases, torchmetrics agreement, sampler properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

from first_lib.errors import FirstError
from first_lib.metrics import (
    accuracy,
    adaptive_ece,
    aurc,
    aurc_rows,
    bin_indices,
    bootstrap_ci,
    brier,
    brier_binary,
    brier_per_question,
    ece,
    ece_equal_mass,
    ece_rows,
    equal_mass_ece_rows,
    mce,
    nll,
    nll_per_question,
    rankwise_calibration,
    reliability_bins,
    risk_coverage,
    smooth_ece,
    smooth_ece_rows,
    smooth_reliability,
    trust_score,
)

torch.set_num_threads(2)


def calibrated_sample(n: int, seed: int, power: float = 1.0):
    """Confidence ~ U(0, 1), correct ~ Bernoulli(confidence ** power) (power 1: calibrated)."""
    rng = np.random.default_rng(seed)
    conf = rng.random(n)
    return conf, rng.random(n) < conf**power


# --------------------------------------------------------------------------- hand-computed


def test_ece_hand_example():
    conf = [0.95, 0.95, 0.15, 0.15]
    correct = [1, 0, 0, 0]
    # bin 10: conf .95, acc .5 -> 2/4 * .45; bin 2: conf .15, acc 0 -> 2/4 * .15
    assert ece(conf, correct) == pytest.approx(0.3)
    assert mce(conf, correct) == pytest.approx(0.45)
    bins = reliability_bins(conf, correct)
    assert bins.count.tolist() == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins.gap[9] == pytest.approx(-0.45)  # over-confident: negative gap
    assert np.isnan(bins.accuracy[0]) and np.isnan(bins.gap[5])  # empty bins
    assert bins.ece == pytest.approx(0.3)
    assert bins.edges.shape == (11,) and bins.n == 4


def test_ece_confidence_exactly_zero_and_one():
    bins = reliability_bins([0.0, 1.0, 1.0], [False, True, False])
    assert bins.count[0] == 1 and bins.count[-1] == 2 and bins.count.sum() == 3
    assert ece([1.0], [True]) == 0.0
    assert ece([0.0], [False]) == 0.0
    assert ece([1.0], [False]) == 1.0
    assert ece([0.0], [True]) == 1.0


def test_bin_edges_are_left_closed_at_m_over_m():
    edges = np.arange(11) / 10
    # Each edge m/M opens its bin; the float just below it does not.
    assert bin_indices(edges, 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]
    assert bin_indices(np.nextafter(edges[1:-1], 0), 10).tolist() == list(range(9))
    assert bin_indices(np.array([0.3, 0.7, 0.1, 0.05]), 10).tolist() == [3, 7, 1, 0]
    for m in (1, 3, 7, 10, 15, 20, 100):
        e = np.arange(m + 1) / m
        x = np.concatenate([np.random.default_rng(m).random(10_000), e, np.nextafter(e, 2)])
        x = np.clip(x, 0, 1)
        # An independent reference on purpose (searchsorted on the edges), not the library's
        # floor-and-correct code: the two must agree everywhere, edges included.
        ref = np.clip(np.searchsorted(e, x, side="right") - 1, 0, m - 1)
        assert (bin_indices(x, m) == ref).all()
        assert (bin_indices(x.astype(np.float32), m) == ref_f32(x, e, m)).all()


def ref_f32(x: np.ndarray, e: np.ndarray, m: int) -> np.ndarray:
    """Independent reference on purpose: the bin of each float32 confidence by searchsorted."""
    x32 = x.astype(np.float32).astype(np.float64)
    return np.clip(np.searchsorted(e, x32, side="right") - 1, 0, m - 1)


def test_adaptive_ece_hand_example():
    conf = [0.4, 0.1, 0.3, 0.2]
    correct = [1, 0, 1, 0]
    # two equal-mass bins: {0.1, 0.2} acc 0 conf .15; {0.3, 0.4} acc 1 conf .35
    assert adaptive_ece(conf, correct, n_bins=2) == pytest.approx(0.5 * 0.15 + 0.5 * 0.65)
    # more bins than predictions: one prediction per bin
    assert adaptive_ece(conf, correct, n_bins=10) == pytest.approx((0.1 + 0.2 + 0.7 + 0.6) / 4)


def test_brier_nll_trust_accuracy():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert brier(probs, [0, 1]) == pytest.approx(0.25)
    c = 4
    assert brier(np.full((3, c), 1 / c), [0, 1, 2]) == pytest.approx(1 - 1 / c)
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=100)
    g = rng.integers(0, 5, size=100)
    onehot = np.eye(5)[g]
    assert brier(p, g) == pytest.approx(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    assert nll(p, g) == pytest.approx(-np.mean(np.log(p[np.arange(100), g])))
    assert nll(probs, [1, 1]) == pytest.approx((-np.log(1e-12) - np.log(0.5)) / 2)  # finite
    assert brier_binary([1.0, 0.5], [True, False]) == pytest.approx(0.125)
    assert trust_score(0.803, 0.063) == pytest.approx(0.74)
    assert trust_score(acc=80.3, ece=6.3) == pytest.approx(74.0)
    assert accuracy([True, False, True, True]) == 0.75


def test_torch_inputs_give_python_floats():
    conf, correct = calibrated_sample(500, seed=1)
    a = ece(conf, correct)
    b = ece(torch.tensor(conf, dtype=torch.float64), torch.tensor(correct))
    assert isinstance(b, float) and b == pytest.approx(a)
    assert isinstance(ece(torch.tensor(conf, dtype=torch.bfloat16), torch.tensor(correct)), float)


def test_rankwise_calibration():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    ids = np.array([[5, 9, 1], [3, 5, 7]])
    res = rankwise_calibration(probs, ids, gold_ids=np.array([9, 3]))
    assert res.rank.tolist() == [1, 2, 3]
    np.testing.assert_allclose(res.mean_prob, [0.6, 0.25, 0.15])
    np.testing.assert_allclose(res.accuracy, [0.5, 0.5, 0.0])
    np.testing.assert_allclose(res.gap, [-0.1, 0.25, -0.15])
    assert res.n == 2


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "fn", [ece, adaptive_ece, mce, reliability_bins, brier_binary], ids=lambda f: f.__name__
)
def test_empty_nan_and_out_of_range_raise(fn):
    with pytest.raises(ValueError, match="empty"):
        fn([], [])
    with pytest.raises(ValueError, match="NaN"):
        fn([0.5, float("nan")], [1, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fn([0.5, 1.2], [1, 0])
    with pytest.raises(ValueError, match="entries"):
        fn([0.5, 0.2], [1, 0, 1])


def test_other_errors():
    with pytest.raises(FirstError):
        ece([0.5], [1], n_bins=0)
    with pytest.raises(ValueError, match="empty"):
        brier(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match="gold"):
        nll(np.full((2, 3), 1 / 3), [0, 3])
    with pytest.raises(ValueError, match="integer"):
        nll(np.full((2, 3), 1 / 3), [0.0, 1.0])
    with pytest.raises(ValueError, match="empty"):
        rankwise_calibration(np.zeros((0, 5)), np.zeros((0, 5)), np.zeros(0))
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci(ece, [], [])
    # float32 round-off just above 1 is accepted (clipped), not an error
    assert ece(np.array([1.0000001]), [True]) == 0.0


# --------------------------------------------------------------------------- torchmetrics


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n_bins", [10, 15])
def test_ece_matches_torchmetrics_binary(seed, n_bins):
    # Definitions coincide for confidences below 1 (torchmetrics puts exactly 1 in a bin of its own).
    conf, correct = calibrated_sample(2000, seed, power=2.0)
    conf = np.minimum(conf, 0.999999)
    ref = BinaryCalibrationError(n_bins=n_bins, norm="l1")(
        torch.tensor(conf), torch.tensor(correct.astype(np.int64))
    )
    assert ece(conf, correct, n_bins) == pytest.approx(float(ref), abs=1e-12)
    ref_max = BinaryCalibrationError(n_bins=n_bins, norm="max")(
        torch.tensor(conf), torch.tensor(correct.astype(np.int64))
    )
    assert mce(conf, correct, n_bins) == pytest.approx(float(ref_max), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_ece_matches_torchmetrics_multiclass(seed):
    g = torch.Generator().manual_seed(seed)
    n, c = 1500, 5
    probs = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 2, dim=-1)
    target = torch.randint(0, c, (n,), generator=g)
    conf, pred = probs.max(dim=-1)
    ref = MulticlassCalibrationError(num_classes=c, n_bins=10, norm="l1")(probs, target)
    # torchmetrics accumulates in float32 here, hence the tolerance.
    assert ece(conf, pred == target) == pytest.approx(float(ref), abs=1e-6)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("seed", range(3))
def test_ece_of_calibrated_sampler_tends_to_zero(seed):
    small = ece(*calibrated_sample(1_000, seed))
    large = ece(*calibrated_sample(1_000_000, seed))
    assert large < 0.005
    assert large < small
    assert adaptive_ece(*calibrated_sample(1_000_000, seed)) < 0.005


def test_ece_of_miscalibrated_sampler_does_not_vanish():
    # correct ~ Bernoulli(conf^2): the gap conf - conf^2 integrates to 1/6 (minus a little binning).
    value = ece(*calibrated_sample(1_000_000, seed=0, power=2.0))
    assert value == pytest.approx(1 / 6, abs=0.005)
    bins = reliability_bins(*calibrated_sample(100_000, seed=0, power=2.0))
    assert (bins.gap[1:-1] < 0).all()  # over-confident everywhere inside


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate():
    conf, correct = calibrated_sample(1221, seed=3, power=1.5)
    point = ece(conf, correct)
    lo, hi = bootstrap_ci(ece, conf, correct, n_boot=500, seed=7)
    assert lo < point < hi
    assert (lo, hi) == bootstrap_ci(ece, conf, correct, n_boot=500, seed=7)
    assert (lo, hi) != bootstrap_ci(ece, conf, correct, n_boot=500, seed=8)
    # the vectorised ECE path equals calling the function once per replicate
    slow = bootstrap_ci(lambda c, y: ece(c, y), conf, correct, n_boot=500, seed=7)
    assert slow == pytest.approx((lo, hi), abs=1e-12)


def test_bootstrap_ci_of_a_mean_matches_the_normal_approximation():
    x = np.random.default_rng(0).normal(size=4000)
    lo, hi = bootstrap_ci(np.mean, x, n_boot=2000, seed=0)
    half = 1.96 * x.std() / np.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.15 * half)


def test_bootstrap_ci_resamples_rows_jointly():
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=300)
    gold = probs.argmax(axis=1)  # jointly resampled rows keep gold = argmax: accuracy stays 1
    lo, hi = bootstrap_ci(lambda p, g: float(np.mean(p.argmax(1) == g)), probs, gold, n_boot=200)
    assert lo == hi == 1.0


# --------------------------------------------------------------------------- beyond 10-bin ECE


def gap_sample(n: int, seed: int, gap: float = 0.1):
    """Confidence ~ U(0.5, 1), correct ~ Bernoulli(confidence - gap): over-confident by exactly
    `gap` at every confidence, so every ECE (binned, equal-mass, smooth) has population value
    `gap`."""
    rng = np.random.default_rng(seed)
    conf = 0.5 + 0.5 * rng.random(n)
    return conf, rng.random(n) < conf - gap


def test_equal_mass_ece_is_adaptive_ece_and_rows_agree():
    assert ece_equal_mass is adaptive_ece
    rng = np.random.default_rng(0)
    conf = rng.random((4, 57))
    corr = (rng.random((4, 57)) < conf).astype(float)
    for n_bins in (1, 10, 15):
        rows = equal_mass_ece_rows(conf, corr, n_bins)
        assert rows == pytest.approx(
            [adaptive_ece(c, k, n_bins) for c, k in zip(conf, corr, strict=True)]
        )
        assert ece_rows(conf, corr, n_bins) == pytest.approx(
            [ece(c, k, n_bins) for c, k in zip(conf, corr, strict=True)]
        )
    # every group holds N/M predictions: 4 groups of 2 here, whatever the confidences
    conf1 = [0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.98]
    corr1 = [1, 1, 1, 1, 0, 0, 0, 0]
    assert ece_equal_mass(conf1, corr1, 4) == pytest.approx(
        (abs(2 - 1.83) + abs(2 - 1.87) + abs(0 - 1.91) + abs(0 - 1.95)) / 8
    )


def test_per_question_scores_average_to_brier_and_nll():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.0, 0.0, 1.0]])
    gold = np.array([0, 2, 0])
    assert brier_per_question(probs, gold).mean() == pytest.approx(brier(probs, gold))
    assert nll_per_question(probs, gold).mean() == pytest.approx(nll(probs, gold))
    assert brier_per_question(probs, gold)[2] == pytest.approx(2.0)


def _naive_smece(f, y, sigma=None, grid=1001):
    """Smooth ECE straight from the definition: the reflected kernel at every (t, f_i), no
    binning of the confidences, a fine trapezoid over t, bisection for the fixed point.

    An independent reference implementation on purpose (slow and simple, sharing no code with
    `first_lib.metrics.smooth`), to cross-check the library's FFT-on-a-grid version; do not
    replace it with a call to the library."""
    f = np.asarray(f, float)
    r = np.asarray(y, float) - f
    t = np.linspace(0, 1, grid)[:, None]

    def at(s):
        k = sum(
            np.exp(-0.5 * ((t - f + 2 * j) / s) ** 2) + np.exp(-0.5 * ((t + f + 2 * j) / s) ** 2)
            for j in range(-3, 4)
        )
        big_r, dens = (k * r).mean(1), k.mean(1)
        return np.trapezoid(np.abs(big_r)) / np.trapezoid(dens)

    if sigma is not None:
        return at(sigma)
    lo, hi = 0.0, 1.0
    for _ in range(16):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid) > mid else (lo, mid)
    return at(hi)


@pytest.mark.parametrize("sample", ["calibrated", "overconfident"])
def test_smooth_ece_matches_a_naive_implementation(sample):
    conf, corr = calibrated_sample(150, 3) if sample == "calibrated" else gap_sample(150, 3)
    assert smooth_ece(conf, corr, sigma=0.1) == pytest.approx(
        _naive_smece(conf, corr, 0.1), rel=0.01
    )
    assert smooth_ece(conf, corr) == pytest.approx(_naive_smece(conf, corr), rel=0.02)


def _relplot_samples():
    """Synthetic samples (calibrated, over-confident by 0.1, under-confident) and the book's own
    records: every variant of the committed CSQA lab file, seed 0 (confidences near 1)."""
    from first_lib import lab

    yield "calibrated", calibrated_sample(400, 1)
    yield "over-confident", gap_sample(400, 2)
    yield "under-confident", calibrated_sample(3000, 5, power=0.5)
    data = lab.load_lab_records(lab.default_file("cpu", "csqa"))
    for variant, by_seed in sorted(data.records.items()):
        recs = by_seed[min(by_seed)]
        conf = np.array([r["confidence"] for r in recs], dtype=np.float64)
        yield f"lab {variant}", (conf, np.array([bool(r["correct"]) for r in recs]))


def _exact_smoothing(conf, resid, t, sigma):
    """(R(t) / D(t), D(t)) with the reflected kernel summed exactly over every prediction
    (O(n G)): the brute-force reference for both grid implementations."""
    kern = np.zeros((t.shape[0], conf.shape[0]))
    for k in range(-3, 4):
        for u in (conf, -conf):
            kern += np.exp(-0.5 * ((t[:, None] - u[None, :] + 2 * k) / sigma) ** 2)
    density = kern.sum(axis=1) / (conf.shape[0] * sigma * np.sqrt(2 * np.pi))
    return kern @ resid / kern.sum(axis=1), density


def test_smooth_ece_curve_and_density_match_relplot():
    """The cross-check issue 18 asks for, against the authors' package (Apple's `relplot`, a
    test dependency): smECE at its fixed point and at a fixed bandwidth, and at the fixed point
    the smoothed residual (our curve minus the diagonal) and the confidence density from
    relplot's reflected Gaussian kernel on our grid. Both discretise the kernel, so they agree
    to a fraction of a percent, not to round-off; the exact kernel sum decides between them:
    ours is within 5e-4 of it everywhere, relplot up to 3e-3 away at wide bandwidths (its
    kernel table stops at +-0.5, 2.6 sigma at sigma = 0.19: the Fine-tune records), and
    its density by about 1% of its peak (ours: 0.03%)."""
    import relplot
    from relplot.kernels import ReflectedGaussianKernel

    checked = 0
    for name, (conf, corr) in _relplot_samples():
        y = corr.astype(float)
        assert smooth_ece(conf, corr) == pytest.approx(relplot.smECE(conf, y), rel=0.01), name
        ref = relplot.smECE_sigma(conf, y, 0.05)
        assert smooth_ece(conf, corr, sigma=0.05) == pytest.approx(ref, rel=0.01), name
        rel = smooth_reliability(conf, corr)
        kernel = ReflectedGaussianKernel(rel.sigma)
        theirs, _ = kernel.smooth(conf, y - conf, rel.t)
        exact, exact_density = _exact_smoothing(conf, y - conf, rel.t, rel.sigma)
        ours = rel.accuracy - rel.t
        dense = rel.density > 0.2  # where the curve rests on some predictions
        assert np.abs(ours - exact)[dense].max() < 5e-4, name
        assert np.abs(theirs - ours)[dense].max() < 5e-3, name
        top = exact_density.max()
        assert np.abs(rel.density - exact_density).max() < 0.002 * top, name
        assert np.abs(kernel.kde(conf, rel.t) - rel.density).max() < 0.02 * top, name
        checked += 1
    assert checked >= 10  # three synthetic samples and the lab file's variants


def test_smooth_ece_fixed_point_curve_and_limits():
    conf, corr = gap_sample(3000, 0)
    rel = smooth_reliability(conf, corr)
    assert rel.smece == pytest.approx(rel.sigma, abs=2e-3)  # the fixed point smECE = sigma
    assert rel.smece == pytest.approx(0.1, abs=0.02)  # over-confident by 0.1 everywhere
    step = rel.t[1] - rel.t[0]
    assert (rel.density.sum() - (rel.density[0] + rel.density[-1]) / 2) * step == pytest.approx(1)
    inside = (rel.t > 0.6) & (rel.t < 0.9)  # the curve runs 0.1 below the diagonal
    assert np.abs(rel.accuracy[inside] - (rel.t[inside] - 0.1)).max() < 0.06
    assert smooth_ece(*calibrated_sample(20_000, 0)) < 0.015  # calibrated: tends to 0
    # smECE_sigma falls as sigma grows (wider kernels cancel more noise), which is why the
    # fixed point is unique; where the gap has one sign everywhere it hardly moves
    mixed = calibrated_sample(1000, 1)
    values = [smooth_ece(*mixed, sigma=s) for s in (0.01, 0.05, 0.2, 0.8)]
    assert values == sorted(values, reverse=True) and values[0] > 2 * values[-1]
    flat = [smooth_ece(conf, corr, sigma=s) for s in (0.01, 0.8)]
    assert flat == pytest.approx([0.1, 0.1], abs=0.01)
    with pytest.raises(FirstError):
        smooth_ece(conf, corr, sigma=0.0)


def test_smooth_ece_is_continuous_where_binned_ece_jumps():
    # half the predictions sit just below the bin edge 0.8, half just above; all are right
    # 75% of the time. Moving them across the edge by 0.002 changes the binned ECE a lot.
    rng = np.random.default_rng(0)
    corr = rng.random(2000) < 0.75
    below = np.where(np.arange(2000) % 2 == 0, 0.799, 0.701)
    above = below + 0.002
    assert abs(ece(below, corr) - ece(above, corr)) > 0.02
    assert abs(smooth_ece(below, corr) - smooth_ece(above, corr)) < 0.005


def test_smooth_ece_rows_match_single_calls():
    conf, corr = calibrated_sample(200, 5)
    rows = smooth_ece_rows(np.stack([conf, conf[::-1]]), np.stack([corr, corr[::-1]]).astype(float))
    assert rows == pytest.approx([smooth_ece(conf, corr)] * 2)


def test_risk_coverage_and_aurc_hand_examples():
    curve = risk_coverage([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    assert curve.coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert curve.risk == pytest.approx([0, 1 / 2, 1 / 3, 2 / 4])
    assert aurc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(
        (0 + 1 / 2 + 1 / 3 + 1 / 2) / 4
    )
    # ties are averaged over their order: the same AURC whichever tied answer comes first
    assert aurc([0.9, 0.9], [1, 0]) == aurc([0.9, 0.9], [0, 1]) == pytest.approx(0.5)
    assert risk_coverage([0.9, 0.5, 0.5, 0.5], [1, 1, 0, 0]).risk == pytest.approx(
        [0, (2 / 3) / 2, (4 / 3) / 3, 2 / 4]  # 2 errors among the 3 tied: 2/3 per answered
    )
    conf = np.random.default_rng(0).random((3, 40))
    corr = (conf > 0.4).astype(float)
    assert aurc_rows(conf, corr) == pytest.approx(
        [aurc(c, k) for c, k in zip(conf, corr, strict=True)]
    )


def test_aurc_orders_rankings_and_meets_its_limits():
    rng = np.random.default_rng(0)
    n, err = 20_000, 0.3
    wrong = rng.random(n) < err
    e = wrong.mean()
    perfect = np.where(wrong, 0.2, 0.8) + 0.01 * rng.random(n)
    noisy = perfect + 0.4 * rng.standard_normal(n)
    flat = np.full(n, 0.6)
    scores = [aurc(np.clip(c, 0, 1), ~wrong) for c in (perfect, noisy, flat)]
    assert scores == sorted(scores)  # better ranking, lower AURC
    assert scores[0] == pytest.approx(e + (1 - e) * np.log(1 - e), abs=1e-3)
    assert scores[2] == pytest.approx(e)  # uninformative: the error rate at every coverage
    assert risk_coverage(noisy.clip(0, 1), ~wrong).risk[-1] == pytest.approx(e)
