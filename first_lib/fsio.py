"""Crash-safe file writes (temp file, fsync, rename, fsync the folder), folder sizes, file
checksums, and the named crash points a deterministic crash trial stops the process at."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# This module is the ground floor: it imports nothing from the project, so every module may use it.


@contextlib.contextmanager
def file_lock(
    path: str | os.PathLike, log=None, what: str = "", wait: bool = True
) -> Iterator[None]:
    """An exclusive advisory lock held on the file `path` (created if needed) while the block
    runs; a second process waits, saying `waiting: {what}` through `log` when given, or raises
    BlockingIOError when not `wait`. The kernel releases the lock of a killed process."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            if log is not None:
                log(f"waiting: {what or 'another process holds ' + path.name}")
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, crash_at: str | None = None) -> Path:
    """Write `data` to `path` so that a kill leaves either the old file or the new one, never
    half of one: a temporary file in the same folder, written, flushed and fsynced, renamed over
    `path`; then the folder is fsynced. The temporary file is removed on failure. `crash_at`
    names the crash point between the temporary file and the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if crash_at is not None:
            crash_point(crash_at)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(
    path: str | os.PathLike, text: str, encoding: str = "utf-8", crash_at: str | None = None
) -> Path:
    """`atomic_write_bytes` of `text` encoded."""
    return atomic_write_bytes(path, text.encode(encoding), crash_at=crash_at)


def atomic_write_json(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    default: Any = None,
    newline: bool = False,
    crash_at: str | None = None,
) -> Path:
    """`atomic_write_text` of `json.dumps(obj, ...)` (with a final newline when `newline`)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)
    return atomic_write_text(path, text + ("\n" if newline else ""), crash_at=crash_at)


def dir_size(path: str | os.PathLike) -> int:
    """Bytes of the files under folder `path` (a file: its size; nothing there: 0)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks (about 1 s a GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_bookkeeping(rel: Path) -> bool:
    """Lock files and folders, and temporary files a killed writer may leave behind."""
    return any(p == ".locks" or p.endswith(".lock") or ".tmp" in p for p in rel.parts)


def file_table(folder: str | os.PathLike, skip: tuple[str, ...] = ("meta.json",)) -> dict:
    """{relative path: {"size", "sha256"}} of every file under `folder` (sorted), except the
    top-level names in `skip`, lock files and temporary files."""
    folder = Path(folder)
    table = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or str(rel) in skip or _is_bookkeeping(rel):
            continue
        table[rel.as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return table


def table_problem(
    folder: str | os.PathLike, table: dict, hashes: bool = False, source: str = "meta.json"
) -> str | None:
    """Why the files under `folder` do not match `table` (from `file_table`; `source` names where
    it is recorded), or None: a missing file or another size (a stat each), or with `hashes`
    another sha256 (a full read)."""
    folder = Path(folder)
    for rel, want in table.items():
        path = folder / rel
        try:
            size = path.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != want["size"]:
            return f"{rel} has {size} bytes, {source} records {want['size']}"
        if hashes and file_sha256(path) != want["sha256"]:
            return f"{rel} does not match the sha256 {source} records"
    return None


# ----------------------------------------------------------------------------- crash points

CRASH_ENV = "FIRST_CRASH_AT"
# Every named commit window of the pipeline, in the order a run reaches them. With
# FIRST_CRASH_AT=<name> (or <name>:<N>, the N-th time it is reached) the process exits there at
# once with status 137, as after a SIGKILL; `python -m scripts.crash_trial` resumes from each.
CRASH_POINTS = {
    "meta:tmp-written": "meta.json written to its temporary name, not yet renamed",
    "meta:written": "meta.json renamed into place (the artefact is finished)",
    "tiny-models:files-written": "tiny models and tokenizer saved, before meta.json",
    "checkpoint:tmp-written": "a checkpoint written and fsynced in checkpoint.tmp",
    "checkpoint:old-renamed": "the previous checkpoint renamed to checkpoint.old",
    "checkpoint:renamed": "checkpoint.tmp renamed to checkpoint, checkpoint.old not yet removed",
    "train:model-tmp-written": "the trained model saved in <artefact>.tmp",
    "train:old-removed": "an old artefact folder removed, <artefact>.tmp not yet renamed",
    "train:model-renamed": "<artefact>.tmp renamed to the artefact, before meta.json",
    "train:meta-written": "meta.json written, the .work folder not yet removed",
    "extract:shard-written": "a store shard renamed into place",
    "extract:store-meta-written": "a store's meta.json written, before its MANIFEST.json",
    "extract:manifest-written": "a store's MANIFEST.json written, before the extract meta.json",
    "calibrate:computed": "c* and delta found, before meta.json",
    "evaluate:records-written": "records.jsonl and metrics.json written, before meta.json",
}
_CRASH_COUNTS: dict[str, int] = {}


def parse_crash_spec(spec: str) -> tuple[str, int]:
    """`name` or `name:N` -> (name, N); N defaults to 1."""
    head, _, tail = spec.rpartition(":")
    if head and tail.isdigit():
        return head, int(tail)
    return spec, 1


def crash_point(name: str) -> None:
    """Exit at once with status 137 (no cleanup, as a SIGKILL) when $FIRST_CRASH_AT names this
    point and this is the N-th time the process reaches it; otherwise nothing."""
    if name not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    want, nth = parse_crash_spec(spec)
    if want != name:
        return
    _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if _CRASH_COUNTS[name] == nth:
        print(f"[first] crash point {name}:{nth} reached: exiting 137", file=sys.stderr, flush=True)
        os._exit(137)
