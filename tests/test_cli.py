"""The `first` command: help without torch, and a command table that matches the modules."""

from __future__ import annotations

import subprocess
import sys

from first_lib import cli


def test_help_answers_without_importing_torch():
    code = (
        "import sys, contextlib, io\n"
        "from first_lib.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert 'run' in out.getvalue(), out.getvalue()\n"
        "heavy = sorted({'torch', 'transformers', 'numpy'} & set(sys.modules))\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"`first --help` imported {proc.stdout.strip()}"


def _helps(parser) -> dict[str, str]:
    action = parser._subparsers._group_actions[0]
    return {a.dest: a.help for a in action._choices_actions}


def test_command_table_matches_the_modules_parsers():
    full = _helps(cli.build_parser(everything=True))
    table = {name: help_text for name, (_, help_text) in cli.COMMANDS.items()}
    assert full == table


def test_each_command_builds_from_its_own_modules():
    for name in cli.COMMANDS:
        parser = cli.build_parser(name)
        sub = parser._subparsers._group_actions[0].choices[name]
        assert sub.add_help, f"{name}: the lazily listed stub was not replaced by the real parser"


def test_dry_run_seeds_say_not_estimated_rather_than_zero(monkeypatch):
    """With nothing to count from (a fresh machine without the data wheel), the per-seed lines
    say so; with rows, each seed's minutes and the total count a shared artefact once."""
    from first_lib.pipeline import cli as pcli
    from first_lib.pipeline import clock

    monkeypatch.setattr(clock, "estimate", lambda prof, setting, **kw: [])
    text = pcli.describe_seeds("tiny", "csqa", "0,1", {})
    assert "not estimated" in text and "0.0 min" not in text

    def rows(prof, setting, **kw):
        own = {"artefact": f"own-{prof.seed}", "seconds": 120.0, "done": False}
        return [own, {"artefact": "shared", "seconds": 60.0, "done": False}]

    monkeypatch.setattr(clock, "estimate", rows)
    text = pcli.describe_seeds("tiny", "csqa", "0,1", {})
    assert "seed 0: 3.0 min" in text and "seed 1: 3.0 min" in text
    assert "all seeds: 5.0 min" in text


def test_a_warning_is_one_first_line_and_the_hook_is_restored(monkeypatch, capsys):
    """A warning raised by a command (a library's, on two lines with its source, by default) is
    printed as one `[first] warning:` line; Python's own hook is back after the command."""
    import argparse
    import warnings

    def command(args):
        warnings.warn("10 prompts cut\nto 320 tokens", UserWarning, stacklevel=1)
        return 0

    def parser(command_name=None):
        p = argparse.ArgumentParser(prog="first")
        p.set_defaults(func=command)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main([]) == 0
        assert warnings.showwarning is before
    err = capsys.readouterr().err
    assert err.splitlines() == ["[first] warning: 10 prompts cut to 320 tokens"], err
