"""Run ``gpureg`` in-process through :func:`gpureg.cli.main` (issue 23: CLI tests without a Python start each).

``run_cli(*args)`` returns a :class:`subprocess.CompletedProcess` (``returncode``, ``stdout``, ``stderr``),
so a test reads the same as with ``subprocess.run([sys.executable, "-m", "gpureg", ...])``. One smoke test
(tests/cli/test_cli.py) and the signal tests still start a real process.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import warnings

from gpureg.cli import main


def run_cli(*args) -> subprocess.CompletedProcess:
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("always")  # printed on stderr each time, as in a fresh process
        warnings.showwarning = _show_on_stderr
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["gpureg", *argv], code, out.getvalue(), err.getvalue())


def _show_on_stderr(message, category, filename, lineno, file=None, line=None):
    import sys

    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
