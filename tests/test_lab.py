"""The lab's records file: export -> load gives the run's records back, bad files fail in one
line, the file stays small, and the committed tiny file is what it says it is."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from first_lib import book, cli, lab, lab_export, stats
from first_lib.errors import FirstError
from tests.lab_fake import fake_run

REPO = Path(__file__).resolve().parents[1]
TINY_FILE = REPO / lab.default_file("tiny", "csqa")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A fake run of three seeds on 60 questions, exported and loaded back."""
    tmp = tmp_path_factory.mktemp("lab")
    run = fake_run(tmp, n=60, seeds=(0, 1, 2))
    path = lab_export.export_records(run, "csqa", tmp / "records.json.gz")
    results = json.loads((run / "results.json").read_text())
    return run, path, results, lab.load_lab_records(path)


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_round_trip_gives_the_run_records_back(exported):
    _, _, results, data = exported
    written = book.seed_records(results, "csqa")
    assert set(data.records) == set(written)
    for variant, by_seed in written.items():
        assert set(data.records[variant]) == set(by_seed), variant  # a baseline: one seed
        for seed, records in by_seed.items():
            for r, b in zip(records, data.records[variant][seed], strict=True):
                assert (b["id"], b["gold"], b["pred"], b["correct"]) == (
                    r["id"],
                    r["gold"],
                    r["pred"],
                    r["correct"],
                )
                assert b["probs"] == r["probs"] and b["confidence"] == r["confidence"]  # exact
                assert b["raw_probs"] == pytest.approx(r["raw_probs"], rel=1e-4)
    assert data.records["student_base"].keys() == {0}
    assert data.records["finetune"].keys() == {0, 1, 2}


def test_metrics_of_the_loaded_records_are_the_runs(exported):
    _, _, results, data = exported
    written = book.seed_records(results, "csqa")
    for variant in ("finetune", "finetune_posthoc_ts", "student_base"):
        for metric in stats.METRICS:
            a = stats.estimate(written[variant], metric, n_boot=20).point
            assert stats.estimate(data.records[variant], metric, n_boot=20).point == a


def test_the_file_says_what_made_it(exported):
    run, path, results, data = exported
    meta = data.meta
    assert meta["format"] == lab.FORMAT and meta["version"] == lab.VERSION
    assert (meta["profile"], meta["setting"], meta["test"]) == ("fake", "csqa", "csqa")
    assert meta["config"] == results["config"] and data.seeds == [0, 1, 2]
    assert meta["machine"]["hardware"] == "Fake CPU" and meta["precision"] == "fp32"
    assert meta["code"]["stage_versions"]["posthoc-ts"] == "p1"
    assert meta["command"] == lab.export_command(str(run), "csqa", str(path))
    temps = meta["posthoc_temperatures"]["finetune_posthoc_ts"]
    assert set(temps) == {"0", "1", "2"} and all(t > 0 for t in temps.values())
    assert data.n_test == 60 and data.first_seed()["finetune"] == data.records["finetune"][0]


def test_posthoc_records_are_rebuilt_from_their_models_raw_probs(exported):
    """A post-hoc variant's file block names the variant whose raw_probs it keeps; refitting the
    temperature the pipeline used on those raw_probs gives the variant's probabilities."""
    from first_lib import posthoc

    _, _, _, data = exported
    t = data.meta["posthoc_temperatures"]["distill_posthoc_ts"]["1"]
    again = posthoc.apply_temperature(data.records["distill"][1], t)
    scaled = data.records["distill_posthoc_ts"][1]
    np.testing.assert_allclose([r["probs"] for r in again], [r["probs"] for r in scaled], rtol=1e-3)


def test_export_refuses_records_it_could_not_give_back(tmp_path):
    run = fake_run(tmp_path, n=8, seeds=(0,))
    results = json.loads((run / "results.json").read_text())
    path = Path(results["by_test"]["csqa"]["records"]["finetune_posthoc_ts"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[3]["raw_probs"] = [2 * p for p in rows[3]["raw_probs"]]  # not the model's any more
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(FirstError, match=r"raw_probs recomputed from the file differ") as err:
        lab_export.export_records(run, "csqa", tmp_path / "x.json.gz")
    one_line(err)
    assert not (tmp_path / "x.json.gz").exists()
    with pytest.raises(FirstError, match="no test set 'boolq'"):
        lab_export.export_records(run, "boolq", tmp_path / "x.json.gz")
    with pytest.raises(FirstError, match="no results.json"):
        lab_export.export_records(tmp_path / "nowhere", "csqa", tmp_path / "x.json.gz")


def test_a_seeds_run_not_finished_exports_its_finished_seeds(exported, tmp_path):
    """A `--seeds` run stopped after two of three seeds (seed-S/results.json, no results.json
    at the top): the file holds those two seeds, the same records as the finished run's."""
    run, _, results, data = exported
    partial = tmp_path / "partial"
    for seed in (0, 1):  # seed 2 never finished
        one = {k: v for k, v in results.items() if k not in ("seeds", "by_seed")}
        one.update(results["by_seed"][str(seed)])
        (partial / f"seed-{seed}").mkdir(parents=True)
        (partial / f"seed-{seed}" / "results.json").write_text(json.dumps(one))
    (partial / "seed-2").mkdir()  # started, not finished
    got = lab.load_lab_records(lab_export.export_records(partial, "csqa", tmp_path / "p.json.gz"))
    assert got.records["finetune"].keys() == {0, 1}
    for seed in (0, 1):
        assert got.records["finetune"][seed] == data.records["finetune"][seed]
    assert got.records["student_base"].keys() == {0}
    with pytest.raises(FirstError, match="no results.json"):
        lab_export.export_records(partial / "seed-2", "csqa", tmp_path / "x.json.gz")
    # another setting's entry of the profile's table, or its prose, changed between the seeds:
    # the same run
    older = json.loads((partial / "seed-1" / "results.json").read_text())
    edited = {**older["config"], "note": "reworded", "per_setting": {"obqa": {"seeds": [0]}}}
    (partial / "seed-1" / "results.json").write_text(json.dumps({**older, "config": edited}))
    assert lab.load_lab_records(
        lab_export.export_records(partial, "csqa", tmp_path / "e.json.gz")
    ).records["finetune"].keys() == {0, 1}
    # a seed folder left from a run of another configuration is not mixed in
    older["config"] = {**older["config"], "seed": 1, "n_train": 7}
    (partial / "seed-1" / "results.json").write_text(json.dumps(older))
    with pytest.raises(FirstError, match="seed-1 was made with another configuration.*n_train"):
        lab_export.export_records(partial, "csqa", tmp_path / "q.json.gz")


def _rewrite(path: Path, target: Path, change) -> Path:
    data = json.loads(gzip.decompress(path.read_bytes()))
    change(data)
    target.write_bytes(gzip.compress(json.dumps(data).encode()))
    return target


def test_bad_files_fail_in_one_line(exported, tmp_path):
    _, path, _, _ = exported
    cases = {
        "missing": (tmp_path / "none.json.gz", "no lab records file at .* first export-records"),
        "truncated": (tmp_path / "cut.json.gz", "is not a complete gzip file"),
        "not gzip": (tmp_path / "plain.json.gz", "is not a complete gzip file"),
        "not json": (tmp_path / "text.json.gz", "does not hold JSON"),
        "other format": (tmp_path / "other.json.gz", "is not a lab records file"),
        "other version": (
            tmp_path / "v2.json.gz",
            "has format version 2; this code reads version 1",
        ),
        "short block": (tmp_path / "short.json.gz", "finetune, seed 1: 59 rows of probs"),
    }
    raw = path.read_bytes()
    (tmp_path / "cut.json.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "plain.json.gz").write_text("{}")
    (tmp_path / "text.json.gz").write_bytes(gzip.compress(b"not json"))
    (tmp_path / "other.json.gz").write_bytes(gzip.compress(b'{"format": "else"}'))
    _rewrite(path, tmp_path / "v2.json.gz", lambda d: d.update(version=2))
    _rewrite(
        path,
        tmp_path / "short.json.gz",
        lambda d: d["records"]["finetune"]["1"]["probs"].pop(),
    )
    for name, (bad, message) in cases.items():
        with pytest.raises(FirstError, match=message) as err:
            lab.load_lab_records(bad)
        assert one_line(err), name


def test_a_record_is_a_few_dozen_bytes(tmp_path):
    """The file's size per record (question x evaluation; five candidates) bounds the size of a
    real run's file: the cpu profile's CSQA test set (1221 questions) x 23 evaluations (seven
    variants at three seeds, two untuned baselines) must stay under 2 MB."""
    run = fake_run(tmp_path, n=200, seeds=(0, 1, 2))
    data = lab.load_lab_records(lab_export.export_records(run, "csqa", tmp_path / "r.json.gz"))
    n_evals = sum(len(by_seed) for by_seed in data.records.values())
    assert n_evals == 23
    per_record = data.size / (data.n_test * n_evals)
    assert per_record < 45, per_record
    assert per_record * 1221 * 23 < 2e6


def test_cli_exports_and_fails_in_one_line(tmp_path, capsys):
    run = fake_run(tmp_path, n=10, seeds=(0, 1))
    out = tmp_path / "lab" / "r.json.gz"
    assert cli.main(["export-records", "--run", str(run), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert lab.load_lab_records(out).seeds == [0, 1]
    assert cli.main(["export-records", "--run", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("first: error: no results.json") and "\n" not in err


def test_resolve_picks_the_profiles_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths fall back to the repository root
    assert lab.resolve(None, "tiny") == TINY_FILE
    assert lab.resolve(None, "gpu") == Path("lab/records-gpu-csqa.json.gz")  # missing: as given
    cpu = REPO / lab.default_file("cpu")
    assert lab.resolve(None, None) == (cpu if cpu.is_file() else TINY_FILE)
    (tmp_path / "mine.json.gz").write_text("")
    assert lab.resolve("mine.json.gz", "tiny") == Path("mine.json.gz")


def test_a_profile_without_a_file_reads_its_own_run(tmp_path, monkeypatch):
    """At a profile whose file is not in lab/ (a gpu build, a cpu build before its file is
    committed) the chapter exports that profile's run, as `book.run_setting` gives it."""
    asked = []

    def run_setting(profile, setting, out_dir, allow_compute=None):
        asked.append((profile, setting, allow_compute))
        fake_run(tmp_path, n=12, seeds=(0,), out=Path(out_dir) / "runs" / setting)

    monkeypatch.setattr(book, "run_setting", run_setting)
    path = lab_export.records_for("gpu", None, tmp_path / "results", allow_compute=False)
    assert path == tmp_path / "results" / "records-gpu-csqa.json.gz"
    assert asked == [("gpu", "csqa", False)] and lab.load_lab_records(path).n_test == 12
    assert (
        lab_export.records_for("tiny", None, tmp_path / "results").resolve() == TINY_FILE
    )  # in lab/
    with pytest.raises(FirstError, match="no lab records file"):  # a file named: never a run
        lab.load_lab_records(lab_export.records_for("gpu", "mine.json.gz", tmp_path / "results"))
    assert len(asked) == 1


def test_split_questions_and_refit_temperature(exported):
    _, _, _, data = exported
    ids = data.meta["ids"]
    fit, held = lab.split_questions(ids, seed=3)
    assert sorted(fit + held) == sorted(ids) and not set(fit) & set(held)
    assert lab.split_questions(ids, seed=3) == (fit, held)
    assert lab.split_questions(ids, seed=4) != (fit, held)
    # the fake fine-tuned model is over-confident: a temperature above 1 lowers held-out ECE
    temps, scaled = lab.refit_temperature(data.records["finetune"], fit, held)
    before = lab.subset(data.records["finetune"], held)
    assert all(t > 1 for t in temps.values())
    assert [r["id"] for r in scaled[0]] == sorted(held)
    ece = {k: stats.estimate(v, "ece", n_boot=20).point for k, v in (("b", before), ("a", scaled))}
    assert ece["a"] < ece["b"]
    assert stats.estimate(scaled, "acc", n_boot=20).point == stats.estimate(before, "acc", 20).point


def test_run_differences_compare_the_file_with_results_json(exported, tmp_path):
    _, path, _, data = exported
    assert lab.run_differences(data) == []  # the fake run wrote no metrics
    ran = {
        "finetune": {
            "0": {
                "ece": stats.estimate({0: data.records["finetune"][0]}, "ece", n_boot=2).point,
                "acc": 0.0,
            }
        }
    }
    bad = _rewrite(path, tmp_path / "m.json.gz", lambda d: d.update(run_metrics=ran))
    diffs = sorted(lab.run_differences(lab.load_lab_records(bad)))
    assert diffs[0] == 0.0 and diffs[1] > 0  # ece agrees; the accuracy of 0 does not


# ----------------------------------------------------------------------------- the committed file


def test_committed_tiny_file_is_a_tiny_run_of_todays_questions():
    """lab/records-tiny-csqa.json.gz (the lab's file on a fresh clone) loads, says it comes
    from tiny random models, and holds the test questions a tiny run evaluates now. If this
    fails, make it again with the command in the README (`first export-records`)."""
    from first_lib.config import profile_from_dict
    from first_lib.pipeline import load_questions
    from first_lib.profiles import for_setting, get_profile

    data = lab.load_lab_records(TINY_FILE)
    meta = data.meta
    assert meta["profile"] == "tiny" and "TINY RANDOM MODELS" in meta["note"]
    assert meta["setting"] == meta["test"] == "csqa"
    assert profile_from_dict(meta["config"]).name == "tiny"
    assert data.seeds == list(get_profile("tiny").seeds)
    assert set(data.records) == set(book.VARIANT_LABELS)
    assert data.size < 100_000
    assert lab.run_differences(data) and max(lab.run_differences(data)) < 1e-9
    questions = load_questions(for_setting(get_profile("tiny"), "csqa"), "csqa")["tests"]["csqa"]
    expected = sorted((str(q.id), int(q.gold)) for q in questions)
    assert list(zip(meta["ids"], meta["gold"], strict=True)) == expected
    for by_seed in data.records.values():
        for records in by_seed.values():
            assert all(np.isclose(sum(r["probs"]), 1.0, atol=1e-5) for r in records)


def _seed_runs(results: dict, root: Path, groups) -> list[Path]:
    """The fake run's seeds split into `--seeds` runs of their own (as if made in different
    sessions): one folder of seed-S/results.json a group."""
    runs = []
    for group in groups:
        run = root / ("seeds-" + "-".join(map(str, group)))
        for seed in group:
            one = {k: v for k, v in results.items() if k not in ("seeds", "by_seed")}
            one.update(results["by_seed"][str(seed)])
            one["config"] = {**results["config"], "seed": seed, "seeds": list(group)}
            (run / f"seed-{seed}").mkdir(parents=True)
            (run / f"seed-{seed}" / "results.json").write_text(json.dumps(one))
        runs.append(run)
    return runs


def test_seeds_run_in_two_sessions_merge_into_the_file_of_one_run(exported, tmp_path):
    """Seed 0 exported in one session, seeds 1 and 2 added in another (`--add-to`): the file
    holds the same records, seeds, calibration and run metrics as the export of the run of all
    three; the untuned baselines once, with how well the second evaluation agreed."""
    _, _, results, whole = exported
    first, rest = _seed_runs(results, tmp_path, [(0,), (1, 2)])
    path = lab_export.export_records(first, "csqa", tmp_path / "m.json.gz")
    assert lab.load_lab_records(path).seeds == [0]
    assert lab_export.export_records(rest, "csqa", add_to=path) == path
    got = lab.load_lab_records(path)
    assert got.seeds == [0, 1, 2]
    assert got.records == whole.records
    for key in ("calibration", "run_metrics", "posthoc_temperatures"):
        assert got.meta[key] == whole.meta[key], key
    assert lab.run_differences(got) == lab.run_differences(whole)
    assert [s["seeds"] for s in got.meta["sources"]] == [[0], [1, 2]]
    assert "--add-to" in got.meta["command"]
    (agreement,) = got.meta["baseline_agreement"]
    assert agreement["student_base"] == {"same_prediction": 1.0, "max_prob_difference": 0.0}
    # the same seed twice, or seeds of another design or code, are refused in one line
    with pytest.raises(FirstError, match="both hold seed 1, 2") as err:
        lab_export.export_records(rest, "csqa", tmp_path / "x.json.gz", add_to=path)
    one_line(err)
    other = tmp_path / "other.json.gz"
    for change, why in (
        (lambda d: d["config"].update(n_train=7), "another configuration.*n_train"),
        (lambda d: d["code"]["stage_versions"].update(evaluate="zzz"), "other code.*evaluate"),
        (lambda d: d.update(precision="bf16"), "precision"),
        (lambda d: d["gold"].reverse(), "other questions"),
    ):
        _rewrite(lab_export.export_records(first, "csqa", tmp_path / "s0.json.gz"), other, change)
        with pytest.raises(FirstError, match=why):
            lab_export.export_records(rest, "csqa", tmp_path / "x.json.gz", add_to=other)


def test_cli_adds_seeds_to_a_file(exported, tmp_path, capsys):
    _, _, results, _ = exported
    first, rest = _seed_runs(results, tmp_path, [(2,), (0, 1)])
    path = tmp_path / "r.json.gz"
    assert cli.main(["export-records", "--run", str(first), "--out", str(path)]) == 0
    assert cli.main(["export-records", "--run", str(rest), "--add-to", str(path)]) == 0
    assert "seeds 0, 1, 2" in capsys.readouterr().out
    data = lab.load_lab_records(path)
    assert data.records["student_base"].keys() == {2}  # the earlier evaluation, once
    assert data.records["finetune"].keys() == {0, 1, 2}


def test_a_run_without_baselines_adds_its_seeds_to_a_file_that_has_them(exported, tmp_path):
    """`--set baselines=false` for the later seeds: the untuned models are not evaluated again,
    the file's evaluation serves every seed; any other configuration change is still refused."""
    _, _, results, whole = exported
    first, rest = _seed_runs(results, tmp_path, [(0,), (1, 2)])

    def read(path):
        return json.loads(gzip.decompress(Path(path).read_bytes()))

    earlier = read(lab_export.export_records(first, "csqa", tmp_path / "a.json.gz"))
    earlier["config"]["baselines"] = True
    new = read(lab_export.export_records(rest, "csqa", tmp_path / "b.json.gz"))
    new["config"]["baselines"] = False
    for v in ("teacher_base", "student_base"):
        del new["records"][v], new["run_metrics"][v]
    merged = lab_export.merge_lab_data(earlier, new, "a.json.gz")
    out = tmp_path / "m.json.gz"
    out.write_bytes(gzip.compress(json.dumps(merged).encode()))
    got = lab.load_lab_records(out)
    assert got.seeds == [0, 1, 2] and got.records == whole.records
    assert merged["baseline_agreement"] == [{}]
    new["config"]["n_train"] = 7
    with pytest.raises(FirstError, match="differs in baselines, n_train"):
        lab_export.merge_lab_data(earlier, new, "a.json.gz")
