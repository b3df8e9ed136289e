"""Bootstrap differences between variants and the verdict words (the helpers before stats)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from first_lib import metrics
from first_lib.book.labels import signed
from first_lib.book.records import conf_correct
from first_lib.errors import FirstError


def _aligned(a: Sequence[Mapping], b: Sequence[Mapping]) -> tuple[np.ndarray, ...]:
    ia = {str(r["id"]): r for r in a}
    ib = {str(r["id"]): r for r in b}
    if set(ia) != set(ib):
        raise FirstError("the two record sets are not on the same questions")
    ids = sorted(ia)
    ca, ka = conf_correct([ia[i] for i in ids])
    cb, kb = conf_correct([ib[i] for i in ids])
    return ca, ka.astype(np.float64), cb, kb.astype(np.float64)


def metric_value(metric: str, conf: np.ndarray, correct: np.ndarray) -> float:
    """'ece', 'acc' or 'trust' (= acc - ece) of confidences and correctness, as fractions."""
    if metric == "ece":
        return metrics.ece(conf, correct)
    if metric == "acc":
        return metrics.accuracy(correct)
    if metric == "trust":
        return metrics.trust_score(metrics.accuracy(correct), metrics.ece(conf, correct))
    raise FirstError(f"unknown metric {metric!r}; use ece, acc or trust")


@dataclass(frozen=True)
class Difference:
    """A paired difference ``metric(a) - metric(b)`` with its 95% bootstrap interval."""

    point: float
    lo: float
    hi: float


def _sorted_candidates(records: Any) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, C] sorted high to low, hit [N, C]: the rank-i candidate is gold), C = fewest
    candidates of any question. Records of several training seeds ({seed: records}, the same
    questions) give each question's mean over seeds: the rank-i probability and the fraction
    of seeds whose rank-i candidate is gold (exact for any mean over questions)."""
    if isinstance(records, Mapping):
        runs = [sorted(r, key=lambda x: str(x["id"])) for r in records.values()]
        if len({tuple(str(x["id"]) for x in r) for r in runs}) != 1:
            raise FirstError("the seeds were evaluated on different questions")
        width = min(len(x["probs"]) for r in runs for x in r)
        pairs = [_sorted_candidates([{**x, "probs": x["probs"][:width]} for x in r]) for r in runs]
        return np.mean([p for p, _ in pairs], axis=0), np.mean([h for _, h in pairs], axis=0)
    width = min(len(r["probs"]) for r in records)
    probs = np.array([r["probs"][:width] for r in records], dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    gold = np.array([r["gold"] for r in records])
    return np.take_along_axis(probs, order, axis=1), (order == gold[:, None]).astype(np.float64)


def rank_gaps(records: Any, n_boot: int = 1000, seed: int = 0) -> dict[str, Difference]:
    """Accuracy minus mean probability at rank 1 ("top1") and averaged over ranks 2..C
    ("rest") of the answer candidates, with bootstrap intervals over questions (records of one
    run, or {seed: records}: each question's mean over the seeds, see `_sorted_candidates`).

    Negative top1: over-confident on the chosen answer; positive rest: under-confident on the
    others (the paper's "tuning-induced mis-calibration", sec. 3.2).
    """
    probs, hit = _sorted_candidates(records)

    def top1(p, h) -> float:
        return float(h[:, 0].mean() - p[:, 0].mean())

    def rest(p, h) -> float:
        return float((h[:, 1:].mean(0) - p[:, 1:].mean(0)).mean())

    out = {}
    for name, fn in (("top1", top1), ("rest", rest)):
        lo, hi = metrics.bootstrap_ci(fn, probs, hit, n_boot=n_boot, seed=seed)
        out[name] = Difference(fn(probs, hit), lo, hi)
    return out


def paired_difference(
    a: Sequence[Mapping],
    b: Sequence[Mapping],
    metric: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> Difference:
    """metric(a) - metric(b) over the same questions, with a paired percentile bootstrap.

    Questions are resampled jointly for a and b, so the interval reflects the variation of the
    difference itself (narrower than comparing two separate intervals).
    """
    ca, ka, cb, kb = _aligned(a, b)

    def diff(c1, k1, c2, k2) -> float:
        return metric_value(metric, c1, k1) - metric_value(metric, c2, k2)

    lo, hi = metrics.bootstrap_ci(diff, ca, ka, cb, kb, n_boot=n_boot, seed=seed)
    return Difference(diff(ca, ka, cb, kb), lo, hi)


def bootstrap_mean(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> Difference:
    """Mean of values with a 95% percentile bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)
    lo, hi = metrics.bootstrap_ci(lambda v: float(np.mean(v)), x, n_boot=n_boot, seed=seed)
    return Difference(float(x.mean()), lo, hi)


def unpaired_difference(
    a: Sequence[Mapping],
    b: Sequence[Mapping],
    metric: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> Difference:
    """metric(a) - metric(b) for records of different questions (or different test sets): each
    side is resampled on its own, and the interval is the percentile interval of the
    differences."""
    ca, ka = conf_correct(a)
    cb, kb = conf_correct(b)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_boot)
    for i in range(n_boot):
        ia = rng.integers(0, len(ca), len(ca))
        ib = rng.integers(0, len(cb), len(cb))
        diffs[i] = metric_value(metric, ca[ia], ka[ia]) - metric_value(metric, cb[ib], kb[ib])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    point = metric_value(metric, ca, ka) - metric_value(metric, cb, kb)
    return Difference(point, float(lo), float(hi))


REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"


def verdict(lo: float, hi: float, threshold: float = 0.0, claim: str = "above") -> str:
    """A plain verdict from an interval [lo, hi] and the side of `threshold` the paper claims.

    "reproduced" when the whole interval lies on the claimed side, "contradicted" when it lies
    wholly on the other side, "inconclusive" when it contains the threshold.
    """
    if not lo <= hi:
        raise FirstError(f"an interval needs lo <= hi, got [{lo}, {hi}]")
    if claim not in ("above", "below"):
        raise FirstError(f"claim must be 'above' or 'below', got {claim!r}")
    above, below = lo > threshold, hi < threshold
    if claim == "above":
        return REPRODUCED if above else CONTRADICTED if below else INCONCLUSIVE
    return REPRODUCED if below else CONTRADICTED if above else INCONCLUSIVE


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """All reproduced -> reproduced; any contradicted -> contradicted; else inconclusive."""
    if not verdicts:
        raise FirstError("no verdicts to combine")
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if any(v == CONTRADICTED for v in verdicts):
        return CONTRADICTED
    return INCONCLUSIVE


def first_to_finetune(records: Mapping[str, Sequence[Mapping]], n_boot: int = 1000, seed: int = 0):
    """The paper's "FIRST to Fine-tune" row: the gains of FIRST over Fine-tune, paired.

    Returns {metric: Difference} with gains oriented so that positive is better: the ECE gain
    is ECE(Fine-tune) - ECE(FIRST); the Acc and Trust gains are FIRST - Fine-tune.
    """
    first, ft = records["first_ts"], records["finetune"]
    return {
        "ece": paired_difference(ft, first, "ece", n_boot, seed),
        "acc": paired_difference(first, ft, "acc", n_boot, seed),
        "trust": paired_difference(first, ft, "trust", n_boot, seed),
    }


def first_vs_others(
    records: Mapping[str, Sequence[Mapping]],
    others: Sequence[str] = ("finetune", "distill", "distill_ls"),
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Difference]]:
    """FIRST's paired advantage over each other student: {other: {"ece": ECE(other) -
    ECE(FIRST), "acc": Acc(FIRST) - Acc(other), "trust": Trust(FIRST) - Trust(other)}}.
    Positive is better for FIRST throughout."""
    first = records["first_ts"]
    out = {}
    for v in others:
        out[v] = {
            "ece": paired_difference(records[v], first, "ece", n_boot, seed),
            "acc": paired_difference(first, records[v], "acc", n_boot, seed),
            "trust": paired_difference(first, records[v], "trust", n_boot, seed),
        }
    return out


def diff_text(d: Difference, digits: int = 1) -> str:
    """'+1.2 [-0.3, +2.8]' (percentage points)."""
    return f"{signed(d.point, digits)} [{signed(d.lo, digits)}, {signed(d.hi, digits)}]"
