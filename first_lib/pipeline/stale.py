"""`first clean`: which artefacts no built-in profile and setting of this version uses, and the
registry of runs in progress (`in_use`), whose artefacts are kept whatever their keys."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from first_lib import fsio
from first_lib.artefacts import artefact_lock, code_version, is_done
from first_lib.beyond.plan import artefact_names as study_artefact_names
from first_lib.config import TASK_NAMES, Profile, with_training_seed
from first_lib.errors import FirstError
from first_lib.paths import first_home
from first_lib.pipeline.graph import run_artefacts
from first_lib.profiles import PROFILES, all_settings, for_setting


def live_artefacts() -> set[str]:
    """Names of every artefact a built-in profile and setting of this version would use at either
    precision and every training seed of the profile (with the beyond-k study's, at its default
    k and draws), plus those of runs in progress (`in_use`). Every valid setting counts, not only
    the book's three: a finished run of another task's setting is as current as the book's."""
    names = set()
    combos = itertools.product(PROFILES.values(), all_settings(), ("fp32", "bf16"))
    for base, setting, precision in combos:
        # at that precision: a profile's `per_precision` table is read at the one it resolves
        for prof in _as_run(replace(base, precision=precision), setting):
            for seed in base.seeds:  # every training seed of the profile (`first run --seeds`),
                # which a run writes into both training configs too (`with_training_seed`)
                seeded = with_training_seed(replace(prof, seed=seed))
                names |= run_artefacts(seeded, setting, precision)
                # and the chapter beyond_k's study on top of that run, at its default k and draws
                names |= study_artefact_names(replace(seeded, precision=precision), setting)
    return names | names_in_use()


def _as_run(base: Profile, setting: str) -> list[Profile]:
    """`base` as a run of `setting` uses it; out of domain also tested on every task
    (`--set ood_tests=...` picks any: each evaluation's key names its test set, so these are
    the evaluations of any list). The default list counts apart: the tiny profile's models
    depend on the list."""
    prof = for_setting(base, setting)
    return [prof, replace(prof, ood_tests=TASK_NAMES)] if setting == "ood" else [prof]


def _in_use_dir() -> Path:
    return first_home() / "runs" / ".in-use"


@contextlib.contextmanager
def in_use(names: set[str]) -> Iterator[None]:
    """Register `names` as used by this process while the block runs: a file listing them, held
    under an exclusive lock, so `first clean` keeps them (a run with `--set` whose keys no
    built-in profile names included). The kernel drops the lock of a killed process."""
    folder = _in_use_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}-{time.monotonic_ns()}.json"
    tmp = path.with_suffix(".tmp")  # locked before it gets the name `names_in_use` reads
    with open(tmp, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps(sorted(names)))
        fh.flush()
        os.replace(tmp, path)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)


def names_in_use() -> set[str]:
    """Artefact names registered by runs in progress; registrations of dead runs are removed."""
    names: set[str] = set()
    folder = _in_use_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            with open(path) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:  # held: the run is alive
                    names.update(json.loads(path.read_text() or "[]"))
                    continue
                fcntl.flock(fh, fcntl.LOCK_UN)
            path.unlink(missing_ok=True)  # nobody holds it: a run that was killed
        except (OSError, ValueError):
            continue
    return names


def _is_locked(path: Path) -> bool:
    """Whether another process holds the lock of artefact `path` (writing it right now)."""
    try:
        with artefact_lock(path, wait=False):
            return False
    except FirstError:
        return True


def _held(lock: Path) -> bool:
    """Whether a live process holds lock file `lock` (which is never created here)."""
    try:
        with open(lock) as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def stale_prefix_entries(now: float | None = None) -> list[Path]:
    """Entries of the frozen-bottom cache (`$FIRST_HOME/prefix/`, `first_lib.prefix`) that no
    run can use: made by another version of its code, without a readable meta.json, or a
    `.tmp` folder left by a write that died (untouched for 10 minutes; a write takes seconds);
    an entry's `.lock` goes with it, and a lock held by a live process is never listed.
    An entry's other keys (weights, tokens) cannot be priced without loading the models, so a
    current entry is kept whichever run made it."""
    root = first_home() / "prefix"
    current = code_version(["first_lib.prefix"])
    now = time.time() if now is None else now
    out = []
    entries = sorted(root.iterdir()) if root.is_dir() else []
    for path in entries:
        if path.name.endswith(".lock"):  # an entry's lock: stale with its entry, if not held
            entry = path.with_name(path.name.removesuffix(".lock"))
            if entry.exists() or _held(path):
                continue
            out.append(path)
            continue
        if path.name.endswith(".tmp"):
            if now - path.stat().st_mtime > 600:
                out.append(path)
            continue
        try:
            code = json.loads((path / "meta.json").read_text())["key"]["code"]
        except (OSError, ValueError, KeyError, TypeError):
            code = None
        if code != current and not _held(path.with_name(path.name + ".lock")):
            out.append(path)
            lock = path.with_name(path.name + ".lock")
            if lock.exists():
                out.append(lock)
    return out


def clean(apply: bool = False, log=print) -> tuple[list[Path], int]:
    """The artefacts under `first_home()/runs` that no built-in profile and setting of this version
    uses (older versions' keys, `--set` overrides), with their total size; deleted when `apply`.
    Artefacts of runs in progress (`in_use`, e.g. with `--set`), in-progress work of a live key
    (`.work`, `.tmp`) and anything whose lock is held are kept; folders moved aside as corrupt
    (`.corrupt-*`) and the `.work` leftovers of finished artefacts are stale, and so are the
    frozen-bottom cache's entries that `stale_prefix_entries` names."""
    runs = first_home() / "runs"
    live = live_artefacts()
    stale, total, kept = [], 0, 0
    for path in sorted(runs.iterdir()) if runs.is_dir() else []:
        if path.name == ".in-use":
            continue
        name = path.name.split(".", 1)[0]  # <stage>-<hash>, without .lock / .work / .tmp
        aside = ".corrupt-" in path.name  # moved aside by `claim_done`: never in use
        # the work folder of a finished artefact is left over (a kill before its removal)
        leftover = path.name.endswith(".work") and is_done(runs / name)
        if leftover and not _is_locked(runs / name):
            aside = True
        if name in live and not aside:
            kept += 1
            continue
        if not aside and (runs / f"{name}.lock").exists() and _is_locked(runs / name):
            log(f"kept {path.name}: another run holds its lock")
            kept += 1
            continue
        size = fsio.dir_size(path)
        stale.append(path)
        total += size
        log(f"{'removed' if apply else 'stale'}  {path.name}  {size / 1e9:.2f} GB")
        if apply:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in stale_prefix_entries():
        size = fsio.dir_size(path)
        stale.append(path)
        total += size
        log(f"{'removed' if apply else 'stale'}  prefix/{path.name}  {size / 1e9:.2f} GB")
        if apply:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                missing_ok=True
            )
    verb = "removed" if apply else "would remove (run again with --yes)"
    log(f"{verb}: {len(stale)} entries, {total / 1e9:.2f} GB; kept {kept} entries in use")
    return stale, total
