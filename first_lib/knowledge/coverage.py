"""Coverage statistics: streaming accumulators of the cumulative top-j mass, merged over shards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

COVERAGE_MAX_J = 100  # cumulative top-j mass is recorded for j = 1..100 (Figure 2 of the paper)
RESERVOIR_ROWS = 512  # cumulative-mass rows sampled per shard for the coverage quantiles
QUANTILES = (0.05, 0.25, 0.50, 0.75, 0.95)


class _Coverage:
    """Streaming statistics of the cumulative top-j mass rows [n, J]: sum, sum of squares,
    min, max per j, and a seeded reservoir sample of rows for quantiles."""

    def __init__(self, width: int, seed: int, reservoir: int = RESERVOIR_ROWS):
        self.width = width
        self.count = 0
        self.sum = np.zeros(width, dtype=np.float64)
        self.sumsq = np.zeros(width, dtype=np.float64)
        self.min = np.full(width, np.inf)
        self.max = np.full(width, -np.inf)
        self.res = np.zeros((reservoir, width), dtype=np.float32)
        self.rng = np.random.default_rng(seed)

    def update(self, cum: np.ndarray) -> None:
        """cum: float32 [n, J] cumulative mass of each row, non-decreasing in j."""
        n = cum.shape[0]
        if n == 0:
            return
        c64 = cum.astype(np.float64)
        self.sum += c64.sum(0)
        self.sumsq += np.square(c64).sum(0)
        np.minimum(self.min, cum.min(0), out=self.min)
        np.maximum(self.max, cum.max(0), out=self.max)
        # Algorithm R, vectorised: row t (0-based, over the shard) replaces slot j ~ U{0..t}.
        r = self.res.shape[0]
        t = np.arange(self.count, self.count + n)
        fill = t < r
        self.res[t[fill]] = cum[fill]
        rest = np.flatnonzero(~fill)
        if rest.size:
            slots = self.rng.integers(0, t[rest] + 1)
            for row, slot in zip(rest[slots < r], slots[slots < r], strict=True):
                self.res[slot] = cum[row]  # in order: a later row wins a slot, as in Algorithm R
        self.count += n

    def state(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "sum": self.sum.tolist(),
            "sumsq": self.sumsq.tolist(),
            "min": self.min.tolist(),
            "max": self.max.tolist(),
        }

    def sample(self) -> np.ndarray:
        return self.res[: min(self.count, self.res.shape[0])]


def _weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> list:
    """Quantiles of weighted samples (values [n], weights [n]): midpoint-interpolated CDF."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    cdf = (np.cumsum(w) - 0.5 * w) / w.sum()
    return [float(np.interp(q, cdf, v)) for q in qs]


def _merge_coverage(states: list[dict], samples: list[np.ndarray]) -> dict[str, Any]:
    """Combine per-shard accumulators (in shard order) into the `coverage` entry of meta.json."""
    count = sum(s["count"] for s in states)
    width = len(states[0]["sum"])
    tot = np.zeros(width)
    totsq = np.zeros(width)
    lo = np.full(width, np.inf)
    hi = np.full(width, -np.inf)
    for s in states:
        if s["count"]:
            tot += np.asarray(s["sum"])
            totsq += np.asarray(s["sumsq"])
            lo = np.minimum(lo, s["min"])
            hi = np.maximum(hi, s["max"])
    mean = tot / count
    std = np.sqrt(np.maximum(totsq / count - mean**2, 0.0))
    # Each sampled row stands for count_shard / rows_sampled positions of its shard.
    vals = [x for x in samples if len(x)]
    wts = [
        np.full(len(x), s["count"] / len(x)) for s, x in zip(states, samples, strict=True) if len(x)
    ]
    rows = np.concatenate(vals).astype(np.float64)
    weights = np.concatenate(wts)
    quant = np.array([_weighted_quantiles(rows[:, j], weights, QUANTILES) for j in range(width)])
    quant = np.clip(quant, lo[:, None], hi[:, None])  # the sample is fp16: keep it in range
    cov: dict[str, Any] = {
        "k": list(range(1, width + 1)),
        "n_positions": count,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "min": lo.tolist(),
        "max": hi.tolist(),
        "quantile_sample_rows": int(len(rows)),
    }
    for qi, q in enumerate(QUANTILES):
        cov[f"p{round(q * 100):02d}"] = quant[:, qi].tolist()
    return cov
