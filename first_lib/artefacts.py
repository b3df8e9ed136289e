"""Artefacts: folders under `first_home()/runs/<stage>-<hash>/` named by the hash of what made them,
finished when their `meta.json` (written last, fsynced, with the size and sha256 of every file)
records the key; checked, locked, moved aside when corrupt, and keyed by the code that made them.

Sizes are checked whenever a stage asks whether its artefact is done, sha256s once per process
when a stage reads an upstream artefact (`verify_upstream`). A meta.json that is corrupt or
records another key, or files that do not match it, are reported in one line, the folder moved
aside (`.corrupt-<time>`) and the artefact recomputed. A lock file stops two runs from writing the
same artefact.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path

from first_lib import fsio
from first_lib.errors import FirstError
from first_lib.paths import first_home

STORE_MANIFEST = "MANIFEST.json"  # a top-k store's own file table (first_lib.knowledge.MANIFEST)


def config_hash(obj) -> str:
    """A short, stable hash of a JSON-able description of what makes an artefact."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# The project's modules whose code each stage runs: a change to their code (not to comments,


_MODULE_HASHES: dict[str, str] = {}  # module name -> source_hash of its code, once per process


def source_hash(source: str) -> str:
    """sha256 of `ast.dump` of Python `source` with every docstring removed: comments, docstrings
    and formatting do not change it; code does."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = node.body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def module_hash(name: str) -> str:
    """`source_hash` of module `name`'s code, read without importing it (cached). For a package,
    of every `.py` file under it, with their relative paths, so an edit to any submodule counts."""
    if name not in _MODULE_HASHES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise FirstError(f"cannot find the source of module {name}")
        if spec.submodule_search_locations:  # a package
            root = Path(spec.origin).parent
            parts = [
                f"{path.relative_to(root)} {source_hash(path.read_text(encoding='utf-8'))}"
                for path in sorted(root.rglob("*.py"))
            ]
            _MODULE_HASHES[name] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        else:
            _MODULE_HASHES[name] = source_hash(Path(spec.origin).read_text(encoding="utf-8"))
    return _MODULE_HASHES[name]


def code_version(modules) -> str:
    """A short hash of the code of `modules` (names of the project's modules)."""
    text = "\n".join(f"{name} {module_hash(name)}" for name in sorted(modules))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def artefact_dir(stage: str, key: dict) -> Path:
    return first_home() / "runs" / f"{stage}-{config_hash(key)}"


def meta_problem(path: Path, key: dict | None = None) -> str | None:
    """Why `path/meta.json` does not mark a finished artefact of `key` (None: it does). A missing
    meta.json is a problem too ("missing"): the stage has not finished."""
    try:
        text = (path / "meta.json").read_text()
    except FileNotFoundError:
        return "missing"
    except (OSError, UnicodeDecodeError) as err:
        return f"meta.json is unreadable ({' '.join(str(err).split())})"
    if not text.strip():
        return "meta.json is corrupt (empty)"
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        return f"meta.json is corrupt ({err})"
    if not isinstance(meta, dict):
        return "meta.json is corrupt (not a JSON object)"
    if key is not None:
        want = json.loads(json.dumps(key, default=str))  # tuples and paths as JSON stores them
        if meta.get("key") != want:
            got = config_hash(meta["key"]) if "key" in meta else "none"
            return f"meta.json records another key (hash {got}, expected {config_hash(key)})"
    files = meta.get("files", {})  # artefacts made before file tables were recorded: none
    if not isinstance(files, dict):
        return "meta.json is corrupt (its file table is not a JSON object)"
    return fsio.table_problem(path, files)


def is_done(path: Path, key: dict | None = None) -> bool:
    """Whether `path` is a finished artefact: its meta.json parses, (when `key` is given) records
    `key`, and every file it lists is there with its recorded size."""
    return meta_problem(path, key) is None


def claim_done(path: Path, key: dict, log) -> bool:
    """`is_done(path, key)`, except that a meta.json that is corrupt or records another key, or
    a listed file that is missing or has another size, is reported in one line and the folder
    moved aside (renamed `<name>.corrupt-<time>`, never deleted), so the caller recomputes the
    artefact. Call it holding the artefact's lock."""
    problem = meta_problem(path, key)
    if problem is None:
        return True
    if problem == "missing":
        return False
    _move_aside(path, problem, log)
    return False


def _move_aside(path: Path, problem: str, log) -> None:
    """Rename artefact `path` to `<name>.corrupt-<time>` and say why in one line."""
    _VERIFIED.discard(str(path))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    path.rename(aside)
    fsio.fsync_dir(path.parent)
    log(f"{path.name}: {problem}; moved aside to {aside.name} and recomputing")


class UpstreamCorrupt(FirstError):
    """An artefact a stage was about to read did not match its meta.json and was moved aside;
    `run` starts over, which recomputes it."""


_VERIFIED: set[str] = set()  # artefact folders whose sha256s matched, once per process


def artefact_of(path) -> Path | None:
    """The artefact folder under `first_home()/runs` that holds `path` (None: not in one)."""
    runs = first_home() / "runs"
    try:
        rel = Path(path).relative_to(runs)
    except ValueError:
        return None
    return runs / rel.parts[0] if rel.parts else None


def _hash_problem(root: Path) -> str | None:
    problem = meta_problem(root)
    if problem is None:
        problem = fsio.table_problem(root, read_meta(root).get("files", {}), hashes=True)
    if problem is None and root.name.startswith("extract-"):
        for manifest in sorted(root.glob(f"*/{STORE_MANIFEST}")):  # a store's own file hashes
            rel = manifest.relative_to(root)
            try:
                shards = json.loads(manifest.read_text())["shards"]
                table = {
                    f"{s['name']}/{name}": {"size": f["bytes"], "sha256": f["sha256"]}
                    for s in shards
                    for name, f in s["files"].items()
                }
            except (OSError, ValueError, KeyError, TypeError):
                return f"{rel} is unreadable"
            problem = fsio.table_problem(manifest.parent, table, hashes=True, source=str(rel))
            if problem is not None:
                return f"{manifest.parent.name}/{problem}"
    return problem


def verify_upstream(path, log, acc=None) -> None:
    """Before a stage reads `path`: the sha256 of every file its artefact's meta.json lists (for
    a top-k store also the MANIFEST's), once per process. A mismatch is reported in one line,
    the artefact moved aside (by the main process) and `UpstreamCorrupt` raised."""
    root = artefact_of(path)
    if root is None or str(root) in _VERIFIED:
        return
    main = acc is None or acc.is_main_process
    with artefact_lock(root, log=log) if main else contextlib.nullcontext():
        problem = _hash_problem(root)
        if problem is None:
            _VERIFIED.add(str(root))
            return
        if main and root.exists():
            _move_aside(root, problem, log)
    raise UpstreamCorrupt(f"{root.name}: {problem}")


@contextlib.contextmanager
def artefact_lock(path: Path, wait: bool = True, log=None) -> Iterator[None]:
    """An exclusive lock on `path` (a sibling `.lock` file): a second run says so and waits
    (`wait`), or refuses. The kernel drops the lock of a killed process."""
    what = f"another run is writing {path.name} (lock {path.name}.lock)"
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(fsio.file_lock(path.with_name(path.name + ".lock"), log, what, wait))
        except BlockingIOError as err:
            raise FirstError(f"another run is writing {path}; wait for it to finish") from err
        yield


def write_meta(path: Path, meta: dict) -> None:
    """Write meta.json atomically and fsynced, with the size and sha256 of every other file of
    the artefact (`files`); its presence marks the artefact finished."""
    for stale in path.glob(".meta.json.tmp-*"):  # left by a run killed while writing it
        stale.unlink(missing_ok=True)
    meta = {**meta, "files": fsio.file_table(path)}
    fsio.atomic_write_json(
        path / "meta.json", meta, indent=2, default=str, crash_at="meta:tmp-written"
    )
    fsio.crash_point("meta:written")


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())
