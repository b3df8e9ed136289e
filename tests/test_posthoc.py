"""Post-hoc temperature scaling of answers (first_lib.posthoc) on synthetic records."""

from __future__ import annotations

import numpy as np
import pytest

from first_lib import metrics, posthoc
from first_lib.errors import FirstError


def _records(n: int, true_t: float, scale: float, seed: int) -> list[dict]:
    """Questions with 4 candidates whose gold answers are drawn from softmax(z / true_t), while
    the model reports softmax(z): over-confident when true_t > 1."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        z = rng.normal(0, scale, 4)
        p_true = np.exp(z / true_t) / np.exp(z / true_t).sum()
        gold = int(rng.choice(4, p=p_true))
        raw = np.exp(z) / np.exp(z).sum() * 0.3  # log-probs of candidates, mass elsewhere too
        probs = raw / raw.sum()
        pred = int(np.argmax(raw))
        out.append(
            {
                "id": f"q{i}",
                "gold": gold,
                "pred": pred,
                "probs": probs.tolist(),
                "raw_probs": raw.tolist(),
                "confidence": float(probs[pred]),
                "correct": pred == gold,
            }
        )
    return out


def _ece(records) -> float:
    return metrics.ece([r["confidence"] for r in records], [r["correct"] for r in records])


def test_the_fitted_temperature_recovers_the_true_one():
    for true_t in (0.5, 1.0, 2.5):
        fitted = posthoc.fit_temperature(_records(4000, true_t, 3.0, seed=1))
        assert fitted == pytest.approx(true_t, rel=0.12), true_t


def test_scaling_fixes_confidence_and_keeps_answers():
    val, test = _records(2000, 2.5, 3.0, seed=2), _records(2000, 2.5, 3.0, seed=3)
    t = posthoc.fit_temperature(val)
    scaled = posthoc.apply_temperature(test, t)
    assert [r["pred"] for r in scaled] == [r["pred"] for r in test]  # accuracy unchanged
    assert all(abs(sum(r["probs"]) - 1) < 1e-9 for r in scaled)
    assert _ece(scaled) < 0.5 * _ece(test)  # the over-confident model is re-calibrated
    assert posthoc.nll(test, t) < posthoc.nll(test, 1.0)


def test_refusals():
    with pytest.raises(FirstError, match="needs validation records"):
        posthoc.fit_temperature([])
    with pytest.raises(FirstError, match="must be > 0"):
        posthoc.apply_temperature(_records(3, 1.0, 1.0, 0), 0.0)
