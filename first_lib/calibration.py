"""Re-calibration of the teacher's stored top-k probabilities ("trustworthy maximization").

Three transforms of probabilities over the last axis, each in rank order (column 0 = rank 1):

- ``temperature_scale(p, c)``: eq. 4 of the paper, ``softmax(p / c)`` over the k kept tokens.
  Applied to *probabilities*, not logits, so it can never be the identity: it always returns
  a distribution that sums to 1 over the k tokens and pulls ranks 2..k towards each other.
  Large c flattens everything towards 1/k, small c sharpens towards one-hot.
- ``power_scale(p, T)``: the logit-style family ``p^(1/T)``, i.e. ordinary temperature scaling
  of log-probabilities. It keeps probability ratios ordered, and is exactly the identity at
  T = 1. Each row is rescaled to keep its total mass (for rows that sum to 1 that is the usual
  renormalisation), so the mass outside the top-k is untouched.
- ``label_smooth(p, delta)``: eq. 3 generalised to k tokens: rank 1 gives ``delta`` away,
  ranks 2..k receive ``delta / (k - 1)`` each (for k = 5: ``-delta`` and ``+delta/4``). The
  row's total mass is kept. When ``p1 < delta`` only ``p1`` is moved (rank 1 becomes 0 and
  ranks 2..k share ``p1``), so no probability goes negative.

``search_coefficient`` picks the coefficient that minimises ECE on validation data: a coarse
grid (step 0.1), then a fine grid (step 0.02) around the best coarse value, as in sec. 5.5.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from first_lib.config import KINDS, check_coefficient
from first_lib.errors import FirstError
from first_lib.metrics import check_probs, to_numpy

__all__ = [
    "KINDS",
    "DEFAULT_GRIDS",
    "CoefficientSearch",
    "temperature_scale",
    "power_scale",
    "label_smooth",
    "apply_transform",
    "check_coefficient",
    "search_coefficient",
]

Kind = Literal["none", "ts", "power", "ls"]

# Default coarse grids (inclusive) per transform. TS: the paper's (0, 1] in steps of 0.1 (c = 0
# is undefined). Power: T in [0.1, 3] (T < 1 sharpens, T > 1 flattens; fine-tuned models are
# usually over-confident, so T > 1 is the interesting side). LS: delta in [0, 0.5] (delta = 0
# is the identity; the paper's fixed value is 0.1).
DEFAULT_GRIDS: dict[str, tuple[float, float]] = {
    "ts": (0.1, 1.0),
    "power": (0.1, 3.0),
    "ls": (0.0, 0.5),
}


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _float_numpy(probs: Any) -> np.ndarray:
    arr = np.asarray(probs)
    return arr.astype(np.result_type(arr.dtype, np.float32), copy=False)


def _float_torch(probs: Any) -> Any:
    import torch

    return probs.to(torch.promote_types(probs.dtype, torch.float32))


def temperature_scale(probs: Any, c: float) -> Any:
    """Eq. 4: ``P(i) <- exp(P(i)/c) / sum_j exp(P(j)/c)`` over the last axis.

    Args:
        probs: [..., k] probabilities (numpy array or torch tensor).
        c: temperature, > 0.

    Returns:
        [..., k] same type as ``probs`` (float32 or wider), summing to 1 over the last axis,
        in the same rank order.
    """
    check_coefficient("ts", c)
    if _is_torch(probs):
        import torch

        return torch.softmax(_float_torch(probs) / c, dim=-1)
    z = _float_numpy(probs) / c
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def power_scale(probs: Any, T: float) -> Any:
    """``p^(1/T)`` rescaled to keep each row's mass (identity at T = 1; zeros stay zero).

    Computed in log space relative to the row's maximum, so small T cannot underflow a whole
    row. A row of all zeros stays all zeros.

    Args:
        probs: [..., k] non-negative probabilities (numpy array or torch tensor).
        T: temperature, > 0.
    """
    check_coefficient("power", T)
    if _is_torch(probs):
        import torch

        p = _float_torch(probs)
        mass = p.sum(dim=-1, keepdim=True)
        pmax = p.amax(dim=-1, keepdim=True)
        safe_max = torch.where(pmax > 0, pmax, torch.ones_like(pmax))
        q = torch.where(p > 0, torch.exp(torch.log(p / safe_max) / T), torch.zeros_like(p))
        return q / q.sum(dim=-1, keepdim=True).clamp_min(1e-30) * mass
    p = _float_numpy(probs)
    mass = p.sum(axis=-1, keepdims=True)
    pmax = p.max(axis=-1, keepdims=True)
    safe_max = np.where(pmax > 0, pmax, 1.0)
    with np.errstate(divide="ignore"):
        q = np.exp(np.log(p / safe_max) / T)
    return q / np.maximum(q.sum(axis=-1, keepdims=True), 1e-30) * mass


def label_smooth(probs: Any, delta: float) -> Any:
    """Eq. 3 for k kept tokens in rank order: rank 1 loses ``m``, ranks 2..k gain ``m/(k-1)``.

    ``m = min(delta, p1)``: when the top-1 probability is below delta only p1 is moved, so no
    entry becomes negative. The row's total mass is unchanged. Rank order is not preserved
    (the paper's first criticism of LS): rank 1 can fall below rank 2.

    Args:
        probs: [..., k] probabilities in rank order, k >= 2 (numpy array or torch tensor).
        delta: smoothing coefficient, 0 <= delta < 1 (the paper uses 0.1).
    """
    check_coefficient("ls", delta)
    k = probs.shape[-1]
    if k < 2:
        raise FirstError(f"label smoothing needs at least 2 kept tokens, got k = {k}")
    if _is_torch(probs):
        import torch

        p = _float_torch(probs).clone()
        moved = torch.clamp(p[..., 0], max=delta)
    else:
        p = _float_numpy(probs).copy()
        moved = np.minimum(p[..., 0], delta)
    p[..., 0] -= moved
    p[..., 1:] += moved[..., None] / (k - 1)
    return p


def apply_transform(probs: Any, kind: Kind | str, coef: float | None = None) -> Any:
    """Apply a re-calibration by name: ``"none"`` (returned as is), ``"ts"`` (eq. 4, c),
    ``"power"`` (``p^(1/T)``, T) or ``"ls"`` (eq. 3, delta). Works on numpy and torch.

    Args:
        probs: [..., k] probabilities in rank order.
        kind: one of ``KINDS``.
        coef: the coefficient (ignored for "none").
    """
    check_coefficient(kind, coef)
    if kind == "none":
        return probs
    if kind == "ts":
        return temperature_scale(probs, float(coef))
    if kind == "power":
        return power_scale(probs, float(coef))
    return label_smooth(probs, float(coef))


# --------------------------------------------------------------------------- grid search


@dataclass(frozen=True)
class CoefficientSearch:
    """Result of `search_coefficient`.

    Attributes: ``kind``; ``best`` coefficient and its ``best_ece``; the whole ``coarse`` and
    ``fine`` curves as lists of (coefficient, ECE); ``baseline_ece``: the ECE with no transform
    (to see whether re-calibration helps at all); ``n`` validation positions; ``n_bins``.
    """

    kind: str
    best: float
    best_ece: float
    coarse: list[tuple[float, float]] = field(default_factory=list)
    fine: list[tuple[float, float]] = field(default_factory=list)
    baseline_ece: float = float("nan")
    n: int = 0
    n_bins: int = 10

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (for meta.json)."""
        d = asdict(self)
        d["coarse"] = [list(x) for x in self.coarse]
        d["fine"] = [list(x) for x in self.fine]
        return d


def _grid(lo: float, hi: float, step: float) -> np.ndarray:
    n = int(np.floor((hi - lo) / step + 1e-9))
    return np.round(lo + step * np.arange(n + 1), 10)


def _valid(kind: str, values: np.ndarray) -> np.ndarray:
    if kind == "ls":
        return values[(values >= 0.0) & (values < 1.0)]
    return values[values > 0.0]


class _ConfidenceFn:
    """Confidence (max transformed prob) and correctness for one grid value, vectorised.

    TS and power scaling are monotone per row, so the arg-max never changes: only the
    confidence does, ``mass / sum_j exp(z_j / s)`` with ``z = p - p_max`` (TS, mass = 1) or
    ``z = log p - log p_max`` (power, mass = row sum). LS changes only the top-1 and moves
    the rest by a constant, so the arg-max is rank 1 or the best of ranks 2..k. Work is done
    on [k, N] columns (k vector operations, not a reduction over a short last axis) and the
    exponentials in float32.
    """

    def __init__(self, p: np.ndarray, gold_rank: np.ndarray, kind: str):
        self.kind = kind
        cols = np.ascontiguousarray(p.T)  # [k, N]
        self.k = cols.shape[0]
        if kind == "ls":
            self.p1 = cols[0]
            self.rest_max, arg_rest = _column_max(cols[1:])
            self.rest_correct = (arg_rest + 1 == gold_rank).astype(np.float64)
            self.top_correct = (gold_rank == 0).astype(np.float64)
            return
        pmax, top = _column_max(cols)
        self.correct = (top == gold_rank).astype(np.float64)
        # In rank order (the usual case) column 0 is every row's max: its term is exp(0) = 1.
        self.skip_first = bool((top == 0).all())
        body = cols[1:] if self.skip_first else cols
        if kind == "ts":
            self.zt = (body - pmax).astype(np.float32)
            self.mass = None
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.log(body) - np.log(pmax)
            z[:, pmax <= 0] = 0.0  # an all-zero row: confidence = mass / k = 0
            self.zt = z.astype(np.float32)
            self.mass = cols.sum(axis=0)
        self.buf = np.empty_like(self.zt)

    def __call__(self, coef: float) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "ls":
            moved = np.minimum(self.p1, coef)
            top = self.p1 - moved
            other = self.rest_max + moved / (self.k - 1)
            keep_top = top >= other  # ties go to rank 1, as arg-max does
            conf = np.where(keep_top, top, other)
            return conf, np.where(keep_top, self.top_correct, self.rest_correct)
        np.multiply(self.zt, np.float32(1.0 / coef), out=self.buf)
        np.exp(self.buf, out=self.buf)
        total = self.buf.sum(axis=0, dtype=np.float64)
        if self.skip_first:
            total += 1.0
        conf = np.reciprocal(total, out=total)  # <= 1: the max term alone is exp(0) = 1
        if self.mass is not None:
            conf = np.clip(conf * self.mass, 0.0, 1.0)
        return conf, self.correct


def _column_max(cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max and first arg-max over the rows of a [k, N] array -> ([N], [N])."""
    best = cols[0].copy()
    arg = np.zeros(cols.shape[1], dtype=np.int64)
    for j in range(1, cols.shape[0]):
        better = cols[j] > best
        best[better] = cols[j][better]
        arg[better] = j
    return best, arg


def _fast_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> float:
    """ECE as in `metrics.ece`, with bins by floor(conf * M) (may differ from it only for a
    confidence within round-off of a bin edge)."""
    idx = np.minimum((conf * n_bins).astype(np.intp), n_bins - 1)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    corr_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    return float(np.abs(corr_sum - conf_sum).sum() / conf.shape[0])


def search_coefficient(
    probs: Any,
    gold_rank: Any,
    kind: str = "ts",
    grid: tuple[float, float] | None = None,
    coarse_step: float = 0.1,
    fine_step: float = 0.02,
    n_bins: int = 10,
) -> CoefficientSearch:
    """Coarse-to-fine grid search for the coefficient that minimises validation ECE (sec. 5.5).

    For each coefficient the k probabilities are transformed (``apply_transform``); the
    confidence is the largest transformed probability and the prediction is correct when its
    position equals ``gold_rank``. The coarse grid runs from ``grid[0]`` to ``grid[1]``
    (inclusive) in ``coarse_step``; the fine grid runs over ``best_coarse +- coarse_step`` in
    ``fine_step``, keeping only valid values (c > 0, T > 0, 0 <= delta < 1). Ties go to the
    smallest coefficient.

    Args:
        probs: [N, k] probabilities in rank order (column 0 = rank 1).
        gold_rank: [N] int, the position (0..k-1) of the gold token among the k, or -1 when
            the gold token is not among them (then the prediction is wrong at any coefficient).
        kind: "ts" (eq. 4, c), "power" (``p^(1/T)``) or "ls" (eq. 3, delta).
        grid: (first, last) coarse values; None picks ``DEFAULT_GRIDS[kind]``:
            TS (0.1, 1.0), power (0.1, 3.0), LS (0.0, 0.5).
        coarse_step, fine_step: grid steps (the paper's 0.1 and 0.02).
        n_bins: ECE bins.
    """
    if kind not in DEFAULT_GRIDS:
        raise FirstError(f"search_coefficient supports {tuple(DEFAULT_GRIDS)}, not {kind!r}")
    if not (coarse_step > 0 and fine_step > 0):
        raise FirstError("coarse_step and fine_step must be > 0")
    p = to_numpy(probs, "probs")
    if p.ndim != 2 or p.shape[1] < 2:
        raise FirstError(f"probs must have shape [N, k] with k >= 2, got {p.shape}")
    p = check_probs(p)
    gold = to_numpy(gold_rank, "gold_rank", dtype=None).reshape(-1)
    if gold.dtype.kind not in "iu" or gold.shape[0] != p.shape[0]:
        raise FirstError(f"gold_rank must be [N] integers, got {gold.dtype} {gold.shape}")
    if gold.min() < -1 or gold.max() >= p.shape[1]:
        raise FirstError(f"gold_rank must lie in [-1, {p.shape[1] - 1}]")
    lo, hi = grid if grid is not None else DEFAULT_GRIDS[kind]
    coarse_values = _valid(kind, _grid(float(lo), float(hi), coarse_step))
    if coarse_values.size == 0:
        raise FirstError(f"the grid {grid} holds no valid coefficient for {kind}")

    fn = _ConfidenceFn(p, gold.astype(np.int64), kind)
    coarse = [(float(v), _fast_ece(*fn(float(v)), n_bins)) for v in coarse_values]
    best_coarse = min(coarse, key=lambda t: t[1])[0]
    half = int(round(coarse_step / fine_step))
    fine_values = _valid(kind, np.round(best_coarse + fine_step * np.arange(-half, half + 1), 10))
    fine = [(float(v), _fast_ece(*fn(float(v)), n_bins)) for v in fine_values]
    best, best_ece = min(coarse + fine, key=lambda t: (t[1], t[0]))

    pmax, top = _column_max(np.ascontiguousarray(p.T))
    baseline = _fast_ece(pmax, (top == gold).astype(np.float64), n_bins)
    return CoefficientSearch(
        kind=kind,
        best=float(best),
        best_ece=float(best_ece),
        coarse=coarse,
        fine=fine,
        baseline_ece=baseline,
        n=int(p.shape[0]),
        n_bins=int(n_bins),
    )
