"""`first evidence`: the primary family decided from lab files, as the book decides it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from first_lib import claims as paper_claims
from first_lib import cli, evidence, evidence_text, lab, lab_export, stats, verdicts
from first_lib.errors import FirstError
from tests.lab_fake import fake_run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Fake lab files: CSQA with three training seeds, BoolQ with one."""
    tmp = tmp_path_factory.mktemp("evidence")
    out = {}
    for test, seeds in (("csqa", (0, 1, 2)), ("boolq", (0,))):
        run = fake_run(tmp / test, n=200, seeds=seeds, test=test, seed=len(seeds))
        out[test] = lab_export.export_records(run, test, tmp / f"records-fake-{test}.json.gz")
    return out


def _value(by_seed, seed, metric):
    """A model's accuracy or 10-bin ECE on one seed's records (an untuned baseline has one),
    computed here from confidences and correctness."""
    recs = by_seed.get(seed, next(iter(by_seed.values())))
    conf = np.array([r["confidence"] for r in recs])
    right = np.array([bool(r["correct"]) for r in recs], dtype=float)
    if metric == "acc":
        return right.mean()
    assert metric == "ece"
    bins = np.minimum((conf * 10).astype(int), 9)  # [0, 0.1), ..., [0.9, 1.0]
    return sum(
        abs(right[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
        for b in range(10)
        if (bins == b).any()
    )


def test_the_family_is_the_primary_family_decided_with_holm(files):
    got = evidence.from_files([files["csqa"], files["boolq"]], n_boot=200)
    claims = got["claims"]
    variants = {"finetune", "distill", "finetune_posthoc_ts"}
    assert set(claims) == set(verdicts.primary_names(("csqa", "boolq"), variants))
    testable = {n: c["p"] for n, c in claims.items() if c["testable"]}
    for name, p_holm in stats.holm(testable).items():
        assert math.isclose(claims[name]["p_holm"], p_holm, abs_tol=1e-12)
    for name, c in claims.items():
        needs = verdicts.depends_on(c["models"])
        learned = got["checks"][c["task"]]
        assert c["testable"] == all(
            learned[m]["learned"] is not False for m in needs if m in learned
        )
        assert (c["verdict"] == stats.NOT_TESTABLE) == (not c["testable"])
        assert got["sentences"][name] == verdicts.sentence(c["subject"], c["verdict"])
        # the paper's difference on the claim's own test (BoolQ and CSQA both have a row)
        if c["a"] == "first_ts" and c["b"] in ("finetune", "distill"):
            assert c["paper_from"] == c["task"] and c["paper"] is not None
        # one seed: set against the spread of the three-seed file; three seeds: no yardstick
        if c["task"] == "boolq":
            spread = verdicts.seed_spread(
                lab.load_lab_records(files["csqa"]).records, c["a"], c["b"], c["metric"]
            )
            assert c["spread"] == spread and c["beyond_seed_spread"] == (
                abs(c["estimate"].point) > spread
            )
        else:
            assert c["spread"] is None
        # several seeds: each seed's difference alone, on that seed's records; one seed: none
        if c["task"] == "csqa":
            recs = lab.load_lab_records(files["csqa"]).records
            assert list(c["by_seed"]) == [0, 1, 2]
            for s, d in c["by_seed"].items():
                assert math.isclose(
                    d, _value(recs[c["a"]], s, c["metric"]) - _value(recs[c["b"]], s, c["metric"])
                )
        else:
            assert c["by_seed"] is None
    assert got["yardstick"] == "csqa"
    assert sum(got["counts"].values()) == len(claims)


def test_the_seeds_sentence_names_the_claims_whose_seeds_split():
    """Generated from the per-seed differences: the claims with seeds on both sides of 0 and the
    one that moved most; nothing when no test has several seeds."""
    claims = {
        "a": {"subject": "claim A", "by_seed": {0: 0.05, 1: 0.06, 2: 0.04}},
        "b": {"subject": "claim B", "by_seed": {0: 0.001, 1: -0.123, 2: -0.153}},
        "c": {"subject": "claim C", "by_seed": None},
    }
    assert evidence.seeds_disagree(claims) == ["b"]
    text = evidence_text.seeds_sentence(claims)
    assert (
        "In 1 of the 2 claims" in text
        and "claim B (seed 0 +0.1, seed 1 -12.3, seed 2 -15.3)" in text
    )
    assert "moved most between seeds: claim B, 15.4 points" in text and "claim A" not in text
    claims["b"]["by_seed"] = {0: -0.01, 1: -0.02}
    assert "same side of 0" in evidence_text.seeds_sentence(claims)
    assert evidence_text.seeds_sentence({"c": claims["c"]}) == ""


def test_a_model_that_did_not_learn_withholds_its_claims(files, tmp_path):
    """Swap the tuned teacher's records for worse ones: its claims become not testable."""
    import gzip

    data = json.loads(gzip.decompress(files["boolq"].read_bytes()))
    block = data["records"]["teacher"]["0"]
    block["pred"] = [(g + 1) % 5 for g in data["gold"]]  # every answer wrong
    bad = tmp_path / "records-fake-boolq.json.gz"
    bad.write_bytes(gzip.compress(json.dumps(data).encode()))
    got = evidence.from_files([bad], n_boot=200)
    assert got["checks"]["boolq"]["teacher"]["learned"] is False
    for c in got["claims"].values():
        if "teacher" in verdicts.depends_on(c["models"]):
            assert c["verdict"] == stats.NOT_TESTABLE and "teacher" in c["note"]
        else:
            assert "teacher" not in c["note"]
    assert sum("teacher" in verdicts.depends_on(c["models"]) for c in got["claims"].values()) >= 4


def test_cli_prints_the_tables_and_writes_json(files, tmp_path, capsys):
    out = tmp_path / "e.json"
    args = [
        "evidence",
        str(files["csqa"]),
        str(files["boolq"]),
        "--n-boot",
        "200",
        "--json",
        str(out),
    ]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "Did training work?" in text and "Of the 14 primary claims" in text
    # then the paper's other claims, the share too noisy and what the files cannot decide
    assert "Every claim of the paper that these files decide (CSQA, BoolQ;" in text
    assert "secondary claims:" in text and "too noisy to tell: " in text
    assert "top5_mass_answer: needs the knowledge store" in text
    saved = json.loads(out.read_text())
    assert (
        saved["all"]["tests"] == ["csqa", "boolq"]
        and "ood_worse_calibrated" in saved["all"]["missing"]
    )
    assert set(saved["claims"]) == set(
        evidence.from_files([files["csqa"], files["boolq"]], n_boot=200)["claims"]
    )
    assert cli.main(["evidence", str(files["csqa"]), str(files["csqa"])]) == 2
    assert "merge them first" in capsys.readouterr().err


def test_files_of_two_profiles_are_not_one_design(files):
    with pytest.raises(FirstError, match="different profiles"):
        evidence.from_files([files["boolq"], lab.default_file("tiny", "csqa")])


@pytest.fixture(scope="module")
def ood_files(tmp_path_factory):
    """Fake lab files of the out-of-domain setting (one training seed), tested on CSQA (the
    same 200 question ids as the in-domain CSQA file) and on OBQA."""
    tmp = tmp_path_factory.mktemp("evidence-ood")
    out = {}
    for test in ("csqa", "obqa"):
        run = fake_run(tmp / test, n=200, seeds=(0,), test=test, seed=11, setting="ood")
        out[test] = lab_export.export_records(run, test, tmp / f"records-fake-ood-{test}.json.gz")
    return out


def test_every_claim_the_records_decide(files):
    """Besides the primary family, the files decide the paper's other claims with the chapter's
    code (`claims.build`): the primary rows are the family's to the last digit, the secondary
    ones are uncorrected, and what needs a run's cache or a missing file is listed by name."""
    got = evidence.from_files([files["csqa"], files["boolq"]], n_boot=200)
    every = got["all"]
    assert every["tests"] == ["csqa", "boolq"]
    claims = every["claims"]
    for name, c in got["claims"].items():
        mine = claims[name]
        assert mine["primary"] and mine["verdict"] == c["verdict"]
        assert (mine["p"], mine["p_holm"]) == (c["p"], c["p_holm"])
        assert mine["estimate"].point == c["estimate"].point
    counted = {k: c for k, c in claims.items() if c["counted"]}
    assert {k for k, c in counted.items() if c["primary"]} == set(got["claims"])
    secondary = {k: c for k, c in counted.items() if not c["primary"]}
    assert len(secondary) >= 10
    for c in secondary.values():
        assert c["verdict"] in stats.VERDICTS and c["p_holm"] is None
    # one secondary claim by hand: the teacher's accuracy minus the fine-tuned student's, over
    # every seed's answers (accuracy is a mean, so pooling the seeds is the mean difference)
    recs = lab.load_lab_records(files["csqa"]).records

    def acc(v):
        return sum(r["correct"] for rs in recs[v].values() for r in rs) / sum(
            len(rs) for rs in recs[v].values()
        )

    est = claims["teacher_vs_finetune_acc_csqa"]["estimate"]
    assert math.isclose(est.point, acc("teacher") - acc("finetune"), abs_tol=1e-12)
    n = sum(sum(by.values()) for by in every["counts"].values())
    assert n == len(counted)
    noisy = sum(by[stats.TOO_NOISY] for by in every["counts"].values())
    assert every["too_noisy"] == noisy / n
    # no store and no out-of-domain file: those claims are named, not formed
    assert set(paper_claims.NEED_CACHE) <= set(every["missing"])
    assert "ood_worse_calibrated" in every["missing"]
    assert not set(every["missing"]) & set(claims)
    assert any(k.endswith("_ood_obqa") for k in every["missing"])


def test_out_of_domain_files_add_secondary_claims_only(files, ood_files):
    """The out-of-domain run tests on CSQA's split too: its file is records-P-ood-csqa, the lab's
    glob of in-domain files skips it unless asked, and `first evidence` keeps its claims out of
    the primary family; with CSQA's in-domain file, the in/out comparison is paired."""
    assert lab.default_file("cpu", "csqa", "ood") == "lab/records-cpu-ood-csqa.json.gz"
    assert lab.default_file("cpu", "csqa", "csqa") == lab.default_file("cpu", "csqa")
    assert all("-ood-" not in f.name for f in lab.profile_files("cpu"))
    base = evidence.from_files([files["csqa"], files["boolq"]], n_boot=200)
    got = evidence.from_files([files["csqa"], files["boolq"], *ood_files.values()], n_boot=200)
    assert [f["key"] for f in got["files"]] == ["csqa", "boolq", "ood_csqa", "ood_obqa"]
    assert got["names"]["ood_obqa"].endswith("(out of domain)")
    assert set(got["claims"]) == set(base["claims"])  # the primary family is unchanged
    every = got["all"]
    assert every["tests"] == ["csqa", "boolq", "ood_csqa", "ood_obqa"]
    assert set(every["missing"]) == set(paper_claims.NEED_CACHE)
    ood = every["claims"]["ood_worse_calibrated"]
    assert not ood["primary"] and ood["testable"]  # the fake tuned models learned
    assert ood["note"] == "paired: the same 200 CSQA test questions in both settings"
    o = lab.load_lab_records(ood_files["csqa"]).records["finetune"]
    i = lab.load_lab_records(files["csqa"]).records["finetune"]
    direct = stats.compare(*verdicts.common_questions(o, i), "ece", n_boot=200, seed=0)
    assert (ood["estimate"].point, ood["estimate"].lo) == (direct.point, direct.lo)
    assert not any(c["primary"] for k, c in every["claims"].items() if k.endswith("_ood_obqa"))
    with pytest.raises(FirstError, match="no in-domain file"):
        evidence.from_files([ood_files["obqa"]])


def test_a_pairing_across_precisions_says_so(files, ood_files, tmp_path):
    """The in/out-of-domain comparison pairs two runs' records; when those runs used different
    precisions (the committed CSQA file is bf16, the out-of-domain one fp32), its note says
    which, and only then."""
    import gzip

    data = json.loads(gzip.open(ood_files["csqa"]).read())
    same = data["precision"]
    assert same == lab.load_lab_records(files["csqa"]).meta["precision"]
    data["precision"] = other = "bf16" if same == "fp32" else "fp32"
    moved = tmp_path / "records-fake-ood-csqa.json.gz"
    moved.write_bytes(gzip.compress(json.dumps(data).encode()))
    note = evidence.from_files([files["csqa"], moved], n_boot=50)["all"]["claims"][
        "ood_worse_calibrated"
    ]["note"]
    assert note == (
        "paired: the same 200 CSQA test questions in both settings; "
        f"runs at different precisions (ood_csqa {other}, csqa {same})"
    )
    assert paper_claims.precision_note("ood_worse_calibrated", {"csqa": same}) == ""
    assert paper_claims.precision_note("ece_finetune_csqa", {"csqa": same, "ood_csqa": other}) == ""


def test_claims_of_unknown_tests_are_refused():
    with pytest.raises(FirstError, match="not one of the paper's test sets"):
        paper_claims.build({"arc_challenge": {}}, {})


def test_another_tasks_file_is_a_family_of_its_own(files, tmp_path, capsys):
    """A file of a task beside the paper's (appendix_more_tasks: OpenBookQA, ARC-Challenge)
    leaves the book's primary family as it was and is Holm-corrected apart; given alone it is
    the family."""
    run = fake_run(tmp_path / "obqa", n=150, seeds=(0,), test="obqa", seed=5)
    obqa = lab_export.export_records(run, "obqa", tmp_path / "records-fake-obqa.json.gz")
    base = evidence.from_files([files["csqa"], files["boolq"]], n_boot=200)
    got = evidence.from_files([files["csqa"], files["boolq"], obqa], n_boot=200)
    assert base["more_tasks"] is None
    assert {n: (c["p"], c["p_holm"]) for n, c in got["claims"].items()} == {
        n: (c["p"], c["p_holm"]) for n, c in base["claims"].items()
    }
    more = got["more_tasks"]
    assert more["tests"] == ["obqa"] and all(c["task"] == "obqa" for c in more["claims"].values())
    testable = {n: c["p"] for n, c in more["claims"].items() if c["testable"]}
    for name, p_holm in stats.holm(testable).items():
        assert math.isclose(more["claims"][name]["p_holm"], p_holm, abs_tol=1e-12)
    # one seed: held against the three-seed CSQA file's spread, as the appendix does
    assert all(c["spread"] is not None for c in more["claims"].values())
    alone = evidence.from_files([obqa], n_boot=200)
    assert set(alone["claims"]) == set(more["claims"]) and alone["more_tasks"] is None
    assert cli.main(["evidence", str(files["csqa"]), str(obqa), "--n-boot", "100"]) == 0
    assert "a family of their own" in capsys.readouterr().out


def test_ls_that_is_distill_is_not_counted_twice(files):
    """Where the validation search chose delta* = 0, Distill w/ LS is Distill (the same
    probabilities on every question): "TS beats LS" is then "FIRST vs Distill" again, shown
    and not counted; with a different LS model it counts."""
    recs = dict(lab.load_lab_records(files["csqa"]).records)
    checks = {"csqa": verdicts.training_checks(recs, n_boot=50)}
    name = verdicts.first_vs_name("distill_ls", "ece", "csqa")
    apart = paper_claims.build({"csqa": recs}, checks, n_boot=50)
    assert apart[name]["counted"] and not paper_claims.same_model(recs, "distill_ls", "distill")
    recs["distill_ls"] = {s: [dict(x) for x in rs] for s, rs in recs["distill"].items()}
    same = paper_claims.build({"csqa": recs}, checks, n_boot=50)
    assert paper_claims.same_model(recs, "distill_ls", "distill")
    assert not same[name]["counted"] and "delta* = 0" in same[name]["note"]
    other = verdicts.first_vs_name("distill", "ece", "csqa")
    assert same[other]["counted"] and same[name]["estimate"].point == same[other]["estimate"].point
    assert sum(c["counted"] for c in same.values()) == sum(c["counted"] for c in apart.values()) - 1


def test_what_decides_the_claims_too_noisy_to_tell(files):
    ev = evidence.from_files([files["csqa"], files["boolq"]], n_boot=300)
    noisy = {n for n, c in ev["claims"].items() if c["verdict"] == stats.TOO_NOISY}
    assert noisy and set(ev["decides"]) == noisy
    for name, d in ev["decides"].items():
        c = ev["claims"][name]
        recs = {"csqa": lab.load_lab_records(files["csqa"]),
                "boolq": lab.load_lab_records(files["boolq"])}[c["task"]].records  # fmt: skip
        split = stats.variance_split(recs[c["a"]], recs[c["b"]], c["metric"], n_boot=300)
        assert d["split"] >= d["n_questions"] == split["n_questions"] == 200
        assert d["one_seed"] == (c["task"] == "boolq")
        # the floor: the whole split, the seeds' part gone; it lies at or below every design
        floor = stats.planned_mde({**split, "seeds": 0.0}, n_questions=d["split"])
        assert d["floor"] == pytest.approx(floor)
        assert d["floor"] <= d["mde_split"] + 1e-12
        if d["paper_size"] is None:
            assert d["decidable"] is None and d["questions"] is None
            continue
        assert d["paper_size"] == pytest.approx(abs(c["paper"]) / 100)
        assert d["decidable"] == (d["floor"] <= d["paper_size"])
        q = d["questions_unlimited"]
        assert math.isfinite(q)
        assert stats.planned_mde({**split, "seeds": 0.0}, n_questions=int(q)) <= d["paper_size"]
        # a split that decides needs no more questions than it has, and one that does not, more
        assert (q <= d["split"]) == d["decidable"]
    # the table and the sentence name every such claim
    rows = evidence_text.decides_rows(ev["decides"], ev["claims"], ev["names"])
    assert len(rows) == len(noisy)
    text = evidence_text.decides_sentence(ev["decides"], ev["claims"])
    for name in noisy:
        assert ev["claims"][name]["subject"] in text
