"""Write the paired notebooks: notebooks/<name>.ipynb from chapters/<name>.md (`make notebooks`).

    python -m scripts.notebooks            # write every chapter's notebook, drop stale ones
    python -m scripts.notebooks --check    # exit 1 naming each notebook that differs

The chapters' MyST sources are the book; these are the same cells as plain, unexecuted Jupyter
notebooks, for whoever runs papermill or opens them in Jupyter, Binder or on GitHub without
jupytext. They hold no outputs and no metadata that changes from one jupytext version or one
run to the next (cell ids are hashes of the cells), so the same sources always give the same
bytes and tests/test_book.py can check that the committed notebooks match their chapters.
Their `jupytext.formats` pairs each with its chapter, so Jupyter with jupytext saves an edit to
both.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

from scripts.build_book import KERNELSPEC, REPO, is_notebook, toc_files

NOTEBOOKS = REPO / "notebooks"
PAIRING = "notebooks//ipynb,chapters//md:myst"  # jupytext: notebooks/X.ipynb <-> chapters/X.md


def chapters(repo: Path = REPO) -> list[Path]:
    """The MyST notebooks of the table of contents, in reading order."""
    paths = [repo / f"{rel}.md" for rel in toc_files(repo)]
    return [p for p in paths if is_notebook(p)]


def _cell_id(cell, seen: set[str]) -> str:
    """A stable id: the hash of the cell's type and source (numbered when two cells agree)."""
    base = hashlib.sha256(f"{cell.cell_type}\0{cell.source}".encode()).hexdigest()[:12]
    cid, n = base, 1
    while cid in seen:
        n += 1
        cid = f"{base}-{n}"
    seen.add(cid)
    return cid


def paired_notebook(source: Path):
    """chapters/<name>.md as an unexecuted notebook with fixed metadata (nbformat node)."""
    import jupytext
    import nbformat

    nb = jupytext.read(source)
    nb.metadata = nbformat.from_dict(
        {
            "jupytext": {"formats": PAIRING},
            "kernelspec": dict(KERNELSPEC),
            "language_info": {"name": "python"},
        }
    )
    seen: set[str] = set()
    for cell in nb.cells:
        cell.id = _cell_id(cell, seen)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.validate(nb)
    return nb


def notebook_text(source: Path) -> str:
    """The bytes `make notebooks` writes for `source` (as text)."""
    import nbformat

    return nbformat.writes(paired_notebook(source)) + "\n"


def differences(repo: Path = REPO) -> list[str]:
    """What `make notebooks` would change under notebooks/: one line per notebook."""
    out = []
    expected = {f"{p.stem}.ipynb": p for p in chapters(repo)}
    for name, source in expected.items():
        target = repo / "notebooks" / name
        if not target.is_file():
            out.append(f"notebooks/{name}: missing")
        elif target.read_text() != notebook_text(source):
            out.append(f"notebooks/{name}: differs from chapters/{source.name}")
    folder = repo / "notebooks"
    for path in sorted(folder.glob("*.ipynb")) if folder.is_dir() else []:
        if path.name not in expected:
            out.append(f"notebooks/{path.name}: no chapter of _toc.yml")
    return out


def write(repo: Path = REPO) -> list[Path]:
    """Write every chapter's notebook and delete the notebooks of chapters no longer listed."""
    folder = repo / "notebooks"
    folder.mkdir(exist_ok=True)
    written = []
    for source in chapters(repo):
        target = folder / f"{source.stem}.ipynb"
        text = notebook_text(source)
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
            written.append(target)
    keep = {f"{p.stem}.ipynb" for p in chapters(repo)}
    for path in folder.glob("*.ipynb"):
        if path.name not in keep:
            path.unlink()
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say what would change")
    args = parser.parse_args(argv)
    if args.check:
        diff = differences()
        for line in diff:
            print(line)
        if diff:
            print("run `make notebooks` and commit notebooks/", file=sys.stderr)
        return 1 if diff else 0
    for path in write():
        print(f"[notebooks] {'wrote' if path.exists() else 'removed'} {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
