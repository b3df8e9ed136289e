"""Input checks shared by the metrics: arrays or tensors to float64 numpy, validated.

Every metric takes numpy arrays or torch tensors (any device, any float dtype) and returns
plain python floats (or small numpy containers), computed in float64 on the CPU. Inputs are
validated: an empty input, a NaN, or a confidence outside [0, 1] raises `FirstError` (a
`ValueError`) with a message that says which argument is wrong.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from first_lib.errors import FirstError

# Values this far outside [0, 1] are float round-off and are clipped; further out is an error.
_TOL = 1e-5


def to_numpy(x: Any, name: str = "input", dtype: Any = np.float64) -> np.ndarray:
    """Convert a numpy array, torch tensor or sequence to a numpy array of `dtype`.

    Raises `FirstError` on an empty input, or on NaN in a floating input.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.size == 0:
        raise FirstError(f"{name} is empty: metrics need at least one prediction")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise FirstError(f"{name} contains NaN")
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def _confidence(confidence: Any) -> np.ndarray:
    conf = to_numpy(confidence, "confidence").reshape(-1)
    lo, hi = conf.min(), conf.max()
    if lo < -_TOL or hi > 1.0 + _TOL:
        raise FirstError(f"confidence must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    if lo < 0.0 or hi > 1.0:  # float32 round-off, e.g. a softmax that sums to 1.0000001
        conf = np.clip(conf, 0.0, 1.0)
    return conf


def _correct(correct: Any, n: int) -> np.ndarray:
    corr = to_numpy(correct, "correct").reshape(-1)
    if corr.shape[0] != n:
        raise FirstError(f"confidence has {n} entries but correct has {corr.shape[0]}")
    if corr.min() < 0.0 or corr.max() > 1.0:
        raise FirstError("correct must be booleans or numbers in [0, 1]")
    return corr


def check_probs(p: np.ndarray, name: str = "probs") -> np.ndarray:
    """Check that a float array lies in [0, 1] (clipping float round-off) and return it."""
    lo, hi = p.min(), p.max()
    if lo < -_TOL or hi > 1.0 + _TOL:
        raise FirstError(f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    return np.clip(p, 0.0, 1.0) if (lo < 0.0 or hi > 1.0) else p
