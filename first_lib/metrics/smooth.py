"""Smooth ECE and the smooth reliability curve (Blasiok & Nakkiran 2023): kernel, bandwidth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from first_lib.errors import FirstError
from first_lib.metrics.inputs import _confidence, _correct

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
