"""Render every page of the built book in headless Chromium; fail on errors or missing images.

    python -m scripts.check_pages                    # checks _build/html
    python -m scripts.check_pages --html DIR --screenshots DIR

Needs Debian's `chromium` on the PATH (or $CHROMIUM); this script installs nothing:

    apt-get install -y chromium        # as root (sudo elsewhere)

It serves the HTML folder on 127.0.0.1 with `python -m http.server` in a subprocess, loads each
page twice in `chromium --headless` (once with --dump-dom for the rendered DOM, once with
--screenshot into `_build/screenshots/`), and fails (exit 1) on a page whose DOM holds an error
output (a cell's stderr or a traceback), an <img> whose file is not in the build, or equations
that MathJax (served from the book's own `_static/`, no CDN) did not typeset.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"_static", "_sources", "_images", "_sphinx_design_static", "_panels_static"}
# Class names myst-nb gives error outputs, and the text every Python traceback starts with.
ERROR_MARKERS = (
    "output stderr",
    "output traceback",
    "output error",
    "Traceback (most recent call last)",
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1280,2000",
)


def find_chromium() -> str:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise SystemExit(
        "check_pages needs Debian's chromium on the PATH (or $CHROMIUM): "
        "apt-get install -y chromium"
    )


def pages(html_dir: Path) -> list[Path]:
    """Every .html page of the build, outside Sphinx's asset folders, in a stable order."""
    out = []
    for path in sorted(html_dir.rglob("*.html")):
        rel = path.relative_to(html_dir)
        if rel.parts[0] in SKIP_DIRS:
            continue
        out.append(rel)
    return out


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


def check_dom(dom: str, page: Path, html_dir: Path) -> list[str]:
    """Problems of one rendered page: error outputs, and images missing from the build.

    Args:
        dom: the page's DOM after rendering (chromium --dump-dom).
        page: the page's path relative to `html_dir`, e.g. chapters/intro.html.
        html_dir: the root of the build.
    """
    problems = [f"error output ({m!r})" for m in ERROR_MARKERS if m in dom]
    if 'class="math' in dom and "<mjx-container" not in dom:
        problems.append("equations left as raw TeX (MathJax did not load or typeset)")
    parser = _Images()
    parser.feed(dom)
    base = "http://book.invalid/" + page.as_posix()
    for src in parser.srcs:
        if not src:
            problems.append("an <img> without src")
            continue
        if src.startswith("data:"):
            continue
        url = urlparse(urljoin(base, src))
        if url.netloc != "book.invalid":
            problems.append(f"image from outside the build: {src}")
            continue
        target = html_dir / unquote(url.path).lstrip("/")
        if not target.is_file() or target.stat().st_size == 0:
            problems.append(f"missing image: {src}")
    return problems


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(html_dir: Path) -> Iterator[str]:
    """`python -m http.server` on 127.0.0.1 in a subprocess; yields the base URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    proc = subprocess.Popen(
        [*cmd, "--directory", str(html_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit(f"the HTTP server on {base} did not start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def chromium(binary: str, profile_dir: str, *args: str, timeout: int = 90) -> str:
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exit {proc.returncode}: {proc.stderr[-500:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", default=str(REPO / "_build" / "html"))
    parser.add_argument("--screenshots", default=str(REPO / "_build" / "screenshots"))
    parser.add_argument("--budget-ms", type=int, default=4000, help="virtual time for scripts")
    args = parser.parse_args(argv)

    html_dir = Path(args.html).resolve()
    if not (html_dir / "index.html").is_file():
        print(f"no book at {html_dir} (build it first: make book)", file=sys.stderr)
        return 2
    binary = find_chromium()
    shots = Path(args.screenshots)
    shots.mkdir(parents=True, exist_ok=True)
    failed = 0
    with serve(html_dir) as base, tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        for rel in pages(html_dir):
            url = base + rel.as_posix()
            shot = shots / (rel.with_suffix("").as_posix().replace("/", "__") + ".png")
            budget = f"--virtual-time-budget={args.budget_ms}"
            dom = ""
            try:
                dom = chromium(binary, profile, budget, "--dump-dom", url)
                chromium(binary, profile, budget, f"--screenshot={shot}", url)
                problems = check_dom(dom, rel, html_dir)
                if not shot.is_file():
                    problems.append("no screenshot was written")
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                problems = [f"chromium failed: {err}"]
            status = "ok" if not problems else "FAIL"
            print(f"{status:<4} {rel}  ({len(dom)} characters of DOM) -> {shot.name}")
            for p in problems:
                print(f"       {p}")
            failed += bool(problems)
    total = len(pages(html_dir))
    print(f"{total - failed} of {total} pages ok; screenshots in {shots}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
