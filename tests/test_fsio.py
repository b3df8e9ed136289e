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
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta == {"stage": "x", "path": str(tmp_path), "files": {}}
    assert str(tmp_path) in synced and any(".meta.json.tmp-" in s for s in synced)
    assert pipeline.is_done(tmp_path)


def test_file_table_lists_files_but_not_meta_locks_or_temporaries(tmp_path):
    (tmp_path / "sub" / ".locks").mkdir(parents=True)
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub" / "b.txt").write_bytes(b"")
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "sub" / ".locks" / "process-0.lock").write_text("")
    (tmp_path / ".meta.json.tmp-12").write_text("{")
    (tmp_path / "shard-00001.tmp-3").mkdir()
    (tmp_path / "shard-00001.tmp-3" / "x").write_bytes(b"1")
    table = fsio.file_table(tmp_path)
    assert list(table) == ["a.bin", "sub/b.txt"]
    assert table["a.bin"] == {"size": 3, "sha256": fsio.file_sha256(tmp_path / "a.bin")}
    assert fsio.table_problem(tmp_path, table, hashes=True) is None
    (tmp_path / "a.bin").write_bytes(b"abd")  # same size: only the full check sees it
    assert fsio.table_problem(tmp_path, table) is None
    assert "a.bin does not match" in fsio.table_problem(tmp_path, table, hashes=True)
    (tmp_path / "a.bin").write_bytes(b"ab")
    assert fsio.table_problem(tmp_path, table) == "a.bin has 2 bytes, meta.json records 3"
    (tmp_path / "sub" / "b.txt").unlink()
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert fsio.table_problem(tmp_path, table) == "sub/b.txt is missing"


def test_crash_point_exits_137_at_the_nth_time_only():
    """FIRST_CRASH_AT=name:N exits with 137 the N-th time `name` is reached; other points and
    unset variables do nothing; an unknown name is a programming error."""
    import subprocess
    import sys

    code = (
        "from first_lib import fsio\n"
        "for i in range(3):\n"
        "    fsio.crash_point('meta:written'); fsio.crash_point('meta:tmp-written')\n"
        "    print('passed', i, flush=True)\n"
    )

    def run(spec):
        env = {**os.environ, fsio.CRASH_ENV: spec} if spec else dict(os.environ)
        env.pop(fsio.CRASH_ENV, None) if not spec else None
        cwd = Path(fsio.__file__).parents[1]
        return subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True
        )

    r = run("meta:tmp-written:2")
    assert r.returncode == 137 and r.stdout.split("\n")[:-1] == ["passed 0"]
    assert "crash point meta:tmp-written:2 reached" in r.stderr
    r = run("meta:written")
    assert r.returncode == 137 and r.stdout == ""
    assert run("").returncode == 0 and run("meta:written:4").returncode == 0
    assert fsio.parse_crash_spec("a:b:12") == ("a:b", 12)
    assert fsio.parse_crash_spec("a:b") == ("a:b", 1)
    with pytest.raises(ValueError, match="unknown crash point"):
        fsio.crash_point("no-such-point")


def test_every_crash_point_is_registered_and_placed():
    """The names passed to `crash_point` in the project are exactly `CRASH_POINTS`."""
    used = set()
    for path in Path(fsio.__file__).parent.rglob("*.py"):  # packages too
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", "")) == "crash_point"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                used.add(node.args[0].value)
            for kw in getattr(node, "keywords", []) if isinstance(node, ast.Call) else []:
                if kw.arg == "crash_at" and isinstance(kw.value, ast.Constant) and kw.value.value:
                    used.add(kw.value.value)
    assert used == set(fsio.CRASH_POINTS)
