"""The knowledge file (`first export-knowledge`): the five claims about the teacher's
distributions decided from a small file, as paper_vs_reproduction decides them from a run's
cache; and `claims.missing` names exactly the claims a build of fewer inputs does not form."""

from __future__ import annotations

import gzip
import itertools
import json
import math

import numpy as np
import pytest

from first_lib import book, cli, evidence, lab, lab_export, lab_knowledge, pipeline, verdicts
from first_lib import claims as paper_claims
from first_lib.errors import FirstError
from tests.lab_fake import fake_run


def fake_knowledge(path, profile="fake", setting="csqa", n=120, seed=0, precision="fp32"):
    """A knowledge file of made-up numbers in the exported format (labelled: a test fake)."""
    rng = np.random.default_rng(seed)
    probs = np.sort(rng.dirichlet(np.ones(6) * 0.3, size=n)[:, :5], axis=1)[:, ::-1]
    ranks = rng.choice([-1, 0, 1, 2, 3, 4], size=n, p=[0.1, 0.6, 0.1, 0.1, 0.05, 0.05])
    coverage = {
        key: {"what": f"fake {key}", "k": 5, "by_example_mean": rng.uniform(lo, 1, m).tolist()}
        for key, lo, m in (("text", 0.6, 8), ("task", 0.85, 24), ("answer", 0.9, 60))
    }
    data = {
        "format": lab_knowledge.FORMAT,
        "version": lab_knowledge.VERSION,
        "profile": profile,
        "setting": setting,
        "precision": precision,
        "config": {"seed": 0},
        "machine": {"hardware": "test fake"},
        "coverage": coverage,
        "tokens": {"split": "validation", "probs": probs.tolist(), "ranks": ranks.tolist()},
    }
    path.write_bytes(gzip.compress(json.dumps(data).encode()))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Fake lab files (CSQA three seeds, BoolQ one, the out-of-domain run on CSQA and OBQA) and a
    fake knowledge file, all of profile "fake"."""
    tmp = tmp_path_factory.mktemp("knowledge")
    out = {}
    for test, seeds, setting in (
        ("csqa", (0, 1, 2), None),
        ("boolq", (0,), None),
        ("ood_csqa", (0,), "ood"),
        ("ood_obqa", (0,), "ood"),
    ):
        task = test.removeprefix("ood_")
        run = fake_run(tmp / test, n=200, seeds=seeds, test=task, seed=len(seeds) + 3,
                       **({"setting": setting} if setting else {}))  # fmt: skip
        out[test] = lab_export.export_records(run, task, tmp / f"records-fake-{test}.json.gz")
    out["knowledge"] = fake_knowledge(tmp / "knowledge-fake-csqa.json.gz")
    return out


def test_a_knowledge_file_decides_the_five_cache_claims(files, capsys):
    paths = [files["csqa"], files["boolq"], files["knowledge"]]
    got = evidence.from_files(paths, n_boot=200)
    every = got["all"]
    k = lab_knowledge.load_knowledge(files["knowledge"])
    assert set(paper_claims.NEED_CACHE) <= set(every["claims"])
    assert not set(paper_claims.NEED_CACHE) & set(every["missing"])
    # the same numbers paper_vs_reproduction computes from the same inputs
    for key, (_, entry) in k.coverage.items():
        c = every["claims"][f"top5_mass_{key}"]
        assert math.isclose(c["estimate"].point, np.mean(entry["by_example_mean"]) - 0.95)
        assert c["verdict"] in ("reproduced", "contradicted", "too noisy to tell",
                                "rules out the paper's size")  # fmt: skip
    probs, ranks = k.tokens
    rank1 = every["claims"]["token_rank1_overconfident_teacher"]["estimate"]
    assert math.isclose(rank1.point, np.mean((ranks == 0) - probs[:, 0]))
    # the primary family is the records' alone
    base = evidence.from_files(paths[:2], n_boot=200)
    assert set(got["claims"]) == set(base["claims"])
    # the knowledge file's teacher is fp32, the fake records' too: nothing to note
    assert "at fp32" not in every["claims"]["top5_mass_answer"]["note"]
    assert got["knowledge"]["n_positions"] == len(ranks) and base["knowledge"] is None
    assert [f["key"] for f in got["files"]] == ["csqa", "boolq"]
    assert cli.main(["evidence", *map(str, paths), "--n-boot", "100"]) == 0
    text = capsys.readouterr().out
    assert f"{files['knowledge']}: " in text and "top5_mass_answer: needs" not in text


def test_a_teacher_of_another_precision_or_seed_is_noted(files, tmp_path):
    other = fake_knowledge(tmp_path / "knowledge-fake-csqa.json.gz", precision="bf16")
    every = evidence.from_files([files["csqa"], other], n_boot=100)["all"]
    note = every["claims"]["token_rank1_overconfident_teacher"]["note"]
    assert "teacher's store at bf16" in note
    meta = lab.load_lab_records(files["csqa"]).meta
    k = lab_knowledge.load_knowledge(other)
    assert lab_knowledge.note(k, {**meta, "seeds": [7]}).endswith("not one of the records'")


def test_knowledge_files_are_refused_in_one_line(files, tmp_path):
    with pytest.raises(FirstError, match="give one"):
        evidence.from_files([files["csqa"], files["knowledge"], files["knowledge"]])
    obqa = fake_knowledge(tmp_path / "knowledge-fake-obqa.json.gz", setting="obqa")
    with pytest.raises(FirstError, match="about the csqa teacher's"):
        evidence.from_files([files["csqa"], obqa])
    tiny = fake_knowledge(tmp_path / "knowledge-tiny-csqa.json.gz", profile="tiny")
    with pytest.raises(FirstError, match="different profiles"):
        evidence.from_files([files["csqa"], tiny])
    with pytest.raises(FirstError, match="give at least one lab records file"):
        evidence.from_files([files["knowledge"]])
    bad = tmp_path / "knowledge-bad.json.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(FirstError, match="not a complete knowledge file") as err:
        lab_knowledge.load_knowledge(bad)
    assert "\n" not in str(err.value)
    records = tmp_path / "knowledge-x.json.gz"
    records.write_bytes(files["csqa"].read_bytes())
    with pytest.raises(FirstError, match="is not a knowledge file"):
        lab_knowledge.load_knowledge(records)


def test_missing_names_exactly_what_a_build_of_fewer_inputs_does_not_form(files):
    """`claims.missing` mirrors `claims.build` by hand; over every subset of the test sets, with
    and without the knowledge file, the claims formed and the claims named missing are disjoint
    and together the counted claims of a build from everything."""
    recs = {t: lab.load_lab_records(files[t]).records for t in paper_claims.TEST_NAMES}
    checks = {t: verdicts.training_checks(r, n_boot=50) for t, r in recs.items()}
    k = lab_knowledge.load_knowledge(files["knowledge"])

    def counted(claims):
        return {n for n, c in claims.items() if c["counted"]}

    def build(tests, knowledge):
        return paper_claims.build(
            {t: recs[t] for t in tests},
            {t: checks[t] for t in tests},
            coverage=k.coverage if knowledge else None,
            tokens=k.tokens if knowledge else None,
            n_boot=20,
        )

    full = counted(build(list(recs), True))
    assert len(full) >= 40
    for n in range(len(recs) + 1):
        for tests in itertools.combinations(recs, n):
            for knowledge in (False, True):
                claims = build(tests, knowledge)
                formed = counted(claims)
                named = set(paper_claims.missing(claims, list(tests)))
                assert not formed & named, (tests, knowledge, formed & named)
                assert formed | named == full, (tests, knowledge, full - formed - named)


def test_export_from_a_cached_tiny_teacher_and_store(tmp_path, monkeypatch):
    """At tiny (random models, labelled as such), `first extract` then `first export-knowledge`:
    the file holds what the book's helpers compute from the cache; before the extract, one line
    names the command that makes it."""
    with pytest.raises(FirstError, match="first extract --profile tiny --setting csqa") as err:
        lab_knowledge.export_knowledge("tiny", "csqa", tmp_path / "k.json.gz", seed=5)
    assert "\n" not in str(err.value)
    with pytest.raises(FirstError, match="not the out-of-domain"):
        lab_knowledge.cached_artefacts("tiny", "ood")
    pipeline.run("tiny", "csqa", until="extract", log=lambda m: None)
    _, precision, teacher, extract = lab_knowledge.cached_artefacts("tiny", "csqa")
    out = tmp_path / "knowledge-tiny-csqa.json.gz"
    assert cli.main(["export-knowledge", "--profile", "tiny", "--out", str(out)]) == 0
    k = lab_knowledge.load_knowledge(out)
    assert (k.profile, k.setting, k.meta["precision"]) == ("tiny", "csqa", precision)
    assert k.meta["artefacts"] == {"teacher": teacher.stage, "extract": extract.stage}
    assert "tiny" in k.coverage["text"][0]
    answer = book.topk_mass_by_example(extract.path / "train", 5)
    assert k.coverage["answer"][1]["by_example_mean"] == answer["by_example_mean"]
    results = {"setting": "csqa", "profile": "tiny",
               "artefacts": {"teacher": str(teacher.path), "store": str(extract.path)}}  # fmt: skip
    probs, ranks = book.store_probs_ranks(results, "validation")
    np.testing.assert_array_equal(k.tokens[1], ranks)
    np.testing.assert_allclose(k.tokens[0], probs[:, :5], rtol=1e-6)
    assert 0 < len(k.coverage["text"][1]["by_example_mean"]) <= lab_knowledge.N_PASSAGES
    assert out.stat().st_size < 200_000


def test_committed_tiny_knowledge_file():
    """lab/knowledge-tiny-csqa.json.gz (beside the tiny records file, so the lab chapter shows
    the five claims on a fresh clone) says it comes from tiny random models, holds one stored
    answer position per validation question of a tiny run, and `first evidence` reads it. If it
    fails, make it again with the command the file records."""
    from first_lib.config import profile_from_dict
    from first_lib.pipeline import load_questions
    from first_lib.profiles import for_setting, get_profile

    path = lab.REPO / lab_knowledge.default_file("tiny")
    k = lab_knowledge.load_knowledge(path)
    assert k.profile == "tiny" and "TINY RANDOM MODELS" in k.meta["note"]
    assert profile_from_dict(k.meta["config"]).name == "tiny"
    assert "first export-knowledge --profile tiny" in k.meta["command"]
    val = load_questions(for_setting(get_profile("tiny"), "csqa"), "csqa")["validation"]
    assert len(k.tokens[1]) == len(val) and k.tokens[0].shape == (len(val), 5)
    assert path.stat().st_size < 20_000
    assert lab.profile_files("tiny", knowledge=True)[-1] == path
    assert path not in lab.profile_files("tiny")
    every = evidence.from_files(lab.profile_files("tiny", knowledge=True), n_boot=100)["all"]
    assert set(paper_claims.NEED_CACHE) <= set(every["claims"])
