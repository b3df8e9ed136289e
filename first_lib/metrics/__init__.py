"""Calibration and accuracy metrics: binned, equal-mass and smooth ECE, scores, selective risk."""

# ruff: noqa: F401 (a face: every import is a re-export)
from first_lib.metrics.binned import (
    ReliabilityBins,
    adaptive_ece,
    bin_indices,
    ece,
    ece_equal_mass,
    ece_rows,
    equal_mass_ece_rows,
    mce,
    reliability_bins,
)
from first_lib.metrics.bootstrap import _check_boot, bootstrap_ci, resample_indices
from first_lib.metrics.inputs import check_probs, to_numpy
from first_lib.metrics.rankwise import RankwiseCalibration, rankwise_calibration
from first_lib.metrics.scores import (
    accuracy,
    brier,
    brier_binary,
    brier_per_question,
    nll,
    nll_per_question,
    trust_score,
)
from first_lib.metrics.selective import (
    RiskCoverage,
    aurc,
    aurc_rows,
    risk_coverage,
    selective_risk_rows,
)
from first_lib.metrics.smooth import (
    SmoothReliability,
    smooth_ece,
    smooth_ece_rows,
    smooth_reliability,
)
