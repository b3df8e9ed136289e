"""Verdicts on the paper's claims: Holm's multiplicity correction, `decide`, `learned`.

- **Multiplicity.** `holm` adjusts the p-values of the primary claims (Holm 1979); secondary
  claims are reported unadjusted and say so.
- **Verdicts.** `decide` returns one of `VERDICTS`; `BOOK_VERDICT` maps them onto the three
  words of `first_lib.book.verdict`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from first_lib.errors import FirstError
from first_lib.stats.estimate import Estimate, compare


def holm(pvalues: Mapping[str, float] | Sequence[float]) -> Any:
    """Holm's step-down adjusted p-values (Holm 1979), in the input's shape (dict or list).

    Sort the m p-values; the i-th smallest (i = 1..m) is multiplied by ``m - i + 1`` and the
    running maximum taken, capped at 1. Rejecting where the adjusted p <= alpha keeps the
    chance of *any* false claim in the family below alpha, whatever their dependence, and
    rejects at least as much as Bonferroni (which multiplies all by m).
    """
    keys = list(pvalues) if isinstance(pvalues, Mapping) else None
    p = np.array([pvalues[k] for k in keys] if keys is not None else list(pvalues), dtype=float)
    if p.size and (np.isnan(p).any() or p.min() < 0 or p.max() > 1):
        raise FirstError(f"p-values must lie in [0, 1], got {p.tolist()}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adj_sorted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    adj = np.empty(m)
    adj[order] = adj_sorted
    return dict(zip(keys, adj.tolist(), strict=True)) if keys is not None else adj.tolist()


REPRODUCED, CONTRADICTED = "reproduced", "contradicted"
RULES_OUT = "rules out the paper's effect size"
TOO_NOISY = "too noisy to tell"
NOT_TESTABLE = "not testable here"
VERDICTS = (REPRODUCED, CONTRADICTED, RULES_OUT, TOO_NOISY, NOT_TESTABLE)
# The same verdicts in the three words of `first_lib.book.verdict` / `combine_verdicts`.
BOOK_VERDICT = {
    REPRODUCED: "reproduced",
    CONTRADICTED: "contradicted",
    RULES_OUT: "inconclusive",
    TOO_NOISY: "inconclusive",
    NOT_TESTABLE: "inconclusive",
}


@dataclass(frozen=True)
class Claim:
    """A claim of the paper about a difference (oriented as the `Estimate` it is tested on).

    Attributes: ``direction`` 'above' (the paper says the difference is positive) or 'below';
    ``effect`` the paper's difference in the same orientation and units (fractions), or None;
    ``primary`` whether the claim is in the family Holm corrects.
    """

    direction: str
    effect: float | None = None
    primary: bool = False

    def __post_init__(self) -> None:
        if self.direction not in ("above", "below"):
            raise FirstError(f"direction must be 'above' or 'below', got {self.direction!r}")
        if self.effect is not None and (self.effect > 0) != (self.direction == "above"):
            raise FirstError(
                f"the paper's effect {self.effect} is not on the {self.direction} side"
            )


def decide(est: Any, claim: Claim, p: float | None = None, testable: bool = True) -> str:
    """The verdict on ``claim`` from a difference with its interval (`Estimate`, or anything
    with ``lo`` and ``hi``).

    - "not testable here" when a precondition failed (``testable`` False, e.g. a model that
      did not learn: see `learned`);
    - "reproduced" / "contradicted" when the interval excludes 0 on the claimed / the other
      side (and, for a primary claim, its Holm-adjusted ``p`` is <= alpha);
    - otherwise "rules out the paper's effect size" when the interval excludes the paper's
      effect (the data are precise enough to say the effect, if any, is smaller), else
      "too noisy to tell" (compare the paper's effect with the estimate's ``mde``).
    """
    if not testable:
        return NOT_TESTABLE
    if not est.lo <= est.hi:
        raise FirstError(f"an interval needs lo <= hi, got [{est.lo}, {est.hi}]")
    alpha = getattr(est, "alpha", 0.05)
    significant = (est.lo > 0 or est.hi < 0) and (p is None or p <= alpha)
    if significant:
        return REPRODUCED if (est.lo > 0) == (claim.direction == "above") else CONTRADICTED
    if claim.effect is not None and not est.lo <= claim.effect <= est.hi:
        return RULES_OUT
    return TOO_NOISY


def decide_all(
    items: Mapping[str, tuple[Claim, Any]], testable: Mapping[str, bool] | None = None
) -> dict[str, dict[str, Any]]:
    """Verdicts for a set of named claims {name: (claim, estimate)}.

    The primary claims that are testable form one family: their p-values (``estimate.p``) are
    Holm-adjusted together; secondary claims keep their own p. Returns {name: {"verdict",
    "p", "p_holm" (None for secondary), "primary"}}.
    """
    testable = testable or {}
    family = {
        k: est.p for k, (claim, est) in items.items() if claim.primary and testable.get(k, True)
    }
    adjusted = holm(family) if family else {}
    out = {}
    for name, (claim, est) in items.items():
        p_holm = adjusted.get(name)
        out[name] = {
            "verdict": decide(est, claim, p_holm, testable.get(name, True)),
            "p": est.p,
            "p_holm": p_holm,
            "primary": claim.primary,
        }
    return out


def learned(
    tuned: Any, untuned: Any, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[bool, Estimate]:
    """Did training work? Accuracy(tuned) - accuracy(untuned) on the same questions, paired
    (over the tuned model's seeds too); True when the interval lies above 0.

    Claims about a model that did not learn (tuned no better than untuned) are "not testable
    here": its calibration after tuning says nothing about what tuning does.
    """
    est = compare(tuned, untuned, "acc", n_boot=n_boot, seed=seed, alpha=alpha)
    return est.lo > 0.0, est
