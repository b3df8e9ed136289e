"""A variant's metric, or two variants' difference, with its bootstrap interval (`Estimate`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from first_lib import metrics
from first_lib.errors import FirstError
from first_lib.stats.power import mde
from first_lib.stats.resample import _paired_seeds, _replicates, interval
from first_lib.stats.rows import BIASED_METRICS, _point
from first_lib.stats.tables import runs_of


@dataclass(frozen=True)
class Estimate:
    """A metric, or a difference of metrics, with its bootstrap inference (fractions).

    Attributes: ``point`` the plug-in estimate (mean over seeds); ``lo``, ``hi`` the
    ``1 - alpha`` interval; ``corrected`` the bias-corrected estimate ``2 point - mean(reps)``
    (what the basic interval is centred on); ``p`` the two-sided p-value of 0; ``se`` the
    bootstrap standard error; ``mde`` the minimum detectable effect (`mde`); ``method``
    'percentile' or 'basic'; ``seeds`` 'paired', 'independent' or 'single';
    ``n_questions``, ``n_seeds`` (per side); ``metric``.
    Has ``point``, ``lo`` and ``hi`` like `first_lib.book.Difference`, so `book.diff_text`
    and `book.verdict` take it.
    """

    metric: str
    point: float
    lo: float
    hi: float
    corrected: float
    p: float
    se: float
    mde: float
    method: str
    seeds: str
    n_questions: int
    n_seeds: tuple[int, ...]
    alpha: float = 0.05


def _method(metric: str, method: str) -> str:
    if method == "auto":
        return "basic" if metric in BIASED_METRICS else "percentile"
    return method


def _estimate(point, reps, metric, method, alpha, power, seeds, sides) -> Estimate:
    n_seeds = tuple(r.n_seeds for r in sides)
    return from_replicates(
        point, reps, metric, method, alpha, power, seeds, len(sides[0].ids), n_seeds
    )


def from_replicates(
    point: float,
    reps: np.ndarray,
    metric: str,
    method: str,
    alpha: float,
    power: float,
    seeds: str,
    n_questions: int,
    n_seeds: tuple[int, ...],
) -> Estimate:
    """The `Estimate` of `point` from its bootstrap replicates `reps`: the interval by `method`,
    the bias-corrected point, the standard error and the smallest difference detected with
    `power` (for analyses that draw their own replicates)."""
    lo, hi, p = interval(point, reps, method, alpha)
    se = float(np.std(reps, ddof=1)) if reps.shape[0] > 1 else 0.0
    return Estimate(
        metric=metric,
        point=point,
        lo=lo,
        hi=hi,
        corrected=float(2 * point - reps.mean()),
        p=p,
        se=se,
        mde=mde(se, alpha, power),
        method=method,
        seeds=seeds,
        n_questions=int(n_questions),
        n_seeds=n_seeds,
        alpha=alpha,
    )


def estimate(
    variant: Any,
    metric: str,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    method: str = "auto",
    n_bins: int = 10,
    power: float = 0.8,
) -> Estimate:
    """One variant's ``metric`` with its interval over questions (and seeds, if several).

    ``method='auto'`` takes the bias-corrected basic interval for ECE-like metrics
    (`BIASED_METRICS`; its lower end is clipped at 0, as they cannot be negative except
    trust) and the percentile interval otherwise. ``variant``: see `runs_of`.
    """
    metrics._check_boot(n_boot, alpha)
    runs = runs_of(variant)
    method = _method(metric, method)
    point = _point(runs, metric, n_bins)
    (reps,) = _replicates([runs], metric, n_boot, seed, False, n_bins)
    est = _estimate(point, reps, metric, method, alpha, power, "single", [runs])
    if method == "basic" and metric != "trust" and est.lo < 0.0:
        est = replace(est, lo=0.0)
    return est


def compare(
    a: Any,
    b: Any,
    metric: str,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    method: str = "auto",
    pair_seeds: str = "auto",
    n_bins: int = 10,
    power: float = 0.8,
) -> Estimate:
    """``metric(a) - metric(b)`` on the same questions, over questions and training seeds.

    Each side's metric is the mean over its seeds. Replicates draw the same questions for
    both sides and each side's seeds (paired by index when both have the same seed labels,
    ``pair_seeds='auto'``; force with 'paired' or 'independent'). The interval is the
    bias-corrected basic one for ECE-like metrics and the percentile one otherwise
    (``method='auto'``); ``method='percentile'`` with one seed per side reproduces
    `first_lib.book.paired_difference` exactly. ``a``, ``b``: see `runs_of`.

    Example: ``compare({0: ft0, 1: ft1, 2: ft2}, {0: first0, 1: first1, 2: first2}, "ece")``
    is ECE(Fine-tune) - ECE(FIRST): positive when FIRST is better calibrated.
    """
    metrics._check_boot(n_boot, alpha)
    ra, rb = runs_of(a), runs_of(b)
    if ra.ids != rb.ids:
        raise FirstError("the two variants were not evaluated on the same questions")
    paired = _paired_seeds(ra, rb, pair_seeds)
    method = _method(metric, method)
    point = _point(ra, metric, n_bins) - _point(rb, metric, n_bins)
    rep_a, rep_b = _replicates([ra, rb], metric, n_boot, seed, paired, n_bins)
    scheme = "paired" if paired else "single" if ra.n_seeds == rb.n_seeds == 1 else "independent"
    return _estimate(point, rep_a - rep_b, metric, method, alpha, power, scheme, [ra, rb])
