"""Post-hoc temperature scaling of a trained model's answers: the cheap competitor to FIRST.

Guo et al. (2017) re-calibrate a trained classifier by dividing its logits by one temperature T,
fitted to minimise the negative log-likelihood on held-out data. Here the "logits" are the
model's log-probabilities of the answer candidates (`raw_probs` of an evaluation record, before
renormalisation), so the re-calibrated confidence is `softmax(log p / T)` over the candidates.
T > 0 never changes which answer is predicted, only how sure the model says it is: accuracy is
the same, calibration is not. The temperature is fitted on the same validation split that FIRST
uses to choose its coefficient, on the records of the model evaluated there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from first_lib.errors import FirstError

LOG_T_GRID = np.linspace(np.log(0.05), np.log(20.0), 241)  # T from 0.05 to 20, log-spaced


def _logits(records: Sequence[dict]) -> list[np.ndarray]:
    out = []
    for r in records:
        raw = np.asarray(r["raw_probs"], dtype=np.float64)
        out.append(np.log(np.clip(raw, 1e-300, None)))
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def nll(records: Sequence[dict], temperature: float) -> float:
    """Mean negative log-likelihood of the gold answers after scaling by `temperature`."""
    total = 0.0
    for z, r in zip(_logits(records), records, strict=True):
        scaled = z / temperature
        m = scaled.max()
        total -= scaled[r["gold"]] - (m + np.log(np.exp(scaled - m).sum()))
    return total / len(records)


def fit_temperature(records: Sequence[dict]) -> float:
    """The T > 0 that minimises the NLL of `records` (a log-spaced grid from 0.05 to 20, then a
    finer grid between the best point's neighbours). Deterministic."""
    if not records:
        raise FirstError("post-hoc temperature scaling needs validation records; got none")
    losses = [nll(records, float(np.exp(t))) for t in LOG_T_GRID]
    i = int(np.argmin(losses))
    lo, hi = LOG_T_GRID[max(i - 1, 0)], LOG_T_GRID[min(i + 1, len(LOG_T_GRID) - 1)]
    fine = np.linspace(lo, hi, 41)
    losses = [nll(records, float(np.exp(t))) for t in fine]
    return float(np.exp(fine[int(np.argmin(losses))]))


def apply_temperature(records: Sequence[dict], temperature: float) -> list[dict]:
    """Records as the scaled model would give them: `probs` and `confidence` re-calibrated,
    `pred`, `correct` and `raw_probs` as they were."""
    if not temperature > 0:
        raise FirstError(f"a temperature must be > 0, got {temperature}")
    out = []
    for z, r in zip(_logits(records), records, strict=True):
        probs = _softmax(z / temperature)
        out.append({**r, "probs": [float(p) for p in probs], "confidence": float(probs[r["pred"]])})
    return out
