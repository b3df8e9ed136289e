"""What a chapter hands out: glued numbers and figures, banners, its JSON, cached results."""

from __future__ import annotations

import dataclasses
import hashlib
import html
import inspect
import io
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from first_lib import fsio
from first_lib.book.differences import Difference
from first_lib.paths import first_home


def glue_text(name: str, value: Any) -> None:
    """Glue `str(value)` for `{glue:text}` in the prose (nothing is shown in the notebook).

    The text is glued as a Python string: myst-nb pastes `literal_eval` of its repr, which gives
    back exactly this text ("1.10" stays "1.10"; "0.9, 0.05" does not become a tuple)."""
    from myst_nb import glue

    glue(name, str(value), display=False)


def glue_md(name: str, text: str) -> None:
    """Glue a sentence of MyST Markdown for `{glue:md}` in the prose: pasted inline as ordinary
    text (`{glue:text}` shows its value in bold, which suits a number, not a sentence)."""
    from IPython.display import Markdown
    from myst_nb import glue

    glue(name, Markdown(text), display=False)


def glue_many(values: Mapping[str, Any], prefix: str = "") -> None:
    """`glue_text` for every item; keys become ``prefix + key``."""
    for k, v in values.items():
        glue_text(prefix + k, v)


def figure_png(fig, dpi: int = 110) -> bytes:
    """A matplotlib Figure as PNG bytes (Agg; no pyplot state involved)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def glue_figure(name: str, fig, dpi: int = 110) -> None:
    """Glue a figure for a ``{glue:figure}`` directive (which adds the caption)."""
    from IPython.display import Image
    from myst_nb import glue

    glue(name, Image(data=figure_png(fig, dpi), format="png"), display=False)


def glue_table(name: str, frame) -> None:
    """Glue a pandas DataFrame (rendered as an HTML table) for ``{glue:figure}``/``{glue:}``."""
    from myst_nb import glue

    glue(name, frame, display=False)


def show_source(*objects: Any) -> Any:
    """The source code of library functions/classes, as a Markdown code block to display."""
    from IPython.display import Markdown

    blocks = []
    for obj in objects:
        mod = inspect.getmodule(obj)
        where = f"{mod.__name__}.{obj.__qualname__}" if mod else obj.__qualname__
        src = inspect.getsource(obj)
        blocks.append(f"`{where}`:\n\n```python\n{src.rstrip()}\n```")
    return Markdown("\n\n".join(blocks))


def precision_sentence(precision: str | None = None) -> str:
    """Which precision the page's numbers were computed at, and why (HTML)."""
    from first_lib import device

    asked = device.requested_precision()
    precision = precision or device.resolve_precision()
    if asked == "auto":
        why = "chosen by <code>auto</code> for this machine's hardware"
    else:
        why = f"set by <code>${device.ENV_VAR}={asked}</code>"
    return f"Computed at <strong>{html.escape(precision)}</strong> ({why})."


def profile_banner(
    profile: str, note: str = "", precision: str | None = None, elsewhere: bool = False
) -> Any:
    """An admonition saying which profile and precision produced the page's numbers (a warning
    for tiny). `precision`: the one recorded in the page's results (default: this kernel's).
    `elsewhere`: the numbers were computed by another process (a records file), so this
    kernel's precision setting does not explain theirs."""
    from IPython.display import HTML

    if elsewhere:
        said = (
            f"Computed at <strong>{html.escape(str(precision))}</strong> by the run that made them."
        )
    else:
        said = precision_sentence(precision)
    note = html.escape(note) + " " + said
    if profile == "tiny":
        body = (
            "<p><strong>The numbers on this page come from tiny random models</strong> "
            "(profile <code>tiny</code>): they test that the machinery runs end to end and say "
            "nothing about FIRST. Build the book with <code>make book</code> (profile "
            f"<code>cpu</code>) for real numbers.</p><p>{note}</p>"
        )
        return HTML(
            '<div class="admonition warning"><p class="admonition-title">'
            f"Tiny random models</p>{body}</div>"
        )
    body = f"<p>Numbers on this page: profile <code>{html.escape(profile)}</code>. {note}</p>"
    return HTML(f'<div class="admonition note"><p class="admonition-title">Profile</p>{body}</div>')


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if np.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Difference):
        return {"point": obj.point, "lo": obj.lo, "hi": obj.hi}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. stats.Estimate
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_chapter_json(out_dir: str | os.PathLike, chapter: str, data: Mapping[str, Any]) -> Path:
    """Write a chapter's numbers to ``{out_dir}/{chapter}.json`` (atomically); returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{chapter}.json"
    from first_lib import device

    record = {"chapter": chapter, "precision": device.resolve_precision(), **data}
    return fsio.atomic_write_text(path, json.dumps(_jsonable(record), indent=2, sort_keys=True))


def book_cache_dir() -> Path:
    return first_home() / "book"


def cached_json(name: str, key: Mapping[str, Any], compute: Callable[[], Any]) -> Any:
    """`compute()` once per (name, key); the JSON result is kept under first_home()/book/."""
    text = json.dumps(_jsonable(key), sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = book_cache_dir() / f"{name}-{digest}.json"
    if path.is_file():
        return json.loads(path.read_text())["value"]
    value = _jsonable(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    fsio.atomic_write_text(path, json.dumps({"key": json.loads(text), "value": value}))
    return value
