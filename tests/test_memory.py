"""The memory estimate (`first_lib/pipeline/memory.py`): it covers what LoRA training steps of
the real models measured (`bench/stage-memory-cpu.json`, `scripts/memory_probe.py`), and a
run refuses, in one line and before computing anything, a stage the machine cannot hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from first_lib import flops, pipeline
from first_lib.errors import FirstError
from first_lib.pipeline import clock, memory, runner
from first_lib.profiles import for_setting, get_profile

REPO = Path(__file__).resolve().parents[1]
PROBES = REPO / "bench" / "stage-memory-cpu.json"


def _measured():
    data = json.loads(PROBES.read_text())
    return [p for p in data["probes"] if p.get("peak_memory_gb")]


def test_the_estimate_covers_every_measured_training_step():
    """For every probe of the committed file (real models, LoRA, 8 examples a batch): the
    estimate from today's constants is at least the measured peak and at most 30% above it
    (a looser estimate refuses machines that could run the stage)."""
    probes = _measured()
    assert len(probes) >= 4 and {p["model"] for p in probes} >= {
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
    }
    for p in probes:
        shape = flops.Shape(**p["shape"])
        est = memory.stage_gb(shape, p["params_b"], "train", p["precision"], p["batch_tokens"],
                              {"lora_r": 16, "lora_layers": p["layers"]})  # fmt: skip
        assert p["peak_memory_gb"] <= est <= 1.3 * p["peak_memory_gb"], (p, est)


def test_activations_grow_with_the_batch_and_the_trained_layers():
    shape = flops.shape_of("qwen2.5-coder-1.5b-instruct")
    lora = {"lora_r": 16, "lora_layers": 0}
    one = memory.stage_gb(shape, 1.78, "train", "fp32", 976, lora)
    two = memory.stage_gb(shape, 1.78, "train", "fp32", 2 * 976, lora)
    top8 = memory.stage_gb(shape, 1.78, "train", "fp32", 976, {**lora, "lora_layers": 8})
    half = memory.stage_gb(shape, 1.78, "train", "bf16", 976, lora)
    assert two - one == pytest.approx(one - memory.BASE_GB - 1.78 * 4)
    assert top8 < one and half < one
    assert memory.stage_gb(shape, 1.78, "evaluate", "fp32", 976) < one


@pytest.fixture
def home(tmp_path, monkeypatch):
    from tests.conftest import isolated_home

    home = isolated_home(tmp_path)
    monkeypatch.setenv("FIRST_HOME", str(home))
    return home


def test_a_stage_the_machine_cannot_hold_is_refused_in_one_line(home, monkeypatch):
    """The tiny profile with a machine of 0.5 GB: the run stops before its first stage, naming
    the stage, its estimate and what to change."""
    monkeypatch.setattr(runner, "available_memory_gb", lambda: 0.5)
    with pytest.raises(FirstError, match=r"the stage '.*' of profile tiny .* needs about") as err:
        pipeline.run("tiny", "csqa", log=lambda m: None)
    # what the process holds anyway is more than 0.5 GB: no smaller micro-batch helps
    assert "\n" not in str(err.value) and "bigger machine" in str(err.value)
    assert "batch_size" not in str(err.value)
    assert not list((home / "runs").glob("teacher-*/meta.json"))


def _cpu_without_tables(setting: str):
    """The cpu profile for `setting` without its per-precision micro-batches, at fp32."""
    return for_setting(get_profile("cpu", precision="fp32", per_precision={}), setting)


def test_the_plan_prices_every_model_stage_in_gb(home):
    """`--dry-run` prints each stage's estimated peak, evaluations included: at fp32 the cpu
    profile's BoolQ teacher with 8 questions a micro-batch (passages of up to 320 tokens, all 28
    layers) needs more than a 24 GB machine holds, its OpenBookQA teacher does not."""
    prof = _cpu_without_tables("boolq")
    work = clock.stage_work(prof, "boolq")
    need = clock.memory_needs(prof, "boolq", "fp32", work)
    assert need["teacher"] > 24 > need["finetune"]
    assert all(v > memory.BASE_GB for v in need.values())
    obqa = _cpu_without_tables("obqa")
    assert clock.memory_needs(obqa, "obqa", "fp32", clock.stage_work(obqa, "obqa"))["teacher"] < 24


def test_the_advice_is_a_micro_batch_that_fits_with_the_same_optimizer_steps(home):
    """Over the machine's memory, a training stage is told the largest micro-batch that fits
    (batch size over a power of two, grad_accum times it: the same examples a step), and the
    estimate of the run so changed does fit."""
    assert memory.smaller_batches(30.0, 6.0, 20.0, 8, 1) == (4, 2)  # 6 + 24 / 2 = 18
    assert memory.smaller_batches(30.0, 6.0, 12.0, 8, 2) == (2, 8)  # 6 + 24 / 4 = 12
    assert memory.smaller_batches(30.0, 6.0, 8.0, 8, 1) is None  # 6 + 24 / 8 = 9 > 8
    prof = _cpu_without_tables("boolq")
    work = clock.stage_work(prof, "boolq")
    need = clock.memory_needs(prof, "boolq", "fp32", work)["teacher"]
    node = next(n for n in pipeline.stage_graph(prof, "boolq", "fp32") if n.name == "teacher")
    text = memory.advice(node, prof.teacher, prof.params_b[0], "fp32", need, 24.0)
    assert "--set teacher_train.batch_size=4 --set teacher_train.grad_accum=2" in text
    smaller = for_setting(get_profile("cpu", precision="fp32", per_precision={},
                                      **{"teacher_train.batch_size": 4,
                                         "teacher_train.grad_accum": 2}), "boolq")  # fmt: skip
    again = clock.memory_needs(smaller, "boolq", "fp32", clock.stage_work(smaller, "boolq"))
    assert again["teacher"] <= 24.0 < need


@pytest.mark.parametrize("setting", ["csqa", "boolq", "ood", "obqa", "arc_challenge"])
def test_the_cpu_profile_fits_24_gb_at_either_precision(home, setting):
    """Every stage of the cpu profile, in every setting the book and its appendix run, is
    estimated within 24 GB at fp32 (the profile's `per_precision` table splits the teacher's
    batch where 8 questions would not fit) and at bf16; the table changes nothing at bf16 (the
    keys of the committed bf16 runs stay), and at fp32 only the micro-batch: the same questions
    an optimizer step, the same recipe otherwise."""
    for precision in ("fp32", "bf16"):
        prof = for_setting(get_profile("cpu", precision=precision), setting)
        need = clock.memory_needs(prof, setting, precision, clock.stage_work(prof, setting))
        assert need and max(need.values()) <= 24.0, (precision, need)
    plain = for_setting(get_profile("cpu", precision="bf16", per_precision={}), setting)
    bf16 = for_setting(get_profile("cpu", precision="bf16"), setting)
    assert [n.key for n in pipeline.stage_graph(bf16, setting, "bf16")] == [
        n.key for n in pipeline.stage_graph(plain, setting, "bf16")
    ]
    split, whole = (
        for_setting(get_profile("cpu", precision="fp32", per_precision=p), setting).teacher_train
        for p in (get_profile("cpu").per_precision, {})
    )
    assert split.batch_size * split.grad_accum == whole.batch_size * whole.grad_accum
    assert {**split.key(), "batch_size": 0, "grad_accum": 0} == {
        **whole.key(),
        "batch_size": 0,
        "grad_accum": 0,
    }


def test_a_caller_s_batch_size_replaces_the_precision_table_s_micro_batch():
    """`--set teacher_train.batch_size=8` at fp32 means 8 questions a step as at bf16 (the
    table's accumulation does not multiply it); another training field keeps the table's split."""
    given = for_setting(get_profile("cpu", precision="fp32", **{"teacher_train.batch_size": 8}),
                        "boolq").teacher_train  # fmt: skip
    assert (given.batch_size, given.grad_accum) == (8, 1)
    lr = for_setting(get_profile("cpu", precision="fp32", **{"teacher_train.lr": 2e-4}),
                     "boolq").teacher_train  # fmt: skip
    assert (lr.batch_size, lr.grad_accum, lr.lr) == (4, 2, 2e-4)


def test_a_finished_stage_leaves_no_model_in_the_run_s_accelerator():
    """A run hands one `Accelerator` to every stage, and `prepare` keeps a reference to each
    model and optimizer: the runner's `memory.release(acc)` drops them, so a trained model (and
    its optimizer state) is freed when the stage is over, not at the end of the run."""
    import gc
    import weakref

    from first_lib import device, models, train

    cfg = train.TrainConfig(lr=1e-3, epochs=1, batch_size=4, lora_r=2, lora_targets=("q_proj",))
    examples = [
        {"id": f"x{i}", "input_ids": [2 + (i + t) % 50 for t in range(8)], "target_mask": [1] * 8}
        for i in range(8)
    ]
    acc = device.accelerator("fp32")
    alive = {}
    for release in (False, True):
        model = models.make_tiny_model(64, "student")
        trained, _ = train.train(model, examples, cfg, pad_id=0, accelerator=acc, progress=False)
        ref = weakref.ref(trained)
        del model, trained
        memory.release(acc) if release else gc.collect()
        alive[release] = ref() is not None
    assert alive == {False: True, True: False}  # kept by the accelerator until released
    assert acc._models == [] and acc._optimizers == []


def test_frozen_heap_skips_old_objects_and_collects_them_after():
    import gc
    import weakref

    class Node:
        pass

    def cycle():
        a, b = Node(), Node()
        a.other, b.other = b, a
        return a

    old = cycle()
    old_ref = weakref.ref(old)
    with memory.frozen_heap():
        assert gc.get_freeze_count() > 0
        del old  # dies in a cycle while frozen: not collected during the run
        gc.collect()
        assert old_ref() is not None
        new_ref = weakref.ref(cycle())  # made during the run: collected as usual
        gc.collect()
        assert new_ref() is None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old_ref() is None  # back in the collector's reach after the run


def test_the_plan_covers_every_stage_of_a_measured_run():
    """Every stage of a reduced `cpu` run, all in one process as a run has them (the committed
    file): the plan's price (`stage_gb` plus `RUN_GB`, from today's constants) is at least the
    stage's measured peak and at most 30% above it."""
    data = json.loads((PROBES.parent / "stage-memory-pipeline-cpu-fp32.json").read_text())
    rows = data["stages"]
    assert {r["kind"] for r in rows} == {"train", "extract", "evaluate"}
    for r in rows:
        est = memory.RUN_GB[r["precision"]] + memory.stage_gb(
            flops.Shape(**r["shape"]), r["params_b"], r["kind"], r["precision"],
            r["batch_tokens"], r["train"],
        )  # fmt: skip
        assert r["peak_memory_gb"] <= est <= 1.3 * r["peak_memory_gb"], (r["stage"], est)
    # without the run's share, the students' training was priced below what it held
    assert any(
        memory.stage_gb(flops.Shape(**r["shape"]), r["params_b"], r["kind"], r["precision"],
                        r["batch_tokens"], r["train"]) < r["peak_memory_gb"]
        for r in rows
    )  # fmt: skip
