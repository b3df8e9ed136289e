"""Where artefacts live: one root, `FIRST_HOME`, outside the repository by default."""

from __future__ import annotations

import os
from pathlib import Path


def first_home() -> Path:
    """The artefact root: `$FIRST_HOME`, else `$XDG_CACHE_HOME/first-book`, else ~/.cache/first-book."""
    env = os.environ.get("FIRST_HOME")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "first-book"
