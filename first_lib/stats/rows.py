"""Metrics of rows: every bootstrap replicate's acc, ECE, trust, Brier, NLL, smECE or AURC."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from first_lib import metrics
from first_lib.errors import FirstError
from first_lib.stats.tables import Runs


def _mean_of(column: str) -> Callable[..., np.ndarray]:
    return lambda cols, n_bins: cols[column].mean(axis=1)


def _trust(cols: Mapping[str, np.ndarray], n_bins: int) -> np.ndarray:
    return cols["correct"].mean(axis=1) - metrics.ece_rows(
        cols["confidence"], cols["correct"], n_bins
    )


_ROWS: dict[str, Callable[..., np.ndarray]] = {
    "acc": _mean_of("correct"),
    "ece": lambda c, n_bins: metrics.ece_rows(c["confidence"], c["correct"], n_bins),
    "trust": _trust,
    "brier": _mean_of("brier"),
    "nll": _mean_of("nll"),
    "ece_equal_mass": lambda c, n_bins: metrics.equal_mass_ece_rows(
        c["confidence"], c["correct"], n_bins
    ),
    "smece": lambda c, n_bins: metrics.smooth_ece_rows(c["confidence"], c["correct"]),
    "aurc": lambda c, n_bins: metrics.aurc_rows(c["confidence"], c["correct"]),
}
METRICS = tuple(_ROWS)
_NEEDS = {"acc": ("correct",), "brier": ("brier",), "nll": ("nll",)}  # else confidence, correct
# Plug-in estimates biased upwards by sampling noise: their intervals are bias-corrected.
BIASED_METRICS = ("ece", "trust", "ece_equal_mass", "smece")


def metric_rows(metric: str, cols: Mapping[str, np.ndarray], n_bins: int = 10) -> np.ndarray:
    """``metric`` of every row of per-question columns {name: [R, N]} -> [R] (fractions).

    Metrics: acc, ece (equal-width bins), trust (acc - ece), brier, nll (of the candidate
    probabilities), ece_equal_mass, smece (smooth ECE), aurc (area under risk-coverage).
    """
    if metric not in _ROWS:
        raise FirstError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if metric in ("brier", "nll") and metric not in cols:
        raise FirstError(f"{metric} needs the candidate probabilities (records with 'probs')")
    return _ROWS[metric](cols, n_bins)


def _point(runs: Runs, metric: str, n_bins: int) -> float:
    """The variant's metric: the mean over its seeds of each seed's metric."""
    return float(metric_rows(metric, runs.columns, n_bins).mean())
