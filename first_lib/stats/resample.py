"""The crossed bootstrap over questions and training seeds, and its intervals and p-values.

A number in the book is an estimate from two sources of chance: which test questions were
drawn (the questions are a sample of the task) and which training seed was used (adapter
initialisation and batch order; a rerun gives another model). Every interval here resamples
both, with the bootstrap:

- **Questions and seeds, crossed.** Every seed of every variant answers the same questions, so
  the data are a seeds x questions table. A replicate draws N questions with replacement
  (the same ones for both variants: the comparison is paired) and, for each variant, S seeds
  with replacement; the variant's metric is the mean over the drawn seeds of the metric on
  the drawn questions. This is Owen's (2007) "pigeonhole" bootstrap for crossed designs; it is
  mildly conservative (the question-by-seed interaction is counted at both levels). Seeds are
  *paired by index* when both variants were trained with the same seeds (seed s gives both the
  same adapter initialisation and batch order, so their runs are correlated and pairing
  removes the shared part) and drawn independently otherwise (e.g. a trained variant against an
  untuned model, which has a single run). With one seed a replicate is exactly
  `first_lib.book.paired_difference`'s (the same questions are drawn from the same stream).
- **A bias-aware interval for ECE** (`ECE_INTERVAL`). The plug-in ECE is biased upwards: every
  bin's |accuracy - confidence| adds its sampling noise, so even a perfectly calibrated model
  scores a few points, and the bootstrap replicates sit above the estimate by about the same
  bias again. The percentile interval then sits too high and can miss the truth entirely. For
  ECE-like metrics (``ece``, ``ece_equal_mass``, ``smece``, ``trust``) we use the *basic*
  bootstrap interval ``[2 t - q(1 - a/2), 2 t - q(a/2)]`` (Davison & Hinkley 1997, eq. 5.6),
  whose centre is the bias-corrected estimate ``2 t - mean(t*)`` (Efron & Tibshirani 1993,
  sec. 10.6) -- the same correction Kumar et al. (2019, "Verified uncertainty calibration")
  apply in their debiased l1 calibration error. In a simulation (tests/test_stats.py: N = 300,
  a true ECE of 3 points, 100 trials) it covered the truth 90% of the time, the percentile
  interval 48%; Efron's BC percentile interval, which moves the same way, fell in between.
  At a true ECE of exactly 0 no interval for a non-negative quantity is exact: the lower end
  reaches 0 about half the time (clipped at 0 for a single model's ECE).
- **p-values by inverting the interval**: the two-sided p-value is the smallest alpha at which
  the interval excludes 0, i.e. twice the share of the (reflected, for the basic interval)
  replicates on the far side of 0, with the +1 of Monte Carlo tests so it is never 0
  (Davison & Hinkley 1997, sec. 4.4). An interval excluding 0 and p < alpha thus agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from first_lib import metrics
from first_lib.errors import FirstError
from first_lib.stats.rows import _NEEDS, metric_rows
from first_lib.stats.tables import Runs

ECE_INTERVAL = (
    "bias-corrected (basic) bootstrap interval over questions and seeds: "
    "[2 t - q97.5, 2 t - q2.5] of the replicates, centred on the bias-corrected ECE 2 t - mean(t*)"
)
SEED_SCHEME = (
    "questions and training seeds resampled together (crossed bootstrap); seeds paired by index "
    "when both variants were trained with the same seeds, else drawn independently"
)
P_VALUE = (
    "two-sided bootstrap p-value: twice the share of replicates beyond 0 (the interval inverted)"
)


def _draw_seeds(rng: np.random.Generator, c: int, s: int, resample: bool = True) -> np.ndarray:
    """[c, s] seed indices: drawn with replacement, or all s seeds once (``resample`` False)."""
    if s == 1 or not resample:
        return np.broadcast_to(np.arange(s), (c, s))
    return rng.integers(0, s, size=(c, s))


def _gathered(runs: Runs, metric: str, sidx: np.ndarray, qidx: np.ndarray, n_bins: int):
    """[c] replicate values: seeds sidx [c, S] x questions qidx [c, N], mean over seeds."""
    c, s = sidx.shape
    need = _NEEDS.get(metric, ("confidence", "correct"))
    rows = {
        k: v[sidx[:, :, None], qidx[:, None, :]].reshape(c * s, -1)
        for k, v in runs.columns.items()
        if k in need
    }
    return metric_rows(metric, rows, n_bins).reshape(c, s).mean(axis=1)


_LEVELS = ("both", "questions", "seeds")


def _replicates(
    sides: Sequence[Runs],
    metric: str,
    n_boot: int,
    seed: int,
    paired: bool,
    n_bins: int,
    levels: str = "both",
) -> list[np.ndarray]:
    """Bootstrap replicates [n_boot] of each side's metric, the same questions for all sides.

    Questions come from `metrics.resample_indices(N, n_boot, seed)` (as in
    `metrics.bootstrap_ci`); seeds from a second stream, once for all sides when ``paired``.
    ``levels`` 'questions' or 'seeds' resamples that level only (the other is kept whole).
    """
    n = len(sides[0].ids)
    width = max(r.n_seeds for r in sides)
    seed_rng = np.random.default_rng([seed, 1])
    draw = levels != "questions"
    out: list[list[np.ndarray]] = [[] for _ in sides]
    for qidx in metrics.resample_indices(n, n_boot, seed, width):
        c = qidx.shape[0]
        if levels == "seeds":
            qidx = np.broadcast_to(np.arange(n), qidx.shape)
        shared = _draw_seeds(seed_rng, c, sides[0].n_seeds, draw) if paired else None
        for k, runs in enumerate(sides):
            sidx = shared if paired else _draw_seeds(seed_rng, c, runs.n_seeds, draw)
            out[k].append(_gathered(runs, metric, sidx, qidx, n_bins))
    return [np.concatenate(o) for o in out]


def interval(
    point: float, reps: np.ndarray, method: str = "percentile", alpha: float = 0.05
) -> tuple[float, float, float]:
    """(lo, hi, p) of a bootstrap: the ``1 - alpha`` interval and the two-sided p-value of 0.

    ``percentile``: the alpha/2 and 1 - alpha/2 quantiles of the replicates. ``basic``: the
    same quantiles of the replicates reflected about the estimate, ``2 point - reps``, which
    removes the bias the replicates show (they sit ``mean(reps) - point`` above the estimate;
    so, to first order, does the estimate above the truth). The p-value inverts the interval:
    ``min(1, 2 (1 + #beyond 0) / (1 + R))`` with #beyond 0 the count of (reflected)
    replicates on the smaller side of 0.
    """
    if method not in ("percentile", "basic"):
        raise FirstError(f"interval method must be 'percentile' or 'basic', got {method!r}")
    dist = reps if method == "percentile" else 2.0 * point - reps
    lo, hi = np.percentile(dist, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    beyond = min(np.sum(dist <= 0.0), np.sum(dist >= 0.0))
    p = min(1.0, 2.0 * (1 + beyond) / (1 + dist.shape[0]))
    return float(lo), float(hi), float(p)


def _paired_seeds(a: Runs, b: Runs, pair_seeds: str) -> bool:
    if pair_seeds not in ("auto", "paired", "independent"):
        raise FirstError(f"pair_seeds must be auto, paired or independent, got {pair_seeds!r}")
    same = a.seeds == b.seeds and a.n_seeds > 1
    if pair_seeds == "paired" and a.n_seeds != b.n_seeds:
        raise FirstError(f"cannot pair {a.n_seeds} seeds with {b.n_seeds}")
    return pair_seeds == "paired" or (pair_seeds == "auto" and same)
