"""The `first` command. Each module registers its own sub-commands through `add_cli(subparsers)`.

Errors a user can fix (`FirstError`, `ValueError`, missing files) are printed as one line and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, imported lazily so `first --help` stays fast.
_MODULES = (
    "first_lib.assets",
    "first_lib.models",  # after assets: it adds `assets peek`
    "first_lib.tasks",
    "first_lib.pipeline",
    "first_lib.bench",
    "first_lib.device",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="first", description="FIRST: efficient trustworthy distillation, reproduced."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a module not written yet
            if err.name == name:
                continue
            raise
        module.add_cli(sub)
    return parser


def _one_line(err: BaseException) -> str:
    """The message of `err` on one line (a message may quote a tool's multi-line output)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, MemoryError, OSError) as err:
        print(f"first: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if type(err).__name__ != "OutOfMemoryError":  # torch's, a RuntimeError subclass
            raise
        print(f"first: error: out of memory: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("first: interrupted; finished work is kept and the next run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
