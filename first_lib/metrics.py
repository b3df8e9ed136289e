"""Calibration and accuracy metrics: ECE (eq. 1), equal-mass ECE, smooth ECE, MCE, Brier, NLL,
Trust (eq. 2), and selective prediction (risk-coverage curve, AURC).

Every function takes numpy arrays or torch tensors (any device, any float dtype) and returns
plain python floats (or small numpy containers), computed in float64 on the CPU. Inputs are
validated: an empty input, a NaN, or a confidence outside [0, 1] raises `FirstError` (a
`ValueError`) with a message that says which argument is wrong.

Binning (`ece`, `mce`, `reliability_bins`): M equal-width bins on [0, 1], each closed on the
left, ``[m/M, (m+1)/M)``, except the last, which is closed on both sides so that a confidence of
exactly 1 lands in bin M and a confidence of exactly 0 in bin 1. The edges are the floats
nearest to m/M. This is torchmetrics' convention for confidences below 1 except exactly at an
edge where ``torch.linspace`` rounds differently (e.g. 0.3: torchmetrics' edge is
0.30000000000000004, so it puts 0.3 in bin 3, here bin 4); torchmetrics also puts a confidence
of exactly 1 in an extra (M+1)-th bin of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from first_lib.errors import FirstError

__all__ = [
    "ReliabilityBins",
    "RankwiseCalibration",
    "to_numpy",
    "check_probs",
    "bin_indices",
    "ece",
    "adaptive_ece",
    "ece_equal_mass",
    "ece_rows",
    "equal_mass_ece_rows",
    "SmoothReliability",
    "smooth_ece",
    "smooth_ece_rows",
    "smooth_reliability",
    "RiskCoverage",
    "risk_coverage",
    "aurc",
    "aurc_rows",
    "selective_risk_rows",
    "mce",
    "reliability_bins",
    "brier",
    "brier_binary",
    "brier_per_question",
    "nll",
    "nll_per_question",
    "accuracy",
    "trust_score",
    "rankwise_calibration",
    "bootstrap_ci",
    "resample_indices",
]


# --------------------------------------------------------------------------- input handling

# Values this far outside [0, 1] are float round-off and are clipped; further out is an error.
_TOL = 1e-5


def to_numpy(x: Any, name: str = "input", dtype: Any = np.float64) -> np.ndarray:
    """Convert a numpy array, torch tensor or sequence to a numpy array of `dtype`.

    Raises `FirstError` on an empty input, or on NaN in a floating input.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.size == 0:
        raise FirstError(f"{name} is empty: metrics need at least one prediction")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise FirstError(f"{name} contains NaN")
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def _confidence(confidence: Any) -> np.ndarray:
    conf = to_numpy(confidence, "confidence").reshape(-1)
    lo, hi = conf.min(), conf.max()
    if lo < -_TOL or hi > 1.0 + _TOL:
        raise FirstError(f"confidence must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    if lo < 0.0 or hi > 1.0:  # float32 round-off, e.g. a softmax that sums to 1.0000001
        conf = np.clip(conf, 0.0, 1.0)
    return conf


def _correct(correct: Any, n: int) -> np.ndarray:
    corr = to_numpy(correct, "correct").reshape(-1)
    if corr.shape[0] != n:
        raise FirstError(f"confidence has {n} entries but correct has {corr.shape[0]}")
    if corr.min() < 0.0 or corr.max() > 1.0:
        raise FirstError("correct must be booleans or numbers in [0, 1]")
    return corr


def check_probs(p: np.ndarray, name: str = "probs") -> np.ndarray:
    """Check that a float array lies in [0, 1] (clipping float round-off) and return it."""
    lo, hi = p.min(), p.max()
    if lo < -_TOL or hi > 1.0 + _TOL:
        raise FirstError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return np.clip(p, 0.0, 1.0) if (lo < 0.0 or hi > 1.0) else p


def _check_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise FirstError(f"n_bins must be a positive integer, got {n_bins!r}")


def _edges(n_bins: int) -> np.ndarray:
    """Bin edges m / M, each the float nearest to the fraction (so 0.3 and 0.7 open bins 4 and
    8 of 10; ``np.linspace`` would give 0.30000000000000004 and 0.7000000000000001)."""
    return np.arange(n_bins + 1) / n_bins


def bin_indices(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index in 0..n_bins-1 of each confidence (equal width; 0 -> first bin, 1 -> last).

    Shapes: confidence [...] float in [0, 1] -> [...] int64. No validation (internal, hot path).
    """
    edges = _edges(n_bins)
    # floor(conf * M), then corrected by one where round-off put it across an edge: the same
    # result as searchsorted(edges, conf, side="right") - 1, at half the cost.
    idx = np.minimum((confidence * n_bins).astype(np.intp), n_bins - 1)
    idx -= confidence < edges[idx]
    idx += confidence >= edges[idx + 1]
    return np.minimum(idx, n_bins - 1)


# --------------------------------------------------------------------------- ECE and friends


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of a reliability diagram (M equal-width bins).

    Attributes (arrays of length M unless said): ``edges`` [M + 1] bin edges; ``count`` number
    of predictions in the bin; ``mean_confidence`` and ``accuracy`` their mean confidence and
    accuracy (NaN in an empty bin); ``gap`` = accuracy - mean_confidence (positive: the bin is
    under-confident, accuracy above the diagonal; negative: over-confident; NaN when empty).
    """

    edges: np.ndarray
    count: np.ndarray
    mean_confidence: np.ndarray
    accuracy: np.ndarray
    gap: np.ndarray

    @property
    def n(self) -> int:
        """Total number of predictions."""
        return int(self.count.sum())

    @property
    def ece(self) -> float:
        """Expected calibration error (eq. 1) of these bins."""
        filled = self.count > 0
        return float(np.sum(self.count[filled] * np.abs(self.gap[filled])) / self.n)


def _bin_sums(conf: np.ndarray, corr: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    idx = bin_indices(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    corr_sum = np.bincount(idx, weights=corr, minlength=n_bins)
    return count, conf_sum, corr_sum


def reliability_bins(confidence: Any, correct: Any, n_bins: int = 10) -> ReliabilityBins:
    """Per-bin count, mean confidence, accuracy and gap over M equal-width bins.

    Args:
        confidence: [N] confidence of each prediction, in [0, 1].
        correct: [N] bool (or 0/1) whether each prediction was right.
        n_bins: M, the number of equal-width bins (the paper uses 10).
    """
    _check_bins(n_bins)
    conf = _confidence(confidence)
    corr = _correct(correct, conf.shape[0])
    count, conf_sum, corr_sum = _bin_sums(conf, corr, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        acc = np.where(count > 0, corr_sum / count, np.nan)
    return ReliabilityBins(
        edges=_edges(n_bins),
        count=count,
        mean_confidence=mean_conf,
        accuracy=acc,
        gap=acc - mean_conf,
    )


def ece(confidence: Any, correct: Any, n_bins: int = 10) -> float:
    """Expected calibration error, eq. 1: ``sum_m |B_m|/n * |acc(B_m) - conf(B_m)|``.

    Args:
        confidence: [N] confidence of each prediction (the probability of the predicted
            answer), in [0, 1].
        correct: [N] bool (or 0/1) whether the prediction was right.
        n_bins: M equal-width bins (0 counts in the first bin, 1 in the last).

    Returns:
        ECE as a fraction in [0, 1] (multiply by 100 for the paper's tables).
    """
    _check_bins(n_bins)
    conf = _confidence(confidence)
    corr = _correct(correct, conf.shape[0])
    return float(ece_rows(conf[None], corr[None], n_bins)[0])


def ece_rows(conf: np.ndarray, corr: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """`ece` of every row at once (e.g. bootstrap replicates): conf, corr [R, N] -> [R].

    No validation (internal, hot path). Uses ``|B_m|/n * |acc - conf| = |sum(correct) -
    sum(conf)| / n`` in each bin, so one `bincount` per sum does all rows.
    """
    r, n = conf.shape
    flat = (np.arange(r)[:, None] * n_bins + bin_indices(conf, n_bins)).reshape(-1)
    conf_sum = np.bincount(flat, weights=conf.reshape(-1), minlength=r * n_bins)
    corr_sum = np.bincount(flat, weights=corr.reshape(-1), minlength=r * n_bins)
    return np.abs(corr_sum - conf_sum).reshape(r, n_bins).sum(axis=1) / n


def mce(confidence: Any, correct: Any, n_bins: int = 10) -> float:
    """Maximum calibration error: the largest ``|acc(B_m) - conf(B_m)|`` over non-empty bins."""
    bins = reliability_bins(confidence, correct, n_bins)
    return float(np.nanmax(np.abs(bins.gap)))


def adaptive_ece(confidence: Any, correct: Any, n_bins: int = 10) -> float:
    """ECE with equal-mass bins: the predictions sorted by confidence, split into M groups
    of (nearly) equal size (sizes differ by at most one; fewer groups when N < M).

    Equal-width bins put most predictions of a confident model into the top bin or two, so the
    10-bin ECE then rests on one or two bins; equal-mass bins give every bin N/M predictions,
    so each bin's accuracy is estimated equally well (Nixon et al. 2019, "Measuring calibration
    in deep learning"; Roelofs et al. 2022 study how the choice moves the estimate's bias).
    `ece_equal_mass` is this function under the name `results.json` uses.
    """
    _check_bins(n_bins)
    conf = _confidence(confidence)
    corr = _correct(correct, conf.shape[0])
    return float(equal_mass_ece_rows(conf[None], corr[None], n_bins)[0])


ece_equal_mass = adaptive_ece


def equal_mass_ece_rows(conf: np.ndarray, corr: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """`adaptive_ece` of every row at once: conf, corr [R, N] -> [R]. No validation."""
    r, n = conf.shape
    order = np.argsort(conf, axis=1, kind="stable")
    m = min(int(n_bins), n)
    # Group g holds sorted positions [bounds[g], bounds[g+1]).
    bounds = (np.arange(m + 1) * n) // m
    flat = (np.arange(r)[:, None] * m + np.repeat(np.arange(m), np.diff(bounds))).reshape(-1)
    conf_sum = np.bincount(flat, np.take_along_axis(conf, order, 1).reshape(-1), r * m)
    corr_sum = np.bincount(flat, np.take_along_axis(corr, order, 1).reshape(-1), r * m)
    return np.abs(corr_sum - conf_sum).reshape(r, m).sum(axis=1) / n


def accuracy(correct: Any) -> float:
    """Fraction of correct predictions."""
    return float(to_numpy(correct, "correct").mean())


def trust_score(acc: float, ece: float) -> float:
    """Trust score, eq. 2: ``Acc - ECE`` (both fractions, or both percentages)."""
    acc, ece = float(acc), float(ece)
    if not (np.isfinite(acc) and np.isfinite(ece)):
        raise FirstError(f"trust_score needs finite numbers, got acc={acc}, ece={ece}")
    return acc - ece


# --------------------------------------------------------------------------- smooth ECE

_SMECE_GRID = 200  # evaluation points on [0, 1] at least (and at least 10 per bandwidth)
_SMECE_GRID_MAX = 1000
_SMECE_TOL = 1e-4  # the bisection stops when the bandwidth bracket is this narrow
_IMAGES = 2.0 * np.arange(-3, 4)  # mirror images u + 2k and -u + 2k, k = -3..3


@dataclass(frozen=True)
class SmoothReliability:
    """A kernel-smoothed reliability diagram (Blasiok & Nakkiran 2023).

    Attributes: ``t`` [G] confidences on a grid over [0, 1]; ``accuracy`` [G] the smoothed
    accuracy at each confidence, ``t + r(t)`` with r the kernel-weighted mean residual
    (correct - confidence) of the predictions near t (plot it against t: the diagonal is
    perfect calibration); ``density`` [G] the kernel density of the confidences (integrates to
    1; where it is thin the curve rests on few predictions); ``sigma`` the bandwidth;
    ``smece`` the smooth ECE at that bandwidth.
    """

    t: np.ndarray
    accuracy: np.ndarray
    density: np.ndarray
    sigma: float
    smece: float


def _folded_gaussian(sigma: float, g: int) -> np.ndarray:
    """A Gaussian of width sigma folded onto the grid's offsets: entry m + g - 1 holds
    ``sum_k phi_sigma(m * step + 2k)``, m = -(g - 1) .. 2(g - 1), step = 1 / (g - 1).

    The reflected kernel on [0, 1] is ``K_sigma(t, u) = sum_k phi(t - u + 2k) + phi(t + u +
    2k)``: the mirror images of u at 0 and 1 (and their images) keep all of a prediction's
    kernel mass inside [0, 1], where a plain Gaussian near a confidence of 1 would leak half of
    it past the edge. On the grid t - u and t + u are multiples of the step, hence this table.
    """
    x = np.arange(-(g - 1), 2 * (g - 1) + 1) / (g - 1)
    z = (x[:, None] + _IMAGES) / sigma
    return np.exp(-0.5 * z * z).sum(axis=1) / (sigma * np.sqrt(2.0 * np.pi))


def _apply_kernel(folded: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``sum_j K(t_i, t_j) v_j`` for all i and every row v of ``vectors`` [V, G]: the t - u part
    is a convolution of v with the table, the t + u part one of v reversed; both by FFT."""
    g = vectors.shape[1]
    size = 1 << int(np.ceil(np.log2(folded.shape[0] + g)))  # no wrap-around
    both = np.concatenate([vectors, vectors[:, ::-1]])
    conv = np.fft.irfft(np.fft.rfft(folded, size) * np.fft.rfft(both, size, axis=1), size, axis=1)
    v = vectors.shape[0]
    return conv[:v, g - 1 : 2 * g - 1] + conv[v:, 2 * g - 2 : 3 * g - 2]


def _smooth(conf: np.ndarray, resid: np.ndarray, sigma: float) -> tuple[np.ndarray, ...]:
    """(t [G], smoothed residual mass R(t), density D(t)): R(t) = 1/n sum_i K(t, f_i) r_i and
    D(t) = 1/n sum_i K(t, f_i). Each confidence is first split linearly between its two
    nearest grid points, so the cost is O(G log G), whatever n."""
    g = int(min(_SMECE_GRID_MAX, max(_SMECE_GRID, np.ceil(10.0 / sigma))))
    pos = conf * (g - 1)
    lo = np.minimum(pos.astype(np.intp), g - 2)
    w = pos - lo
    n = conf.shape[0]

    def to_grid(v: np.ndarray) -> np.ndarray:
        return (np.bincount(lo, v * (1 - w), g) + np.bincount(lo + 1, v * w, g)) / n

    smoothed = _apply_kernel(
        _folded_gaussian(sigma, g), np.stack([to_grid(resid), to_grid(np.ones(n))])
    )
    return np.linspace(0.0, 1.0, g), smoothed[0], smoothed[1]


def _trapezoid(y: np.ndarray) -> float:
    """Trapezoid sum of y on a uniform grid, in units of the step (the step cancels in ratios)."""
    return float(y.sum() - 0.5 * (y[0] + y[-1]))


def _smece_at(conf: np.ndarray, resid: np.ndarray, sigma: float) -> float:
    """smECE_sigma = integral of |R(t)| over [0, 1] (the density's numerical integral, ~1,
    divides it out so the grid's round-off does not count)."""
    _, r, d = _smooth(conf, resid, sigma)
    return _trapezoid(np.abs(r)) / _trapezoid(d)


def _fixed_point(conf: np.ndarray, resid: np.ndarray) -> float:
    """The bandwidth sigma* with smECE_sigma* = sigma*, by bisection on [0, 1] (smECE_sigma
    falls as sigma grows, so there is exactly one)."""
    lo, hi = 0.0, 1.0
    if _smece_at(conf, resid, hi) >= hi:
        return hi
    while hi - lo > _SMECE_TOL:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _smece_at(conf, resid, mid) > mid else (lo, mid)
    return hi


def _conf_resid(confidence: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    conf = _confidence(confidence)
    return conf, _correct(correct, conf.shape[0]) - conf


def smooth_reliability(confidence: Any, correct: Any, sigma: float | None = None):
    """The smooth reliability curve and smooth ECE (Blasiok & Nakkiran 2023, "Smooth ECE:
    Principled reliability diagrams via kernel smoothing").

    Binned ECE jumps when a prediction crosses a bin edge and depends on the number of bins.
    Smooth ECE replaces the bins by a Gaussian kernel: the residual ``r_i = correct_i -
    confidence_i`` is averaged around every confidence t with weights ``K_sigma(t, f_i)``
    (reflected at 0 and 1), and ``smECE_sigma = integral |1/n sum_i K_sigma(t, f_i) r_i| dt``,
    i.e. the mean absolute smoothed gap weighted by the density of confidences. The
    bandwidth is not a free choice: ``sigma*`` is the fixed point ``smECE_sigma* = sigma*``
    (a model whose error is e is judged at resolution e), which makes smECE a consistent
    calibration measure (within a constant factor of the distance to the nearest perfectly
    calibrated predictor) and leaves no knob to tune.

    Args:
        confidence: [N] confidences in [0, 1]; correct: [N] bool (or 0/1).
        sigma: a fixed bandwidth instead of the fixed point (e.g. to compare models at one
            resolution).

    Returns:
        `SmoothReliability` with the curve, the density, sigma and smECE (a fraction).
    """
    conf, resid = _conf_resid(confidence, correct)
    if sigma is None:
        sigma = _fixed_point(conf, resid)
    elif not 0.0 < sigma <= 1.0:
        raise FirstError(f"sigma must lie in (0, 1], got {sigma}")
    t, r, d = _smooth(conf, resid, sigma)
    mass = _trapezoid(d) / (t.shape[0] - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = t + r / d
    return SmoothReliability(t, acc, d / mass, float(sigma), _trapezoid(np.abs(r)) / _trapezoid(d))


def smooth_ece(confidence: Any, correct: Any, sigma: float | None = None) -> float:
    """Smooth ECE at the fixed-point bandwidth (or at ``sigma``): see `smooth_reliability`.

    Like every ECE it is above 0 by chance for a calibrated model (a median of about 3 points at
    N = 1000 for confidences spread over [0, 1], as for 10-bin ECE), but it changes continuously
    with the predictions and needs no bins.
    """
    return smooth_reliability(confidence, correct, sigma).smece


def smooth_ece_rows(conf: np.ndarray, corr: np.ndarray) -> np.ndarray:
    """`smooth_ece` of every row (each with its own fixed point): [R, N] -> [R]. No validation;
    a few ms a row."""
    resid = corr - conf
    return np.array([_smece_at(c, r, _fixed_point(c, r)) for c, r in zip(conf, resid, strict=True)])


# --------------------------------------------------------------------------- selective prediction


@dataclass(frozen=True)
class RiskCoverage:
    """Selective prediction: answer only the k most confident questions, abstain on the rest.

    Attributes: ``coverage`` [N] = k/N for k = 1..N; ``risk`` [N] the error rate among the k
    answered. A model whose confidence ranks its errors last has a low curve; the area under
    it (`aurc`) is the mean risk over all coverages.
    """

    coverage: np.ndarray
    risk: np.ndarray

    @property
    def aurc(self) -> float:
        """Area under the risk-coverage curve (the mean of ``risk``)."""
        return float(self.risk.mean())


def selective_risk_rows(conf: np.ndarray, corr: np.ndarray) -> np.ndarray:
    """Risk at every coverage k = 1..N of every row: [R, N] -> [R, N]. No validation.

    Ties are averaged: within a group of equal confidences the order is arbitrary, so the
    errors answered at coverage k are those of the groups before plus the group's error rate
    times how many of it are answered (the expectation over random tie-breaking). A model
    that gives every question the same confidence thus scores its error rate at every k.
    """
    order = np.argsort(-conf, axis=1, kind="stable")
    c = np.take_along_axis(conf, order, 1)
    err = 1.0 - np.take_along_axis(corr, order, 1)
    r, n = c.shape
    pos = np.broadcast_to(np.arange(n), (r, n))
    first = np.ones((r, n), dtype=bool)  # position opens a group of equal confidences
    first[:, 1:] = c[:, 1:] != c[:, :-1]
    last = np.ones((r, n), dtype=bool)
    last[:, :-1] = first[:, 1:]
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
    cum = np.concatenate([np.zeros((r, 1)), np.cumsum(err, axis=1)], axis=1)  # errors in first k
    before = np.take_along_axis(cum, start, 1)
    group = np.take_along_axis(cum, end + 1, 1) - before
    answered = before + (pos - start + 1) * group / (end - start + 1)
    return answered / (pos + 1)


def risk_coverage(confidence: Any, correct: Any) -> RiskCoverage:
    """The risk-coverage curve (Geifman & El-Yaniv 2017, "Selective classification for deep
    neural networks"): the error rate among the k most confident predictions, k = 1..N.

    Calibration asks whether 80% confidence means 80% right; selective prediction asks only
    whether the confidence *ranks* the right answers above the wrong ones. A model can be
    calibrated and rank badly (every question at its accuracy) or rank well and be
    over-confident: the two views complement each other.
    """
    conf = _confidence(confidence)
    corr = _correct(correct, conf.shape[0])
    n = conf.shape[0]
    return RiskCoverage(np.arange(1, n + 1) / n, selective_risk_rows(conf[None], corr[None])[0])


def aurc(confidence: Any, correct: Any) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019, "Bias-reduced uncertainty
    estimation for deep neural classifiers"), lower is better; ties averaged.

    Uninformative confidence scores the error rate e; a perfect ranking (every error least
    confident) scores about ``e + (1 - e) ln(1 - e)`` (tends to it for large N).
    """
    return risk_coverage(confidence, correct).aurc


def aurc_rows(conf: np.ndarray, corr: np.ndarray) -> np.ndarray:
    """`aurc` of every row: [R, N] -> [R]. No validation."""
    return selective_risk_rows(conf, corr).mean(axis=1)


# --------------------------------------------------------------------------- proper scores


def _probs_gold(probs: Any, gold: Any) -> tuple[np.ndarray, np.ndarray]:
    p = to_numpy(probs, "probs")
    if p.ndim != 2:
        raise FirstError(f"probs must have shape [N, C], got {p.shape}")
    g = to_numpy(gold, "gold", dtype=None).reshape(-1)
    if g.dtype.kind not in "iu":
        raise FirstError(f"gold must hold integer class indices, got dtype {g.dtype}")
    if g.shape[0] != p.shape[0]:
        raise FirstError(f"probs has {p.shape[0]} rows but gold has {g.shape[0]}")
    if g.min() < 0 or g.max() >= p.shape[1]:
        raise FirstError(f"gold indices must lie in [0, {p.shape[1] - 1}]")
    return check_probs(p), g.astype(np.int64)


def brier_per_question(probs: Any, gold: Any) -> np.ndarray:
    """Each question's multi-class Brier score ``sum_c (p[n, c] - 1[c == gold[n]])^2``: [N].

    Per-question scores are what a paired comparison resamples (`first_lib.stats`).
    """
    p, g = _probs_gold(probs, gold)
    return np.square(p).sum(axis=1) - 2.0 * p[np.arange(p.shape[0]), g] + 1.0


def brier(probs: Any, gold: Any) -> float:
    """Multi-class Brier score over the candidates:
    ``mean_n sum_c (p[n, c] - 1[c == gold[n]])^2``.

    The probabilities are used as given (renormalise them over the candidates first if that is
    what you mean). Range [0, 2]; 0 is perfect; a uniform guess over C candidates scores
    ``1 - 1/C``.

    Args:
        probs: [N, C] probability of each candidate answer.
        gold: [N] int index of the right candidate.
    """
    return float(np.mean(brier_per_question(probs, gold)))


def brier_binary(confidence: Any, correct: Any) -> float:
    """Brier score of the top-1 confidence: ``mean (confidence - correct)^2``, in [0, 1]."""
    conf = _confidence(confidence)
    corr = _correct(correct, conf.shape[0])
    return float(np.mean(np.square(conf - corr)))


def nll_per_question(probs: Any, gold: Any, eps: float = 1e-12) -> np.ndarray:
    """Each question's ``-log max(p[n, gold[n]], eps)``: [N] (see `nll`)."""
    p, g = _probs_gold(probs, gold)
    return -np.log(np.maximum(p[np.arange(p.shape[0]), g], eps))


def nll(probs: Any, gold: Any, eps: float = 1e-12) -> float:
    """Negative log-likelihood of the gold candidate: ``-mean_n log max(p[n, gold[n]], eps)``.

    The probabilities are used as given; ``eps`` keeps a zero probability finite
    (-log 1e-12 = 27.6).
    """
    return float(np.mean(nll_per_question(probs, gold, eps)))


# --------------------------------------------------------------------------- rank-wise


@dataclass(frozen=True)
class RankwiseCalibration:
    """Position-wise calibration (the paper's Figure 3) for ranks 1..k.

    Attributes: ``rank`` [k] = 1..k; ``mean_prob`` [k] mean probability of the rank-i token;
    ``accuracy`` [k] fraction of positions where the rank-i token is the ground truth;
    ``n`` number of positions. A calibrated model has mean_prob close to accuracy at each rank.
    """

    rank: np.ndarray
    mean_prob: np.ndarray
    accuracy: np.ndarray
    n: int

    @property
    def gap(self) -> np.ndarray:
        """accuracy - mean_prob per rank (positive: under-confident at that rank)."""
        return self.accuracy - self.mean_prob


def rankwise_calibration(topk_probs: Any, topk_ids: Any, gold_ids: Any) -> RankwiseCalibration:
    """Mean probability of the rank-i token and how often it is the gold token, i = 1..k.

    Args:
        topk_probs: [N, k] probabilities in rank order (column 0 is the top-1).
        topk_ids: [N, k] token ids of the same entries.
        gold_ids: [N] the ground-truth token id at each position.
    """
    p = to_numpy(topk_probs, "topk_probs")
    ids = to_numpy(topk_ids, "topk_ids", dtype=None)
    gold = to_numpy(gold_ids, "gold_ids", dtype=None).reshape(-1)
    if p.ndim != 2 or ids.shape != p.shape:
        raise FirstError(f"topk_probs {p.shape} and topk_ids {ids.shape} must both be [N, k]")
    if gold.shape[0] != p.shape[0]:
        raise FirstError(f"topk_probs has {p.shape[0]} rows but gold_ids has {gold.shape[0]}")
    hit = ids == gold[:, None]
    k = p.shape[1]
    return RankwiseCalibration(
        rank=np.arange(1, k + 1),
        mean_prob=p.mean(axis=0),
        accuracy=hit.mean(axis=0),
        n=int(p.shape[0]),
    )


# --------------------------------------------------------------------------- bootstrap


_CHUNK = 4_000_000  # indices drawn at once: memory stays bounded for large N


def resample_indices(n: int, n_boot: int, seed: int = 0, width: int = 1):
    """Bootstrap row indices: yields chunks [c, n] of ``n_boot`` rows in all, each row n draws
    with replacement from ``range(n)``, from ``numpy.random.default_rng(seed)``.

    Chunks hold about 4M indices (``width`` shrinks them when each index is later expanded
    ``width``-fold, e.g. once per training seed), so memory stays bounded for large n. The
    stream depends only on (n, n_boot, seed, width): `first_lib.stats` draws the same
    questions as `bootstrap_ci` when there is one seed.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK // (n * width))
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n, size=(min(chunk, n_boot - start), n))


def _check_boot(n_boot: int, alpha: float) -> None:
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise FirstError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: Any,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(*arrays, **kwargs)``.

    Rows (the first axis) of all arrays are resampled jointly, with replacement, ``n_boot``
    times (`resample_indices`); the interval is the ``alpha/2`` and ``1 - alpha/2``
    percentiles of the replicates. ``ece`` is computed for all replicates at once
    (vectorised); any other function is called once per replicate.

    The percentile interval assumes the estimate is unbiased; the plug-in ECE is not (it is
    biased upwards, so its replicates sit above the estimate): `first_lib.stats` has the
    bias-corrected interval for it.

    Example: ``bootstrap_ci(ece, confidence, correct, n_bins=10)`` -> (lo, hi).
    """
    if not arrays:
        raise FirstError("bootstrap_ci needs at least one array to resample")
    _check_boot(n_boot, alpha)
    arrs = [to_numpy(a, f"array {i}", dtype=None) for i, a in enumerate(arrays)]
    n = arrs[0].shape[0]
    if any(a.shape[0] != n for a in arrs):
        raise FirstError(f"arrays must share their first dimension, got {[a.shape for a in arrs]}")
    stats = []
    fast = metric_fn is ece and len(arrs) == 2
    if fast:
        n_bins = kwargs.get("n_bins", 10)
        _check_bins(n_bins)
        conf = _confidence(arrs[0])
        corr = _correct(arrs[1], n)
    for idx in resample_indices(n, n_boot, seed):
        if fast:
            stats.append(ece_rows(conf[idx], corr[idx], n_bins))
        else:
            stats.append(np.array([metric_fn(*(a[i] for a in arrs), **kwargs) for i in idx]))
    stats = np.concatenate(stats)
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)
