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


def test_the_prior_is_per_precision_and_per_model(home):
    """Without records here each precision has its own prior, per kind of stage and, where the
    committed rates differ, per model role; every stage of the fp32 probe ran alone, at fp32, at
    the real architectures (stages that shared the machine are left out by its writer)."""
    probe = json.loads((BENCH / "stage-rates-cpu-fp32.json").read_text())
    for kind in ("train", "extract", "evaluate"):
        for precision in ("fp32", "bf16"):
            gflops, basis = clock.rate(kind, precision)
            assert gflops == pytest.approx(1000.0 * clock.PRIOR_MFU[precision][kind])
            assert f"prior at {precision}" in basis
    for precision in ("fp32", "bf16"):
        priors = clock.PRIOR_MFU[precision]
        for role in ("teacher", "student"):
            gflops, _ = clock.rate("train", precision, role=role)
            assert gflops == pytest.approx(1000.0 * priors[f"train {role}"])
    assert clock.PRIOR_MFU["bf16"]["train student"] < clock.PRIOR_MFU["bf16"]["train teacher"]
    stages = probe["stages"].values()
    assert all(
        s["precision"] == "fp32" and s["other_cores"] <= flops.CONTENDED_CORES for s in stages
    )
    assert probe["left_out_shared"] == []


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
        set(per) - {"beyond_k"}  # the beyond_k chapter's study on top of the CSQA run
        == set(profiles.book_settings())
        == {"csqa", "boolq", "ood", "obqa", "arc_challenge"}
    )
    assert per["beyond_k"] > 0


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


BENCH = __import__("pathlib").Path(__file__).resolve().parents[1] / "bench"


def test_the_priors_are_the_committed_rates_files():
    """Each precision's prior is the `rates` block of its committed file: fp32's the medians of
    its recorded stages, bf16's derived from the AMX Xeon's written-down stage times. The
    derivation is redone here from the counted FLOPs: every observation with a recorded `mfu`
    puts the machine's peak within 10% of the others' (a stage whose time or share was written
    down wrong would stand out), and the rates are the medians of what the observations say."""
    import copy

    from scripts import stage_rates

    fp32 = json.loads((BENCH / "stage-rates-cpu-fp32.json").read_text())
    assert fp32["rates"] == clock.rates_from_stages(fp32["stages"])
    assert clock.PRIOR_MFU["fp32"] == fp32["rates"]["mfu"]
    amx = json.loads((BENCH / "stage-rates-cpu-bf16-amx.json").read_text())
    assert stage_rates.derive(copy.deepcopy(amx)) == amx
    assert clock.PRIOR_MFU["bf16"] == amx["rates"]["mfu"]
    peaks = [o["peak_gflops"] for o in amx["observed"] if o.get("mfu") is not None]
    assert len(peaks) >= 4
    assert all(abs(p / amx["rates"]["peak_gflops"] - 1) < 0.10 for p in peaks), peaks
    # the students' LoRA training reaches a smaller share of the peak than the teacher's
    mfu = amx["rates"]["mfu"]
    assert mfu["train student"] < mfu["train teacher"]
    # a wrong observation moves the derived peak out of line
    bad = copy.deepcopy(amx)
    bad["observed"][0]["seconds"] *= 1.5
    bad = stage_rates.derive(bad)
    assert abs(bad["observed"][0]["peak_gflops"] / bad["rates"]["peak_gflops"] - 1) > 0.10


def test_a_run_is_priced_for_the_machine_of_a_rates_file(home, tmp_path):
    """With `rates` each stage costs its FLOPs over that machine's peak times the share its kind
    and model reached there (not this machine's peak), from an empty cache."""
    rates = clock.Rates(
        "a test machine",
        "bf16",
        2000.0,
        {"train": 0.4, "train teacher": 0.5, "extract": 0.8, "evaluate": 0.8},
    )
    prof = for_setting(get_profile("cpu", precision="bf16"), "csqa")
    here = {r["stage"]: r for r in clock.estimate(prof, "csqa", "bf16")}
    there = {r["stage"]: r for r in clock.estimate(prof, "csqa", rates=rates)}
    for stage, share in (("teacher", 0.5), ("finetune", 0.4), ("extract", 0.8)):
        r = there[stage]
        load = r["seconds"] - r["gflop"] / (2000.0 * share)
        assert 0 < load < 30, (stage, load)  # what is left is loading and saving
        assert "measured on a test machine" in r["basis"]
        assert r["gflop"] == here[stage]["gflop"]
    assert there["teacher"]["seconds"] < here["teacher"]["seconds"]  # 1000 GFLOP/s here
    for r in there.values():
        r["done"] = True  # done here says nothing of the other machine
    text = clock.describe(list(there.values()), rates)
    assert "from an empty cache" in text and "a test machine" in text
    assert f"{clock.total_minutes(list(there.values()), only_missing=False):.1f} min" in text
    total, per = clock.book_estimate("cpu", "fp32", rates=rates)
    assert set(per) == {*profiles.book_settings(), "beyond_k"}
    assert total == pytest.approx(sum(per.values()))
    # the beyond_k study: eight students and their evaluations, two extraction-like passes
    from first_lib.beyond import study

    rows = clock.study_rows("cpu", "bf16", rates=rates)
    price = {r["artefact"]: r["estimate_s"] for r in rows}
    assert sum(a.startswith("student ") for a in price) == 8
    assert price["student top-10"] == pytest.approx(there["distill-none"]["seconds"])
    assert price["evaluate top-10"] == pytest.approx(there["evaluate distill on csqa"]["seconds"])
    assert price["extract top-50"] == price["sample the teacher"] == there["extract"]["seconds"]
    assert per["beyond_k"] == pytest.approx(study.minutes(rows, only_missing=False))


def test_the_rates_option_of_the_dry_runs(home, tmp_path, capsys):
    from first_lib.cli import main
    from scripts import build_book

    amx = str(BENCH / "stage-rates-cpu-bf16-amx.json")
    args = ["run", "--profile", "cpu", "--setting", "obqa", "--dry-run", "--rates", amx]
    assert main(args + ["--seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    assert "on Intel(R) Xeon(R) Processor, 2 cores at bf16, from an empty cache" in out
    assert "all seeds:" in out
    assert main(["run", "--profile", "cpu", "--setting", "obqa", "--rates", amx]) == 2
    assert "goes with --dry-run" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(args[:-1] + [str(bad)]) == 2
    assert "not a rates file" in capsys.readouterr().err
    no_eval = json.loads((BENCH / "stage-rates-cpu-bf16-amx.json").read_text())
    del no_eval["rates"]["mfu"]["evaluate"]
    bad.write_text(json.dumps(no_eval))
    assert main(args[:-1] + [str(bad)]) == 2
    assert "missing or not positive: ['evaluate']" in capsys.readouterr().err
    assert build_book.main(["--dry-run", "--rates", amx]) == 0
    out = capsys.readouterr().out
    assert "runs from an empty cache" in out and "beyond_k" in out and " h) on Intel" in out


def test_the_floor_is_the_books_work_at_a_machines_peak(home):
    """`book_work` counts each artefact's FLOPs once (as `book_estimate` counts its minutes), and
    the floor, the work over a machine's peak, lies below the estimate for that machine by the
    stages' loading and saving alone when every stage reaches the whole peak, and further below
    at the shares stages really reach."""
    full = clock.Rates("a test machine", "bf16", 2000.0, {"train": 1, "extract": 1, "evaluate": 1})
    rows = clock.book_rows("cpu", "bf16", rates=full)
    per = clock.book_work("cpu", "bf16", rows=rows)
    assert set(per) == {*profiles.book_settings(), "beyond_k"} and min(per.values()) > 0
    # the untuned models' evaluations serve every training seed: counted once
    csqa = [(r["artefact"], r["gflop"]) for r in rows["csqa"]]
    assert len(dict(csqa)) < len(csqa)
    assert per["csqa"] == pytest.approx(sum(dict(csqa).values()))
    assert per["csqa"] < sum(g for _, g in csqa)
    # the study prices its students as the run's plain distillation, FLOPs and minutes alike
    study = {r["artefact"]: r for r in rows["beyond_k"]}
    distill = next(r for r in rows["csqa"] if r["stage"] == "distill-none")
    assert study["student top-10"]["gflop"] == distill["gflop"]
    assert study["student top-10"]["estimate_s"] == distill["seconds"]
    total_min, _ = clock.book_estimate("cpu", "bf16", rates=full, rows=rows)
    floor = clock.floor_minutes(sum(per.values()), full.peak_gflops)
    unique = {r["artefact"]: r for k, rs in rows.items() if k != "beyond_k" for r in rs}
    loading = [r["seconds"] - r["gflop"] / 2000.0 for r in unique.values()]
    assert all(-0.1 <= s < 60 for s in loading)  # seconds are rounded to 0.1
    loading_min = (
        sum(loading) / 60
        + sum(r["estimate_s"] - r["gflop"] / 2000.0 for r in rows["beyond_k"]) / 60
    )
    assert floor < total_min
    assert total_min - floor == pytest.approx(loading_min, abs=0.05)
    real = clock.Rates(
        "a test machine", "bf16", 2000.0, {"train": 0.4, "extract": 0.8, "evaluate": 0.8}
    )
    slower, _ = clock.book_estimate("cpu", "bf16", rates=real)
    assert slower > total_min + 0.5 * floor  # a share of 0.4 or 0.8 costs more than the floor
    assert clock.floor_minutes(6000.0, 100.0) == 1.0


def test_known_peaks_come_from_the_committed_bench_files(tmp_path):
    """Each bench result gives its machine's peak at the precision it ran; each rates file its
    peak; anything else under bench/ is skipped."""
    import shutil

    cpu = {
        "cpu": "AMD EPYC",
        "cores": 2,
        "gpu": None,
        "precision": "bf16",
        "precision_auto_would_pick": "bf16",
    }
    (tmp_path / "results-cpu.json").write_text(
        json.dumps(
            {
                "machine": cpu,
                "precision": "bf16",
                "matmul_peak_gflops": {"bf16": 432.0, "fp32": 162.0},
            }
        )
    )
    gpu = {"cpu": "x", "gpu": "NVIDIA H200", "precision": "bf16"}
    (tmp_path / "results-gpu.json").write_text(
        json.dumps(
            {"machine": gpu, "precision": "bf16", "matmul_peak_gflops": {"bf16": 8e5, "fp32": 5e4}}
        )
    )
    (tmp_path / "results-old.json").write_text(json.dumps({"machine": cpu, "precision": "bf16"}))
    (tmp_path / "results-broken.json").write_text("{")
    (tmp_path / "stage-rates-bad.json").write_text("{}")
    shutil.copy(BENCH / "stage-rates-cpu-bf16-amx.json", tmp_path / "stage-rates-amx.json")
    found = clock.known_peaks(tmp_path)
    assert [(p["machine"], p["precision"], p["peak_gflops"]) for p in found] == [
        ("AMD EPYC, 2 cores (native bf16)", "bf16", 432.0),
        ("Intel(R) Xeon(R) Processor, 2 cores", "bf16", 1223.2),
        ("NVIDIA H200", "bf16", 8e5),
    ]
    assert [p["source"] for p in found] == [
        "results-cpu.json",
        "stage-rates-amx.json",
        "results-gpu.json",
    ]
