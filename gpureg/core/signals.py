"""SIGINT and SIGTERM: stop a run at once and cleanly, never swallow the request.

:func:`handled` (used by the CLI around every command) installs one handler
for both signals. The first signal raises :class:`Interrupted` (a
``KeyboardInterrupt``) in the main thread, so ``with`` blocks unwind: the
output lock is released and the ``.partial`` file is closed, resumable.
Python may swallow an exception raised inside a destructor or a weakref
callback ("Exception ignored in ..."), so the signal is also remembered:
:func:`check` (called between energies and before a result is renamed)
raises it again, and the CLI never exits 0 after one. Inside
:func:`deferred` (writing one energy and its done flag) the handler only
records the signal, which is raised when the block ends. A second signal
while the first unwinds is recorded, not raised; a third ends the process
at once (exit ``128 + signum``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

__all__ = ["check", "deferred", "exit_now", "handled", "Interrupted", "received", "signal_name"]

_SIGNAL = {"signum": None, "count": 0, "defer": 0}
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal; ``signum`` is the signal, ``exit_code`` ``128 + signum`` (130, 143)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)


def signal_name(signum: int) -> str:
    """``"SIGINT"``, ``"SIGTERM"``..."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def received() -> int | None:
    """The signal received in the active :func:`handled` block (``None`` when none, or outside one)."""
    return _SIGNAL["signum"]


def check() -> None:
    """Raise :class:`Interrupted` when a signal was received (a safe point: between energies, before a rename)."""
    if _SIGNAL["signum"] is not None and _SIGNAL["defer"] == 0 and threading.current_thread() is threading.main_thread():
        raise Interrupted(_SIGNAL["signum"])


@contextlib.contextmanager
def deferred():
    """A block that a signal does not cut in two (the signal is raised when it ends)."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        _SIGNAL["defer"] += 1
    try:
        yield
    finally:
        if main:
            _SIGNAL["defer"] -= 1
    if main:
        check()


@contextlib.contextmanager
def handled(*, then_exit: str | None = None):
    """Install the SIGINT/SIGTERM handler for the block (main thread only; elsewhere a no-op).

    ``then_exit``: instead of restoring the previous handlers after the block
    (in-process use), leave one that prints ``then_exit`` (with the signal's
    name in ``{name}``) and ends the process at once: the ``gpureg`` command,
    whose work is done and whose outputs are closed once the block has ended.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _SIGNALS}
    hook = sys.unraisablehook

    def quiet(unraisable):  # a signal raised inside a destructor: remembered, raised again by check()
        if not isinstance(unraisable.exc_value, Interrupted):
            hook(unraisable)

    _SIGNAL.update(signum=None, count=0, defer=0)
    sys.unraisablehook = quiet
    for s in _SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, (h if h is not None else signal.SIG_DFL) if then_exit is None else _late(then_exit))
        if sys.unraisablehook is quiet:
            sys.unraisablehook = hook
        _SIGNAL.update(signum=None, count=0, defer=0)  # a later run in this process starts without it


def exit_now(code: int) -> None:
    """End the process with ``code`` without the interpreter's teardown (about a second with numba, SciPy and h5py
    loaded): after a signal, once every output is closed and the lock released."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _late(message):
    def handler(signum, frame):
        with contextlib.suppress(Exception):
            sys.stderr.write(message.format(name=signal_name(signum)) + "\n")
        exit_now(128 + signum)

    return handler


def _handler(signum, frame):
    _SIGNAL["count"] += 1
    if _SIGNAL["count"] >= 3:
        os._exit(128 + signum)  # asked three times: no more cleaning up
    if _SIGNAL["signum"] is not None:
        return  # the first one is being handled (unwinding)
    _SIGNAL["signum"] = signum
    if _SIGNAL["defer"] == 0:
        raise Interrupted(signum)
