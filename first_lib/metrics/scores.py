"""Accuracy, Trust (eq. 2) and the proper scores of the candidates: Brier and NLL."""

from __future__ import annotations

from typing import Any

import numpy as np

from first_lib.errors import FirstError
from first_lib.metrics.inputs import _confidence, _correct, check_probs, to_numpy


def accuracy(correct: Any) -> float:
    """Fraction of correct predictions."""
    return float(to_numpy(correct, "correct").mean())


def trust_score(acc: float, ece: float) -> float:
    """Trust score, eq. 2: ``Acc - ECE`` (both fractions, or both percentages)."""
    acc, ece = float(acc), float(ece)
    if not (np.isfinite(acc) and np.isfinite(ece)):
        raise FirstError(f"trust_score needs finite numbers, got acc={acc}, ece={ece}")
    return acc - ece


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


def brier_per_question(probs: Any, gold: Any) -> np.ndarray:
    """Each question's multi-class Brier score ``sum_c (p[n, c] - 1[c == gold[n]])^2``: [N].

    Per-question scores are what a paired comparison resamples (`first_lib.stats`).
    """
    p, g = _probs_gold(probs, gold)
    return np.square(p).sum(axis=1) - 2.0 * p[np.arange(p.shape[0]), g] + 1.0


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
    return float(np.mean(brier_per_question(probs, gold)))


def brier_binary(confidence: Any, correct: Any) -> float:
    """Brier score of the top-1 confidence: ``mean (confidence - correct)^2``, in [0, 1]."""
    conf = _confidence(confidence)
    corr = _correct(correct, conf.shape[0])
    return float(np.mean(np.square(conf - corr)))


def nll_per_question(probs: Any, gold: Any, eps: float = 1e-12) -> np.ndarray:
    """Each question's ``-log max(p[n, gold[n]], eps)``: [N] (see `nll`)."""
    p, g = _probs_gold(probs, gold)
    return -np.log(np.maximum(p[np.arange(p.shape[0]), g], eps))


def nll(probs: Any, gold: Any, eps: float = 1e-12) -> float:
    """Negative log-likelihood of the gold candidate: ``-mean_n log max(p[n, gold[n]], eps)``.

    The probabilities are used as given; ``eps`` keeps a zero probability finite
    (-log 1e-12 = 27.6).
    """
    return float(np.mean(nll_per_question(probs, gold, eps)))
