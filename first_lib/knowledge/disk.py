"""Store files on disk: fsync'd writes, atomic JSON, reading JSON, the per-process lock."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from first_lib import fsio
from first_lib.errors import FirstError

_ENOSPC = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_file(path: Path, data: bytes | memoryview) -> None:
    """Write bytes and fsync them. The single place where store bytes hit the disk (tests patch
    it to simulate a full disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name in the same folder, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in _ENOSPC:
            raise FirstError(f"disk full while writing {path}") from None
        raise
    fsio.fsync_dir(path.parent)


def _read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def _lock(out_dir: Path, process_index: int) -> Iterator[None]:
    """An exclusive, non-blocking lock per (folder, process index); released even on kill -9."""
    lock_dir = out_dir / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    f = open(lock_dir / f"process-{process_index}.lock", "a+")
    try:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock
            pass
        except OSError:
            raise FirstError(
                f"another extraction (process {process_index}) is already writing {out_dir}; "
                "wait for it to finish or use another folder"
            ) from None
        yield
    finally:
        f.close()
