"""Bootstrap over questions: resampled row indices and the percentile interval of a metric."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from first_lib.errors import FirstError
from first_lib.metrics.binned import _check_bins, ece, ece_rows
from first_lib.metrics.inputs import _confidence, _correct, to_numpy

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
