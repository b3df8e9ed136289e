"""The claim registry, the training check and the sentences of `first_lib.verdicts`."""

from __future__ import annotations

import numpy as np
import pytest

from first_lib import stats, verdicts
from first_lib.errors import FirstError


def _records(correct, conf=None, ids=None):
    correct = np.asarray(correct, dtype=bool)
    n = correct.size
    conf = np.full(n, 0.6) if conf is None else np.asarray(conf)
    out = []
    for i in range(n):
        p = [conf[i], 1 - conf[i]]
        gold = 0 if correct[i] else 1
        out.append(
            {
                "id": str(ids[i] if ids is not None else i),
                "probs": p,
                "gold": gold,
                "pred": 0,
                "confidence": float(conf[i]),
                "correct": bool(correct[i]),
            }
        )
    return out


def test_primary_family_is_named_in_one_place():
    names = verdicts.primary_names()
    # three competitors x (ECE, accuracy), less the accuracy of post-hoc TS (an identity of the
    # Fine-tune one), and tuning for the teacher and the student
    assert len(names) == len(verdicts.IN_DOMAIN) * (3 * 2 - 1 + 2)
    assert "first_vs_finetune_ece_csqa" in names and "tuning_overconfident_student_boolq" in names
    assert verdicts.is_primary("first_vs_finetune_posthoc_ts_ece_boolq")
    assert not verdicts.is_primary("first_vs_finetune_posthoc_ts_acc_boolq")
    assert not verdicts.is_primary("first_vs_finetune_trust_csqa")
    assert not verdicts.is_primary("first_vs_finetune_ece_ood_csqa")
    # without the post-hoc variant its claims drop out of the family
    short = verdicts.primary_names(variants=("finetune", "distill"))
    assert not any("posthoc" in n for n in short) and len(short) == len(names) - 2


def test_training_check_and_testability():
    rng = np.random.default_rng(0)
    base = _records(rng.random(300) < 0.3)
    good = _records(rng.random(300) < 0.8)
    recs = {"student_base": base, "finetune": good, "first_ts": base, "teacher": good}
    checks = verdicts.training_checks(recs, n_boot=200)
    assert checks["finetune"]["learned"] is True
    assert checks["first_ts"]["learned"] is False
    assert checks["teacher"]["learned"] is None  # no teacher_base: not checked
    assert verdicts.depends_on(["first_ts", "finetune_posthoc_ts"]) == [
        "first_ts",
        "teacher",
        "finetune",
    ]
    ok, why = verdicts.testability(["first_ts", "finetune"], checks)
    assert not ok and "first_ts" in why
    ok, why = verdicts.testability(["finetune"], checks)
    assert ok and why == ""
    ok, why = verdicts.testability(["distill"], checks)  # teacher unchecked
    assert ok and "not checked" in why
    est = stats.compare(good, base, "acc", n_boot=200)
    assert verdicts.verdict_of(est, ["first_ts"], checks) == stats.NOT_TESTABLE
    assert verdicts.verdict_of(est, ["finetune"], checks) == stats.REPRODUCED
    assert verdicts.verdict_of(est, direction="below") == stats.CONTRADICTED


def test_decide_holm_and_combine():
    rng = np.random.default_rng(1)
    a = _records(rng.random(400) < 0.7)
    b = _records(rng.random(400) < 0.5)
    est = stats.compare(a, b, "acc", n_boot=300)
    items = {
        "first_vs_finetune_acc_csqa": {"claim": stats.Claim("above", 0.2, True), "estimate": est},
        "first_vs_distill_acc_csqa": {
            "claim": stats.Claim("above", None, True),
            "estimate": est,
            "testable": False,
        },
        "other": {"claim": stats.Claim("below"), "estimate": est},
    }
    out = verdicts.decide(items)
    assert out["first_vs_finetune_acc_csqa"]["verdict"] == stats.REPRODUCED
    assert out["first_vs_distill_acc_csqa"]["verdict"] == stats.NOT_TESTABLE
    assert out["other"]["verdict"] == stats.CONTRADICTED and out["other"]["p_holm"] is None
    assert verdicts.combine([stats.REPRODUCED] * 3) == stats.REPRODUCED
    assert verdicts.combine([stats.REPRODUCED, stats.TOO_NOISY]) == stats.TOO_NOISY
    assert verdicts.combine([stats.RULES_OUT, stats.RULES_OUT]) == stats.RULES_OUT
    assert verdicts.combine([stats.CONTRADICTED, stats.NOT_TESTABLE]) == stats.NOT_TESTABLE
    with pytest.raises(FirstError):
        verdicts.combine([])


def test_mean_estimate_and_common_questions():
    x = np.r_[np.full(50, 0.97), np.full(50, 0.99)]
    est = verdicts.mean_estimate(x, 0.95, n_boot=200)
    assert est.point == pytest.approx(0.03) and est.lo > 0 and est.mde >= 0
    assert verdicts.verdict_of(est) == stats.REPRODUCED
    a = _records([1, 0, 1], ids=["q1", "q2", "q3"])
    b = _records([1, 1], ids=["q3", "q1"])
    ca, cb = verdicts.common_questions(a, b)
    assert [r["id"] for r in ca] == [r["id"] for r in cb] == ["q1", "q3"]
    with pytest.raises(FirstError):
        verdicts.common_questions(a, _records([1], ids=["z"]))


def test_counts_sentence_names_every_verdict():
    text = verdicts.counts_sentence({stats.REPRODUCED: 2, stats.TOO_NOISY: 1, stats.RULES_OUT: 4})
    assert text.startswith("Of the 7 claims:")
    assert all(verdicts.COUNTED[v] in text for v in stats.VERDICTS)
    assert "4 ruling out the paper's effect size" in text and "rules out" not in text
