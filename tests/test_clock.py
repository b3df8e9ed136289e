"""The plan with a clock (first_lib/clock.py): estimated minutes per stage before a run."""

from __future__ import annotations

import json

import pytest

from first_lib import flops, pipeline, profiles
from first_lib.pipeline import clock
from first_lib.profiles import for_setting, get_profile
from tests.conftest import isolated_home


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = isolated_home(tmp_path)
    monkeypatch.setenv("FIRST_HOME", str(home))
    monkeypatch.setattr(flops, "measure_peak_gflops", lambda p, d="cpu", seconds=0.5: 1000.0)
    return home


def _rows(profile="cpu", setting="csqa", **over):
    prof = for_setting(get_profile(profile, precision="bf16", **over), setting)
    return {r["stage"]: r for r in clock.estimate(prof, setting, "bf16")}


def test_every_stage_and_evaluation_has_an_estimate(home):
    rows = _rows()
    stages = [s["stage"] for s in pipeline.plan(get_profile("cpu"), "csqa", "bf16")]
    evals = [f"evaluate {n} on csqa" for n in (*pipeline.VARIANTS, "teacher_base", "student_base")]
    evals += [f"evaluate {n} on validation" for n in pipeline.POSTHOC.values()]
    evals += [f"posthoc {n} on csqa" for n in pipeline.POSTHOC]
    assert set(rows) == set(stages) | set(evals)
    assert all(not r["done"] for r in rows.values())
    assert all(r["seconds"] > 0 for r in rows.values())
    # the 1.5B teacher costs more per step than the 0.5B student on the same data and depth
    same = _rows(**{"student_train.lora_layers": 8})
    assert same["teacher"]["gflop"] > 2 * same["finetune"]["gflop"]
    # ... and all 24 of the student's layers cost more than its top 8
    assert rows["finetune"]["gflop"] > 1.5 * same["finetune"]["gflop"]
    assert (
        rows["evaluate teacher on csqa"]["gflop"] > 2 * rows["evaluate finetune on csqa"]["gflop"]
    )


def test_estimates_scale_with_the_work(home):
    small, large = _rows(n_train=64), _rows(n_train=128)
    ratio = large["finetune"]["gflop"] / small["finetune"]["gflop"]
    assert 1.7 < ratio < 2.3  # twice the questions, about twice the FLOPs
    assert (
        large["evaluate finetune on csqa"]["gflop"] == small["evaluate finetune on csqa"]["gflop"]
    )
    deeper = _rows(**{"student_train.lora_layers": 24})
    assert deeper["finetune"]["gflop"] > small["finetune"]["gflop"]


def test_this_machines_records_replace_the_prior(home):
    _, basis = clock.rate("train", "bf16")
    assert "prior" in basis
    folder = home / "runs" / "finetune-abc"
    folder.mkdir(parents=True)
    student = flops.shape_of("qwen2.5-coder-0.5b-instruct")
    perf = {"mfu": 0.4, "precision": "bf16", "kind": "train", "shape": student.to_dict()}
    (folder / "meta.json").write_text(json.dumps({"perf": perf}))
    gflops, basis = clock.rate("train", "bf16", shape=student)
    assert gflops == pytest.approx(400.0) and "upper quartile of 1" in basis
    assert "prior" in clock.rate("train", "fp32", shape=student)[1]  # another precision's
    teacher = flops.shape_of("qwen2.5-coder-1.5b-instruct")
    assert "prior" in clock.rate("train", "bf16", shape=teacher)[1]  # another model's


def test_the_prior_is_per_precision_and_fp32_is_the_recorded_probe(home):
    """Without records here each precision has its own prior; fp32's are the medians of the
    stage rates committed in bench/stage-rates-cpu-fp32.json (the real architectures on an AVX2
    CPU, alone), to the two digits the table keeps."""
    from pathlib import Path

    probe = json.loads(
        (Path(__file__).resolve().parents[1] / "bench" / "stage-rates-cpu-fp32.json").read_text()
    )
    for kind in ("train", "extract", "evaluate"):
        assert clock.PRIOR_MFU["fp32"][kind] == pytest.approx(probe["median_mfu"][kind], abs=0.006)
        for precision in ("fp32", "bf16"):
            gflops, basis = clock.rate(kind, precision)
            assert gflops == pytest.approx(1000.0 * clock.PRIOR_MFU[precision][kind])
            assert f"prior at {precision}" in basis
    # every stage of the probe ran alone, at fp32, at the real architectures
    stages = probe["stages"].values()
    assert all(
        s["precision"] == "fp32" and s["other_cores"] <= flops.CONTENDED_CORES for s in stages
    )
    medians = {}
    for name, s in probe["stages"].items():
        kind = (
            "evaluate"
            if name.startswith("evaluate")
            else "extract"
            if name == "extract"
            else "train"
        )
        medians.setdefault(kind, []).append(s["mfu"])
    import statistics

    assert {k: statistics.median(v) for k, v in medians.items()} == probe["median_mfu"]


def test_a_stage_that_shared_the_machine_does_not_set_the_rate(home):
    student = flops.shape_of("qwen2.5-coder-0.5b-instruct")
    for name, mfu, other in (("finetune-alone", 0.4, 0.02), ("finetune-shared", 0.1, 1.1)):
        folder = home / "runs" / name
        folder.mkdir(parents=True)
        perf = {
            "mfu": mfu,
            "precision": "bf16",
            "kind": "train",
            "shape": student.to_dict(),
            "other_cores": other,
        }
        (folder / "meta.json").write_text(json.dumps({"perf": perf}))
    assert clock.recorded_mfu("train", "bf16", shape=student) == [0.4]
    gflops, basis = clock.rate("train", "bf16", shape=student)
    assert gflops == pytest.approx(400.0) and "upper quartile of 1" in basis


def test_done_stages_cost_nothing_and_shared_artefacts_count_once(home):
    rows = list(_rows().values())
    assert clock.total_minutes(rows) == pytest.approx(sum(r["seconds"] for r in rows) / 60)
    for r in rows:
        r["done"] = True
    assert clock.total_minutes(rows) == 0
    total, per = clock.book_estimate("cpu", "bf16")
    # the untuned pair's evaluations on CSQA are shared by the csqa and ood settings
    assert total < sum(per.values()) + 1e-9 or total == pytest.approx(sum(per.values()))
    assert (
        set(per)
        == set(profiles.book_settings())
        == {"csqa", "boolq", "ood", "obqa", "arc_challenge"}
    )


def test_dry_run_prints_minutes(home, capsys):
    from first_lib.cli import main

    assert main(["run", "--profile", "cpu", "--setting", "csqa", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "estimated time still to compute" in out and " min " in out


def test_unknown_architecture_says_so(home):
    prof = get_profile("paper")
    assert clock.estimate(prof, "csqa", "bf16") == []
    assert "not estimated" in clock.describe([])


def test_the_book_estimate_counts_every_training_seed(home):
    """A setting that runs three training seeds costs its first seed plus two more of everything
    a seed trains (the untuned baselines' evaluations are shared): not one seed's time."""
    from first_lib.profiles import for_setting, get_profile

    _, per = clock.book_estimate("cpu", "bf16", settings=["csqa"])
    seeds = for_setting(get_profile("cpu"), "csqa").seeds
    assert len(seeds) == 3
    first_seed = clock.estimate(for_setting(get_profile("cpu"), "csqa"), "csqa", "bf16")
    one = clock.total_minutes(first_seed)
    shared = sum(r["seconds"] / 60 for r in first_seed if r["stage"].endswith("_base on csqa"))
    assert shared > 0
    assert per["csqa"] == pytest.approx(3 * one - 2 * shared)
