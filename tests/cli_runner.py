"""The in-process ``genhancer`` runner the CLI's error tests share."""

from __future__ import annotations

from genhancer.cli import main


def run_cli(args, capsys) -> tuple[int, str, list[str]]:
    """``genhancer ARGS`` in this process: the exit code, stdout, and the stderr lines that start with ``error:``.

    A user's mistake is one line, never a stack trace: a traceback, or more than one error line, fails the test."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) <= 1, err
    return code, out, errors
