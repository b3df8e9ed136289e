"""The check that training worked on held-out data (`first_lib.heldout`, `verdicts.held_out_check`)
on TINY RANDOM MODELS and synthetic losses: the loss is training's, it does not depend on how the
examples are batched, a model that learned passes and one that did not fails, and the check
travels from the stage graph to results.json, the lab file and the claims."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from first_lib import evidence_text, heldout, models, train, verdicts
from first_lib.config import TrainConfig
from first_lib.errors import FirstError
from first_lib.profiles import for_setting, get_profile
from tests.test_train import _examples, _model

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _kd_store(examples, k=3, vocab=60, seed=1):
    """A made-up top-k per target position: (ids, probs) of example i, as a store gives them."""
    rng = np.random.default_rng(seed)
    out = []
    for ex in examples:
        n = sum(ex["target_mask"][: len(ex["input_ids"]) - 1])
        ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)])
        probs = rng.dirichlet(np.ones(k), size=n).astype(np.float32)
        out.append((ids.astype(np.int64), probs))
    return lambda i: out[i]


def test_ce_loss_is_the_mean_next_token_nll_of_a_plain_forward():
    """Independent of `TargetRowsLM` and `step_loss`: the model's full logits, log-softmax, the
    next token at each target position, averaged per example."""
    torch.manual_seed(0)
    model, ex = _model().eval(), _examples(7)
    loss, targets = heldout.example_losses(
        model, ex, TrainConfig(loss="ce"), pad_id=0, batch_size=3
    )
    for i, e in enumerate(ex):
        ids = torch.tensor([e["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        pos = [t for t in range(len(e["input_ids"]) - 1) if e["target_mask"][t]]
        want = -np.mean([float(logp[t, e["input_ids"][t + 1]]) for t in pos])
        assert targets[i] == len(pos)
        assert loss[i] == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss_kind", ["ce", "kd"])
def test_losses_do_not_depend_on_the_batching(loss_kind):
    """Right padding and length bucketing leave each example's loss as it is alone (fp32)."""
    model, ex = _model().eval(), _examples(9, seed=3)
    cfg = TrainConfig(loss=loss_kind, transform="ts" if loss_kind == "kd" else "none", coef=0.5)
    teacher = _kd_store(ex) if loss_kind == "kd" else None
    one, n1 = heldout.example_losses(model, ex, cfg, 0, teacher, batch_size=1)
    many, n4 = heldout.example_losses(model, ex, cfg, 0, teacher, batch_size=4)
    assert (n1 == n4).all() and np.isfinite(one).all()
    np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-6)


def test_kd_loss_is_the_training_step_loss_of_the_example_alone():
    model, ex = _model().eval(), _examples(5, seed=4)
    cfg = TrainConfig(loss="kd", transform="ls", coef=0.1)
    teacher = _kd_store(ex)
    loss, _ = heldout.example_losses(model, ex, cfg, 0, teacher, batch_size=5)
    for i in range(len(ex)):
        batch = train.collate(ex, [i], teacher, 0)
        with torch.no_grad():
            logits = train.TargetRowsLM(model)(
                batch["input_ids"], batch["attention_mask"], batch["target_mask"]
            )
        assert loss[i] == pytest.approx(float(train.step_loss(logits, batch, cfg)), rel=1e-5)
    with pytest.raises(FirstError, match="needs the teacher"):
        heldout.example_losses(model, ex, cfg, 0, None)


def test_a_model_trained_on_the_task_passes_and_its_start_does_not():
    """Train a tiny model on examples with a fixed next-token rule; held-out examples of the same
    rule: the tuned model's loss falls (learned), the untuned one against itself does not."""
    rng = np.random.default_rng(0)

    def rule_examples(n, start):
        out = []
        for i in range(n):
            ids = rng.integers(2, 30, size=10).tolist()
            ids[5] = ids[4] + 30  # the target: a token that follows from the one before
            out.append(
                {
                    "id": f"r{start + i}",
                    "input_ids": ids,
                    "target_mask": [t == 4 for t in range(10)],
                }
            )
        return out

    train_ex, held = rule_examples(48, 0), rule_examples(24, 100)
    untuned = models.make_tiny_model(64, size="student", seed=0).eval()
    cfg = TrainConfig(loss="ce", lr=3e-3, epochs=15, batch_size=8, warmup_ratio=0.0, seed=0)
    tuned, _ = train.train(
        copy.deepcopy(untuned), train_ex, cfg, pad_id=0, progress=False, precision="fp32"
    )
    passes = {}
    for name, m in (("tuned", tuned.float().eval()), ("untuned", untuned)):
        loss, targets = heldout.example_losses(m, held, cfg, 0)
        passes[name] = {"ids": [e["id"] for e in held], "loss": loss, "targets": targets}
    record = heldout.compare_models(passes["tuned"], passes["untuned"])
    ok, est = verdicts.held_out_check({0: record}, n_boot=300)
    assert ok and est.lo > 0 and record["mean_drop"] > 0
    same = heldout.compare_models(passes["untuned"], passes["untuned"])
    ok, est = verdicts.held_out_check({0: same}, n_boot=300)
    assert not ok and est.point == 0.0


def _record(drop, n=40, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    untuned = 2.0 + rng.normal(0, 0.5, n)
    tuned = untuned - drop + rng.normal(0, noise, n)
    return {
        "ids": [f"q{i}" for i in range(n)],
        "tuned": tuned.tolist(),
        "untuned": untuned.tolist(),
    }


@pytest.mark.parametrize(("drop", "learned"), [(0.4, True), (0.0, False), (-0.3, False)])
def test_held_out_check_decides_by_the_interval(drop, learned):
    by_seed = {s: _record(drop, seed=s) for s in range(3)}
    ok, est = verdicts.held_out_check(by_seed, n_boot=400)
    assert ok is learned and ok == (est.lo > 0)
    assert est.n_seeds == (3,) and est.n_questions == 40 and est.mde > 0
    assert est.lo <= est.point <= est.hi


def test_held_out_check_refuses_seeds_on_other_examples():
    a, b = _record(0.2), _record(0.2, seed=1)
    b["ids"] = list(reversed(b["ids"]))
    with pytest.raises(FirstError, match="different examples"):
        verdicts.held_out_check({0: a, 1: b})


def test_training_checks_take_the_held_out_check_where_given():
    """A model with a held-out record is judged by it, even when its untuned base is on the
    test (its test is not its task); one without is judged by accuracy, or not at all."""
    from tests.test_verdicts import _records

    rng = np.random.default_rng(2)
    recs = {m: _records(rng.random(200) < p) for m, p in
            [("teacher_base", 0.5), ("teacher", 0.7), ("student_base", 0.4), ("finetune", 0.6),
             ("distill", 0.6)]}  # fmt: skip
    held = {"finetune": {0: _record(0.0)}, "teacher": {0: _record(0.5)}}
    checks = verdicts.training_checks(recs, n_boot=200, held_out=held)
    assert checks["teacher"]["check"] == verdicts.HELD_OUT and checks["teacher"]["learned"]
    assert checks["finetune"]["check"] == verdicts.HELD_OUT and not checks["finetune"]["learned"]
    assert checks["distill"]["check"] == "accuracy"
    no_base = {k: v for k, v in recs.items() if not k.endswith("_base")}
    plain = verdicts.training_checks(no_base, n_boot=200)
    assert all(c["learned"] is None and c["check"] is None for c in plain.values())
    rows = {r["model"]: r for r in evidence_text.check_rows({"ood_csqa": checks})}
    teacher, distill = rows[evidence_text.LABEL["teacher"]], rows[evidence_text.LABEL["distill"]]
    assert teacher["gain from tuning [95% CI]"].endswith("nats") and teacher["learned?"] == "yes"
    assert distill["gain from tuning [95% CI]"].endswith("points")
    testable, note = verdicts.testability(["first_ts", "finetune"], checks)
    assert not testable and "finetune" in note


def test_the_graph_checks_where_no_test_can():
    from first_lib import pipeline

    def kinds(prof, setting):
        return [n for n in pipeline.stage_graph(prof, setting, "fp32") if n.kind == "check"]

    ood = kinds(for_setting(get_profile("cpu"), "ood"), "ood")
    assert [n.variant for n in ood] == ["teacher", "finetune", "distill", "distill_ls", "first_ts"]
    assert kinds(for_setting(get_profile("cpu"), "csqa"), "csqa") == []
    off = for_setting(get_profile("cpu", baselines=False), "csqa")
    assert len(kinds(off, "csqa")) == 5
    # a check is keyed by the model it checks: another training seed, another check
    other = for_setting(get_profile("cpu", seed=1), "ood")
    assert {n.path for n in kinds(other, "ood")}.isdisjoint({n.path for n in ood})
    rows = {
        r["stage"]: r
        for r in pipeline.clock.estimate(for_setting(get_profile("cpu"), "ood"), "ood", "fp32")
    }
    if rows:  # priced where the data is cached: two forward passes over the validation split
        assert rows["check-teacher"]["gflop"] > 0


def test_a_tiny_out_of_domain_run_checks_every_model_and_exports_it(tmp_path):
    out = tmp_path / "ood"
    cmd = [sys.executable, "-m", "first_lib.cli", "run", "--profile", "tiny", "--setting", "ood"]
    subprocess.run([*cmd, "--out", str(out)], check=True, cwd=REPO, capture_output=True)
    res = json.loads((out / "results.json").read_text())
    assert set(res["held_out"]) == {"teacher", "finetune", "distill", "distill_ls", "first_ts"}
    for record in res["held_out"].values():
        assert len(record["ids"]) == len(record["tuned"]) == len(record["untuned"]) > 0
        assert record["mean_drop"] == pytest.approx(
            np.mean(np.subtract(record["untuned"], record["tuned"])), abs=1e-5
        )
    from first_lib import book, lab, lab_export

    # the appendix finds each check's folder under the clock's name for it (time and perf)
    res["_clock"] = json.loads((out / "clock.json").read_text())
    costs = {r["stage"]: r for r in book.stage_costs(res)}
    assert costs["check-teacher"]["estimate_s"] > 0 and costs["check-teacher"]["actual_s"] > 0
    held = book.seed_held_out(res)
    assert set(held["teacher"]) == {0}
    ok, _ = verdicts.held_out_check(held["teacher"], n_boot=200)
    assert ok  # even a tiny teacher fits held-out instructions better after training on them
    path = lab_export.export_records(out, "csqa", tmp_path / "ood-csqa.json.gz")
    data = lab.load_lab_records(path)
    assert data.meta["held_out"]["teacher"]["0"] == res["held_out"]["teacher"]


def test_a_check_is_priced_and_rated_as_a_forward_not_as_training():
    from first_lib.pipeline import clock

    assert clock._stage_role("check-teacher") == ("extract", "teacher")
    assert clock._stage_role("check-distill-ts") == ("extract", "student")
    assert clock._stage_role("distill-ts") == ("train", "student")
    stages = {
        "teacher": {"mfu": 0.6, "peak_gflops": 90.0, "precision": "fp32"},
        "check-finetune": {"mfu": 0.1, "peak_gflops": 90.0, "precision": "fp32"},
    }
    rates = clock.rates_from_stages(stages)["mfu"]
    assert rates["train"] == 0.6 and "train student" not in rates
