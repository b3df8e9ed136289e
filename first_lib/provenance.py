"""Where a lab file came from: the repository's commit and the time, as the exported files
(`first export-records`, `first export-knowledge`) and the memory probe record them."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> dict:
    """The repository's commit, and whether first_lib/ had uncommitted changes (None outside a
    git checkout)."""

    def git(*args):
        proc = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False
        )
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "first_lib")
    return {"commit": commit, "first_lib_changed": bool(dirty) if commit else None}


def iso(seconds: float) -> str:
    """`seconds` since the epoch as an ISO 8601 UTC time to the second."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
