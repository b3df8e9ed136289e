"""Reliability: `kill -9` at any point resumes to the same bytes, two runs never both write one
artefact, and the tiny profile is deterministic (TINY RANDOM MODELS: machinery only).

The long fault-injection campaign is `python -m scripts.fault_injection` (a short version runs
here under `-m slow`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from first_lib import artefacts, pipeline
from first_lib.errors import FirstError
from first_lib.knowledge import TopKStore
from first_lib.profiles import get_profile
from scripts import fault_injection as fi

REPO = Path(__file__).resolve().parents[1]

# A child process: a small random causal model (plain torch, so the child starts fast) has its
# top-k over 40 examples extracted in shards of 4. argv: OUT PAUSE_SHARD. With PAUSE_SHARD >= 0
# the child stops (sleeps) right after the first file of that shard's temporary folder is
# written and says "partial": a kill then leaves a half-written shard, the worst moment.
CHILD = r"""
import sys, time, types
import numpy as np, torch
torch.set_num_threads(1)
from first_lib import knowledge as kn
from first_lib.knowledge import disk

class Toy(torch.nn.Module):
    def __init__(self, vocab=300, dim=32):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mix = torch.nn.Embedding(vocab, dim), torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
    def get_input_embeddings(self): return self.emb
    def get_output_embeddings(self): return self.head
    def forward(self, input_ids, attention_mask=None, use_cache=False):
        h = self.emb(input_ids).cumsum(1)  # causal: position t sees tokens 0..t
        return types.SimpleNamespace(logits=self.head(torch.tanh(self.mix(h))) * 4)

out, pause = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
examples = []
for i in range(40):
    n = int(rng.integers(8, 40))
    examples.append({"id": f"e{i}", "input_ids": rng.integers(0, 300, n).tolist(),
                     "target_mask": [n // 2 <= t < n - 1 for t in range(n)]})
write = disk._write_file
def paused_write(path, data):
    write(path, data)
    if pause >= 0 and path.parent.name.startswith(f"shard-{pause:05d}.tmp"):
        print("partial", flush=True)
        time.sleep(600)
disk._write_file = paused_write
kn.extract_topk(Toy().eval(), examples, out, k=5, batch_size=4, shard_size=4, progress=False,
                on_shard_written=lambda i: print("shard", i, flush=True))
print("done", flush=True)
"""


def _child(out: Path, pause: int = -1) -> list[str]:
    """Run CHILD; with `pause` >= 0, SIGKILL it once it reports the half-written shard."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), str(pause)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line.strip())
        if line.startswith("partial"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=300)
    return lines


def _files(store: Path) -> dict[str, str]:
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file() and ".locks" not in p.parts
    }


def test_extraction_killed_mid_shard_twice_resumes_byte_identical(tmp_path):
    ref, store = tmp_path / "ref", tmp_path / "store"
    assert _child(ref)[-1] == "done"

    lines = _child(store, pause=6)  # kill -9 while shard 6 is half-written
    assert lines[-1] == "partial" and lines[:-1] == [f"shard {i}" for i in range(6)]
    assert len(list(store.glob("shard-00006.tmp-*"))) == 1  # the half-written folder
    assert not (store / "shard-00006").exists() and not (store / "MANIFEST.json").exists()
    with pytest.raises(FirstError, match="not a finished top-k store"):
        TopKStore(store)  # a half-written store is never read

    lines = _child(store, pause=8)  # resumes at shard 6, killed again inside shard 8
    assert lines == ["shard 6", "shard 7", "partial"]
    assert not list(store.glob("shard-00006.tmp-*"))  # the stale folder was removed

    lines = _child(store)  # resumes at shard 8 and finishes
    assert lines == ["shard 8", "shard 9", "done"]
    assert not list(store.glob("*.tmp*")) and not list(store.glob(".*.tmp*"))
    assert _files(store) == _files(ref)  # byte-identical to the uninterrupted store


@pytest.fixture
def one_thread():
    """Tiny models train many times faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_checkpoint_killed_between_renames_resumes_identically(tmp_path, one_thread, precision):
    """A kill between `save_checkpoint`'s two renames leaves only `checkpoint.old` (complete)
    and a `checkpoint.tmp`; the next run resumes from the old one and ends identical."""
    from first_lib import models, train

    def examples():
        g = torch.Generator().manual_seed(0)
        out = []
        for i in range(24):
            n = int(torch.randint(6, 16, (1,), generator=g))
            ids = torch.randint(0, 64, (n,), generator=g).tolist()
            out.append(
                {"id": f"x{i}", "input_ids": ids, "target_mask": [t == n - 2 for t in range(n)]}
            )
        return out

    cfg = train.TrainConfig(lr=1e-3, epochs=2, batch_size=4, save_every=2)
    prec = {"precision": precision}
    data = examples()
    full, full_log = train.train(
        models.make_tiny_model(64, "student"), data, cfg, pad_id=0, progress=False, **prec
    )

    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        train.train(
            models.make_tiny_model(64, "student"),
            data,
            cfg,
            pad_id=0,
            work_dir=work,
            progress=False,
            stop_after=4,
            **prec,
        )
    ckpt = work / "checkpoint"
    ckpt.rename(work / "checkpoint.old")  # killed after the first rename ...
    (work / "checkpoint.tmp").mkdir()  # ... with the next checkpoint half-written
    (work / "checkpoint.tmp" / "trainable.safetensors").write_bytes(b"\0" * 10)
    resumed, log = train.train(
        models.make_tiny_model(64, "student"),
        data,
        cfg,
        pad_id=0,
        work_dir=work,
        progress=False,
        **prec,
    )
    assert log["steps"] == full_log["steps"] == 12 and log["losses"] == full_log["losses"]
    assert log["tokens"] < full_log["tokens"]  # resumed at step 4, not from the start
    for (name, a), (_, b) in zip(
        full.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def _ckpt_train(**kw):
    """A tiny student trained for 12 steps at fp32 on `_ckpt_examples` (checkpoint every 2)."""
    from first_lib import models, train

    cfg = train.TrainConfig(lr=1e-3, epochs=2, batch_size=4, save_every=2)
    model = models.make_tiny_model(64, "student")
    data = _ckpt_examples()
    return train.train(model, data, cfg, pad_id=0, progress=False, precision="fp32", **kw)


def _ckpt_examples() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(24):
        n = int(torch.randint(6, 16, (1,), generator=g))
        ids = torch.randint(0, 64, (n,), generator=g).tolist()
        out.append({"id": f"x{i}", "input_ids": ids, "target_mask": [t == n - 2 for t in range(n)]})
    return out


@pytest.mark.parametrize("window", ["new_and_old", "old_half_removed", "tmp_only", "old_only"])
def test_checkpoint_every_kill_window_resumes_identically(
    tmp_path, one_thread, monkeypatch, window
):
    """Each state a kill inside `save_checkpoint` can leave, made by hand: training resumes from
    the newest complete checkpoint, later rotations do not wedge on a leftover `.old`, and the
    result is bit-identical to an uninterrupted run (fp32)."""
    from first_lib import checkpoint

    run = _ckpt_train

    full, full_log = run()
    work = tmp_path / "work"
    ckpt, old, tmp = work / "checkpoint", work / "checkpoint.old", work / "checkpoint.tmp"
    with pytest.raises(KeyboardInterrupt):
        run(work_dir=work, stop_after=2)
    shutil.copytree(ckpt, tmp_path / "step2")
    with pytest.raises(KeyboardInterrupt):
        run(work_dir=work, stop_after=4)  # resumes at 2; `checkpoint` now holds step 4
    if window == "new_and_old":  # killed after the second rename, before the removal of .old
        shutil.copytree(tmp_path / "step2", old)
    elif window == "old_half_removed":  # killed inside the removal of .old
        shutil.copytree(tmp_path / "step2", old)
        (old / "trainable.safetensors").unlink()
        (old / "optim.pt").unlink()
    elif window == "tmp_only":  # killed while the next checkpoint was being written
        tmp.mkdir()
        (tmp / "trainable.safetensors").write_bytes(b"\0" * 10)
    else:  # killed between the two renames: only .old, complete, and the new one half-written
        ckpt.rename(old)
        shutil.copytree(tmp_path / "step2", tmp)
        (tmp / "state.json").unlink()
    resumed_from = []
    load = checkpoint.load_checkpoint

    def record(*a, **kw):
        step, hist = load(*a, **kw)
        resumed_from.append(step)
        return step, hist

    monkeypatch.setattr(checkpoint, "load_checkpoint", record)
    resumed, log = run(work_dir=work)
    assert resumed_from == [4]  # the newest complete one
    assert log["steps"] == full_log["steps"] == 12 and log["losses"] == full_log["losses"]
    assert ckpt.is_dir() and not old.exists() and not tmp.exists()
    assert json.loads((ckpt / "state.json").read_text())["step"] == 12
    for (name, a), (_, b) in zip(
        full.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_save_checkpoint_removes_a_stale_old(tmp_path):
    """A rotation next to a leftover `.old` (a kill after the second rename) succeeds."""
    from first_lib import checkpoint, models

    model = models.make_tiny_model(64, "student")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = tmp_path / "checkpoint"
    checkpoint.save_checkpoint(path, model, opt, sched, 1, [0.5])
    shutil.copytree(path, tmp_path / "checkpoint.old")
    checkpoint.save_checkpoint(path, model, opt, sched, 2, [0.5, 0.4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert json.loads((path / "state.json").read_text())["step"] == 2


def _reader(proc, lines: list[str]) -> threading.Thread:
    def read():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def test_two_concurrent_runs_never_both_write(tmp_path, monkeypatch):
    """Two `first teacher` runs on one FIRST_HOME while a third holder has the teacher's lock:
    both say they wait; afterwards each artefact was made by exactly one of them."""
    home = fi.fresh_home(tmp_path / "home")
    monkeypatch.setenv("FIRST_HOME", str(home))
    prof = get_profile("tiny", **{"teacher_train.max_steps": 2})
    steps = {s["stage"]: s for s in pipeline.plan(prof, "csqa")}
    teacher = pipeline.artefact_dir("teacher", steps["teacher"]["key"])
    cmd = [sys.executable, "-m", "first_lib.cli", "teacher", "--profile", "tiny"]
    cmd += ["--set", "teacher_train.max_steps=2"]
    env = fi.env_for(home)
    outs: list[list[str]] = [[], []]
    with pipeline.artefact_lock(teacher):
        procs = [
            subprocess.Popen(cmd, env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        readers = [_reader(p, out) for p, out in zip(procs, outs, strict=True)]
        deadline = time.monotonic() + 300
        wait = f"waiting: another run is writing {teacher.name}"
        while not all(any(wait in x for x in out) for out in outs):
            assert time.monotonic() < deadline, outs
            assert all(p.poll() is None for p in procs), outs  # nobody got past the lock
            time.sleep(0.2)
        assert not pipeline.is_done(teacher)
    for p, r in zip(procs, readers, strict=True):
        assert p.wait(timeout=600) == 0
        r.join(timeout=10)
    both = [line for out in outs for line in out]
    assert sum("tiny-models: training" in x for x in both) == 1, both
    assert sum("teacher: training" in x for x in both) == 1, both
    assert pipeline.is_done(teacher)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The uninterrupted tiny run (shared with tests/test_bad_input.py through basetemp)."""
    work = tmp_path_factory.getbasetemp() / "tiny-reference"
    home, out, _ = fi.reference_run(work)
    return work, home, out


def test_tiny_profile_is_deterministic(reference):
    """Two fresh FIRST_HOMEs (at the same path, so artefact paths agree): byte-identical
    results.json and store; timings live in timings.json, apart."""
    work, ref_home, ref_out = reference
    home = fi.fresh_home(work / "home")
    out = work / "second-out"
    run = fi.run_first(fi.first_command(out), fi.env_for(home))
    assert run.rc == 0, run.stderr[-3000:]
    shutil.rmtree(work / "second-home", ignore_errors=True)
    home.rename(work / "second-home")
    assert (out / "results.json").read_bytes() == (ref_out / "results.json").read_bytes()
    assert fi.store_files(work / "second-home") == fi.store_files(ref_home)
    timings = json.loads((out / "timings.json").read_text())
    assert {"teacher", "extract", "calibrate"} <= set(timings)
    assert "seconds" not in (out / "results.json").read_text()


def _foreign_key(meta: str) -> str:
    obj = json.loads(meta)
    obj["key"] = {**obj["key"], "k": 99}
    return json.dumps(obj)


@pytest.mark.parametrize(
    "stage, damage",
    [
        ("calibrate", lambda meta: ""),  # empty
        ("evaluate", lambda meta: meta[: len(meta) // 2]),  # truncated
        ("extract", _foreign_key),  # another artefact's key
    ],
    ids=["empty", "truncated", "foreign-key"],
)
def test_damaged_meta_is_moved_aside_and_recomputed(
    reference, tmp_path, monkeypatch, one_thread, stage, damage
):
    """A finished artefact whose meta.json is empty, truncated or records another key is not
    served: the next run says so in one line, moves the folder aside (never deletes it),
    recomputes it and ends with the reference's results; `first clean` lists it as stale."""
    work, ref_home, ref_out = reference
    home = work / "home"  # the reference run's path: evaluation keys name model folders
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(ref_home, home, symlinks=True)
    monkeypatch.setenv("FIRST_HOME", str(home))
    art = sorted(p for p in (home / "runs").glob(f"{stage}-*") if p.is_dir())[0]
    meta = art / "meta.json"
    meta.write_text(damage(meta.read_text()))
    assert not pipeline.is_done(
        art, json.loads((ref_home / "runs" / art.name / "meta.json").read_text())["key"]
    )

    if stage != "evaluate":  # --dry-run shows it (evaluations are not listed there)
        plan = pipeline.describe_plan(get_profile("tiny"), "csqa").splitlines()
        assert [x.split() for x in plan if art.name in x][0][:2] == [stage, "corrupt"]
    lines: list[str] = []
    out = tmp_path / "out"
    pipeline.run("tiny", "csqa", out=out, log=lines.append)
    moved = [x for x in lines if "moved aside" in x]
    assert len(moved) == 1, lines
    (aside,) = (home / "runs").glob(f"{art.name}.corrupt-*")
    assert moved[0].startswith(f"{art.name}: meta.json ") and aside.name in moved[0]
    assert "\n" not in moved[0]
    assert (aside / "meta.json").read_text() == damage(
        (ref_home / "runs" / art.name / "meta.json").read_text()
    )  # kept as it was
    assert any(x.startswith(f"{stage}:") for x in lines), lines  # recomputed
    assert json.loads(meta.read_text())["stage"] == stage
    assert (out / "results.json").read_text() == (ref_out / "results.json").read_text()

    listed: list[str] = []
    pipeline.clean(log=listed.append)
    assert [x for x in listed if x.startswith("stale")] == [
        x for x in listed if x.startswith(f"stale  {aside.name} ")
    ]
    assert len([x for x in listed if x.startswith("stale")]) == 1, listed


@pytest.mark.slow
def test_fault_injection_short(tmp_path, capsys):
    """One trial with up to two kill -9 at random times: the resumed run matches."""
    rc = fi.main(["--trials", "1", "--max-kills", "2", "--seed", "1", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "1/1 trials match" in out


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _flip_and_reseal_meta(path: Path) -> None:
    """A flipped byte in a store shard, with the extract meta.json's file table rewritten to
    match: only the store's MANIFEST hashes can still see it."""
    from first_lib import fsio

    _flip_last_byte(path)
    art = path.parents[2]  # <extract>/train/shard-00000/values.bin
    meta = json.loads((art / "meta.json").read_text())
    meta["files"] = fsio.file_table(art)
    (art / "meta.json").write_text(json.dumps(meta, indent=2))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _evaluations_of(home: Path, model: Path) -> list[Path]:
    return [
        p.parent
        for p in (home / "runs").glob("evaluate-*/meta.json")
        if json.loads(p.read_text())["key"]["model"] == str(model)
    ]


@pytest.mark.parametrize(
    "stage, rel, damage, reader",
    [
        ("extract", "train/shard-00000/values.bin", _flip_last_byte, "calibrate"),
        ("extract", "train/shard-00000/values.bin", _flip_and_reseal_meta, "calibrate"),
        ("finetune", "model.safetensors", _flip_last_byte, "evaluate"),
        ("teacher", "model.safetensors", _truncate, None),
    ],
    ids=[
        "store-shard-flipped",
        "store-shard-flipped-meta-resealed",
        "student-model-flipped",
        "teacher-model-truncated",
    ],
)
def test_damaged_file_is_moved_aside_and_recomputed(
    reference, tmp_path, monkeypatch, one_thread, stage, rel, damage, reader
):
    """A file of a finished artefact that no longer matches its meta.json: a truncated one is
    seen by the size check whenever the stage asks whether it is done; a same-size flip by the
    sha256 check when a stage reads the artefact (`reader`'s artefact is removed so that one
    does). Either is reported in one line, the folder moved aside, the artefact recomputed, and
    results.json ends byte-identical to the reference."""
    work, ref_home, ref_out = reference
    home = work / "home"  # the reference run's path: evaluation keys name model folders
    shutil.rmtree(home, ignore_errors=True)
    shutil.copytree(ref_home, home, symlinks=True)
    monkeypatch.setenv("FIRST_HOME", str(home))
    monkeypatch.setattr(artefacts, "_VERIFIED", set())
    (art,) = [p for p in (home / "runs").glob(f"{stage}-*") if p.is_dir() and "." not in p.name]
    damage(art / rel)
    if reader == "evaluate":
        readers = _evaluations_of(home, art)
    else:
        readers = [p for p in (home / "runs").glob(f"{reader}-*") if p.is_dir()] if reader else []
    # the fine-tuned student is evaluated twice: on the test set, and on the validation
    # questions for post-hoc temperature scaling
    assert len(readers) == {"evaluate": 2, "calibrate": 1, None: 0}[reader]
    for path in readers:
        shutil.rmtree(path)
    assert pipeline.is_done(art) == (damage is not _truncate)  # sizes only, cheap

    lines: list[str] = []
    out = tmp_path / "out"
    pipeline.run("tiny", "csqa", out=out, log=lines.append)
    moved = [x for x in lines if "moved aside" in x]
    assert len(moved) == 1, lines
    (aside,) = (home / "runs").glob(f"{art.name}.corrupt-*")
    assert moved[0].startswith(f"{art.name}: {rel} ") and aside.name in moved[0], moved
    assert (aside / rel).read_bytes() != (ref_home / "runs" / art.name / rel).read_bytes()
    assert any(x.startswith(f"{stage}:") for x in lines), lines  # recomputed
    assert (art / rel).read_bytes() == (ref_home / "runs" / art.name / rel).read_bytes()
    assert (out / "results.json").read_bytes() == (ref_out / "results.json").read_bytes()


def test_corrupt_checkpoint_is_reported_and_training_starts_over(reference, tmp_path, one_thread):
    """A run killed inside the teacher's training leaves `<teacher>.work/checkpoint`; with its
    weights file truncated the next run says so in one line, trains the teacher from the start,
    and ends byte-identical to the reference."""
    work, ref_home, ref_out = reference
    home = fi.fresh_home(work / "home")
    out = tmp_path / "out"
    env = {**fi.env_for(home), "FIRST_CRASH_AT": "checkpoint:renamed:2"}
    crashed = fi.run_first(fi.first_command(out), env)
    assert crashed.rc == 137, crashed.stderr[-2000:]
    (ckpt,) = (home / "runs").glob("teacher-*.work/checkpoint")
    assert json.loads((ckpt / "state.json").read_text())["step"] == 8
    _truncate(ckpt / "trainable.safetensors")

    env = {k: v for k, v in fi.env_for(home).items() if k != "FIRST_CRASH_AT"}
    done = fi.run_first(fi.first_command(out), env)
    assert done.rc == 0, done.stderr[-3000:]
    reported = [x for x in done.stderr.splitlines() if "checkpoint" in x and "unreadable" in x]
    assert len(reported) == 1 and "training from the start" in reported[0], done.stderr[-3000:]
    assert (out / "results.json").read_bytes() == (ref_out / "results.json").read_bytes()
    assert fi.store_files(home) == fi.store_files(ref_home)


def test_checkpoint_with_a_flipped_byte_is_not_resumed(tmp_path, one_thread):
    """Same size, other bytes: the sha256s in state.json catch it before anything is loaded;
    training starts over and ends bit-identical to an uninterrupted run (fp32)."""

    run = _ckpt_train

    full, full_log = run()
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        run(work_dir=work, stop_after=4)
    _flip_last_byte(work / "checkpoint" / "optim.pt")
    lines: list[str] = []
    resumed, log = run(work_dir=work, log=lines.append)
    assert len(lines) == 1 and "optim.pt does not match" in lines[0], lines
    assert log["tokens"] == full_log["tokens"] and log["losses"] == full_log["losses"]
    for (name, a), (_, b) in zip(
        full.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_crash_trial_covers_every_point():
    from first_lib import fsio
    from scripts import crash_trial

    assert crash_trial.points_of(crash_trial.TRIALS) == set(fsio.CRASH_POINTS)
    assert set(crash_trial.FAST) <= set(crash_trial.TRIALS)


def test_crash_trial_fast_subset(reference, capsys):
    """A deterministic kill at the checkpoint rotation (between the renames) and between the
    stores' MANIFESTs and the extract meta.json: each resumed run matches the reference."""
    from scripts import crash_trial

    work, _, _ = reference
    rc = crash_trial.main(
        ["--workdir", str(work), "--reuse-reference", "--points", *crash_trial.FAST]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert [x.split()[:2] for x in out.splitlines() if x.startswith(("PASS", "FAIL"))] == [
        ["PASS", p] for p in crash_trial.FAST
    ]


@pytest.mark.slow
def test_crash_trial_every_point(reference, capsys):
    """Every trial of `scripts.crash_trial.TRIALS` (about 10 min on two cores)."""
    from scripts import crash_trial

    work, _, _ = reference
    rc = crash_trial.main(["--workdir", str(work), "--reuse-reference"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{len(crash_trial.TRIALS)}/{len(crash_trial.TRIALS)} trials pass" in out
