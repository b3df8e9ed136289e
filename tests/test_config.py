"""Every config field either changes the computation (an artefact key) or is marked cosmetic and
changes none; the resolved config survives a trip through results.json; the seeds reach training."""

from __future__ import annotations

import dataclasses

import pytest

from first_lib import config, pipeline
from first_lib.config import Profile, TrainConfig
from first_lib.errors import FirstError
from first_lib.profiles import PROFILES, for_setting, get_profile

# A non-default value for every field (each must differ from the value in every profile tested).
PROFILE_VALUES = {
    "name": "other",
    "teacher": "tiny:student",
    "student": "tiny:teacher",
    "n_train": 7,
    "n_val": 5,
    "n_test": 9,
    "k": 3,
    "style": "chat",
    "max_length": 77,
    "extract_batch": 3,
    "eval_batch": 5,
    "n_boot": 17,
    "seed": 3,
    "seeds": (5, 6),
    "data_seed": 4,
    "params_b": (0.1, 0.05),
    "threads": 3,
    "precision": "fp32",
    "baselines": False,
    "ood_tests": ("arc_easy", "piqa"),
    "note": "another note",
    "per_setting": {"csqa": {"n_test": 11}},
    # at either precision, so that it changes a key on every machine
    "per_precision": {"fp32": {"csqa": {"n_test": 12}}, "bf16": {"csqa": {"n_test": 12}}},
}
TRAIN_VALUES = {
    "loss": "ce",  # a fine-tuning config must train with CE: changed through the distill stages
    "lr": 1.234e-3,
    "epochs": 1.5,
    "batch_size": 3,
    "grad_accum": 2,
    "warmup_ratio": 0.2,
    "weight_decay": 0.01,
    "adam_beta1": 0.8,
    "adam_beta2": 0.99,
    "adam_eps": 1e-7,
    "max_grad_norm": 0.5,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_layers": 1,
    "lora_targets": ("q_proj",),
    "train_embeddings": False,
    "kd_normalize": "tail",
    "kd_reduction": "sum_per_batch",
    "transform": "none",  # set by the distill stages themselves
    "coef": 1.0,  # likewise
    "seed": 5,
    "save_every": 2,
    "max_steps": 3,
}
SET_BY_STAGES = {"loss", "transform", "coef"}  # the graph sets these for each distill stage


def _keys(prof: Profile, setting: str = "csqa") -> dict[str, str]:
    """Folder name of every artefact of the run at the precision it resolves to here (names hash
    the keys)."""
    return {n.name: n.path.name for n in pipeline.stage_graph(prof, setting)}


def test_every_field_has_help_and_a_test_value():
    for cls, values in ((Profile, PROFILE_VALUES), (TrainConfig, TRAIN_VALUES)):
        names = {f.name for f in dataclasses.fields(cls)}
        assert names == set(values) | ({"teacher_train", "student_train"} & names), cls
        assert all(config.help_of(cls).values()), f"a field of {cls.__name__} has no help"


@pytest.mark.parametrize("field", sorted(PROFILE_VALUES))
def test_a_profile_field_changes_the_keys_unless_cosmetic(field):
    base = for_setting(PROFILES["tiny"], "csqa")
    other = for_setting(
        dataclasses.replace(PROFILES["tiny"], **{field: PROFILE_VALUES[field]}), "csqa"
    )
    before, after = _keys(base), _keys(other)
    if field in config.cosmetic_fields(Profile):
        assert before == after, f"cosmetic {field} changed a key"
    elif field == "baselines":  # the untuned models' evaluations go, checks on held-out data come
        checks = {n for n in after if n.startswith("check-")}
        assert set(after) - checks < set(before) and checks and not checks & set(before)
    elif field == "ood_tests":  # in domain nothing; out of domain other evaluations, same keys
        assert before == after
        ood, other_ood = _keys(base, "ood"), _keys(other, "ood")
        assert {n.split(" on ")[-1] for n in other_ood if n.startswith("evaluate ")} == {
            "arc_easy",
            "piqa",
        }
        assert ood["teacher"] != other_ood["teacher"]  # the tiny tokenizer reads the test sets
    elif field == "precision" and pipeline.run_precision(base) == "fp32":  # fp32 here already
        assert before == after and _keys(dataclasses.replace(base, precision="bf16")) != before
    else:
        changed = [name for name in before if before[name] != after.get(name)]
        assert changed, f"{field} changed no artefact key"


@pytest.mark.parametrize("role", ["teacher_train", "student_train"])
@pytest.mark.parametrize("field", sorted(set(TRAIN_VALUES) - SET_BY_STAGES))
def test_a_training_field_changes_the_keys_unless_cosmetic(role, field):
    base = PROFILES["tiny"]
    value = TRAIN_VALUES[field]
    if field == "seed":  # the training seed is the profile's (one seed for every model)
        with pytest.raises(FirstError, match="--set seed=N"):
            get_profile("tiny", **{f"{role}.seed": value})
        return
    cfg = dataclasses.replace(getattr(base, role), **{field: value})
    other = dataclasses.replace(base, **{role: cfg})
    before, after = _keys(base), _keys(other)
    changed = {name for name in before if before[name] != after[name]}
    if field in config.cosmetic_fields(TrainConfig):
        assert not changed, f"cosmetic {role}.{field} changed {changed}"
        return
    # a teacher field changes the teacher and all that depends on it; a student field the
    # four students and their evaluations, never the teacher
    assert changed, f"{role}.{field} changed no artefact key"
    assert ("teacher" in changed) == (role == "teacher_train")
    if role == "student_train":
        assert {"finetune", "distill-none", "distill-ls", "distill-ts"} <= changed


def test_each_distill_stage_trains_with_kd_and_its_transform():
    nodes = {n.stage: n for n in pipeline.stage_graph(PROFILES["tiny"], "csqa", "fp32")}
    for variant, transform in pipeline.TRANSFORM_OF.items():
        node = nodes[f"distill-{transform}"]
        assert node.variant == variant and node.train.loss == "kd"
        assert node.train.transform == transform and node.key["train"]["coef"] == "calibrate"


def test_the_seed_reaches_every_training_config_and_not_the_questions():
    prof = for_setting(get_profile("tiny", seed=2), "csqa")
    assert prof.teacher_train.seed == prof.student_train.seed == 2
    base = for_setting(get_profile("tiny"), "csqa")
    assert pipeline.load_questions(prof, "csqa") == pipeline.load_questions(base, "csqa")
    a, b = _keys(base), _keys(prof)
    assert a["teacher"] != b["teacher"] and a["finetune"] != b["finetune"]
    # the untuned baselines are the same models on the same questions: shared across seeds
    assert a["evaluate student_base on csqa"] == b["evaluate student_base on csqa"]
    other_data = for_setting(get_profile("tiny", data_seed=2), "csqa")
    assert pipeline.load_questions(other_data, "csqa") != pipeline.load_questions(base, "csqa")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_a_profile_survives_results_json(name):
    import json

    prof = for_setting(get_profile(name, seed=1), "csqa")
    back = config.profile_from_dict(json.loads(json.dumps(prof.to_dict())))
    assert back == prof


def test_the_task_names_are_the_data_wheels_tasks():
    """`config.TASK_NAMES` (which the profile checks read) is `tasks.TASKS`, in its order."""
    from first_lib import tasks

    assert config.TASK_NAMES == tuple(tasks.TASKS)


def test_a_recorded_config_with_an_unknown_field_is_refused():
    with pytest.raises(FirstError, match="unknown profile field 'colour'"):
        config.profile_from_dict({**PROFILES["tiny"].to_dict(), "colour": "red"})


def test_config_imports_nothing_of_the_project_but_errors():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(config.__file__).read_text())
    imported = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("first_lib")
    }
    assert imported <= {"first_lib.errors"}


@pytest.mark.parametrize("seeds", [(), (1, 1), (1.5,)])
def test_seeds_must_be_distinct_integers(seeds):
    with pytest.raises(FirstError, match="seeds"):
        Profile(seeds=seeds)


def test_a_float_field_given_an_int_is_one_key_with_the_float():
    a, b = TrainConfig(epochs=2, lr=1), TrainConfig(epochs=2.0, lr=1.0)
    from first_lib.artefacts import config_hash

    assert isinstance(a.epochs, float) and isinstance(a.lr, float)
    assert config_hash(config.key_dict(a)) == config_hash(config.key_dict(b))


def test_a_recorded_cpu_config_reads_back_with_its_precision_table():
    """results.json holds the whole profile as JSON: the cpu profile's `per_precision` training
    configs come back as `TrainConfig`s (so a recorded run's profile equals the built-in one)."""
    import json

    prof = get_profile("cpu")
    assert prof.per_precision["fp32"]["boolq"]["teacher_train"].grad_accum == 2
    assert config.profile_from_dict(json.loads(json.dumps(prof.to_dict()))) == prof
    with pytest.raises(FirstError, match="unknown profile key 'n_trian' in per_precision"):
        for_setting(get_profile("tiny", precision="fp32",
                                per_precision={"fp32": {"csqa": {"n_trian": 3}}}), "csqa")  # fmt: skip
