"""Position-wise calibration of the top-k tokens (the paper's Figure 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from first_lib.errors import FirstError
from first_lib.metrics.inputs import to_numpy


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
