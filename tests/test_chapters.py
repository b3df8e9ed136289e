"""Smoke test of the book (recommenders-style): every chapter executed with papermill at the
`tiny` profile, and the numbers each one writes checked for keys and ranges.

Part of the default run (and so of CI), at the suite's precision: about 6 minutes at fp32 on a
2-core AVX2 CPU, the three tiny settings trained first; CI's second pass executes the book again
at the other precision (13 minutes at emulated bf16 there).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from first_lib import claims as paper_claims
from first_lib import stats, verdicts
from scripts import build_book
from tests.conftest import PRECISIONS

REPO = Path(__file__).resolve().parents[1]
VERDICTS = set(stats.VERDICTS)
CHAPTERS = [
    Path(rel).name
    for rel in build_book.toc_files(REPO)
    if build_book.is_notebook(REPO / f"{rel}.md")
]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Execute every chapter once, in the book's order, at the suite's precision
    (FIRST_PRECISION, else what `auto` picks here), set for the kernels; returns (out_dir,
    {name: error}, precision). Not at both precisions in one pass: executing the book is two
    thirds of the suite's time, and bf16 is emulated, ~2x slower, on an AVX2-only CPU; the
    second pass of CI (`make test-other-precision`) executes it at the other precision."""
    from first_lib import device

    precision = device.resolve_precision()  # $FIRST_PRECISION, else auto
    assert precision in PRECISIONS
    out = tmp_path_factory.mktemp(f"book-{precision}")
    errors = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FIRST_PRECISION", precision)
        for name in CHAPTERS:
            try:
                build_book.execute_chapter(
                    REPO / "chapters" / f"{name}.md", out / f"{name}.ipynb", "tiny", str(out)
                )
            except Exception as err:  # noqa: BLE001 - reported per chapter below
                errors[name] = f"{type(err).__name__}: {str(err)[-2000:]}"
    return out, errors, precision


def load(executed, name: str) -> dict:
    out, errors, precision = executed
    assert name not in errors, errors[name]
    data = json.loads((out / f"{name}.json").read_text())
    assert data["chapter"] == name and data["profile"] == "tiny"
    assert data["precision"] == precision  # the page's numbers were computed at it
    return data


def frac(x) -> bool:
    return isinstance(x, (int, float)) and 0.0 <= x <= 1.0


def check_metrics(m: dict) -> None:
    for key in ("ece", "acc", "trust"):
        assert key in m
    assert frac(m["ece"]) and frac(m["acc"])
    assert m["trust"] == pytest.approx(m["acc"] - m["ece"])
    lo, hi = m["ece_ci"]
    assert lo <= hi


def check_difference(d: dict) -> None:
    assert {"point", "lo", "hi"} <= set(d) and d["lo"] <= d["hi"]


def test_every_chapter_executes(executed):
    _, errors, _ = executed
    assert not errors, errors


def test_exercise_solutions_ran(executed):
    """Every chapter's exercises (issue 19): each solution cell (tagged `exercise-solution`,
    2 to 4 exercises a chapter, each with at least one) was executed without an error, so
    the hand answers its asserts check hold at this profile."""
    import nbformat

    out, errors, _ = executed
    for name in CHAPTERS:
        assert name not in errors, errors[name]
        nb = nbformat.read(out / f"{name}.ipynb", as_version=4)
        cells = [c for c in nb.cells if "exercise-solution" in c.metadata.get("tags", [])]
        assert len(cells) >= 2, f"{name}: {len(cells)} solution cells"
        for cell in cells:
            assert cell.execution_count is not None, f"{name}: a solution cell did not run"
            assert not [o for o in cell.outputs if o.output_type == "error"], name


def test_intro(executed):
    d = load(executed, "intro")
    assert 0.0 < d["ece_noise"]["median"] < 0.3
    assert d["ece_noise"]["median"] <= d["ece_noise"]["p90"]
    assert d["teacher"].startswith("tiny")


def test_lab(executed):
    """The lab reads the committed tiny records file only: its numbers are the file's run's
    (its precision, not the kernel's) and hang together."""
    from first_lib import lab

    out, errors, _ = executed
    assert "lab" not in errors, errors["lab"]
    d = json.loads((out / "lab.json").read_text())
    data = lab.load_lab_records(lab.resolve(None, "tiny"))
    assert d["chapter"] == "lab" and d["profile"] == "tiny" == data.profile
    assert d["precision"] == data.meta["precision"]
    assert d["n_test"] == data.n_test and d["seeds"] == data.seeds
    assert set(d["variants"]) == set(data.records) and d["format_version"] == lab.VERSION
    assert d["run_check"]["n"] > 0 and d["run_check"]["max_abs_difference"] < 1e-9
    refit = d["refit"]
    assert refit["n_fit"] + refit["n_held"] == d["n_test"]
    assert set(refit["temperatures"]) == {str(s) for s in data.seeds}
    assert all(t > 0 for t in refit["temperatures"].values())
    assert frac(refit["ece_before"]["point"]) and frac(refit["ece_after"]["point"])
    assert refit["ece_change"]["seeds"] == "paired"
    check_difference(refit["ece_change"])
    assert set(d["metrics"]) == set(data.records)
    for by_metric in d["metrics"].values():
        assert set(by_metric) == {"acc", "ece", "ece_equal_mass", "smece", "brier", "nll", "aurc"}
        for m, e in by_metric.items():
            check_difference(e)
            assert e["n_questions"] == d["n_test"]
            if m not in ("brier", "nll"):
                assert frac(e["point"]), m
    # the untuned student is one evaluation; a trained one is pooled over the seeds
    assert d["metrics"]["student_base"]["ece"]["n_seeds"] == [1]
    assert d["metrics"]["finetune"]["ece"]["n_seeds"] == [len(data.seeds)]
    assert set(d["first_vs_finetune"]) == set(d["metrics"]["finetune"])
    for e in d["first_vs_finetune"].values():
        check_difference(e)
        assert e["seeds"] == "paired"


def test_concentrated_knowledge(executed):
    d = load(executed, "concentrated_knowledge")
    assert d["plain_text"] and len(d["task"]) == 3
    for entry in [*d["plain_text"].values(), *d["task"].values()]:
        mass = entry["mean_mass"]
        assert all(frac(x) for x in mass)
        assert all(b >= a - 1e-6 for a, b in zip(mass, mass[1:], strict=False))  # cumulative
        assert entry["top5_mean"] == pytest.approx(mass[4])
        assert frac(entry["share_top5_at_least_95"]) and entry["n_positions"] > 0
    assert set(d["verdicts"].values()) <= VERDICTS
    disk = d["disk"]
    assert [x["k"] for x in disk] == sorted(x["k"] for x in disk)
    assert all(x["bytes"] > 0 for x in disk)
    assert all(a["bytes"] < b["bytes"] for a, b in zip(disk, disk[1:], strict=False))
    assert all(x["bytes_per_position"] == x["format_bytes_per_position"] for x in disk)
    assert d["full_fp16_bytes_paper_example"] > d["top5_bytes_paper_example"]


def test_miscalibration(executed):
    d = load(executed, "miscalibration")
    for gaps in d["rank_gaps"].values():
        check_difference(gaps["top1"])
        check_difference(gaps["rest"])
    for r in d["rankwise"].values():
        assert all(frac(x) for x in r["mean_prob"]) and all(frac(x) for x in r["accuracy"])
        assert r["mean_prob"] == sorted(r["mean_prob"], reverse=True)
    assert sum(d["store_rankwise"]["accuracy"]) <= 1 + 1e-9
    assert set(d["before_after"]) == {
        "csqa_teacher",
        "csqa_student",
        "boolq_teacher",
        "boolq_student",
    }
    for ba in d["before_after"].values():
        assert frac(ba["ece_before"]) and frac(ba["ece_after"])
        check_difference(ba["ece_change"])
    assert set(d["verdicts"].values()) <= VERDICTS


def test_ls_vs_ts(executed):
    d = load(executed, "ls_vs_ts")
    assert d["consistent_with_pipeline"] is True
    for setting in ("csqa", "boolq", "ood"):
        ts = d["searches"][setting]["ts"]
        assert len(ts["coarse"]) == 10 and ts["fine"]
        assert ts["best"] == pytest.approx(d["c_star"][setting])
        assert ts["best_ece"] <= min(e for _, e in ts["coarse"]) + 1e-12
        assert 0 <= d["delta"][setting] < 1
    ex = d["example"]
    assert all(sum(v) == pytest.approx(1.0) for v in ex.values())
    assert d["ts_closest_to_identity"] > 0  # eq. 4 is never the identity
    assert all(frac(v) for v in d["ls_top1_changes"].values())


@pytest.mark.parametrize(
    ("name", "tests"),
    [("distillation", {"csqa", "boolq"}), ("out_of_domain", {"csqa", "obqa"})],
)
def test_distillation_chapters(executed, name, tests):
    d = load(executed, name)
    assert set(d["tests"]) == tests
    for t in d["tests"].values():
        assert t["n_test"] > 0
        for v in ("teacher", "finetune", "distill", "distill_ls", "first_ts"):
            check_metrics(t["variants"][v])
        for m in ("ece", "acc", "trust"):
            check_difference(t["first_to_finetune"][m])
        assert set(t["first_vs_others"]) == {"finetune", "distill", "distill_ls"}
        if name == "out_of_domain":  # checked where the models were taught, so never unchecked
            assert set(t["check"].values()) == {verdicts.HELD_OUT}
            assert None not in t["learned"].values()
    for case in d["case_study"].values():
        for r in case.values():
            assert frac(r["confidence"]) and isinstance(r["correct"], bool)


def check_beyond_k(d: dict) -> None:
    """The beyond-k chapter's numbers: mass grows with k, the bytes are the store format's and a
    sampled store costs what the top-k of the same width does, every student has an ECE and an
    accuracy, and the store cut to the paper's k is the run's own."""
    ks, paper_k = d["ks"], d["paper_k"]
    assert d["seeds"] and paper_k in ks
    means = [d["mass"][str(k)]["mean"] for k in ks]
    assert all(frac(m) for m in means) and means == sorted(means)
    for k in ks:
        m = d["mass"][str(k)]
        assert m["lo"] <= m["hi"] and frac(m["share_at_least_95"])
        b = d["bytes"][f"top-{k}"]
        assert b["per_position"] == pytest.approx(b["format"])  # measured on disk = the format
    for n in d["draws"]:
        assert d["bytes"][f"sampled-{n}"]["per_position"] == d["bytes"][f"top-{n}"]["per_position"]
        for metric in ("ece", "acc"):
            check_difference(d["sampled_vs_topk"][str(n)][metric])
    labels = [f"top-{k}" for k in ks] + [f"sampled-{n}" for n in d["draws"]]
    assert sorted(d["students"]) == sorted(labels)
    for label in labels:
        for metric in ("ece", "acc"):
            est = d["students"][label][metric]
            assert frac(est["point"]) and est["lo"] <= est["hi"]
            if label != f"top-{paper_k}":
                check_difference(d["vs_paper_k"][f"{label} {metric}"])
    assert d["cut_matches_run_store"] == {"same_ids": 1.0, "max_prob_diff": 0.0}
    assert all(r["done"] and r["actual_s"] is not None for r in d["costs"])
    # the Holm family holds the other top-k students that learned, on both metrics, and only them
    assert sorted(d["learned"]) == sorted(labels)
    family = {
        f"{label} {m}"
        for label in labels
        if label.startswith("top-") and label != f"top-{paper_k}" and d["learned"][label]
        for m in ("ece", "acc")
    }
    assert set(d["holm"]) == family and all(0 <= q <= 1 for q in d["holm"].values())
    for label in d["beyond_seed_spread"]:
        assert (
            d["learned"][label] and min(d["holm"][f"{label} {m}"] for m in ("ece", "acc")) <= 0.05
        )


def test_beyond_k(executed):
    check_beyond_k(load(executed, "beyond_k"))


def test_clean_keeps_the_beyond_k_study(executed):
    """The study the chapter made (its default k and draws are the study's `KS` and `DRAWS`) is
    live for `first clean`, which once listed all of it as stale."""
    from first_lib.beyond import study
    from first_lib.pipeline.stale import live_artefacts

    _, errors, precision = executed
    assert "beyond_k" not in errors, errors.get("beyond_k")
    prof = study._profile("tiny", "csqa", 0, {"precision": precision})
    _, items, _ = study.plan(prof, "csqa", study.KS, study.DRAWS)
    assert items and all(item.done() for item in items)
    assert {item.path.name for item in items} <= live_artefacts()


def test_beyond_k_check_can_fail(tmp_path):
    """The check above catches a store whose bytes are not the format's."""
    import copy

    good = {
        "ks": [1, 5],
        "paper_k": 5,
        "draws": [5],
        "seeds": [0],
        "mass": {
            "1": {"mean": 0.4, "lo": 0.3, "hi": 0.5, "share_at_least_95": 0.1},
            "5": {"mean": 0.9, "lo": 0.8, "hi": 0.95, "share_at_least_95": 0.6},
        },
        "bytes": {
            "top-1": {"per_position": 4.0, "format": 4},
            "top-5": {"per_position": 20.0, "format": 20},
            "sampled-5": {"per_position": 20.0, "format": 20},
        },
        "students": {
            lab: {m: {"point": 0.2, "lo": 0.1, "hi": 0.3} for m in ("ece", "acc")}
            for lab in ("top-1", "top-5", "sampled-5")
        },
        "vs_paper_k": {
            f"{lab} {m}": {"point": 0.0, "lo": -0.1, "hi": 0.1}
            for lab in ("top-1", "sampled-5")
            for m in ("ece", "acc")
        },
        "sampled_vs_topk": {
            "5": {m: {"point": 0.0, "lo": -0.1, "hi": 0.1} for m in ("ece", "acc")}
        },
        "cut_matches_run_store": {"same_ids": 1.0, "max_prob_diff": 0.0},
        "costs": [{"done": True, "actual_s": 1.0}],
        "learned": {"top-1": True, "top-5": True, "sampled-5": True},
        "holm": {"top-1 ece": 0.5, "top-1 acc": 0.5},
        "beyond_seed_spread": [],
    }
    check_beyond_k(good)
    bad = copy.deepcopy(good)
    bad["bytes"]["sampled-5"]["per_position"] = 24.0
    with pytest.raises(AssertionError):
        check_beyond_k(bad)
    # a student that did not learn stays out of the Holm family, and a difference called firm
    # must be Holm-significant
    for change in (
        {"learned": {"top-1": False, "top-5": True, "sampled-5": True}},
        {"beyond_seed_spread": ["top-1"]},
    ):
        with pytest.raises(AssertionError):
            check_beyond_k({**copy.deepcopy(good), **change})


def check_more_tasks(d: dict) -> None:
    """The two-more-tasks appendix: its family is the primary family of each task; every claim
    on a model that did not learn is withheld; the Holm column is Holm's over the testable
    claims; with one training seed each difference is set against the CSQA seed spread; every
    sentence is the one generated from its verdict."""
    claims = d["claims"]
    for t in d["tasks"]:
        variants = {c["a"] for c in claims.values() if c["task"] == t} | {
            c["b"] for c in claims.values() if c["task"] == t
        }
        want = set(verdicts.primary_names((t,), variants))
        assert {n for n, c in claims.items() if c["task"] == t} == want
    family = {}
    for name, c in claims.items():
        assert c["verdict"] in VERDICTS
        assert (c["verdict"] == stats.NOT_TESTABLE) == (not d["testable"][name])
        learned = d["learned"][c["task"]]
        needs = verdicts.depends_on(c["models"])
        assert d["testable"][name] == all(learned.get(m) is not False for m in needs)
        if d["testable"][name]:
            family[name] = c["p"]
        else:
            assert c["p_holm"] is None
        est = c["estimate"]
        assert est["lo"] <= est["hi"]
        yardstick = d["csqa_seeds"] if "csqa_seeds" in d else d["yardstick_seeds"]
        if len(d["seeds"][c["task"]]) == 1 and len(yardstick) > 1:
            assert c["spread"] is not None and c["spread"] >= 0
            assert c["beyond_seed_spread"] == (abs(est["point"]) > c["spread"])
        else:
            assert c["spread"] is None and c["beyond_seed_spread"] is None
    for name, p_holm in stats.holm(family).items() if family else ():
        assert math.isclose(claims[name]["p_holm"], p_holm, abs_tol=1e-12)
    assert sum(d["counts"].values()) == len(claims)
    for name, text in d["sentences"].items():
        assert text == verdicts.sentence(claims[name]["subject"], claims[name]["verdict"])
    for by_model in d["training"].values():
        for chk in by_model.values():
            if chk["learned"] is not None:
                assert chk["learned"] == (chk["estimate"]["lo"] > 0)


def test_appendix_more_tasks(executed):
    from first_lib.profiles import MORE_TASKS

    d = load(executed, "appendix_more_tasks")
    assert tuple(d["tasks"]) == MORE_TASKS
    assert all(n > 0 for n in d["n_test"].values())
    check_more_tasks(d)


def test_lab_decides_the_primary_family_of_its_files(executed):
    """The lab page's last table: the primary family of every lab file of the profile (at tiny:
    the committed CSQA file), decided as the appendix decides its tasks."""
    out, errors, _ = executed
    assert "lab" not in errors, errors["lab"]
    lab = json.loads((out / "lab.json").read_text())  # the file's precision (see test_lab)
    d = lab["evidence"]
    assert d["tasks"] == ["csqa"] and d["seeds"]["csqa"] == lab["seeds"]
    assert d["claims"] and sum(d["counts"].values()) == len(d["claims"])
    check_more_tasks(d)
    # the paper's other claims from the same file (first_lib.claims): the primary rows are the
    # family's, the rest uncorrected; the claims of BoolQ and of the out-of-domain setting are
    # named as missing, never formed; those about the teacher's distributions come from the
    # committed tiny knowledge file (lab/knowledge-tiny-csqa.json.gz)
    every = d["all"]
    assert every["tests"] == ["csqa"]
    counted = {k: c for k, c in every["claims"].items() if c["counted"]}
    assert {k for k, c in counted.items() if c["primary"]} == set(d["claims"])
    for name, c in d["claims"].items():
        assert counted[name]["verdict"] == c["verdict"] and counted[name]["p_holm"] == c["p_holm"]
    assert any(not c["primary"] for c in counted.values())
    assert sum(sum(by.values()) for by in every["counts"].values()) == len(counted)
    assert {"ls_can_hurt_boolq", "ood_worse_calibrated"} <= set(every["missing"])
    assert set(paper_claims.NEED_CACHE) <= set(counted)
    assert not set(every["missing"]) & set(every["claims"])


def test_more_tasks_check_can_fail(executed):
    """The check above catches a verdict on a model that did not learn, a Holm column that is
    not Holm's, and a sentence that does not follow its verdict."""
    import copy

    good = load(executed, "appendix_more_tasks")
    name = sorted(good["claims"])[0]
    t = good["claims"][name]["task"]
    for change in (
        lambda d: d["learned"][t].update(teacher=not d["learned"][t]["teacher"]),
        lambda d: d["claims"][name].update(
            verdict=stats.TOO_NOISY
            if d["claims"][name]["verdict"] != stats.TOO_NOISY
            else stats.REPRODUCED
        ),
        lambda d: d["sentences"].update({name: "This build settles it."}),
        lambda d: d["claims"].pop(name),
    ):
        bad = copy.deepcopy(good)
        change(bad)
        with pytest.raises(AssertionError):
            check_more_tasks(bad)


def test_beyond_temperature(executed):
    """The validation-size study (every subset's choice, its test ECE and gap; all the data is one
    choice with no gap) and the temperature comparisons, consistent with the pipeline's fits."""
    d = load(executed, "beyond_temperature")
    n_val, seeds, sizes = d["n_validation"], d["seeds"], d["sizes"]
    assert sizes[-1] == n_val and sizes == sorted(set(sizes)) and len(sizes) >= 2
    for kind in ("ts", "ls"):
        by_size = d["validation_size"][kind]
        assert set(by_size) == {str(m) for m in sizes}
        for m in sizes:
            r = by_size[str(m)]
            want = len(seeds) * (d["n_subsets"] if m < n_val else 1)
            for key in ("coef", "test_ece", "gap"):
                assert r[key]["lo"] <= r[key]["median"] <= r[key]["hi"] and r[key]["n"] == want
            assert frac(r["test_ece"]["lo"]) and frac(r["test_ece"]["hi"]) and frac(r["within_0.1"])
            check_difference(r["mean_gap"])
            assert r["mean_gap"]["n_questions"] == d["n_test"]
        whole = by_size[str(n_val)]
        assert whole["gap"] == {"median": 0.0, "lo": 0.0, "hi": 0.0, "n": len(seeds)}
        assert whole["mean_gap"]["point"] == 0 and whole["within_0.1"] == 1.0
        assert set(whole["whole"]) == {str(s) for s in seeds}
    for s in seeds:
        c = d["validation_size"]["ts"][str(n_val)]["whole"][str(s)]
        assert c == pytest.approx(d["fits"]["teacher"][str(s)]["eq4"])
    assert d["teacher_fit_matches_pipeline"] is True and d["accuracy_kept"] is True
    assert d["posthoc_refit_matches_pipeline"] and all(d["posthoc_refit_matches_pipeline"].values())
    assert set(d["method_ece"]) == {"teacher", "finetune", "distill"}
    for model, by_method in d["method_ece"].items():
        assert set(by_method) == {"none", "eq4", "power", "logit"}
        for e in by_method.values():
            assert frac(e["point"]) and e["lo"] <= e["hi"]
        for e in d["method_differences"][model].values():
            check_difference(e)
        for used, n in (d["nll_positions"][f"{model}/{s}"] for s in seeds):
            assert 0 < used <= n
    assert set(d["before_vs_after"]) == {"finetune_posthoc_ts", "distill_posthoc_ts"}
    for cmp in d["before_vs_after"].values():
        for metric in ("ece", "acc"):
            check_difference(cmp[metric])
            assert cmp[metric]["seeds"] == "paired"
            assert cmp[f"verdict_{metric}"] in VERDICTS


def test_paper_vs_reproduction(executed):
    d = load(executed, "paper_vs_reproduction")
    claims = d["claims"]
    assert len(claims) >= 20
    counted = [c for c in claims if c["counted"]]
    for c in claims:
        assert c["ours"]["lo"] <= c["ours"]["hi"]
        assert not math.isnan(c["ours"]["point"])
        assert c["paper"]
    for c in counted:
        assert c["verdict"] in VERDICTS
        # a claim on a model that did not learn is never decided
        assert (c["verdict"] == stats.NOT_TESTABLE) == (not c["testable"])
        assert c["primary"] == verdicts.is_primary(c["name"])
        if c["primary"] and c["testable"]:
            assert c["p_holm"] >= c["p"] - 1e-12
        else:
            assert c["p_holm"] is None
    # identities and arithmetic are shown, never counted
    names = {c["name"]: c for c in claims}
    assert not names["storage_ratio"]["counted"]
    # the paired in/out-of-domain comparison says how many questions it pairs (not seeds)
    ood = names["ood_worse_calibrated"]
    assert f"the same {ood['ours']['n_questions']} CSQA test questions" in ood["note"]
    assert not any(c["counted"] for k, c in names.items() if k.startswith("rank_rest_"))
    # the primary family named in code is all there, and only it is primary
    assert {c["name"] for c in counted if c["primary"]} == set(d["primary_names"])
    n = sum(sum(by.values()) for by in d["counts"].values())
    assert n == len(counted)
    assert sum(d["counts"]["primary"].values()) == len(d["primary_names"])
    # every conclusion sentence is the one generated from its verdict
    assert set(d["sentences"]) == {c["name"] for c in counted}
    for name, s in d["sentences"].items():
        assert s["verdict"] == names[name]["verdict"]
        assert s["text"] == verdicts.sentence(s["subject"], s["verdict"])
    for test, by_model in d["training"].items():
        for chk in by_model.values():
            assert chk["learned"] in (True, False, None)
            if chk["learned"] is not None:
                assert chk["learned"] == (chk["estimate"]["lo"] > 0)
            # out of domain, every model is checked on held-out instructions, not on the test
            want = verdicts.HELD_OUT if test.startswith("ood") else "accuracy"
            assert chk["check"] == want, (test, chk)


def test_the_knowledge_file_gives_the_chapters_numbers(executed, tmp_path):
    """`first export-knowledge` from the cache the book ran in gives the five claims about the
    teacher's distributions the chapter computed (same helpers, same sizes)."""
    import numpy as np

    from first_lib import lab_knowledge

    d = load(executed, "paper_vs_reproduction")
    names = {c["name"]: c for c in d["claims"]}
    _, _, precision = executed
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FIRST_PRECISION", precision)
        k = lab_knowledge.load_knowledge(
            lab_knowledge.export_knowledge("tiny", "csqa", tmp_path / "k.json.gz")
        )
    for key, (_, entry) in k.coverage.items():
        mine = float(np.mean(entry["by_example_mean"])) - 0.95
        assert math.isclose(names[f"top5_mass_{key}"]["ours"]["point"], mine, abs_tol=1e-9)
    probs, ranks = k.tokens
    rank1 = float(np.mean((ranks == 0) - probs[:, 0]))
    point = names["token_rank1_overconfident_teacher"]["ours"]["point"]
    assert math.isclose(point, rank1, abs_tol=1e-6)  # the file keeps float32 probabilities


@pytest.mark.parametrize("name", CHAPTERS)
def test_page_opens_with_its_rerun_box(executed, name):
    """The executed page shows, right after its parameters, the box with the papermill command
    of this chapter at the profile and precision it ran at, as MyST for the page to parse."""
    import nbformat

    out, errors, precision = executed
    assert name not in errors, errors[name]
    nb = nbformat.read(out / f"{name}.ipynb", as_version=4)
    codes = [c for c in nb.cells if c.cell_type == "code"]
    injected = [i for i, c in enumerate(codes) if "injected-parameters" in c.metadata["tags"]]
    box = codes[injected[0] + 1]
    assert box.metadata["mystnb"]["markdown_format"] == "myst"
    (text,) = [
        o["data"]["text/markdown"] for o in box.outputs if "text/markdown" in o.get("data", {})
    ]
    assert text.startswith(":::{admonition} Re-run this chapter")
    assert f"FIRST_PRECISION={precision} papermill notebooks/{name}.ipynb" in text
    assert "-p profile tiny" in text and f"-p out_dir {out}" in text.replace("\\\n  ", "")
