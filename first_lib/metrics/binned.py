"""Binned calibration metrics: ECE (eq. 1), MCE, reliability bins and equal-mass ECE.

Binning (`ece`, `mce`, `reliability_bins`): M equal-width bins on [0, 1], each closed on the
left, ``[m/M, (m+1)/M)``, except the last, which is closed on both sides so that a confidence of
exactly 1 lands in bin M and a confidence of exactly 0 in bin 1. The edges are the floats
nearest to m/M. This is torchmetrics' convention for confidences below 1 except exactly at an
edge where ``torch.linspace`` rounds differently (e.g. 0.3: torchmetrics' edge is
0.30000000000000004, so it puts 0.3 in bin 3, here bin 4); torchmetrics also puts a confidence
of exactly 1 in an extra (M+1)-th bin of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from first_lib.errors import FirstError
from first_lib.metrics.inputs import _confidence, _correct


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
