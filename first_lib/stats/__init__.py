"""Inference over questions and training seeds: paired bootstrap, ECE intervals, power, verdicts."""

# ruff: noqa: F401 (a face: every import is a re-export)
from first_lib.stats.decide import (
    BOOK_VERDICT,
    CONTRADICTED,
    NOT_TESTABLE,
    REPRODUCED,
    RULES_OUT,
    TOO_NOISY,
    VERDICTS,
    Claim,
    decide,
    decide_all,
    holm,
    learned,
)
from first_lib.stats.estimate import Estimate, compare, estimate, from_replicates
from first_lib.stats.power import design_for, mde, planned_mde, variance_split
from first_lib.stats.resample import ECE_INTERVAL, P_VALUE, SEED_SCHEME, interval
from first_lib.stats.rows import BIASED_METRICS, METRICS, metric_rows
from first_lib.stats.tables import Runs, per_question, runs_of
