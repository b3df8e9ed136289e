"""Calibration and accuracy metrics: ECE (eq. 1), adaptive ECE, MCE, Brier, NLL, Trust (eq. 2).

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
    "mce",
    "reliability_bins",
    "brier",
    "brier_binary",
    "nll",
    "accuracy",
    "trust_score",
    "rankwise_calibration",
    "bootstrap_ci",
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
    _, conf_sum, corr_sum = _bin_sums(conf, corr, n_bins)
    # |B_m|/n * |acc - conf| = |sum(correct) - sum(conf)| / n in each bin.
    return float(np.abs(corr_sum - conf_sum).sum() / conf.shape[0])


def mce(confidence: Any, correct: Any, n_bins: int = 10) -> float:
    """Maximum calibration error: the largest ``|acc(B_m) - conf(B_m)|`` over non-empty bins."""
    bins = reliability_bins(confidence, correct, n_bins)
    return float(np.nanmax(np.abs(bins.gap)))


def adaptive_ece(confidence: Any, correct: Any, n_bins: int = 10) -> float:
    """ECE with equal-mass bins: the predictions sorted by confidence, split into M groups
    of (nearly) equal size (sizes differ by at most one; fewer groups when N < M)."""
    _check_bins(n_bins)
    conf = _confidence(confidence)
    corr = _correct(correct, conf.shape[0])
    order = np.argsort(conf, kind="stable")
    n = conf.shape[0]
    m = min(int(n_bins), n)
    # Group g holds sorted positions [bounds[g], bounds[g+1]).
    bounds = (np.arange(m + 1) * n) // m
    group = np.repeat(np.arange(m), np.diff(bounds))
    conf_sum = np.bincount(group, weights=conf[order], minlength=m)
    corr_sum = np.bincount(group, weights=corr[order], minlength=m)
    return float(np.abs(corr_sum - conf_sum).sum() / n)


def accuracy(correct: Any) -> float:
    """Fraction of correct predictions."""
    return float(to_numpy(correct, "correct").mean())


def trust_score(acc: float, ece: float) -> float:
    """Trust score, eq. 2: ``Acc - ECE`` (both fractions, or both percentages)."""
    acc, ece = float(acc), float(ece)
    if not (np.isfinite(acc) and np.isfinite(ece)):
        raise FirstError(f"trust_score needs finite numbers, got acc={acc}, ece={ece}")
    return acc - ece


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
    p, g = _probs_gold(probs, gold)
    sq = np.square(p).sum(axis=1)
    p_gold = p[np.arange(p.shape[0]), g]
    return float(np.mean(sq - 2.0 * p_gold + 1.0))


def brier_binary(confidence: Any, correct: Any) -> float:
    """Brier score of the top-1 confidence: ``mean (confidence - correct)^2``, in [0, 1]."""
    conf = _confidence(confidence)
    corr = _correct(correct, conf.shape[0])
    return float(np.mean(np.square(conf - corr)))


def nll(probs: Any, gold: Any, eps: float = 1e-12) -> float:
    """Negative log-likelihood of the gold candidate: ``-mean_n log max(p[n, gold[n]], eps)``.

    The probabilities are used as given; ``eps`` keeps a zero probability finite
    (-log 1e-12 = 27.6).
    """
    p, g = _probs_gold(probs, gold)
    return float(-np.mean(np.log(np.maximum(p[np.arange(p.shape[0]), g], eps))))


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


def _ece_batched(conf: np.ndarray, corr: np.ndarray, idx: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of every bootstrap replicate at once. idx: [R, N] row indices -> [R] ECE."""
    r, n = idx.shape
    flat = (np.arange(r)[:, None] * n_bins + bin_indices(conf, n_bins)[idx]).reshape(-1)
    conf_sum = np.bincount(flat, weights=conf[idx].reshape(-1), minlength=r * n_bins)
    corr_sum = np.bincount(flat, weights=corr[idx].reshape(-1), minlength=r * n_bins)
    return np.abs(corr_sum - conf_sum).reshape(r, n_bins).sum(axis=1) / n


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
    times from ``numpy.random.default_rng(seed)``; the interval is the ``alpha/2`` and
    ``1 - alpha/2`` percentiles of the replicates. ``ece`` is computed for all replicates at
    once (vectorised); any other function is called once per replicate.

    Example: ``bootstrap_ci(ece, confidence, correct, n_bins=10)`` -> (lo, hi).
    """
    if not arrays:
        raise FirstError("bootstrap_ci needs at least one array to resample")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise FirstError(f"need n_boot >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    arrs = [to_numpy(a, f"array {i}", dtype=None) for i, a in enumerate(arrays)]
    n = arrs[0].shape[0]
    if any(a.shape[0] != n for a in arrs):
        raise FirstError(f"arrays must share their first dimension, got {[a.shape for a in arrs]}")
    rng = np.random.default_rng(seed)
    # Replicates are drawn in chunks of about 4M indices so memory stays bounded for large N.
    chunk = max(1, 4_000_000 // n)
    stats = []
    fast = metric_fn is ece and len(arrs) == 2
    if fast:
        n_bins = kwargs.get("n_bins", 10)
        _check_bins(n_bins)
        conf = _confidence(arrs[0])
        corr = _correct(arrs[1], n)
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        if fast:
            stats.append(_ece_batched(conf, corr, idx, n_bins))
        else:
            stats.append(np.array([metric_fn(*(a[i] for a in arrs), **kwargs) for i in idx]))
    stats = np.concatenate(stats)
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)
