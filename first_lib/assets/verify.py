"""Checking files against pinned SHA-256s, and stamps that remember a check (for `status`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from tqdm.auto import tqdm

from first_lib import fsio
from first_lib.errors import FirstError

CHUNK = 8 << 20  # bytes read at a time when hashing or joining (8 MiB)


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex SHA-256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"sha256 {path.name}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_file(path: str | Path, sha256: str, progress: bool = False) -> str:
    """Check a file against its pinned SHA-256; return the hash or raise FirstError.

    The error names the file and both hashes, so a user can tell a corrupt download from a
    changed release.
    """
    path = Path(path)
    if not path.is_file():
        raise FirstError(f"{path}: file is missing (expected SHA-256 {sha256})")
    actual = sha256_file(path, progress=progress)
    if actual != sha256.lower():
        raise FirstError(
            f"{path}: SHA-256 mismatch: expected {sha256}, got {actual}. The file is corrupt or "
            f"not the pinned release; it will not be used. Delete it and fetch again."
        )
    return actual


def _verify_asset(path: Path, sha256: str, progress: bool = False) -> str:
    """`verify_file`, then remember the success beside the file (for `status`)."""
    actual = verify_file(path, sha256, progress=progress)
    _write_stamp(path, actual)
    return actual


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _write_stamp(path: Path, sha256: str) -> None:
    """Remember a successful check (size, mtime, hash) so `status` need not re-hash."""
    st = path.stat()
    stamp = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with contextlib.suppress(OSError):  # a read-only cache still works, status just re-says
        # atomic: a process reading the stamp meanwhile never sees half of it (and re-hashes)
        fsio.atomic_write_text(_stamp_path(path), json.dumps(stamp))


def _stamp_ok(path: Path, sha256: str) -> bool:
    """True if `path` was verified against `sha256` and has not changed since."""
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (
        stamp.get("sha256") == sha256
        and stamp.get("size") == st.st_size
        and stamp.get("mtime_ns") == st.st_mtime_ns
    )
