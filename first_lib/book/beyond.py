"""Beyond the paper: how much validation data the temperature needs, and which temperature.

Everything here re-reads what a run already made (the teacher's stored validation top-k, the
evaluation records); nothing is trained or evaluated.

- `candidate_table` / `transformed`: a model's answer probabilities in rank order and the
  confidence and correctness after a re-calibration (eq. 4 ``ts``, ``power`` ``p^(1/T)``, or
  eq. 3 ``ls``), applied to the candidates as `chapters/ls_vs_ts.md` applies eq. 4 to the
  teacher's test answers (the store holds no top-k for test questions).
- `subset_choices`: the coefficient `calibration.search_coefficient` picks on each of many
  random validation subsets of one size (drawn without replacement).
- `expected_gap`: the paired test-ECE cost of choosing on a small subset rather than on all
  validation data, averaged over the subsets, with a bootstrap interval over test questions
  and training seeds (the crossed scheme of `first_lib.stats`).
- `fit_nll_topk`, `recalibrated_records`: the logit temperature of `first_lib.posthoc` fitted
  on the stored top-k, and records re-calibrated by any of the transforms (for `stats.compare`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from first_lib import calibration, metrics, posthoc, stats
from first_lib.errors import FirstError

KINDS = ("none", "ts", "power", "ls")


def candidate_table(records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, C] of each question's candidates sorted high to low, gold rank [N]) of
    evaluation records; every question must have the same number of candidates C (padding a
    row would give eq. 4 mass to candidates that do not exist)."""
    if not records:
        raise FirstError("no evaluation records")
    widths = {len(r["probs"]) for r in records}
    if len(widths) != 1:
        raise FirstError(f"questions have different numbers of candidates: {sorted(widths)}")
    probs = np.array([r["probs"] for r in records], dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    gold = np.array([r["gold"] for r in records], dtype=np.int64)
    rank = np.argmax(order == gold[:, None], axis=1)
    return np.take_along_axis(probs, order, axis=1), rank


def transformed(
    probs: np.ndarray, gold_rank: np.ndarray, kind: str, coef: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(confidence [N], correct [N] as 0/1) after re-calibrating rank-ordered ``probs`` with
    ``kind`` at ``coef``: the largest transformed probability, right when it is the gold
    rank's (eq. 3 can move another candidate to the top; the temperatures never do)."""
    if kind not in KINDS:
        raise FirstError(f"unknown re-calibration {kind!r}; use one of {', '.join(KINDS)}")
    q = np.asarray(calibration.apply_transform(np.asarray(probs, np.float64), kind, coef))
    return q.max(axis=1), (q.argmax(axis=1) == np.asarray(gold_rank)).astype(np.float64)


def recalibrated_records(
    records: Sequence[Mapping[str, Any]], kind: str, coef: float | None = None
) -> list[dict]:
    """Records as if the model's candidate probabilities had been re-calibrated with ``kind``
    at ``coef`` (each question's candidates in rank order, transformed, put back): ``probs``,
    ``pred``, ``confidence`` and ``correct`` change, the rest is kept. With ``power`` this is
    `posthoc.apply_temperature` at the same temperature (``p^(1/T)`` renormalised over the
    candidates is ``softmax(log p / T)``)."""
    if kind not in KINDS:
        raise FirstError(f"unknown re-calibration {kind!r}; use one of {', '.join(KINDS)}")
    out = []
    for r in records:
        p = np.asarray(r["probs"], dtype=np.float64)
        order = np.argsort(-p, kind="stable")
        q = np.empty_like(p)
        q[order] = np.asarray(calibration.apply_transform(p[order][None, :], kind, coef))[0]
        pred = int(np.argmax(q))
        out.append(
            {
                **r,
                "probs": [float(x) for x in q],
                "pred": pred,
                "confidence": float(q[pred]),
                "correct": pred == int(r["gold"]),
            }
        )
    return out


def subset_choices(
    probs: np.ndarray,
    ranks: np.ndarray,
    size: int,
    n_subsets: int = 200,
    seed: Any = 0,
    kind: str = "ts",
) -> np.ndarray:
    """The coefficient `calibration.search_coefficient` chooses on each of ``n_subsets`` random
    subsets of ``size`` validation positions (without replacement, from
    ``numpy.random.default_rng(seed)``); one choice, on all positions, when ``size`` is at least
    their number."""
    n = len(ranks)
    if size < 2:
        raise FirstError(f"a validation subset needs at least 2 positions, got {size}")
    if n_subsets < 1:
        raise FirstError(f"need at least one subset, got {n_subsets}")
    if size >= n:
        return np.array([calibration.search_coefficient(probs, ranks, kind=kind).best])
    rng = np.random.default_rng(seed)
    picks = [rng.choice(n, size=size, replace=False) for _ in range(n_subsets)]
    return np.array(
        [calibration.search_coefficient(probs[i], ranks[i], kind=kind).best for i in picks]
    )


def _seed_draws(rng: np.random.Generator, reps: int, s: int) -> np.ndarray:
    if s == 1:
        return np.zeros((reps, 1), dtype=np.int64)
    return rng.integers(0, s, size=(reps, s))


def expected_gap(
    tests: Mapping[Any, tuple[np.ndarray, np.ndarray]],
    choices: Mapping[Any, Sequence[float]],
    reference: Mapping[Any, float],
    kind: str = "ts",
    n_boot: int = 1000,
    seed: int = 0,
    n_bins: int = 10,
    alpha: float = 0.05,
) -> stats.Estimate:
    """Test ECE at a coefficient chosen on a validation subset minus test ECE at the reference
    coefficient (chosen on all validation data), averaged over the subsets' choices and the
    training seeds: a paired `stats.Estimate` (fractions; positive: the small subset costs).

    ``tests``: {training seed: (rank-ordered test probs [N, C], gold rank [N])}, the same test
    questions in the same order for every seed; ``choices``: {seed: the subsets' coefficients};
    ``reference``: {seed: coefficient}. A replicate draws N test questions with replacement
    (the same for every seed and both coefficients) and, with several seeds, the seeds with
    replacement (the crossed bootstrap of `first_lib.stats`); the subsets' choices stay fixed
    (their spread is a separate quantity). The interval is the bias-corrected (basic) one.
    """
    metrics._check_boot(n_boot, alpha)
    seeds = list(tests)
    if not seeds or set(seeds) != set(choices) or set(seeds) != set(reference):
        raise FirstError("tests, choices and reference must name the same training seeds")
    n = {len(tests[s][1]) for s in seeds}
    if len(n) != 1:
        raise FirstError(f"the seeds' test sets differ in size: {sorted(n)}")
    (n,) = n
    # per seed: the distinct coefficients, their weights, and the reference
    tables = {}
    for s in seeds:
        values, counts = np.unique(np.asarray(choices[s], dtype=np.float64), return_counts=True)
        if values.size == 0:
            raise FirstError(f"no choices for seed {s}")
        p, g = tests[s]
        cols = [transformed(p, g, kind, float(v)) for v in values]
        tables[s] = (counts / counts.sum(), cols, transformed(p, g, kind, float(reference[s])))

    def gap(s: Any, qidx: np.ndarray) -> np.ndarray:
        w, cols, (rc, rk) = tables[s]
        total = -metrics.ece_rows(rc[qidx], rk[qidx], n_bins)
        for wi, (c, k) in zip(w, cols, strict=True):
            total += wi * metrics.ece_rows(c[qidx], k[qidx], n_bins)
        return total

    every = np.arange(n)[None, :]
    point = float(np.mean([gap(s, every)[0] for s in seeds]))
    seed_rng = np.random.default_rng([seed, 1])
    reps = []
    for qidx in metrics.resample_indices(n, n_boot, seed, len(seeds)):
        per_seed = np.stack([gap(s, qidx) for s in seeds], axis=1)  # [c, S]
        sidx = _seed_draws(seed_rng, qidx.shape[0], len(seeds))
        reps.append(np.take_along_axis(per_seed, sidx, axis=1).mean(axis=1))
    reps = np.concatenate(reps)
    seeds_scheme = "paired" if len(seeds) > 1 else "single"
    return stats.from_replicates(
        point, reps, "ece", "basic", alpha, 0.8, seeds_scheme, n, (len(seeds), len(seeds))
    )


def size_summary(values: Sequence[float], low: float = 5.0, high: float = 95.0) -> dict:
    """{"median", "lo", "hi" (the ``low``-``high`` percentile range), "n"} of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise FirstError("no values to summarise")
    lo, med, hi = np.percentile(v, [low, 50.0, high])
    return {"median": float(med), "lo": float(lo), "hi": float(hi), "n": int(v.size)}


def _mean_nll(z: np.ndarray, gold: np.ndarray, temperature: float) -> float:
    """`posthoc.nll` vectorised: mean NLL of ``gold`` under ``softmax(z / T)``, z [N, k]."""
    s = z / temperature
    m = s.max(axis=1)
    lse = m + np.log(np.exp(s - m[:, None]).sum(axis=1))
    return float(np.mean(lse - s[np.arange(len(gold)), gold]))


def fit_nll_topk(probs: np.ndarray, ranks: np.ndarray) -> tuple[float, int]:
    """(T, positions used): the logit temperature of `posthoc.fit_temperature` (its grid and its
    refinement, vectorised here) that minimises the NLL of the true token after
    ``softmax(log p / T)`` over the k given probabilities, on the positions whose true token is
    among them (the NLL is undefined for the rest). For evaluation records' candidates it is
    the temperature the pipeline's post-hoc stage fits."""
    keep = np.asarray(ranks) >= 0
    if not keep.any():
        raise FirstError("no stored position has its true token among the top-k")
    z = np.log(np.clip(np.asarray(probs, dtype=np.float64)[keep], 1e-300, None))
    gold = np.asarray(ranks)[keep].astype(np.int64)
    grid = posthoc.LOG_T_GRID
    i = int(np.argmin([_mean_nll(z, gold, float(np.exp(t))) for t in grid]))
    fine = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)], 41)
    j = int(np.argmin([_mean_nll(z, gold, float(np.exp(t))) for t in fine]))
    return float(np.exp(fine[j])), int(keep.sum())


def posthoc_meta(records_path: str | Path) -> dict:
    """The meta.json of a post-hoc variant's artefact (its fitted ``temperature``), from the
    path of its test records."""
    from first_lib.pipeline import read_meta

    return read_meta(Path(records_path).parent)


def posthoc_validation_records(records_path: str | Path) -> list[dict]:
    """The validation records a post-hoc variant's temperature was fitted on, from the path of
    its test records (the key of its artefact names the validation evaluation)."""
    from first_lib.artefacts import artefact_dir
    from first_lib.book.runs import load_records

    key = posthoc_meta(records_path).get("key", {}).get("validation")
    if key is None:
        raise FirstError(f"{records_path}: not the records of a post-hoc variant")
    return load_records(artefact_dir("evaluate", key) / "records.jsonl")


def gap_sentence(est: Any, what: str) -> str:
    """A sentence on a paired test-ECE gap (`expected_gap`) from its interval alone: above 0
    (``what`` costs calibration), below 0, or containing 0 (then with the smallest gap the design
    would have detected, its MDE). Percentage points."""
    from first_lib.book.differences import diff_text

    ci = f"{diff_text(est)} points"
    if est.lo > 0:
        return f"{what} costs test ECE: the 95% interval of the gap, {ci}, lies above 0."
    if est.hi < 0:
        return f"{what} gives a lower test ECE: the 95% interval of the gap, {ci}, lies below 0."
    return (
        f"For {what[0].lower() + what[1:]}, the 95% interval of the gap, {ci}, contains 0: a gap "
        f"of {100 * est.mde:.1f} points (the MDE) would have shown here, a smaller one need not."
    )
