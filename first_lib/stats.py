"""Inference over questions and training seeds: paired differences, bias-aware intervals,
power, multiplicity and verdicts.

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
- **Power.** ``mde = (z(1 - alpha/2) + z(power)) * se``, with se the bootstrap standard error of
  the difference (questions and seeds together): the smallest true difference this design
  would declare at level alpha with that probability (normal approximation). `variance_split`
  says how much of se comes from questions and how much from seeds, and `planned_mde` what
  more of either would buy.
- **Multiplicity.** `holm` adjusts the p-values of the primary claims (Holm 1979); secondary
  claims are reported unadjusted and say so.
- **Verdicts.** `decide` returns one of `VERDICTS`; `BOOK_VERDICT` maps them onto the three
  words of `first_lib.book.verdict`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

import numpy as np

from first_lib import metrics
from first_lib.errors import FirstError

__all__ = [
    "METRICS",
    "BIASED_METRICS",
    "ECE_INTERVAL",
    "SEED_SCHEME",
    "P_VALUE",
    "REPRODUCED",
    "CONTRADICTED",
    "RULES_OUT",
    "TOO_NOISY",
    "NOT_TESTABLE",
    "VERDICTS",
    "BOOK_VERDICT",
    "Runs",
    "Estimate",
    "Claim",
    "runs_of",
    "per_question",
    "metric_rows",
    "estimate",
    "compare",
    "interval",
    "mde",
    "variance_split",
    "planned_mde",
    "holm",
    "decide",
    "decide_all",
    "learned",
]

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

# --------------------------------------------------------------------------- records -> tables

_COLUMNS = ("confidence", "correct", "brier", "nll")


def per_question(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per-question columns of one run's records (`first_lib.evaluate._record`), each [N]:
    ``confidence``, ``correct`` (0/1), ``brier`` and ``nll`` (from the candidate ``probs``,
    padded with zeros where questions have fewer candidates, which changes neither)."""
    if not records:
        raise FirstError("no evaluation records")
    width = max(len(r["probs"]) for r in records)
    probs = np.zeros((len(records), width))
    for i, r in enumerate(records):
        probs[i, : len(r["probs"])] = r["probs"]
    gold = np.array([r["gold"] for r in records], dtype=np.int64)
    return {
        "confidence": np.array([r["confidence"] for r in records], dtype=np.float64),
        "correct": np.array([bool(r["correct"]) for r in records], dtype=np.float64),
        "brier": metrics.brier_per_question(probs, gold),
        "nll": metrics.nll_per_question(probs, gold),
    }


@dataclass(frozen=True)
class Runs:
    """One variant's runs as a seeds x questions table.

    Attributes: ``seeds`` the seed labels (S); ``ids`` the question ids (N, sorted);
    ``columns`` {name: [S, N]} as in `per_question`.
    """

    seeds: tuple
    ids: tuple[str, ...]
    columns: dict[str, np.ndarray]

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @classmethod
    def of_arrays(cls, confidence: Any, correct: Any, **columns: Any) -> Runs:
        """A table from arrays [S, N] (or [N] for one seed): confidence, correct and any other
        per-question columns (``brier``, ``nll``); questions are named 0..N-1."""
        cols = {"confidence": confidence, "correct": correct, **columns}
        cols = {k: np.atleast_2d(np.asarray(v, dtype=np.float64)) for k, v in cols.items()}
        s, n = cols["confidence"].shape
        if any(v.shape != (s, n) for v in cols.values()):
            raise FirstError(
                f"columns must share one shape, got {[v.shape for v in cols.values()]}"
            )
        return cls(tuple(range(s)), tuple(str(i) for i in range(n)), cols)


def _by_seed(variant: Any) -> dict[Any, Sequence[Mapping]]:
    """{seed: records} from one run's records, a list of runs (seeds 0..S-1) or a mapping."""
    if isinstance(variant, Runs):
        raise FirstError("already a Runs table")
    if isinstance(variant, Mapping):
        return dict(variant)
    variant = list(variant)
    if variant and isinstance(variant[0], Mapping):  # one run: a list of records
        return {0: variant}
    return dict(enumerate(variant))


def runs_of(variant: Any) -> Runs:
    """A `Runs` table from one run's records, a list of runs (one per seed), a mapping
    {seed: records}, or a `Runs` (returned as is). Every run must cover the same questions."""
    if isinstance(variant, Runs):
        return variant
    by_seed = _by_seed(variant)
    if not by_seed:
        raise FirstError("a variant needs at least one run")
    ids = None
    cols: dict[str, list[np.ndarray]] = {c: [] for c in _COLUMNS}
    for seed, records in by_seed.items():
        by_id = {str(r["id"]): r for r in records}
        if ids is None:
            ids = tuple(sorted(by_id))
        elif set(by_id) != set(ids):
            raise FirstError(f"seed {seed!r} was evaluated on other questions than the first seed")
        for name, col in per_question([by_id[i] for i in ids]).items():
            cols[name].append(col)
    return Runs(tuple(by_seed), ids, {c: np.stack(v) for c, v in cols.items()})


# --------------------------------------------------------------------------- metrics of rows


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


# --------------------------------------------------------------------------- the bootstrap


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


_NORMAL = NormalDist()


def mde(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect: the smallest true difference a two-sided test at level
    ``alpha`` detects with probability ``power``, given the standard error ``se`` of the
    estimated difference (normal approximation, the far tail ignored):
    ``(z(1 - alpha/2) + z(power)) * se`` -- 2.80 se at alpha 0.05 and 80% power.

    Beside an inconclusive difference it says what the design could have seen: a paper's
    effect below the mde was never testable here, one well above it would have shown.
    """
    if not (0 < alpha < 1 and 0 < power < 1) or se < 0:
        raise FirstError(f"need 0 < alpha, power < 1 and se >= 0, got {alpha}, {power}, {se}")
    return (_NORMAL.inv_cdf(1 - alpha / 2) + _NORMAL.inv_cdf(power)) * float(se)


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
        n_questions=len(sides[0].ids),
        n_seeds=tuple(r.n_seeds for r in sides),
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


def _paired_seeds(a: Runs, b: Runs, pair_seeds: str) -> bool:
    if pair_seeds not in ("auto", "paired", "independent"):
        raise FirstError(f"pair_seeds must be auto, paired or independent, got {pair_seeds!r}")
    same = a.seeds == b.seeds and a.n_seeds > 1
    if pair_seeds == "paired" and a.n_seeds != b.n_seeds:
        raise FirstError(f"cannot pair {a.n_seeds} seeds with {b.n_seeds}")
    return pair_seeds == "paired" or (pair_seeds == "auto" and same)


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


def variance_split(
    a: Any,
    b: Any,
    metric: str,
    n_boot: int = 500,
    seed: int = 0,
    pair_seeds: str = "auto",
    n_bins: int = 10,
) -> dict[str, Any]:
    """Where the uncertainty of ``metric(a) - metric(b)`` comes from: the bootstrap variance
    with only the questions resampled (all seeds kept) and with only the seeds resampled (all
    questions kept). Their sum is about the variance `compare` reports; each shrinks in
    proportion to its own sample size, which is what `planned_mde` uses to say whether more
    seeds or more questions buy the larger gain. With one seed per side the seed part is 0
    (unknown, not absent: one run cannot show how runs differ).

    Returns {"questions": var, "seeds": var, "n_questions": N, "n_seeds": S} (S the larger
    side's count).
    """
    metrics._check_boot(n_boot, 0.05)
    ra, rb = runs_of(a), runs_of(b)
    if ra.ids != rb.ids:
        raise FirstError("the two variants were not evaluated on the same questions")
    paired = _paired_seeds(ra, rb, pair_seeds)
    out: dict[str, Any] = {"n_questions": len(ra.ids), "n_seeds": max(ra.n_seeds, rb.n_seeds)}
    for level in ("questions", "seeds"):
        rep_a, rep_b = _replicates([ra, rb], metric, n_boot, seed, paired, n_bins, level)
        out[level] = float(np.var(rep_a - rep_b, ddof=1)) if n_boot > 1 else 0.0
    return out


def planned_mde(
    split: Mapping[str, Any],
    n_questions: int | None = None,
    n_seeds: int | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """The `mde` of a design with ``n_questions`` and ``n_seeds`` (default: the measured
    ones), from a `variance_split`: ``se^2 = var_q N / N' + var_s S / S'``."""
    nq = n_questions or split["n_questions"]
    ns = n_seeds or split["n_seeds"]
    if nq < 1 or ns < 1:
        raise FirstError(f"a design needs questions and seeds, got {nq}, {ns}")
    var = split["questions"] * split["n_questions"] / nq + split["seeds"] * split["n_seeds"] / ns
    return mde(float(np.sqrt(var)), alpha, power)


# --------------------------------------------------------------------------- multiplicity


def holm(pvalues: Mapping[str, float] | Sequence[float]) -> Any:
    """Holm's step-down adjusted p-values (Holm 1979), in the input's shape (dict or list).

    Sort the m p-values; the i-th smallest (i = 1..m) is multiplied by ``m - i + 1`` and the
    running maximum taken, capped at 1. Rejecting where the adjusted p <= alpha keeps the
    chance of *any* false claim in the family below alpha, whatever their dependence, and
    rejects at least as much as Bonferroni (which multiplies all by m).
    """
    keys = list(pvalues) if isinstance(pvalues, Mapping) else None
    p = np.array([pvalues[k] for k in keys] if keys is not None else list(pvalues), dtype=float)
    if p.size and (np.isnan(p).any() or p.min() < 0 or p.max() > 1):
        raise FirstError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adj_sorted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    adj = np.empty(m)
    adj[order] = adj_sorted
    return dict(zip(keys, adj.tolist(), strict=True)) if keys is not None else adj.tolist()


# --------------------------------------------------------------------------- verdicts

REPRODUCED, CONTRADICTED = "reproduced", "contradicted"
RULES_OUT = "rules out the paper's effect size"
TOO_NOISY = "too noisy to tell"
NOT_TESTABLE = "not testable here"
VERDICTS = (REPRODUCED, CONTRADICTED, RULES_OUT, TOO_NOISY, NOT_TESTABLE)
# The same verdicts in the three words of `first_lib.book.verdict` / `combine_verdicts`.
BOOK_VERDICT = {
    REPRODUCED: "reproduced",
    CONTRADICTED: "contradicted",
    RULES_OUT: "inconclusive",
    TOO_NOISY: "inconclusive",
    NOT_TESTABLE: "inconclusive",
}


@dataclass(frozen=True)
class Claim:
    """A claim of the paper about a difference (oriented as the `Estimate` it is tested on).

    Attributes: ``direction`` 'above' (the paper says the difference is positive) or 'below';
    ``effect`` the paper's difference in the same orientation and units (fractions), or None;
    ``primary`` whether the claim is in the family Holm corrects.
    """

    direction: str
    effect: float | None = None
    primary: bool = False

    def __post_init__(self) -> None:
        if self.direction not in ("above", "below"):
            raise FirstError(f"direction must be 'above' or 'below', got {self.direction!r}")
        if self.effect is not None and (self.effect > 0) != (self.direction == "above"):
            raise FirstError(
                f"the paper's effect {self.effect} is not on the {self.direction} side"
            )


def decide(est: Any, claim: Claim, p: float | None = None, testable: bool = True) -> str:
    """The verdict on ``claim`` from a difference with its interval (`Estimate`, or anything
    with ``lo`` and ``hi``).

    - "not testable here" when a precondition failed (``testable`` False, e.g. a model that
      did not learn: see `learned`);
    - "reproduced" / "contradicted" when the interval excludes 0 on the claimed / the other
      side (and, for a primary claim, its Holm-adjusted ``p`` is <= alpha);
    - otherwise "rules out the paper's effect size" when the interval excludes the paper's
      effect (the data are precise enough to say the effect, if any, is smaller), else
      "too noisy to tell" (compare the paper's effect with the estimate's ``mde``).
    """
    if not testable:
        return NOT_TESTABLE
    if not est.lo <= est.hi:
        raise FirstError(f"an interval needs lo <= hi, got [{est.lo}, {est.hi}]")
    alpha = getattr(est, "alpha", 0.05)
    significant = (est.lo > 0 or est.hi < 0) and (p is None or p <= alpha)
    if significant:
        return REPRODUCED if (est.lo > 0) == (claim.direction == "above") else CONTRADICTED
    if claim.effect is not None and not est.lo <= claim.effect <= est.hi:
        return RULES_OUT
    return TOO_NOISY


def decide_all(
    items: Mapping[str, tuple[Claim, Any]], testable: Mapping[str, bool] | None = None
) -> dict[str, dict[str, Any]]:
    """Verdicts for a set of named claims {name: (claim, estimate)}.

    The primary claims that are testable form one family: their p-values (``estimate.p``) are
    Holm-adjusted together; secondary claims keep their own p. Returns {name: {"verdict",
    "p", "p_holm" (None for secondary), "primary"}}.
    """
    testable = testable or {}
    family = {
        k: est.p for k, (claim, est) in items.items() if claim.primary and testable.get(k, True)
    }
    adjusted = holm(family) if family else {}
    out = {}
    for name, (claim, est) in items.items():
        p_holm = adjusted.get(name)
        out[name] = {
            "verdict": decide(est, claim, p_holm, testable.get(name, True)),
            "p": est.p,
            "p_holm": p_holm,
            "primary": claim.primary,
        }
    return out


def learned(
    tuned: Any, untuned: Any, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[bool, Estimate]:
    """Did training work? Accuracy(tuned) - accuracy(untuned) on the same questions, paired
    (over the tuned model's seeds too); True when the interval lies above 0.

    Claims about a model that did not learn (tuned no better than untuned) are "not testable
    here": its calibration after tuning says nothing about what tuning does.
    """
    est = compare(tuned, untuned, "acc", n_boot=n_boot, seed=seed, alpha=alpha)
    return est.lo > 0.0, est
