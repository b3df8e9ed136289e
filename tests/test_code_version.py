"""Every artefact key holds the version of the code its stage runs: new code never gets old
results, and comments, docstrings or formatting never throw results away."""

from __future__ import annotations

import pytest

from first_lib import artefacts, pipeline
from first_lib.profiles import get_profile

CODE = '''"""A module."""

import math


def area(r):
    """The area of a circle."""
    return math.pi * r**2
'''


def test_source_hash_ignores_comments_docstrings_and_formatting():
    same = [
        CODE.replace("    return", "    # squared radius\n    return"),
        CODE.replace('"""The area of a circle."""', '"""Pi r squared."""'),
        CODE.replace('    """The area of a circle."""\n', ""),
        CODE.replace('"""A module."""\n', "# no docstring\n"),
        CODE.replace("math.pi * r**2", "(math.pi*r ** 2)").replace("\n\n\n", "\n"),
    ]
    for text in same:
        assert text != CODE
        assert pipeline.source_hash(text) == pipeline.source_hash(CODE), text
    for text in (CODE.replace("r**2", "r**3"), CODE.replace("area", "size"), CODE + "X = 1\n"):
        assert pipeline.source_hash(text) != pipeline.source_hash(CODE), text


def test_module_hash_is_the_source_hash_of_its_file():
    from pathlib import Path

    from first_lib import losses

    text = Path(losses.__file__).read_text()
    assert pipeline.module_hash("first_lib.losses") == pipeline.source_hash(text)
    v = pipeline.code_version(["first_lib.metrics", "first_lib.models"])
    assert v == pipeline.code_version(["first_lib.models", "first_lib.metrics"])
    assert len(v) == 12 and v != pipeline.code_version(["first_lib.metrics"])


def test_a_package_hash_covers_every_file_of_it(tmp_path, monkeypatch):
    """An edit to the code of any submodule of a package changes its hash; a comment does not."""
    pkg = tmp_path / "pkg_probe"
    (pkg / "inner").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""face"""\nfrom pkg_probe.sub import f\n')
    (pkg / "sub.py").write_text("def f():\n    return 1\n")
    (pkg / "inner" / "__init__.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def fresh() -> str:
        artefacts._MODULE_HASHES.pop("pkg_probe", None)
        return pipeline.module_hash("pkg_probe")

    first = fresh()
    (pkg / "sub.py").write_text("def f():\n    # a comment\n    return 1\n")
    assert fresh() == first
    (pkg / "sub.py").write_text("def f():\n    return 2\n")
    second = fresh()
    assert second != first
    (pkg / "inner" / "__init__.py").write_text("X = 2\n")
    assert fresh() != second


def _names(precision: str = "fp32") -> dict[str, str]:
    """Artefact folder names of a tiny csqa run: the plan's stages, the tiny models and one
    evaluation per model (`evaluate:<model>`)."""
    prof = get_profile("tiny")
    dirs = {
        s["stage"]: pipeline.artefact_dir(s["stage"], s["key"])
        for s in pipeline.plan(prof, "csqa", precision)
    }
    tiny = pipeline.artefact_dir("tiny-models", pipeline.tiny_key(prof, "csqa"))
    models = {
        **dirs,
        **{f"{r}_base": pipeline.model_source(prof, r, tiny) for r in ("teacher", "student")},
    }
    names = {stage: path.name for stage, path in dirs.items()}
    names["tiny-models"] = tiny.name
    for label, model in models.items():
        if label not in ("extract", "calibrate"):
            key = pipeline.eval_key(prof, "csqa", model, precision)
            names[f"evaluate:{label}"] = pipeline.artefact_dir("evaluate", key).name
    return names


def _changed_when(monkeypatch, module: str) -> set[str]:
    before = _names()  # fills the per-module cache
    monkeypatch.setitem(artefacts._MODULE_HASHES, module, "0" * 64)  # "new code" of `module`
    after = _names()
    assert set(before) == set(after)
    return {label for label in before if before[label] != after[label]}


DISTILL = {"distill-none", "distill-ls", "distill-ts"}


def test_new_evaluation_code_changes_only_evaluations(monkeypatch):
    changed = _changed_when(monkeypatch, "first_lib.evaluate")
    assert changed == {label for label in _names() if label.startswith("evaluate:")}
    assert len(changed) == 7  # five variants and two untuned baselines


def test_new_extraction_code_changes_extract_and_everything_downstream(monkeypatch):
    changed = _changed_when(monkeypatch, "first_lib.knowledge")
    downstream = {"extract", "calibrate", *DISTILL, *{f"evaluate:{d}" for d in DISTILL}}
    assert changed == downstream  # not the teacher, the fine-tuned student or the baselines


@pytest.mark.parametrize(
    "module, expected",
    [
        ("first_lib.losses", {"teacher", "finetune", *DISTILL}),  # and all downstream
        ("first_lib.metrics", {"calibrate", *DISTILL}),
        ("first_lib.models", {"tiny-models", "teacher", "extract", "finetune", *DISTILL}),
    ],
)
def test_each_stage_names_its_modules(monkeypatch, module, expected):
    changed = _changed_when(monkeypatch, module)
    assert expected <= changed
    trained = {"teacher", "finetune", *DISTILL} & changed
    assert {f"evaluate:{m}" for m in trained} <= changed  # a new model is evaluated anew
    if module == "first_lib.losses":
        assert not {"tiny-models", "evaluate:teacher_base", "evaluate:student_base"} & changed
