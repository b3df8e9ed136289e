"""The `first` command. Each module registers its own sub-commands through `add_cli(subparsers)`.

Errors a user can fix (`FirstError`, `ValueError`, missing files) are printed as one line and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings

# Each command, the modules that define it (imported only when that command runs, so `first
# --help` answers without importing torch) and its one-line help. `models` adds `assets peek`.
# tests/test_cli.py checks that this table says what the modules' own parsers say.
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "assets": (
        ("first_lib.assets", "first_lib.models"),
        "offline models and data from PyPI wheels",
    ),
    "data": (("first_lib.tasks",), "benchmark data: sizes and rendered prompts"),
    "run": (("first_lib.pipeline",), "run every missing stage and write DIR/results.json"),
    "clean": (
        ("first_lib.pipeline",),
        "list (or with --yes delete) artefacts that no built-in profile of this version uses",
    ),
    **{
        stage: (("first_lib.pipeline",), f"run the pipeline up to the {stage} stage (cached)")
        for stage in ("teacher", "extract", "calibrate", "finetune", "distill")
    },
    "bench": (
        ("first_lib.bench",),
        "measure cost against the targets (KD vs CE, extraction, disk, online KD, search)",
    ),
    "info": (
        ("first_lib.device",),
        "this machine: CPU features or GPU, the precision auto picks, versions",
    ),
    "export-records": (
        ("first_lib.lab_export",),
        "pack a finished run's per-question records of one test set into one small file",
    ),
    "export-knowledge": (
        ("first_lib.lab_knowledge",),
        "pack the top-5 mass and stored ranks of a run's cached teacher into one small file",
    ),
    "evidence": (
        ("first_lib.evidence_text",),
        "decide the paper's claims from lab records files (no model, no training)",
    ),
}


def build_parser(command: str | None = None, everything: bool = False) -> argparse.ArgumentParser:
    """The parser, with the full sub-parser of `command` (or of every command when
    `everything`); the others are listed by name and help only."""
    parser = argparse.ArgumentParser(
        prog="first", description="FIRST: efficient trustworthy distillation, reproduced."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = set(COMMANDS) if everything else {command} & set(COMMANDS)
    modules = dict.fromkeys(m for c in COMMANDS if c in wanted for m in COMMANDS[c][0])
    for name in modules:
        importlib.import_module(name).add_cli(sub)
    for name, (_, help_text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)
    # list the commands in the table's order, whichever were built first
    sub._choices_actions.sort(key=lambda a: list(COMMANDS).index(a.dest))
    return parser


def _one_line(err: BaseException) -> str:
    """The message of `err` on one line (a message may quote a tool's multi-line output)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _warnings_as_lines():
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


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one `[first] warning:` line, where a command's output is read (a long run's
    log, the one-line error of a failed command), instead of Python's two lines with the source
    file and line of whichever library raised it."""
    stream = file if file is not None else sys.stderr
    try:
        stream.write(f"[first] warning: {_one_line(Warning(str(message)))}\n")
    except OSError:  # a closed stream: a warning is not worth failing over
        pass


@contextlib.contextmanager
def _warnings_as_lines():
    """`_warning_line` for the duration of one command (restored after: tests call `main`)."""
    shown = warnings.showwarning
    warnings.showwarning = _warning_line
    try:
        yield
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
