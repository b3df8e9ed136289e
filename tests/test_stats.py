"""Inference over questions and seeds: reduction to the one-seed bootstrap, seed levels,
bias-corrected ECE coverage, power, Holm, verdicts. Pure numpy, each test well under 2 s."""

from __future__ import annotations

import numpy as np
import pytest

from first_lib import book, stats
from first_lib.errors import FirstError
from first_lib.stats import Claim, Runs


def make_records(probs: np.ndarray, gold: np.ndarray, prefix: str = "q") -> list[dict]:
    """Evaluation records (the fields of `evaluate._record`) from candidate probs [N, C]."""
    out = []
    for i, (p, g) in enumerate(zip(probs, gold, strict=True)):
        pred = int(np.argmax(p))
        out.append(
            {
                "id": f"{prefix}{i:05d}",
                "gold": int(g),
                "pred": pred,
                "probs": p.tolist(),
                "raw_probs": p.tolist(),
                "confidence": float(p[pred]),
                "correct": pred == int(g),
            }
        )
    return out


def calibrated_records(n: int, seed: int, sharpen: float = 1.0) -> list[dict]:
    """Gold drawn from the model's own probabilities (calibrated), then optionally sharpened
    (p ** sharpen, renormalised: same answers, more confident)."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(4), size=n)
    gold = np.array([rng.choice(4, p=p) for p in probs])
    sharp = probs**sharpen
    return make_records(sharp / sharp.sum(1, keepdims=True), gold)


def table_records(correct: np.ndarray, conf: np.ndarray) -> list[dict]:
    """Two-candidate records with given correctness and confidence."""
    gold = np.where(correct, 0, 1)
    probs = np.stack([conf, 1 - conf], axis=1)
    return make_records(probs, gold)


# --------------------------------------------------------------------------- pairing and seeds


@pytest.mark.parametrize("metric", ["acc", "ece", "trust"])
def test_one_seed_reduces_to_the_paired_question_bootstrap(metric):
    a, b = calibrated_records(300, 1), calibrated_records(300, 2, sharpen=2.0)
    old = book.paired_difference(a, b, metric, n_boot=300, seed=4)
    new = stats.compare(a, b, metric, n_boot=300, seed=4, method="percentile")
    assert (new.point, new.lo, new.hi) == (old.point, old.lo, old.hi)
    assert new.seeds == "single" and new.n_seeds == (1, 1) and new.n_questions == 300
    # as one-element lists and {seed: records} too
    assert stats.compare([a], {7: b}, metric, n_boot=300, seed=4, method="percentile").lo == old.lo


def test_records_in_any_order_and_questions_must_match():
    a, b = calibrated_records(200, 1), calibrated_records(200, 2)
    shuffled = [a[i] for i in np.random.default_rng(0).permutation(200)]
    assert stats.compare(shuffled, b, "ece", n_boot=100) == stats.compare(a, b, "ece", n_boot=100)
    with pytest.raises(FirstError, match="same questions"):
        stats.compare(a[:150], b, "acc", n_boot=10)
    with pytest.raises(FirstError, match="other questions"):
        stats.runs_of([a, a[:150]])
    with pytest.raises(FirstError, match="unknown metric"):
        stats.compare(a, b, "accuracy", n_boot=10)
    with pytest.raises(FirstError, match="candidate probabilities"):
        stats.estimate(Runs.of_arrays([0.9], [1.0]), "brier", n_boot=10)


def test_every_metric_orders_a_calibrated_and_an_overconfident_model():
    calibrated = calibrated_records(600, 3)
    overconfident = calibrated_records(600, 3, sharpen=3.0)  # same answers, sharper
    for metric in ("ece", "ece_equal_mass", "smece", "brier", "nll"):
        d = stats.compare(
            overconfident, calibrated, metric, n_boot=40 if metric == "smece" else 300
        )
        assert d.point > 0 and d.lo > 0, metric
    acc = stats.compare(overconfident, calibrated, "acc", n_boot=200)
    assert (acc.point, acc.lo, acc.hi, acc.p) == (0.0, 0.0, 0.0, 1.0)
    trust = stats.compare(overconfident, calibrated, "trust", n_boot=200)
    assert trust.hi < 0  # same accuracy, worse ECE
    aurc = stats.compare(overconfident, calibrated, "aurc", n_boot=200)
    assert aurc.lo <= aurc.point <= aurc.hi


def seed_effect_tables(s: int = 5, n: int = 400):
    """A and B on s seeds x n questions; seed s moves A's accuracy by a_s, B has no seed
    effect; both have per-question difficulty."""
    rng = np.random.default_rng(0)
    shift = np.linspace(-0.15, 0.15, s)
    p_a = np.clip(0.6 + shift[:, None] + 0.2 * rng.standard_normal(n), 0.05, 0.95)
    ca = rng.random((s, n)) < p_a
    cb = rng.random((s, n)) < 0.55
    conf = np.full((s, n), 0.7)
    return Runs.of_arrays(conf, ca), Runs.of_arrays(conf, cb), ca.astype(float) - cb


def test_seed_level_standard_error_matches_the_crossed_variance_formula():
    # the crossed (pigeonhole) bootstrap's variance of the mean difference is about
    # var(row means) / S + var(column means) / N of the seeds x questions table D
    a, b, d = seed_effect_tables()
    s, n = d.shape
    var_s, var_q = d.mean(1).var(ddof=1) / s, d.mean(0).var(ddof=1) / n
    est = stats.compare(a, b, "acc", n_boot=1500, seed=1)
    assert est.seeds == "paired"
    assert est.se == pytest.approx(np.sqrt(var_s + var_q), rel=0.15)
    # ignoring the seeds (one seed's worth of uncertainty) would be far too narrow
    one = stats.compare(Runs.of_arrays(*(c[:1] for c in a.columns.values())), b, "acc")
    assert est.se > 1.5 * one.se / np.sqrt(s)
    # the split: each level's share, and the design's mde rescaled from it
    split = stats.variance_split(a, b, "acc", n_boot=1500, seed=1)
    assert split["seeds"] == pytest.approx(var_s, rel=0.25)
    assert split["questions"] == pytest.approx(var_q, rel=0.25)
    assert stats.planned_mde(split) == pytest.approx(est.mde, rel=0.15)
    four = stats.planned_mde(split, n_questions=4 * n, n_seeds=4 * s)
    assert four == pytest.approx(stats.planned_mde(split) / 2)
    more_seeds = stats.planned_mde(split, n_seeds=4 * s)
    more_questions = stats.planned_mde(split, n_questions=4 * n)
    assert more_seeds < more_questions  # the seed effect dominates here: seeds buy more


def test_pairing_seeds_removes_what_two_variants_share():
    # seed s gives both variants the same good or bad run; B is A with 5% of answers broken
    rng = np.random.default_rng(1)
    s, n = 4, 500
    ca = rng.random((s, n)) < np.array([0.3, 0.5, 0.7, 0.9])[:, None]
    cb = ca & (rng.random((s, n)) > 0.05)
    conf = np.full((s, n), 0.6)
    a, b = Runs.of_arrays(conf, ca), Runs.of_arrays(conf, cb)
    paired = stats.compare(a, b, "acc", n_boot=500, pair_seeds="auto")
    independent = stats.compare(a, b, "acc", n_boot=500, pair_seeds="independent")
    assert paired.seeds == "paired" and independent.seeds == "independent"
    assert paired.point == independent.point > 0
    assert paired.lo > 0 and independent.lo < 0  # pairing finds what independence cannot
    assert paired.hi - paired.lo < 0.3 * (independent.hi - independent.lo)
    untuned = Runs.of_arrays(conf[:1], cb[:1])  # a single run against several seeds
    assert stats.compare(a, untuned, "acc", n_boot=50).seeds == "independent"
    with pytest.raises(FirstError, match="cannot pair"):
        stats.compare(a, untuned, "acc", n_boot=10, pair_seeds="paired")


# --------------------------------------------------------------------------- bias-aware ECE


def _coverage(n: int, gap: float, method: str, trials: int = 100):
    """Share of trials whose interval covers the true ECE, and the intervals' lower ends."""
    rng = np.random.default_rng(0)
    hits, lows = 0, []
    for t in range(trials):
        if gap:  # over-confident by exactly `gap` at every confidence: true ECE = gap
            conf = 0.5 + 0.5 * rng.random(n)
            correct = rng.random(n) < conf - gap
        else:  # perfectly calibrated: true ECE = 0
            conf = rng.random(n)
            correct = rng.random(n) < conf
        est = stats.estimate(Runs.of_arrays(conf, correct), "ece", 200, t, method=method)
        hits += est.lo <= gap <= est.hi
        lows.append(est.lo)
    return hits / trials, np.array(lows)


def test_bias_corrected_ece_interval_covers_a_small_true_ece():
    basic, _ = _coverage(300, 0.03, "basic")
    percentile, _ = _coverage(300, 0.03, "percentile")
    assert basic >= 0.8  # nominal 0.95; the percentile interval sits above the truth
    assert percentile <= 0.65
    assert stats.estimate(Runs.of_arrays([0.9] * 5, [1] * 5), "ece", 50).method == "basic"


def test_bias_corrected_ece_interval_reaches_zero_for_a_calibrated_model():
    basic, lows = _coverage(300, 0.0, "basic")
    percentile, _ = _coverage(300, 0.0, "percentile")
    assert percentile == 0.0  # never: every replicate is above 0
    assert basic >= 0.35 and np.all(lows >= 0.0)  # about half (a boundary), clipped at 0


def test_interval_reflects_and_p_value_inverts_the_interval():
    rng = np.random.default_rng(0)
    z = rng.standard_normal(1999)
    for mu in (-3.0, -1.0, 0.0, 0.5, 1.2, 2.6, 4.0):
        reps = mu + z
        lo, hi, p = stats.interval(mu, reps, "percentile")
        assert (p <= 0.05) == (lo > 0 or hi < 0)
        assert p == pytest.approx(2 * min(np.mean(reps <= 0), np.mean(reps >= 0)), abs=2e-3)
    # basic = the percentile interval of the replicates reflected about the estimate
    reps = 0.3 + 0.1 * z  # replicates above the estimate 0.25 (the bias of a plug-in ECE)
    lo, hi, _ = stats.interval(0.25, reps, "basic")
    q_lo, q_hi = np.percentile(reps, [2.5, 97.5])
    assert (lo, hi) == pytest.approx((2 * 0.25 - q_hi, 2 * 0.25 - q_lo))
    assert (lo + hi) / 2 < 0.25 < (q_lo + q_hi) / 2
    with pytest.raises(FirstError):
        stats.interval(0.0, reps, "bca")


# --------------------------------------------------------------------------- power


def test_mde_matches_the_closed_form_of_a_paired_difference():
    assert stats.mde(1.0) == pytest.approx(1.959964 + 0.841621, abs=1e-5)
    assert stats.mde(0.01, alpha=0.01, power=0.9) == pytest.approx(0.01 * (2.575829 + 1.281552))
    rng = np.random.default_rng(2)
    n = 2000
    ca = rng.random(n) < 0.62
    cb = np.where(rng.random(n) < 0.7, ca, rng.random(n) < 0.58)  # correlated with a
    conf = np.full(n, 0.6)
    est = stats.compare(Runs.of_arrays(conf, ca), Runs.of_arrays(conf, cb), "acc", 2000)
    d = ca.astype(float) - cb
    closed = (1.959964 + 0.841621) * d.std(ddof=1) / np.sqrt(n)
    assert est.mde == pytest.approx(closed, rel=0.08)
    with pytest.raises(FirstError):
        stats.mde(0.1, power=1.0)


# --------------------------------------------------------------------------- multiplicity


def test_holm_hand_example():
    # sorted: .005 x4 = .02, .01 x3 = .03, .03 x2 = .06, .04 x1 = .04 -> running max .06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = stats.holm({"ece": 0.01, "acc": 0.04, "trust": 0.03, "over": 0.005})
    assert adjusted == pytest.approx({"ece": 0.03, "acc": 0.06, "trust": 0.06, "over": 0.02})
    assert [k for k, v in adjusted.items() if v <= 0.05] == ["ece", "over"]
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0] and stats.holm([]) == []
    with pytest.raises(FirstError):
        stats.holm([0.5, 1.5])


# --------------------------------------------------------------------------- verdicts


def test_verdicts_say_what_they_mean():
    claim = Claim("above", effect=0.077)  # e.g. ECE(Fine-tune) - ECE(FIRST), paper: 7.7 points
    d = book.Difference
    assert stats.decide(d(0.03, 0.01, 0.05), claim) == stats.REPRODUCED
    assert stats.decide(d(-0.03, -0.05, -0.01), claim) == stats.CONTRADICTED
    assert stats.decide(d(0.005, -0.02, 0.03), claim) == stats.RULES_OUT
    assert stats.decide(d(0.04, -0.02, 0.10), claim) == stats.TOO_NOISY
    assert stats.decide(d(0.04, -0.02, 0.10), Claim("above")) == stats.TOO_NOISY
    assert stats.decide(d(0.03, 0.01, 0.05), claim, testable=False) == stats.NOT_TESTABLE
    # a primary claim whose Holm-adjusted p is too large is not reproduced
    assert stats.decide(d(0.03, 0.01, 0.05), claim, p=0.2) == stats.RULES_OUT
    below = Claim("below", effect=-0.05)
    assert stats.decide(d(-0.03, -0.05, -0.01), below) == stats.REPRODUCED
    assert stats.decide(d(0.0, -0.01, 0.01), below) == stats.RULES_OUT
    with pytest.raises(FirstError):
        Claim("above", effect=-0.1)
    with pytest.raises(FirstError):
        stats.decide(d(0.0, 0.1, -0.1), claim)
    assert set(stats.BOOK_VERDICT) == set(stats.VERDICTS)


@pytest.mark.parametrize("lo,hi", [(0.01, 0.05), (-0.05, -0.01), (-0.02, 0.03), (-0.02, 0.1)])
@pytest.mark.parametrize("direction", ["above", "below"])
def test_verdicts_map_onto_the_books_three_words(lo, hi, direction):
    new = stats.decide(book.Difference((lo + hi) / 2, lo, hi), Claim(direction))
    assert stats.BOOK_VERDICT[new] == book.verdict(lo, hi, 0.0, direction)


def _estimate(lo: float, hi: float, p: float) -> stats.Estimate:
    mid = (lo + hi) / 2
    return stats.Estimate(
        "acc", mid, lo, hi, mid, p, 0.01, 0.03, "percentile", "paired", 100, (3, 3)
    )


def test_decide_all_corrects_the_primary_family_only():
    items = {
        "a": (Claim("above", 0.05, primary=True), _estimate(0.01, 0.05, p=0.03)),
        "b": (Claim("above", 0.05, primary=True), _estimate(0.01, 0.05, p=0.001)),
        "c": (Claim("above", 0.05), _estimate(0.01, 0.05, p=0.03)),
        "d": (Claim("above", primary=True), _estimate(-0.1, 0.1, p=0.9)),
    }
    out = stats.decide_all(items, testable={"d": False})
    # family {a, b} (d is not testable): b .001 x 2 = .002, then a .03 x 1 = .03
    assert out["b"]["p_holm"] == pytest.approx(0.002) and out["a"]["p_holm"] == pytest.approx(0.03)
    assert out["a"]["verdict"] == out["b"]["verdict"] == stats.REPRODUCED
    assert out["c"]["p_holm"] is None and out["c"]["verdict"] == stats.REPRODUCED
    assert out["d"]["verdict"] == stats.NOT_TESTABLE and out["d"]["p_holm"] is None
    # with d in the family, a's .03 x 2 = .06: no longer reproduced, and .05 lies in [.01, .05]
    out = stats.decide_all(
        {**items, "d": (Claim("above", primary=True), _estimate(-0.1, 0.1, 0.04))}
    )
    assert out["a"]["p_holm"] == pytest.approx(0.06) and out["a"]["verdict"] == stats.TOO_NOISY
    assert out["c"]["verdict"] == stats.REPRODUCED  # secondary: unadjusted


def test_learned_checks_tuned_against_untuned_accuracy():
    rng = np.random.default_rng(3)
    n = 400
    untuned = rng.random(n) < 0.35
    better = untuned | (rng.random((3, n)) < 0.25)  # three seeds, each fixes some answers
    conf = np.full((3, n), 0.5)
    ok, est = stats.learned(Runs.of_arrays(conf, better), Runs.of_arrays(conf[:1], untuned))
    assert ok and est.lo > 0 and est.metric == "acc"
    same = Runs.of_arrays(conf, np.tile(untuned, (3, 1)))
    ok, est = stats.learned(same, Runs.of_arrays(conf[:1], untuned), n_boot=200)
    assert not ok and est.point == 0.0


def test_estimates_are_json_ready_for_chapter_json():
    import json

    est = stats.compare(calibrated_records(50, 1), calibrated_records(50, 2), "acc", n_boot=20)
    saved = json.loads(json.dumps(book._jsonable({"first_vs_ft": est})))["first_vs_ft"]
    assert saved["point"] == est.point and saved["n_seeds"] == [1, 1] and saved["seeds"] == "single"


def test_design_for_inverts_the_planned_mde():
    # the design it returns detects the size asked (and one question or seed fewer does not)
    split = {"questions": 4e-4, "seeds": 1e-4, "n_questions": 1000, "n_seeds": 3}
    size = 0.06  # below today's mde (about 0.063): more of either side reaches it
    nq = stats.design_for(split, size, n_seeds=3)
    assert stats.planned_mde(split, n_questions=int(nq), n_seeds=3) <= size
    assert stats.planned_mde(split, n_questions=int(nq) - 1, n_seeds=3) > size
    ns = stats.design_for(split, size, n_questions=1000)
    assert nq > 1000 and ns > 3
    assert stats.planned_mde(split, n_questions=1000, n_seeds=int(ns)) <= size
    assert stats.planned_mde(split, n_questions=1000, n_seeds=int(ns) - 1) > size
    # below the floor one side sets, no number of the other side suffices
    floor_q = stats.planned_mde({**split, "seeds": 0.0}, n_questions=1000)
    assert stats.design_for(split, 0.9 * floor_q, n_questions=1000) == float("inf")
    assert stats.design_for(split, 1.1 * floor_q, n_questions=1000) < float("inf")
    floor_s = stats.planned_mde({**split, "questions": 0.0}, n_seeds=3)
    assert stats.design_for(split, 0.9 * floor_s, n_seeds=3) == float("inf")
    with pytest.raises(FirstError):
        stats.design_for(split, size)
    with pytest.raises(FirstError):
        stats.design_for(split, 0.0, n_seeds=3)
