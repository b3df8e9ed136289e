"""End-to-end runs of the `tiny` profile (TINY RANDOM MODELS: these check the machinery, not FIRST)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from first_lib import pipeline
from first_lib.errors import FirstError
from first_lib.knowledge import TopKStore
from tests.conftest import PRECISIONS, isolated_home

REPO = Path(__file__).resolve().parents[1]


def _first_run(out: Path, env: dict, launcher: tuple[str, ...] = (), *extra: str):
    """`first run --profile tiny --setting csqa --out OUT` in a subprocess (optionally launched)."""
    cmd = [sys.executable, "-m", *launcher, *(["-m"] if launcher else []), "first_lib.cli"]
    cmd += ["run", "--profile", "tiny", "--setting", "csqa", "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module", params=PRECISIONS)
def tiny_run(request, tmp_path_factory):
    """One tiny run per precision, whatever the host (FIRST_PRECISION in its environment)."""
    precision = request.param
    tmp = tmp_path_factory.mktemp(f"tiny-{precision}")
    env = {**os.environ, "FIRST_HOME": str(isolated_home(tmp)), "TQDM_DISABLE": "1"}
    env["FIRST_PRECISION"] = precision
    out = tmp / "out"
    t0 = time.perf_counter()
    proc = _first_run(out, env)
    wall = time.perf_counter() - t0
    return {"out": out, "env": env, "wall": wall, "stderr": proc.stderr, "precision": precision}


def test_tiny_run_schema(tiny_run):
    res = json.loads((tiny_run["out"] / "results.json").read_text())
    assert res["profile"] == "tiny" and res["setting"] == "csqa"
    assert res["precision"] == tiny_run["precision"]
    assert res["config"]["name"] == "tiny" and res["config"]["k"] == res["store"]["k"]
    for name in ("teacher", "finetune", "distill", "store"):  # every artefact records it
        meta = json.loads((Path(res["artefacts"][name]) / "meta.json").read_text())
        assert meta["precision"] == tiny_run["precision"], name
    assert res["n_test"] > 0
    assert res["c_star"] > 0 and 0 <= res["delta"] < 1
    assert res["store"]["k"] == 5
    assert 0 < res["store"]["bytes_per_token"] <= 22
    assert 0 < res["store"]["mean_topk_mass"] <= 1
    assert set(res["variants"]) == set(pipeline.VARIANTS) | set(pipeline.POSTHOC)
    for v in res["variants"].values():
        for key in ("ece", "acc", "trust", "ece_ci", "acc_ci", "brier", "nll"):
            assert key in v
        assert 0 <= v["ece"] <= 1 and 0 <= v["acc"] <= 1
        assert v["trust"] == pytest.approx(v["acc"] - v["ece"])
        assert v["ece_ci"][0] <= v["ece"] <= v["ece_ci"][1] + 1e-12
        assert v["acc_ci"][0] <= v["acc"] <= v["acc_ci"][1] + 1e-12


def test_results_hold_the_whole_resolved_config(tiny_run):
    """results.json's `config` is the resolved profile, loadable back as it was."""
    from first_lib.config import profile_from_dict
    from first_lib.profiles import for_setting, get_profile

    res = json.loads((tiny_run["out"] / "results.json").read_text())
    assert profile_from_dict(res["config"]) == for_setting(get_profile("tiny"), "csqa")


def test_another_seed_trains_differently_on_the_same_questions(tiny_run, tmp_path):
    """`first run --seeds 0,1`: seed 1 changes the adapter initialisation and the batch order
    of every trained model (other losses from the first step), not the questions; results.json
    lists both seeds, and the untuned baselines are one evaluation shared by both."""
    import shutil

    res = json.loads((tiny_run["out"] / "results.json").read_text())
    home = tmp_path / "home"  # a copy: the seed-1 artefacts stay out of the shared run's home
    shutil.copytree(tiny_run["env"]["FIRST_HOME"], home, symlinks=True)
    env = {**tiny_run["env"], "FIRST_HOME": str(home)}
    proc = _first_run(tmp_path / "seeds", env, (), "--seeds", "0,1")
    assert "teacher: training" not in proc.stderr.split("seed-0/results.json")[0]  # all cached
    both = json.loads((tmp_path / "seeds" / "results.json").read_text())
    assert both["seeds"] == [0, 1] and set(both["by_seed"]) == {"0", "1"}
    assert both["by_seed"]["0"]["variants"] == res["variants"]
    one = json.loads((tmp_path / "seeds" / "seed-1" / "results.json").read_text())
    assert one["config"]["seed"] == 1 and one["config"]["student_train"]["seed"] == 1
    records = [both["by_seed"][s]["by_test"]["csqa"]["records"] for s in ("0", "1")]
    assert records[0]["student_base"] == records[1]["student_base"]  # one shared evaluation
    assert records[0]["finetune"] != records[1]["finetune"]
    metas = [
        json.loads((Path(both["by_seed"][s]["artefacts"]["finetune"]) / "meta.json").read_text())
        for s in ("0", "1")
    ]
    assert [m["key"]["train"]["seed"] for m in metas] == [0, 1]
    assert metas[0]["key"]["data"] == metas[1]["key"]["data"]  # the same questions
    assert metas[0]["losses"][0] != metas[1]["losses"][0]


def test_every_model_stage_records_its_model_work(tiny_run):
    """`perf` in the meta.json of training, extraction and every evaluation: model FLOPs, their
    rate against this machine's peak at the run's precision (mfu), and the padding share."""
    res = json.loads((tiny_run["out"] / "results.json").read_text())
    home = Path(tiny_run["env"]["FIRST_HOME"])
    dirs = [Path(res["artefacts"][n]) for n in ("teacher", "finetune", "distill", "store")]
    dirs += sorted(p for p in (home / "runs").glob("evaluate-*") if p.is_dir())
    assert len(dirs) > 4
    for d in dirs:
        perf = json.loads((d / "meta.json").read_text())["perf"]
        assert perf["precision"] == tiny_run["precision"] and perf["device"] == "cpu", d
        assert perf["model_gflop"] > 0 and perf["seconds"] > 0 and perf["peak_gflops"] > 0, d
        assert 0 < perf["mfu"] < 1.5, d  # at most the peak, give or take timing noise
        assert perf["computed_tokens"] >= perf["real_tokens"] > 0, d
        assert 0 <= perf["pad_fraction"] < 0.5, d
        assert perf["peak_memory_gb"] > 0.1, d  # the process's peak resident memory meanwhile


def test_a_finished_run_writes_a_rates_file_the_clock_prices_with(tiny_run, tmp_path):
    """`scripts/stage_rates.py` on a finished run: every model stage's recorded rate (or its
    name among those left out for sharing the machine), the medians the clock reads, and a
    dry run priced with that file from an empty cache."""
    from first_lib.pipeline import clock

    out = tmp_path / "rates.json"
    cmd = [sys.executable, "-m", "scripts.stage_rates", "--profile", "tiny", "--out", str(out)]
    proc = subprocess.run(cmd, env=tiny_run["env"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    named = set(data["stages"]) | set(data["left_out_shared"])
    assert {"teacher", "extract", "finetune", "distill-ts", "evaluate teacher on csqa"} <= named
    assert data["machine"]["precision"] == tiny_run["precision"]
    assert data["rates"] == clock.rates_from_stages(data["stages"])
    for s in data["stages"].values():
        assert s["precision"] == tiny_run["precision"] and 0 < s["mfu"] < 1.5
    cmd = [sys.executable, "-m", "first_lib.cli", "run", "--profile", "tiny", "--dry-run"]
    proc = subprocess.run(
        [*cmd, "--rates", str(out)], env=tiny_run["env"], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from an empty cache" in proc.stdout and "measured on" in proc.stdout


def test_a_finished_run_exports_to_a_lab_file_of_its_records(tiny_run, tmp_path):
    """`first export-records` of a real run: the lab file gives back the run's records (the
    probabilities exactly), and the metrics recomputed from it are those of results.json."""
    from first_lib import book, lab

    res = json.loads((tiny_run["out"] / "results.json").read_text())
    out = tmp_path / "records.json.gz"
    subprocess.run(
        [sys.executable, "-m", "first_lib.cli", "export-records", "--run", str(tiny_run["out"])]
        + ["--test", "csqa", "--out", str(out)],
        env=tiny_run["env"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    data = lab.load_lab_records(out)
    assert data.profile == "tiny" and data.meta["precision"] == tiny_run["precision"]
    assert data.meta["config"] == res["config"] and data.seeds == [res["config"]["seed"]]
    for variant, records in book.records_of(res, "csqa").items():
        back = data.records[variant][data.seeds[0]]
        assert [(r["id"], r["pred"], r["probs"]) for r in back] == [
            (r["id"], r["pred"], r["probs"]) for r in records
        ], variant
    diffs = lab.run_differences(data)
    assert len(diffs) == 9 * len(lab.ORDER_FREE) and max(diffs) < 1e-9


def test_tiny_run_is_cached(tiny_run):
    t0 = time.perf_counter()
    proc = _first_run(tiny_run["out"] / "again", tiny_run["env"])
    assert "training" not in proc.stderr and "extract:" not in proc.stderr  # all cached
    a = json.loads((tiny_run["out"] / "results.json").read_text())
    b = json.loads((tiny_run["out"] / "again" / "results.json").read_text())
    assert a == b
    # the estimates live apart, in clock.json: made before the stages ran in the first folder,
    # found done in the second
    clock = json.loads((tiny_run["out"] / "clock.json").read_text())
    again = json.loads((tiny_run["out"] / "again" / "clock.json").read_text())
    assert {s["made"] for s in clock.values()} == {"before"}
    # and each model stage's peak memory, from its model's shape and its largest batch
    assert all(s["memory_gb"] > 0 for k, s in clock.items() if not k.startswith(("calib", "post")))
    assert {s["made"] for s in again.values()} <= {"after", "before"}
    assert time.perf_counter() - t0 < tiny_run["wall"]


def test_dry_run_paper_prints_plan(capsys):
    from first_lib.cli import main

    assert main(["run", "--profile", "paper", "--setting", "csqa", "--dry-run"]) == 0
    text = capsys.readouterr().out
    for stage in (
        "teacher",
        "extract",
        "calibrate",
        "finetune",
        "distill-none",
        "distill-ls",
        "distill-ts",
    ):
        assert stage in text
    assert "Llama-2-13b" in text


def test_unknown_profile_setting_and_key():
    with pytest.raises(FirstError, match="unknown profile"):
        pipeline.run("huge", "csqa")
    with pytest.raises(FirstError, match="unknown setting"):
        pipeline.run("tiny", "squad")
    with pytest.raises(FirstError, match="unknown profile key"):
        pipeline.run("tiny", "csqa", n_trian=3)


def test_two_processes_match_one(tiny_run, tmp_path):
    """accelerate with 2 CPU processes (gloo) gives the same store and metrics as 1 process."""
    env = {**tiny_run["env"], "FIRST_HOME": str(isolated_home(tmp_path))}
    out = tmp_path / "out2"
    # torchrun: accelerate's own launcher starts a single process for MULTI_CPU configs; the
    # same global batch as the 1-process run: 4 per process x 2 processes
    launcher = ("torch.distributed.run", "--nproc_per_node", "2")
    sizes = ("--set", "teacher_train.batch_size=4", "--set", "student_train.batch_size=4")
    _first_run(out, env, launcher, *sizes)
    one = json.loads((tiny_run["out"] / "results.json").read_text())
    two = json.loads((out / "results.json").read_text())
    # DDP averages gradients in another order than one big batch, so the trained teacher agrees
    # with the 1-process teacher to float precision, not bit for bit (extraction alone is
    # byte-identical across process counts: tests/test_knowledge.py).
    # Tolerance on a stored probability. fp32: the teachers differ at float rounding, and the
    # store keeps fp16 values (11 significant bits, 2^-11 relative), so 2e-3 is loose. bf16 keeps
    # 8 significant bits: a logit of magnitude in [2, 4) is a multiple of 2^-6 = 0.016, and the
    # two teachers' weights (saved in bf16) round differently, so a logit can move by one or two
    # such steps; a probability moves by at most p(1 - p) <= 1/4 times a logit change, which
    # bounds it by 2 * 0.016 / 4 = 0.008 (0.0022 was seen): 1e-2.
    atol = {"fp32": 2e-3, "bf16": 1e-2}[tiny_run["precision"]]
    assert two["store"]["k"] == one["store"]["k"]
    assert two["store"]["bytes_per_token"] == one["store"]["bytes_per_token"]
    assert two["store"]["mean_topk_mass"] == pytest.approx(one["store"]["mean_topk_mass"], abs=1e-4)
    s1 = TopKStore(Path(one["artefacts"]["store"]) / "train")
    s2 = TopKStore(Path(two["artefacts"]["store"]) / "train")
    assert len(s1) == len(s2) and s1.meta["content_sha256"] == s2.meta["content_sha256"]
    same_rank = same_set = total = 0
    for i in range(len(s1)):
        (ids1, p1), (ids2, p2) = s1.example(i), s2.example(i)
        same_rank += int((ids1 == ids2).sum())
        total += ids1.size
        np.testing.assert_allclose(np.sort(p1, 1), np.sort(p2, 1), atol=atol)
        for a, pa, b, pb in zip(ids1, p1, ids2, p2, strict=True):
            common = set(a.tolist()) & set(b.tolist())
            same_set += len(common)
            # the same token gets the same probability: rank swaps are near-ties only
            qa = {t: x for t, x in zip(a.tolist(), pa.tolist(), strict=True)}
            qb = {t: x for t, x in zip(b.tolist(), pb.tolist(), strict=True)}
            assert max((abs(qa[t] - qb[t]) for t in common), default=0.0) <= atol
    assert same_set / total > 0.99  # the same top-k tokens
    if tiny_run["precision"] == "fp32":  # in the same order too (bf16: near-ties may swap)
        assert same_rank / total > 0.99
    assert two["c_star"] == pytest.approx(one["c_star"], abs=0.021)
    assert two["delta"] == pytest.approx(one["delta"], abs=0.021)
    for variant in pipeline.VARIANTS:
        for key in ("ece", "acc"):
            assert two["variants"][variant][key] == pytest.approx(
                one["variants"][variant][key], abs=0.02
            ), (variant, key)


def _clean(env: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "first_lib.cli", "clean", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=300)


def test_clean_keeps_what_a_run_made_and_removes_the_rest(tiny_run):
    """Every artefact a real tiny run wrote is live (the keys `clean` computes match the run's);
    stale entries are listed, deleted only with --yes, and one whose lock is held is kept."""
    import fcntl

    runs = Path(tiny_run["env"]["FIRST_HOME"]) / "runs"
    made = sorted(p.name for p in runs.iterdir())
    assert any(n.startswith("evaluate-") for n in made) and any(n.startswith("tiny-") for n in made)
    proc = _clean(tiny_run["env"])
    assert proc.returncode == 0, proc.stderr
    assert "stale " not in proc.stdout and "0 entries" in proc.stdout, proc.stdout

    old = runs / "teacher-000000000000"
    (old / "adapter").mkdir(parents=True)
    (old / "adapter" / "weights.bin").write_bytes(b"x" * 1000)
    (runs / "teacher-000000000000.lock").write_text("")
    busy = runs / "extract-111111111111"
    busy.mkdir()
    teacher = next(n for n in made if n.startswith("teacher-") and "." not in n)
    saving = runs / f"{teacher}.tmp"  # a live stage between saving and renaming its model
    saving.mkdir()
    with open(runs / "extract-111111111111.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        listed = _clean(tiny_run["env"])
        assert "stale  teacher-000000000000 " in listed.stdout
        assert "stale  teacher-000000000000.lock" in listed.stdout
        assert "kept extract-111111111111: another run holds its lock" in listed.stdout
        assert old.exists()  # listing deletes nothing
        assert saving.name not in listed.stdout
        removed = _clean(tiny_run["env"], "--yes")
        assert removed.returncode == 0, removed.stderr
    assert not old.exists() and not (runs / "teacher-000000000000.lock").exists()
    assert busy.exists() and saving.exists()
    expected = [*made, busy.name, busy.name + ".lock", saving.name]
    assert sorted(p.name for p in runs.iterdir()) == sorted(expected)


def test_clean_knows_the_frozen_bottom_cache(tmp_path, monkeypatch):
    """`first clean` lists the prefix cache's entries of another code version, broken ones and
    abandoned `.tmp` writes, and keeps current entries and a write in progress."""
    from first_lib import artefacts

    monkeypatch.setenv("FIRST_HOME", str(tmp_path / "home"))
    root = tmp_path / "home" / "prefix"
    code = artefacts.code_version(["first_lib.prefix"])
    for name, key_code in (("current", code), ("older", "0" * 12)):
        (root / name).mkdir(parents=True)
        (root / name / "meta.json").write_text(json.dumps({"key": {"code": key_code}}))
        (root / name / "states.safetensors").write_bytes(b"x" * 100)
    (root / "current.lock").write_text("")  # a current entry's lock stays
    (root / "older.lock").write_text("")  # an old entry's lock goes with it
    (root / "broken").mkdir()
    (root / "abandoned.tmp").mkdir()
    (root / "writing.tmp").mkdir()
    old = time.time() - 3600
    os.utime(root / "abandoned.tmp", (old, old))
    said: list[str] = []
    stale, _ = pipeline.clean(log=said.append)
    assert sorted(p.name for p in stale) == ["abandoned.tmp", "broken", "older", "older.lock"]
    assert any(line.startswith("stale  prefix/older ") for line in said), said
    pipeline.clean(apply=True, log=said.append)
    assert sorted(p.name for p in root.iterdir()) == ["current", "current.lock", "writing.tmp"]


def test_clean_keeps_the_artefacts_of_a_run_in_progress(tmp_path, monkeypatch):
    """A run with `--set` (keys no built-in profile names) registers its artefacts while it
    runs: `first clean --yes` keeps them then, removes them once the run has ended, and removes
    the `.work` leftover of a finished artefact at any time."""
    monkeypatch.setenv("FIRST_HOME", str(tmp_path / "home"))
    runs = tmp_path / "home" / "runs"
    mine = runs / "teacher-aaaaaaaaaaaa"  # a finished artefact of a run with --set
    (mine / "w").mkdir(parents=True)
    (mine / "meta.json").write_text('{"key": {}}')
    (runs / "teacher-aaaaaaaaaaaa.work").mkdir()  # left over by a kill before its removal
    unfinished = runs / "extract-bbbbbbbbbbbb.work"  # the run is working on it
    unfinished.mkdir()
    names = {mine.name, "extract-bbbbbbbbbbbb"}
    with pipeline.in_use(names):
        assert pipeline.names_in_use() == names
        pipeline.clean(apply=True, log=lambda m: None)
        assert mine.exists() and unfinished.exists()
        assert not (runs / "teacher-aaaaaaaaaaaa.work").exists()
    assert pipeline.names_in_use() == set()  # released with the run
    pipeline.clean(apply=True, log=lambda m: None)
    assert not mine.exists() and not unfinished.exists()


def test_in_use_of_a_killed_run_is_dropped(tmp_path, monkeypatch):
    """A registration whose process died (no lock held) no longer protects anything."""
    monkeypatch.setenv("FIRST_HOME", str(tmp_path / "home"))
    folder = tmp_path / "home" / "runs" / ".in-use"
    folder.mkdir(parents=True)
    (folder / "12345-1.json").write_text('["teacher-cccccccccccc"]')  # nobody holds its lock
    assert pipeline.names_in_use() == set()
    assert not (folder / "12345-1.json").exists()


def test_clean_yes_during_a_run_with_set(tmp_path):
    """`first clean --yes` while a `first run --set seed=1` is between stages: the run's finished
    artefacts (no built-in profile names their keys) are kept and the run ends normally."""
    from first_lib.profiles import get_profile

    env = {**os.environ, "FIRST_HOME": str(isolated_home(tmp_path)), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "first_lib.cli", "run", "--profile", "tiny", "--set", "seed=1"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(tmp_path / "out")],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    prof = get_profile("tiny", seed=1)
    old = os.environ["FIRST_HOME"]
    os.environ["FIRST_HOME"] = env["FIRST_HOME"]
    try:
        step = pipeline.plan(prof, "csqa")[0]
        teacher = pipeline.artefact_dir(step["stage"], step["key"])
    finally:
        os.environ["FIRST_HOME"] = old
    deadline = time.monotonic() + 600
    while not (teacher / "meta.json").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the clean could race it"
    cleaned = _clean(env, "--yes")
    assert cleaned.returncode == 0, cleaned.stderr
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert (teacher / "meta.json").exists() and (tmp_path / "out" / "results.json").exists()
    assert f"removed  {teacher.name} " not in cleaned.stdout
