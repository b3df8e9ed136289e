"""Analysis of evaluation records and of a run's stored top-k: rank-wise calibration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from first_lib import metrics


def conf_correct(records: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(confidence [N] float, correct [N] bool) of evaluation records."""
    conf = np.array([r["confidence"] for r in records], dtype=np.float64)
    corr = np.array([bool(r["correct"]) for r in records], dtype=bool)
    return conf, corr


def candidate_ranks(records: Sequence[Mapping[str, Any]], k: int | None = None):
    """Rank-wise calibration over the answer candidates (the paper's Figure 3 for answers).

    Each question's candidate probabilities are sorted; rank i's mean probability is compared
    with how often the rank-i candidate is the gold answer. k defaults to the fewest
    candidates of any question (5 for CSQA, 4 for OBQA, 2 for BoolQ).
    """
    width = min(len(r["probs"]) for r in records)
    k = min(k or width, width)
    probs = np.array([r["probs"][:width] for r in records], dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, order, axis=1)
    gold = np.array([r["gold"] for r in records])
    return metrics.rankwise_calibration(top, order, gold)


def store_probs_ranks(
    results: Mapping[str, Any], split: str = "validation", **overrides
) -> tuple[np.ndarray, np.ndarray]:
    """The fine-tuned teacher's stored top-k of a run: (probs [N, k] in rank order, rank [N] of
    the true next token among them, -1 when outside), over every stored position of `split`."""
    from first_lib import models, pipeline
    from first_lib.profiles import for_setting, get_profile

    setting = results["setting"]
    prof = for_setting(get_profile(results["profile"], **overrides), setting)
    rows = pipeline.load_questions(prof, setting)["train" if split == "train" else "validation"]
    tok = models.load_tokenizer(results["artefacts"]["teacher"])
    examples = pipeline.tokenize(tok, rows, prof, setting)
    return pipeline.calibration_data(Path(results["artefacts"]["store"]) / split, examples)


def rankwise_from_ranks(probs: np.ndarray, ranks: np.ndarray):
    """`metrics.rankwise_calibration` of top-k probs [N, k] and the gold rank [N] (-1: none)."""
    ids = np.broadcast_to(np.arange(probs.shape[1]), probs.shape)
    return metrics.rankwise_calibration(probs, ids, ranks)


def coefficient_spread(
    probs: np.ndarray, ranks: np.ndarray, kind: str = "ts", n_resamples: int = 200, seed: int = 0
) -> np.ndarray:
    """The coefficient `calibration.search_coefficient` chooses on each of `n_resamples`
    bootstrap resamples of the validation positions (for a multiple-choice task one position is
    one question): how much the choice of c* (or delta*) owes to which questions were drawn."""
    from first_lib import calibration

    rng = np.random.default_rng(seed)
    n = len(ranks)
    picks = [rng.integers(0, n, n) for _ in range(n_resamples)]
    return np.array(
        [calibration.search_coefficient(probs[i], ranks[i], kind=kind).best for i in picks]
    )
