"""first_lib.book.beyond: the validation-size study and the temperature comparisons, on fake
records and fake stored top-k (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from first_lib import calibration, metrics, posthoc
from first_lib.book import beyond
from first_lib.errors import FirstError


def fake_records(n=300, c=5, sharpen=2.5, seed=0):
    """Records of an over-confident model: gold drawn from softmax(z), reported softmax(z * sharpen)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.0, size=(n, c))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    rep = np.exp(sharpen * z) / np.exp(sharpen * z).sum(1, keepdims=True)
    gold = np.array([rng.choice(c, p=p) for p in true])
    out = []
    for i in range(n):
        pred = int(rep[i].argmax())
        out.append(
            {
                "id": f"q{i:04d}",
                "gold": int(gold[i]),
                "pred": pred,
                "probs": rep[i].tolist(),
                "raw_probs": (0.9 * rep[i]).tolist(),  # unnormalised, as a model's would be
                "confidence": float(rep[i, pred]),
                "correct": pred == int(gold[i]),
            }
        )
    return out


def test_candidate_table_sorts_and_finds_the_gold_rank():
    recs = [
        {"probs": [0.1, 0.7, 0.2], "gold": 2},
        {"probs": [0.5, 0.2, 0.3], "gold": 0},
    ]
    probs, rank = beyond.candidate_table(recs)
    assert probs.tolist() == [[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]]
    assert rank.tolist() == [1, 0]
    with pytest.raises(FirstError, match="different numbers of candidates"):
        beyond.candidate_table([{"probs": [0.5, 0.5], "gold": 0}, *recs])


def test_power_on_candidates_is_posthoc_logit_scaling():
    """p^(1/T) renormalised over the candidates is softmax(log p / T): the same records as
    `posthoc.apply_temperature` at the same T, from probs or from unnormalised raw_probs."""
    recs = fake_records(50)
    for t in (0.5, 1.7, 4.0):
        mine = beyond.recalibrated_records(recs, "power", t)
        theirs = posthoc.apply_temperature(recs, t)
        for a, b in zip(mine, theirs, strict=True):
            assert a["probs"] == pytest.approx(b["probs"], abs=1e-6)
            assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-6)
            assert a["pred"] == b["pred"] and a["correct"] == b["correct"]


def test_temperatures_keep_the_answer_and_label_smoothing_can_move_it():
    recs = fake_records(200)
    for kind, coef in (("ts", 0.3), ("power", 2.0)):
        out = beyond.recalibrated_records(recs, kind, coef)
        assert [r["pred"] for r in out] == [r["pred"] for r in recs]
        assert all(sum(r["probs"]) == pytest.approx(1.0) for r in out)
    close = [{"probs": [0.40, 0.42, 0.18], "gold": 0, "pred": 1}]
    (moved,) = beyond.recalibrated_records(close, "ls", 0.1)
    assert moved["pred"] == 0 and moved["correct"] is True
    conf, corr = beyond.transformed(*beyond.candidate_table(close), "ls", 0.1)
    assert corr.tolist() == [1.0] and conf[0] == pytest.approx(0.40 + 0.1 / 2)
    with pytest.raises(FirstError, match="unknown re-calibration"):
        beyond.transformed(*beyond.candidate_table(close), "logits", 1.0)


def test_eq4_on_the_table_matches_eq4_on_the_records():
    recs = fake_records(100)
    conf, corr = beyond.transformed(*beyond.candidate_table(recs), "ts", 0.4)
    out = beyond.recalibrated_records(recs, "ts", 0.4)
    assert conf == pytest.approx([r["confidence"] for r in out])
    assert corr.tolist() == [float(r["correct"]) for r in out]


def test_subset_choices_all_data_and_spread():
    probs, rank = beyond.candidate_table(fake_records(400))
    (whole,) = beyond.subset_choices(probs, rank, 400)
    assert whole == calibration.search_coefficient(probs, rank, kind="ts").best
    small = beyond.subset_choices(probs, rank, 16, n_subsets=60, seed=3)
    again = beyond.subset_choices(probs, rank, 16, n_subsets=60, seed=3)
    large = beyond.subset_choices(probs, rank, 200, n_subsets=60, seed=3)
    assert small.tolist() == again.tolist() and len(small) == 60
    # choices on 16 positions scatter more than on 200 (half of 400)
    assert np.ptp(small) > np.ptp(large)
    assert np.abs(small - whole).mean() > np.abs(large - whole).mean()
    with pytest.raises(FirstError, match="at least 2"):
        beyond.subset_choices(probs, rank, 1)


def test_expected_gap_is_zero_for_the_reference_and_a_weighted_mean_otherwise():
    tests = {s: beyond.candidate_table(fake_records(300, seed=s)) for s in (0, 1)}
    ref = {0: 0.5, 1: 0.5}
    same = beyond.expected_gap(tests, {0: [0.5, 0.5], 1: [0.5]}, ref, n_boot=200)
    assert same.point == 0 and same.lo == same.hi == 0 and same.seeds == "paired"
    choices = {0: [0.1, 0.1, 0.9], 1: [0.3]}
    est = beyond.expected_gap(tests, choices, ref, n_boot=200)

    def ece(s, c):
        return metrics.ece(*beyond.transformed(*tests[s], "ts", c))

    want = np.mean(
        [
            (2 * ece(0, 0.1) + ece(0, 0.9)) / 3 - ece(0, 0.5),
            ece(1, 0.3) - ece(1, 0.5),
        ]
    )
    assert est.point == pytest.approx(want)
    assert est.lo <= est.hi and est.mde > 0 and est.n_questions == 300


def test_expected_gap_sees_a_bad_choice():
    """A far-off coefficient on a large test set: the gap's interval lies above 0."""
    probs, rank = beyond.candidate_table(fake_records(1500))
    best = calibration.search_coefficient(probs, rank, kind="ts").best
    est = beyond.expected_gap({0: (probs, rank)}, {0: [5.0]}, {0: best}, n_boot=300)
    assert est.lo > 0 and est.seeds == "single"
    assert "lies above 0" in beyond.gap_sentence(est, "Choosing badly")
    flat = beyond.expected_gap({0: (probs, rank)}, {0: [best]}, {0: best}, n_boot=50)
    assert "contains 0" in beyond.gap_sentence(flat, "Choosing well")
    with pytest.raises(FirstError, match="same training seeds"):
        beyond.expected_gap({0: (probs, rank)}, {1: [best]}, {0: best})


def test_fit_nll_topk_recovers_an_over_confidence():
    """Reported probabilities sharpened by 2.5: the NLL temperature is about 2.5; positions whose
    true token is outside the top-k are left out."""
    probs, rank = beyond.candidate_table(fake_records(3000, sharpen=2.5))
    t, used = beyond.fit_nll_topk(probs, rank)
    assert used == 3000 and 2.1 < t < 2.9
    rank = rank.copy()
    rank[:100] = -1
    assert beyond.fit_nll_topk(probs, rank)[1] == 2900
    # the same temperature as the pipeline's post-hoc stage on the same candidates
    recs = fake_records(80, sharpen=1.8, seed=4)
    mine, _ = beyond.fit_nll_topk(*beyond.candidate_table(recs))
    assert mine == pytest.approx(posthoc.fit_temperature(recs), rel=1e-9)
    with pytest.raises(FirstError, match="no stored position"):
        beyond.fit_nll_topk(probs[:3], np.array([-1, -1, -1]))


def test_size_summary():
    s = beyond.size_summary(np.arange(101))
    assert (s["median"], s["lo"], s["hi"], s["n"]) == (50.0, 5.0, 95.0, 101)
    with pytest.raises(FirstError):
        beyond.size_summary([])
