"""Every multiple-choice task of the data wheel is a setting (trained, validated and tested on its
own splits), and the out-of-domain setting tests on any of them (`ood_tests`); the book's three
settings keep the keys they had before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from first_lib import pipeline
from first_lib.config import TASK_NAMES
from first_lib.errors import FirstError
from first_lib.pipeline import data  # its `test_tasks` is no test of this file
from first_lib.pipeline.stale import live_artefacts
from first_lib.profiles import PROFILES, SETTINGS, all_settings, for_setting, get_profile
from tests.conftest import isolated_home

REPO = Path(__file__).resolve().parents[1]


def _tested_on(prof, setting: str) -> set[str]:
    """The test sets the evaluate nodes of a run's graph name (the validation split left out)."""
    nodes = pipeline.stage_graph(prof, setting, "fp32")
    return {n.reads[0] for n in nodes if n.kind == "evaluate"} - {"validation"}


def test_every_task_is_a_setting_after_the_books_three():
    assert all_settings() == SETTINGS + tuple(t for t in TASK_NAMES if t not in SETTINGS)
    assert set(TASK_NAMES) < set(all_settings())


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("task", TASK_NAMES)
def test_a_task_setting_builds_its_graph_in_domain(profile, task):
    """The graph of a task's setting: the models train on that task and are tested on its test
    split; post-hoc TS fits on its validation questions."""
    prof = for_setting(get_profile(profile), task)
    nodes = pipeline.stage_graph(prof, task, "fp32")
    assert _tested_on(prof, task) == {task} and data.test_tasks(prof, task) == [task]
    assert next(n for n in nodes if n.stage == "teacher").key["data"]["setting"] == task
    validation = [n for n in nodes if n.kind == "evaluate" and n.reads == ("validation",)]
    assert validation and {n.key["test"] for n in validation} == {f"{task}-validation"}
    assert {n.name for n in nodes if n.kind == "posthoc"} == {
        f"posthoc {name} on {task}" for name in pipeline.POSTHOC
    }


def test_an_unknown_setting_is_one_line_naming_the_valid_ones():
    with pytest.raises(FirstError) as err:
        for_setting(get_profile("tiny"), "squad")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("unknown setting 'squad'; choose one of ")
    assert msg.endswith(", ".join(all_settings()))


def test_ood_tests_on_the_tasks_it_names():
    base = for_setting(get_profile("cpu"), "ood")
    assert _tested_on(base, "ood") == {"csqa", "obqa"}  # the paper's pair by default
    # as `--set ood_tests='["arc_easy","piqa"]'` gives it (JSON-decoded)
    prof = for_setting(get_profile("cpu", ood_tests=["arc_easy", "piqa"]), "ood")
    assert prof.ood_tests == ("arc_easy", "piqa")
    assert data.test_tasks(prof, "ood") == ["arc_easy", "piqa"]
    assert _tested_on(prof, "ood") == {"arc_easy", "piqa"}
    names = {n.name for n in pipeline.stage_graph(prof, "ood", "fp32")}
    assert {
        f"evaluate {v} on {t}" for v in pipeline.VARIANTS for t in ("arc_easy", "piqa")
    } <= names


def test_ood_tests_leaves_every_other_key_alone():
    """The models of a real profile are the same whatever `ood_tests` lists, and so is a test
    set's evaluation in both lists (evaluations are keyed by their test set, not the list); an
    in-domain setting ignores the field."""
    base = for_setting(get_profile("cpu"), "ood")
    other = for_setting(get_profile("cpu", ood_tests=["csqa", "hellaswag"]), "ood")
    a = {n.name: n.path.name for n in pipeline.stage_graph(base, "ood", "fp32")}
    b = {n.name: n.path.name for n in pipeline.stage_graph(other, "ood", "fp32")}
    assert {name: a[name] for name in a if "on obqa" not in name} == {
        name: b[name] for name in b if "on hellaswag" not in name
    }
    csqa = get_profile("cpu", ood_tests=["piqa"])
    assert pipeline.run_artefacts(for_setting(csqa, "csqa"), "csqa", "fp32") == (
        pipeline.run_artefacts(for_setting(get_profile("cpu"), "csqa"), "csqa", "fp32")
    )


def test_tiny_models_of_other_ood_tests_are_other_models():
    """The tiny models' tokenizer is trained on the test prompts too: another list of test sets
    makes other tiny models, and the models trained from them get other keys."""
    base = for_setting(get_profile("tiny"), "ood")
    other = for_setting(get_profile("tiny", ood_tests=["piqa"]), "ood")
    a = {n.stage: n.path.name for n in pipeline.stage_graph(base, "ood", "fp32")}
    b = {n.stage: n.path.name for n in pipeline.stage_graph(other, "ood", "fp32")}
    for stage in ("tiny-models", "teacher", "extract", "finetune", "distill-ts"):
        assert a[stage] != b[stage], stage


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (["csqa", "squad"], "ood_tests: unknown task 'squad'; choose among csqa, boolq, obqa"),
        ([], "ood_tests is empty"),
        (["piqa", "piqa"], "names a task twice"),
        ("piqa", "expects a list"),
        ([1], "expects a list of strings"),
    ],
)
def test_a_bad_ood_tests_is_refused(value, match):
    with pytest.raises(FirstError, match=match) as err:
        get_profile("tiny", ood_tests=value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_books_settings_keep_their_data_keys(profile):
    """The data key of csqa, boolq and ood is what it was before any task could be a setting
    (the formula of that version, written out), so the book's cached runs stay current."""
    for setting in SETTINGS:
        prof = for_setting(get_profile(profile), setting)
        tiny = prof.teacher.startswith("tiny:")
        assert data.data_key(prof, setting) == {
            "prompts": data.prompt_fingerprint(),
            "setting": setting,
            "n": [prof.n_train, prof.n_val],
            "data_seed": prof.data_seed,
            "style": prof.style,
            "max_length": prof.max_length,
            "tokenizer": "tiny" if tiny else prof.teacher,
        }
        nodes = pipeline.stage_graph(prof, setting, "fp32")
        teacher = next(n for n in nodes if n.stage == "teacher")
        assert set(teacher.key) == {"source", "data", "train", "precision", "code"}
        tiny_models = [n.key for n in nodes if n.kind == "tiny-models"]
        assert all("tests" not in key for key in tiny_models)


def test_clean_keeps_the_runs_of_every_setting():
    """`first clean` counts every valid setting live (the extra tasks' runs are current), and out
    of domain an evaluation on any task of a built-in profile's models."""
    live = live_artefacts()
    for profile in PROFILES.values():
        for setting in all_settings():
            for precision in ("fp32", "bf16"):
                for seed in profile.seeds:  # every training seed, not only the first,
                    # built as `first run --seeds --precision P` builds it (the seed reaches the
                    # training configs; the precision picks the profile's per_precision values)
                    args = dict(seed=seed, precision=precision)
                    prof = for_setting(get_profile(profile.name, **args), setting)
                    made = pipeline.run_artefacts(prof, setting, precision)
                    assert made <= live, (profile.name, setting, precision, seed)
    # at the precision it is asked for, as `--precision bf16` builds it (not the machine's or
    # $FIRST_PRECISION's: under FIRST_PRECISION=fp32 that would read the fp32 table)
    prof = get_profile("cpu", ood_tests=["winogrande"], precision="bf16")
    assert pipeline.run_artefacts(for_setting(prof, "ood"), "ood", "bf16") <= live


def test_a_tiny_run_of_another_task(tmp_path):
    """`first run --profile tiny --setting piqa`: trained, validated and tested on PIQA, and
    every artefact it made is live for `first clean`."""
    env = {**os.environ, "FIRST_HOME": str(isolated_home(tmp_path)), "TQDM_DISABLE": "1"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "first_lib.cli", "run", "--profile", "tiny"]
    cmd += ["--setting", "piqa", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["setting"] == "piqa" and list(res["by_test"]) == ["piqa"]
    assert res["n_test"] == res["by_test"]["piqa"]["n_test"] == PROFILES["tiny"].n_test
    assert set(res["variants"]) == set(pipeline.VARIANTS) | set(pipeline.POSTHOC)
    assert all(0 <= v["acc"] <= 1 for v in res["variants"].values())
    clean = [sys.executable, "-m", "first_lib.cli", "clean"]
    listed = subprocess.run(clean, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert listed.returncode == 0 and "0 entries" in listed.stdout, listed.stdout


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    """One FIRST_HOME for the tiny runs of every task (the tiny models are built once)."""
    return isolated_home(tmp_path_factory.mktemp("every-task"))


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_NAMES)
def test_a_tiny_run_of_every_task(task, tiny_home, tmp_path):
    """`first run --profile tiny --setting TASK` for every shipped multiple-choice task: trained,
    validated and tested on the task's own splits, every variant evaluated (the default suite
    runs one such task, PIQA, above, and the chapters CSQA, BoolQ, OpenBookQA and ARC-Challenge;
    `make test-slow` runs them all, ~20 s each at fp32 on a 2-core AVX2 CPU)."""
    env = {**os.environ, "FIRST_HOME": str(tiny_home), "TQDM_DISABLE": "1"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "first_lib.cli", "run", "--profile", "tiny"]
    cmd += ["--setting", task, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    assert res["setting"] == task and list(res["by_test"]) == [task]
    assert 0 < res["by_test"][task]["n_test"] <= PROFILES["tiny"].n_test
    assert set(res["variants"]) == set(pipeline.VARIANTS) | set(pipeline.POSTHOC)
    assert all(0 <= v["acc"] <= 1 and 0 <= v["ece"] <= 1 for v in res["variants"].values())


def test_a_callers_override_wins_over_a_settings_own_value():
    """The cpu profile gives BoolQ its own test size and student recipe (`per_setting`); a value
    the caller sets (`first run --set ...`) still reaches a BoolQ run, and a dotted training
    override changes that one field of BoolQ's own training config, keeping its other fields."""
    from first_lib.profiles import for_setting, get_profile

    own = for_setting(get_profile("cpu"), "boolq")
    assert own.n_test == 1000 and own.student_train.lora_layers == 8
    assert own.student_train.lr == 3e-4
    changed = for_setting(get_profile("cpu", n_test=200, **{"student_train.lr": 1e-3}), "boolq")
    assert changed.n_test == 200
    assert changed.student_train.lr == 1e-3 and changed.student_train.lora_layers == 8
    assert changed.max_length == own.max_length  # a field the caller left alone keeps BoolQ's
    deeper = for_setting(get_profile("cpu", **{"student_train.lora_layers": 0}), "boolq")
    assert deeper.student_train.lora_layers == 0 and deeper.student_train.lr == 3e-4
    # the other settings are untouched by BoolQ's recipe
    assert for_setting(get_profile("cpu"), "csqa").student_train.lora_layers == 0
