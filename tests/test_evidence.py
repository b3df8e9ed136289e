"""`first evidence`: the primary family decided from lab files, as the book decides it."""

from __future__ import annotations

import json
import math

import pytest

from first_lib import cli, evidence, lab, stats, verdicts
from first_lib.errors import FirstError
from tests.lab_fake import fake_run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Fake lab files: CSQA with three training seeds, BoolQ with one."""
    tmp = tmp_path_factory.mktemp("evidence")
    out = {}
    for test, seeds in (("csqa", (0, 1, 2)), ("boolq", (0,))):
        run = fake_run(tmp / test, n=200, seeds=seeds, test=test, seed=len(seeds))
        out[test] = lab.export_records(run, test, tmp / f"records-fake-{test}.json.gz")
    return out


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
    assert got["yardstick"] == "csqa"
    assert sum(got["counts"].values()) == len(claims)


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
    saved = json.loads(out.read_text())
    assert set(saved["claims"]) == set(
        evidence.from_files([files["csqa"], files["boolq"]], n_boot=200)["claims"]
    )
    assert cli.main(["evidence", str(files["csqa"]), str(files["csqa"])]) == 2
    assert "merge them first" in capsys.readouterr().err


def test_files_of_two_profiles_are_not_one_design(files):
    with pytest.raises(FirstError, match="different profiles"):
        evidence.from_files([files["boolq"], lab.default_file("tiny", "csqa")])


def test_out_of_domain_files_are_named_apart_and_not_in_the_family(files, tmp_path):
    """The out-of-domain run tests on CSQA's split too: its file is records-P-ood-csqa, the lab's
    glob of in-domain files skips it, and `first evidence` refuses it (its claims are
    secondary)."""
    import gzip

    assert lab.default_file("cpu", "csqa", "ood") == "lab/records-cpu-ood-csqa.json.gz"
    assert lab.default_file("cpu", "csqa", "csqa") == lab.default_file("cpu", "csqa")
    assert all("-ood-" not in f.name for f in lab.profile_files("cpu"))
    data = json.loads(gzip.decompress(files["csqa"].read_bytes()))
    data["setting"] = "ood"
    ood = tmp_path / "records-fake-ood-csqa.json.gz"
    ood.write_bytes(gzip.compress(json.dumps(data).encode()))
    with pytest.raises(FirstError, match="out-of-domain"):
        evidence.from_files([files["boolq"], ood])
