"""Crash-safe file writes (temp file, fsync, rename, fsync the folder) and folder sizes."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# This module is the ground floor: it imports nothing from the project, so every module may use it.


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, log=None, what: str = "") -> Iterator[None]:
    """An exclusive advisory lock held on the file `path` (created if needed) while the block
    runs; a second process waits, saying so through `log` when given. The kernel releases the
    lock of a killed process."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"waiting: another process is {what or 'holding ' + path.name}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def offline() -> bool:
    """Whether `FIRST_OFFLINE` forbids downloads (the test suite sets it after its set-up)."""
    return os.environ.get("FIRST_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's bytes to the disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename or a new file in it) to the disk. Filesystems that
    cannot fsync a folder are tolerated."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so that a kill leaves either the old file or the new one, never
    half of one: a temporary file in the same folder, written, flushed and fsynced, renamed over
    `path`; then the folder is fsynced. The temporary file is removed on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` of `text` encoded."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    default: Any = None,
    newline: bool = False,
) -> Path:
    """`atomic_write_text` of `json.dumps(obj, ...)` (with a final newline when `newline`)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)
    return atomic_write_text(path, text + ("\n" if newline else ""))


def dir_size(path: str | os.PathLike) -> int:
    """Bytes of the files under folder `path` (a file: its size; nothing there: 0)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
