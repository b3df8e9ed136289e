"""Evaluation records to tables: one variant's runs as seeds x questions columns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from first_lib import metrics
from first_lib.errors import FirstError

_COLUMNS = ("confidence", "correct", "brier", "nll")


def per_question(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per-question columns of one run's records (`first_lib.evaluate._record`), each [N]:
    ``confidence``, ``correct`` (0/1), ``brier`` and ``nll`` (from the candidate ``probs``,
    padded with zeros where questions have fewer candidates, which changes neither)."""
    if not records:
        raise FirstError("no evaluation records")
    width = max(len(r["probs"]) for r in records)
    probs = np.zeros((len(records), width))
    for i, r in enumerate(records):
        probs[i, : len(r["probs"])] = r["probs"]
    gold = np.array([r["gold"] for r in records], dtype=np.int64)
    return {
        "confidence": np.array([r["confidence"] for r in records], dtype=np.float64),
        "correct": np.array([bool(r["correct"]) for r in records], dtype=np.float64),
        "brier": metrics.brier_per_question(probs, gold),
        "nll": metrics.nll_per_question(probs, gold),
    }


@dataclass(frozen=True)
class Runs:
    """One variant's runs as a seeds x questions table.

    Attributes: ``seeds`` the seed labels (S); ``ids`` the question ids (N, sorted);
    ``columns`` {name: [S, N]} as in `per_question`.
    """

    seeds: tuple
    ids: tuple[str, ...]
    columns: dict[str, np.ndarray]

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @classmethod
    def of_arrays(cls, confidence: Any, correct: Any, **columns: Any) -> Runs:
        """A table from arrays [S, N] (or [N] for one seed): confidence, correct and any other
        per-question columns (``brier``, ``nll``); questions are named 0..N-1."""
        cols = {"confidence": confidence, "correct": correct, **columns}
        cols = {k: np.atleast_2d(np.asarray(v, dtype=np.float64)) for k, v in cols.items()}
        s, n = cols["confidence"].shape
        if any(v.shape != (s, n) for v in cols.values()):
            raise FirstError(
                f"columns must share one shape, got {[v.shape for v in cols.values()]}"
            )
        return cls(tuple(range(s)), tuple(str(i) for i in range(n)), cols)


def _by_seed(variant: Any) -> dict[Any, Sequence[Mapping]]:
    """{seed: records} from one run's records, a list of runs (seeds 0..S-1) or a mapping."""
    if isinstance(variant, Runs):
        raise FirstError("already a Runs table")
    if isinstance(variant, Mapping):
        return dict(variant)
    variant = list(variant)
    if variant and isinstance(variant[0], Mapping):  # one run: a list of records
        return {0: variant}
    return dict(enumerate(variant))


def runs_of(variant: Any) -> Runs:
    """A `Runs` table from one run's records, a list of runs (one per seed), a mapping
    {seed: records}, or a `Runs` (returned as is). Every run must cover the same questions."""
    if isinstance(variant, Runs):
        return variant
    by_seed = _by_seed(variant)
    if not by_seed:
        raise FirstError("a variant needs at least one run")
    ids = None
    cols: dict[str, list[np.ndarray]] = {c: [] for c in _COLUMNS}
    for seed, records in by_seed.items():
        by_id = {str(r["id"]): r for r in records}
        if ids is None:
            ids = tuple(sorted(by_id))
        elif set(by_id) != set(ids):
            raise FirstError(f"seed {seed!r} was evaluated on other questions than the first seed")
        for name, col in per_question([by_id[i] for i in ids]).items():
            cols[name].append(col)
    return Runs(tuple(by_seed), ids, {c: np.stack(v) for c, v in cols.items()})
