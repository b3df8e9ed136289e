"""Power: the minimum detectable effect, and how much of it questions and seeds each cause.

``mde = (z(1 - alpha/2) + z(power)) * se``, with se the bootstrap standard error of
the difference (questions and seeds together): the smallest true difference this design
would declare at level alpha with that probability (normal approximation). `variance_split`
says how much of se comes from questions and how much from seeds, and `planned_mde` what
more of either would buy.
"""

from __future__ import annotations

from collections.abc import Mapping
from statistics import NormalDist
from typing import Any

import numpy as np

from first_lib import metrics
from first_lib.errors import FirstError
from first_lib.stats.resample import _paired_seeds, _replicates
from first_lib.stats.tables import runs_of

_NORMAL = NormalDist()


def mde(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect: the smallest true difference a two-sided test at level
    ``alpha`` detects with probability ``power``, given the standard error ``se`` of the
    estimated difference (normal approximation, the far tail ignored):
    ``(z(1 - alpha/2) + z(power)) * se`` -- 2.80 se at alpha 0.05 and 80% power.

    Beside an inconclusive difference it says what the design could have seen: a paper's
    effect below the mde was never testable here, one well above it would have shown.
    """
    if not (0 < alpha < 1 and 0 < power < 1) or se < 0:
        raise FirstError(f"need 0 < alpha, power < 1 and se >= 0, got {alpha}, {power}, {se}")
    return (_NORMAL.inv_cdf(1 - alpha / 2) + _NORMAL.inv_cdf(power)) * float(se)


def variance_split(
    a: Any,
    b: Any,
    metric: str,
    n_boot: int = 500,
    seed: int = 0,
    pair_seeds: str = "auto",
    n_bins: int = 10,
) -> dict[str, Any]:
    """Where the uncertainty of ``metric(a) - metric(b)`` comes from: the bootstrap variance
    with only the questions resampled (all seeds kept) and with only the seeds resampled (all
    questions kept). Their sum is about the variance `compare` reports; each shrinks in
    proportion to its own sample size, which is what `planned_mde` uses to say whether more
    seeds or more questions buy the larger gain. With one seed per side the seed part is 0
    (unknown, not absent: one run cannot show how runs differ).

    Returns {"questions": var, "seeds": var, "n_questions": N, "n_seeds": S} (S the larger
    side's count).
    """
    metrics._check_boot(n_boot, 0.05)
    ra, rb = runs_of(a), runs_of(b)
    if ra.ids != rb.ids:
        raise FirstError("the two variants were not evaluated on the same questions")
    paired = _paired_seeds(ra, rb, pair_seeds)
    out: dict[str, Any] = {"n_questions": len(ra.ids), "n_seeds": max(ra.n_seeds, rb.n_seeds)}
    for level in ("questions", "seeds"):
        rep_a, rep_b = _replicates([ra, rb], metric, n_boot, seed, paired, n_bins, level)
        out[level] = float(np.var(rep_a - rep_b, ddof=1)) if n_boot > 1 else 0.0
    return out


def planned_mde(
    split: Mapping[str, Any],
    n_questions: int | None = None,
    n_seeds: int | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """The `mde` of a design with ``n_questions`` and ``n_seeds`` (default: the measured
    ones), from a `variance_split`: ``se^2 = var_q N / N' + var_s S / S'``."""
    nq = n_questions or split["n_questions"]
    ns = n_seeds or split["n_seeds"]
    if nq < 1 or ns < 1:
        raise FirstError(f"a design needs questions and seeds, got {nq}, {ns}")
    var = split["questions"] * split["n_questions"] / nq + split["seeds"] * split["n_seeds"] / ns
    return mde(float(np.sqrt(var)), alpha, power)


def design_for(
    split: Mapping[str, Any],
    effect: float,
    n_questions: int | None = None,
    n_seeds: int | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """What one side of a design must be for its `mde` to reach ``effect`` (a size, > 0), the
    other side held: given ``n_seeds``, the questions needed; given ``n_questions``, the seeds
    needed (exactly one of the two). From ``mde <= effect``, ``se^2 = var_q N / N' + var_s S /
    S'`` solved for the free side: ``inf`` where the held side's variance alone already keeps
    the mde above ``effect`` (no number of the other suffices), 0 where nothing is needed.
    Rounded up, so a design of that size detects ``effect`` (to the normal approximation; the
    plug-in ECE's bias is taken as what the measured design had)."""
    if (n_questions is None) == (n_seeds is None):
        raise FirstError("give exactly one of n_questions and n_seeds (the side held)")
    if not effect > 0:
        raise FirstError(f"an effect size must be > 0, got {effect}")
    budget = (effect / mde(1.0, alpha, power)) ** 2  # the largest se^2 that detects `effect`
    var_q = split["questions"] * split["n_questions"]
    var_s = split["seeds"] * split["n_seeds"]
    if n_seeds is not None:
        held, free = var_s / n_seeds, var_q
    else:
        held, free = var_q / n_questions, var_s
    room = budget - held
    if room <= 0:
        return float("inf")
    return float(np.ceil(free / room)) if free > 0 else 0.0
