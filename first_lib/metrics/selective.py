"""Selective prediction: the risk-coverage curve and the area under it (AURC)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from first_lib.metrics.inputs import _confidence, _correct


@dataclass(frozen=True)
class RiskCoverage:
    """Selective prediction: answer only the k most confident questions, abstain on the rest.

    Attributes: ``coverage`` [N] = k/N for k = 1..N; ``risk`` [N] the error rate among the k
    answered. A model whose confidence ranks its errors last has a low curve; the area under
    it (`aurc`) is the mean risk over all coverages.
    """

    coverage: np.ndarray
    risk: np.ndarray

    @property
    def aurc(self) -> float:
        """Area under the risk-coverage curve (the mean of ``risk``)."""
        return float(self.risk.mean())


def selective_risk_rows(conf: np.ndarray, corr: np.ndarray) -> np.ndarray:
    """Risk at every coverage k = 1..N of every row: [R, N] -> [R, N]. No validation.

    Ties are averaged: within a group of equal confidences the order is arbitrary, so the
    errors answered at coverage k are those of the groups before plus the group's error rate
    times how many of it are answered (the expectation over random tie-breaking). A model
    that gives every question the same confidence thus scores its error rate at every k.
    """
    order = np.argsort(-conf, axis=1, kind="stable")
    c = np.take_along_axis(conf, order, 1)
    err = 1.0 - np.take_along_axis(corr, order, 1)
    r, n = c.shape
    pos = np.broadcast_to(np.arange(n), (r, n))
    first = np.ones((r, n), dtype=bool)  # position opens a group of equal confidences
    first[:, 1:] = c[:, 1:] != c[:, :-1]
    last = np.ones((r, n), dtype=bool)
    last[:, :-1] = first[:, 1:]
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
    cum = np.concatenate([np.zeros((r, 1)), np.cumsum(err, axis=1)], axis=1)  # errors in first k
    before = np.take_along_axis(cum, start, 1)
    group = np.take_along_axis(cum, end + 1, 1) - before
    answered = before + (pos - start + 1) * group / (end - start + 1)
    return answered / (pos + 1)


def risk_coverage(confidence: Any, correct: Any) -> RiskCoverage:
    """The risk-coverage curve (Geifman & El-Yaniv 2017, "Selective classification for deep
    neural networks"): the error rate among the k most confident predictions, k = 1..N.

    Calibration asks whether 80% confidence means 80% right; selective prediction asks only
    whether the confidence *ranks* the right answers above the wrong ones. A model can be
    calibrated and rank badly (every question at its accuracy) or rank well and be
    over-confident: the two views complement each other.
    """
    conf = _confidence(confidence)
    corr = _correct(correct, conf.shape[0])
    n = conf.shape[0]
    return RiskCoverage(np.arange(1, n + 1) / n, selective_risk_rows(conf[None], corr[None])[0])


def aurc(confidence: Any, correct: Any) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019, "Bias-reduced uncertainty
    estimation for deep neural classifiers"), lower is better; ties averaged.

    Uninformative confidence scores the error rate e; a perfect ranking (every error least
    confident) scores about ``e + (1 - e) ln(1 - e)`` (tends to it for large N).
    """
    return risk_coverage(confidence, correct).aurc


def aurc_rows(conf: np.ndarray, corr: np.ndarray) -> np.ndarray:
    """`aurc` of every row: [R, N] -> [R]. No validation."""
    return selective_risk_rows(conf, corr).mean(axis=1)
