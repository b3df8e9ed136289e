"""Fault injection: `kill -9` a `first run --profile tiny` at random moments, resume it, and check
that the resumed run ends with the same store and the same metrics as an uninterrupted one.

    python -m scripts.fault_injection                    # 5 trials, up to 3 kills each
    python -m scripts.fault_injection --trials 20 --seed 7 --max-kills 4 --keep

1. The reference: `first run --profile tiny --setting csqa --out ...` once, uninterrupted, in a
   fresh FIRST_HOME; its wall time D is measured.
2. Each trial starts from another fresh FIRST_HOME and draws 1..max-kills points uniformly in
   (0, D) (seeded), in order. For each point it starts the same command and SIGKILLs its whole
   process group when the run gets there: after the first point's time for the first kill, and
   for kill j after the time between points j-1 and j plus the start-up (imports, data) the
   resumed run pays again; a run that finishes first is not killed. Then it runs the command
   once more, to completion.
3. The store (every file of the extraction artefact but its stage meta.json, which holds a wall
   time) must be byte-identical to the reference's, and `results.json` identical (timings live
   in timings.json; any key naming seconds or timings would be ignored). A table of the trials
   is printed; the exit status is 1 on any mismatch.

Every run uses the same FIRST_HOME path (the previous one is renamed away), so the absolute
artefact paths inside results.json agree. The models and wheels folders of the real
FIRST_HOME are linked in (downloads are shared; nothing is written there). The stage running at
a kill is read from the `[first] <stage>: ...` lines the pipeline prints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMING_WORDS = ("seconds", "timing", "wall")


def fresh_home(path: Path, cache: Path | None = None) -> Path:
    """An empty FIRST_HOME at `path` whose wheels/ and models/ are links to `cache`'s."""
    from first_lib.paths import first_home

    cache = cache or first_home()
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for name in ("wheels", "models"):
        (cache / name).mkdir(parents=True, exist_ok=True)
        (path / name).symlink_to((cache / name).resolve(), target_is_directory=True)
    return path


def first_command(out: Path, setting: str = "csqa", *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "first_lib.cli", "run", "--profile", "tiny"]
    return [*cmd, "--setting", setting, "--out", str(out), *extra]


@dataclass
class Run:
    """One process: exit code, whether it was killed, when, and in which stage."""

    rc: int | None = None
    killed: bool = False
    kill_at: float | None = None
    stage: str = ""
    wall: float = 0.0
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds, stderr line)

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.lines)


def stage_at(lines: list[tuple[float, str]], t: float) -> str:
    """The stage running at time t: the last `[first] <stage>: ...` line printed before it."""
    stage = "startup"
    for when, line in lines:
        if when > t:
            break
        if line.startswith("[first] ") and ":" in line:
            head = line[len("[first] ") :].split(":", 1)[0].strip()
            stage = "results" if head.startswith("wrote") else head
    return stage


def run_first(cmd: list[str], env: dict, kill_at: float | None = None, timeout: float = 900) -> Run:
    """Run `cmd` in its own process group; SIGKILL the group at `kill_at` s if still running."""
    run = Run(kill_at=kill_at)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill reaches every child
    )

    def read() -> None:
        for line in proc.stderr:
            run.lines.append((time.perf_counter() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=kill_at if kill_at is not None else timeout)
    except subprocess.TimeoutExpired:
        if kill_at is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        os.killpg(proc.pid, signal.SIGKILL)
        run.killed = True
        proc.wait()
    reader.join(timeout=10)
    run.rc = proc.returncode
    run.wall = time.perf_counter() - t0
    if run.killed:
        run.stage = stage_at(run.lines, kill_at)
    return run


def store_files(home: Path) -> dict[str, str]:
    """sha256 of every file of the extraction artefact(s) under home/runs, by relative path;
    the stage's own meta.json (a wall time) and lock files are left out."""
    out = {}
    for art in sorted((home / "runs").glob("extract-*")):
        if not art.is_dir() or art.name.endswith((".lock", ".tmp", ".work")):
            continue
        for path in sorted(art.rglob("*")):
            rel = path.relative_to(art)
            if not path.is_file() or rel.parts[0] == ".locks" or str(rel) == "meta.json":
                continue
            out[f"{art.name}/{rel}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def without_timings(obj):
    """A JSON value with every key that names a duration removed (recursively)."""
    if isinstance(obj, dict):
        return {
            k: without_timings(v)
            for k, v in obj.items()
            if not any(w in k.lower() for w in TIMING_WORDS)
        }
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def compare(ref_home: Path, ref_out: Path, home: Path, out: Path) -> tuple[str, str]:
    """(store verdict, results verdict) of a run against the reference."""
    a, b = store_files(ref_home), store_files(home)
    if not a:
        store = "no store"
    elif a == b:
        store = f"identical ({len(a)} files)"
    else:
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        store = f"DIFFER: {', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''}"
    ref_bytes = (ref_out / "results.json").read_bytes()
    path = out / "results.json"
    if not path.is_file():
        return store, "MISSING"
    if path.read_bytes() == ref_bytes:
        results = "identical bytes"
    elif without_timings(json.loads(path.read_bytes())) == without_timings(json.loads(ref_bytes)):
        results = "identical metrics"
    else:
        results = "DIFFER"
    return store, results


def leftovers(home: Path) -> list[str]:
    """Temporary files or folders a killed run left in finished artefacts (should be none)."""
    runs = home / "runs"
    return sorted(str(p.relative_to(runs)) for p in runs.rglob("*") if ".tmp" in p.name)


def env_for(home: Path) -> dict:
    """The environment of a `first` subprocess using `home` as FIRST_HOME, without progress bars."""
    return {**os.environ, "FIRST_HOME": str(home), "TQDM_DISABLE": "1"}


def reference_run(
    work: Path, setting: str = "csqa", cache: Path | None = None
) -> tuple[Path, Path, Run | None]:
    """The uninterrupted tiny run, made under `work` once: (home, out, run or None if reused).

    It runs with FIRST_HOME = work/home (the path every later run of this work folder uses), and
    the finished home is renamed to work/reference-home.
    """
    ref_home, ref_out = work / "reference-home", work / "reference-out"
    if (ref_out / "results.json").is_file() and ref_home.is_dir():
        return ref_home, ref_out, None
    home = fresh_home(work / "home", cache)
    run = run_first(first_command(ref_out, setting), env_for(home))
    if run.rc != 0:
        raise RuntimeError(f"the uninterrupted run failed (rc={run.rc}):\n{run.stderr[-3000:]}")
    shutil.rmtree(ref_home, ignore_errors=True)
    home.rename(ref_home)
    return ref_home, ref_out, run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scripts.fault_injection",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--trials", type=int, default=5, help="fault-injection trials (default 5)")
    p.add_argument("--max-kills", type=int, default=3, help="kills per trial: 1..N (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--setting", default="csqa", help="setting of the tiny run (default csqa)")
    p.add_argument("--workdir", help="where the homes go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    if args.trials < 1 or args.max_kills < 1:
        p.error("--trials and --max-kills must be >= 1")

    from first_lib.paths import first_home

    cache = first_home()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="first-faults-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"  # every run uses this path; finished homes are renamed away
    env = env_for(home)

    def log(msg: str) -> None:
        print(msg, flush=True)

    shutil.rmtree(work / "reference-out", ignore_errors=True)  # always a new reference
    try:
        ref_home, ref_out, ref = reference_run(work, args.setting, cache)
    except RuntimeError as err:
        log(str(err))
        return 2
    stages = [(round(t, 1), stage_at(ref.lines, t)) for t, line in ref.lines if "[first]" in line]
    startup = stages[0][0] if stages else 0.0  # imports and data, paid by every run
    log(f"uninterrupted run: {ref.wall:.1f} s; stages start at {stages}")

    rows, kills, early, ok_trials = [], 0, 0, 0
    for trial in range(args.trials):
        rng = random.Random(args.seed * 1000 + trial)
        points = sorted(rng.uniform(0.0, ref.wall) for _ in range(rng.randint(1, args.max_kills)))
        # Kill j happens at point j of the uninterrupted run's timeline: a resumed run skips
        # the work done before point j-1 but pays the start-up again.
        times = [
            round(b - a + (startup if a else 0.0), 2)
            for a, b in zip([0.0, *points[:-1]], points, strict=True)
        ]
        fresh_home(home, cache)
        out = work / f"trial{trial}-out"
        shots = []
        for t in times:
            r = run_first(first_command(out, args.setting), env, kill_at=t)
            if r.killed:
                kills += 1
                shots.append(f"{t:.1f}s@{r.stage}")
            else:
                early += 1
                shots.append(f"{t:.1f}s:finished(rc={r.rc})")
        final = run_first(first_command(out, args.setting), env)
        if final.rc != 0:
            store, results = "-", f"resume failed (rc={final.rc}): {final.stderr[-300:]}"
        else:
            store, results = compare(ref_home, ref_out, home, out)
        left = leftovers(home)
        good = final.rc == 0 and store.startswith("identical") and results.startswith("identical")
        ok_trials += good
        rows.append(
            (
                str(trial),
                ", ".join(shots),
                f"{final.wall:.1f}",
                store,
                results,
                str(len(left)),
                "match" if good else "MISMATCH",
            )
        )
        trial_home = work / f"trial{trial}-home"
        shutil.rmtree(trial_home, ignore_errors=True)
        home.rename(trial_home)
        log(f"trial {trial}: {' | '.join(rows[-1][1:])}")

    header = ("trial", "kills (time@stage)", "resume s", "store", "results.json", "tmp", "verdict")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    log("")
    for row in [header, *rows]:
        log("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    log(
        f"\nfault injection: {args.trials} trials, {kills} kills delivered "
        f"({early} more drawn after the run had already finished), "
        f"{ok_trials}/{args.trials} trials match the uninterrupted run"
    )
    if args.keep or ok_trials != args.trials:
        log(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok_trials == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
