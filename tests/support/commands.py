"""Running the ``alignvec`` command line in this process, and the check every bad-input test makes of it."""

from __future__ import annotations

import pytest


def run_main(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    """``alignvec ARGV...`` in this process: (exit status, what it wrote to stderr). What was captured before is
    dropped; an argparse usage error (``SystemExit``) counts as its status."""
    from alignvec_gguf.cli import main  # here, so that conftest (which imports this module) stays light

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    """Exit status 2, exactly one non-empty stderr line holding every needle, no traceback; returns the line."""
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
