"""Crash trial: stop a `first run --profile tiny` at every named commit window (a deterministic
kill -9), resume it, and check that it ends exactly as an uninterrupted run.

    python -m scripts.crash_trial                  # every trial of TRIALS
    python -m scripts.crash_trial --points checkpoint:old-renamed extract:manifest-written:2
    python -m scripts.crash_trial --list           # the crash points and the default trials

The crash points are `first_lib.fsio.CRASH_POINTS`; a run with FIRST_CRASH_AT=<point>[:N] exits
with status 137 (no cleanup, as after a SIGKILL) the N-th time it reaches that point.

1. The reference: the tiny run once, uninterrupted, in a fresh FIRST_HOME.
2. Each trial starts from another fresh FIRST_HOME at the same path (so the artefact paths in
   results.json agree) and runs `first run` with FIRST_CRASH_AT set to its point: the run must
   die with 137 at that point (a run that finishes, or dies otherwise, fails the trial). A
   trial `a,b` crashes at `a`, then at `b` on the next run (a window only a resumed run
   reaches). Then the run is resumed to completion without FIRST_CRASH_AT.
3. The resumed `results.json` must be byte-identical to the reference's, the store files too,
   no temporary file may be left under runs/, nothing may have been moved aside as corrupt.
   One line per trial (PASS or FAIL) and a summary are printed; the exit status is 1 on any
   failure.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from first_lib import fsio
from scripts import fault_injection as fi

# Every crash point at least once, in the order the tiny run reaches them, and the repeats that
# matter (occurrences count per process: 8 teacher checkpoints come first, then 4 per student;
# meta.json is written by tiny-models, teacher, extract, calibrate, finetune, three distills,
# then seven evaluations).
TRIALS = (
    "tiny-models:files-written",
    "meta:tmp-written",  # tiny-models' meta.json
    "meta:written",
    "checkpoint:tmp-written",  # the teacher's first checkpoint
    "checkpoint:old-renamed",  # its second: between the two renames
    "checkpoint:renamed",
    "checkpoint:tmp-written:3",
    "checkpoint:renamed:2",
    "checkpoint:old-renamed:9",  # the fine-tuned student's second checkpoint
    "train:model-tmp-written",  # the teacher
    "train:model-renamed",
    "train:model-renamed,train:old-removed",  # a resumed run replaces the folder without meta
    "meta:tmp-written:2",
    "train:meta-written",
    "extract:shard-written",  # the train store
    "extract:store-meta-written",
    "extract:manifest-written",
    "extract:shard-written:2",  # the validation store
    "extract:store-meta-written:2",
    "extract:manifest-written:2",  # both stores finished, before the extract meta.json
    "meta:tmp-written:3",  # the extract meta.json
    "meta:written:3",
    "calibrate:computed",
    "meta:tmp-written:4",
    "train:model-renamed:2",  # the fine-tuned student
    "train:model-tmp-written:3",  # distill (no transform): KD on the store
    "train:meta-written:5",  # the last distillation
    "evaluate:records-written",
    "meta:tmp-written:9",  # the first evaluation's meta.json
    "evaluate:records-written:7",  # the last evaluation
    "meta:written:15",
)
FAST = ("checkpoint:old-renamed", "extract:manifest-written:2")  # the default suite's subset


def points_of(trials) -> set[str]:
    """Names of the crash points `trials` (specs like `a:N,b`) stop at."""
    return {fsio.parse_crash_spec(p)[0] for t in trials for p in t.split(",")}


def run_trial(spec: str, work: Path, cache: Path, ref_home: Path, ref_out: Path) -> dict:
    """Crash at each point of `spec` in turn, then resume; the verdict against the reference."""
    home = fi.fresh_home(work / "home", cache)
    out = work / "trial-out"
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in fi.env_for(home).items() if k != fsio.CRASH_ENV}
    row = {"trial": spec, "crashed": [], "problems": []}
    for point in spec.split(","):
        name, nth = fsio.parse_crash_spec(point)
        r = fi.run_first(fi.first_command(out), {**env, fsio.CRASH_ENV: point})
        row["crashed"].append(f"{r.wall:.1f}s")
        if r.rc != 137 or f"crash point {name}:{nth} reached" not in r.stderr:
            why = "finished without reaching it" if r.rc == 0 else f"rc={r.rc}"
            row["problems"].append(f"{point} not reached ({why}): {r.stderr[-300:]!r}")
            return row
    final = fi.run_first(fi.first_command(out), env)
    row["resume"] = f"{final.wall:.1f}s"
    if final.rc != 0:
        row["problems"].append(f"resume failed (rc={final.rc}): {final.stderr[-500:]!r}")
        return row
    store, results = fi.compare(ref_home, ref_out, home, out)
    row["store"], row["results"] = store, results
    if not store.startswith("identical"):
        row["problems"].append(f"store {store}")
    if results != "identical bytes":
        row["problems"].append(f"results.json {results}")
    left = fi.leftovers(home)
    if left:
        row["problems"].append(f"left behind: {', '.join(left[:3])}")
    aside = sorted(p.name for p in (home / "runs").glob("*.corrupt-*"))
    if aside or "moved aside" in final.stderr:
        row["problems"].append(f"moved aside as corrupt: {', '.join(aside)}")
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scripts.crash_trial",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--points", nargs="+", help="trials to run (default: every one of TRIALS)")
    p.add_argument("--list", action="store_true", help="list the crash points and trials")
    p.add_argument(
        "--workdir", help="where the homes go (default: a temporary folder, removed after a pass)"
    )
    p.add_argument(
        "--reuse-reference",
        action="store_true",
        help="reuse a reference run already in --workdir (made by this version of the code)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.list:
        for name, what in fsio.CRASH_POINTS.items():
            log(f"{name:<28} {what}")
        log(f"\ndefault trials: {' '.join(TRIALS)}")
        return 0
    trials = tuple(args.points or TRIALS)
    unknown = points_of(trials) - set(fsio.CRASH_POINTS)
    if unknown:
        p.error(f"unknown crash points: {', '.join(sorted(unknown))} (see --list)")

    from first_lib.paths import first_home

    cache = first_home()
    own = not args.workdir  # a temporary folder of its own: removed after a clean pass
    work = Path(args.workdir or tempfile.mkdtemp(prefix="first-crash-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not args.reuse_reference:
        shutil.rmtree(work / "reference-out", ignore_errors=True)
    t0 = time.perf_counter()
    try:
        ref_home, ref_out, ref = fi.reference_run(work, cache=cache)
    except RuntimeError as err:
        log(str(err))
        return 2
    log(f"reference run: {'reused' if ref is None else f'{ref.wall:.1f} s'}")
    rows = []
    for spec in trials:
        row = run_trial(spec, work, cache, ref_home, ref_out)
        rows.append(row)
        verdict = "PASS" if not row["problems"] else "FAIL"
        detail = (
            "; ".join(row["problems"]) or f"store {row['store']}, results.json {row['results']}"
        )
        times = f"crashed after {'+'.join(row['crashed'])}, resumed in {row.get('resume', '-')}"
        log(f"{verdict}  {spec:<40} {times}: {detail}")
        if args.keep:
            shutil.rmtree(work / f"home-{len(rows)}", ignore_errors=True)
            (work / "home").rename(work / f"home-{len(rows)}")
    passed = sum(not r["problems"] for r in rows)
    missing = set(fsio.CRASH_POINTS) - points_of(trials)
    log(
        f"\ncrash trial: {passed}/{len(rows)} trials pass, {len(points_of(trials))} of "
        f"{len(fsio.CRASH_POINTS)} crash points tested"
        + (f" (not tested: {', '.join(sorted(missing))})" if missing else "")
        + f", {time.perf_counter() - t0:.0f} s"
    )
    if own and (args.keep or passed != len(rows)):
        log(f"work folder kept: {work}")
    elif own:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
