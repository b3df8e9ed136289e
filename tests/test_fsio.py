"""first_lib.fsio: atomic, fsynced writes and folder sizes."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from first_lib import fsio


def test_atomic_write_json_and_text(tmp_path):
    path = tmp_path / "a.json"
    fsio.atomic_write_json(path, {"b": 1, "a": (1, 2)}, indent=2, sort_keys=True)
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True)
    fsio.atomic_write_json(path, {"x": Path("/p")}, default=str, newline=True)
    assert path.read_text() == '{\n  "x": "/p"\n}\n'
    fsio.atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_bytes() == "héllo\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "t.txt"]  # no temp left


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    fsio.atomic_write_text(path, "old")

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        fsio.atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_dir_size(tmp_path):
    assert fsio.dir_size(tmp_path / "missing") == 0
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "x").write_bytes(b"12345")
    (tmp_path / "d" / "e" / "y").write_bytes(b"123")
    assert fsio.dir_size(tmp_path / "d") == 8
    assert fsio.dir_size(tmp_path / "d" / "x") == 5
    fsio.fsync_dir(tmp_path / "d")  # no error
    fsio.fsync_dir(tmp_path / "missing")  # tolerated


def test_fsio_imports_nothing_from_the_project():
    tree = ast.parse(Path(fsio.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.startswith("first_lib")]


def test_write_meta_is_fsynced_before_it_counts(tmp_path, monkeypatch):
    """meta.json (what marks an artefact done) reaches the disk: the file and its folder."""
    from first_lib import pipeline

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    pipeline.write_meta(tmp_path, {"stage": "x", "path": tmp_path})
    monkeypatch.setattr(os, "fsync", fsync)
    assert json.loads((tmp_path / "meta.json").read_text()) == {"stage": "x", "path": str(tmp_path)}
    assert str(tmp_path) in synced and any(".meta.json.tmp-" in s for s in synced)
    assert pipeline.is_done(tmp_path)
