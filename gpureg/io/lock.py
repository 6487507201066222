"""An exclusive lock on an output file, so that two runs never write the same result.

The lock is a small file beside the output (its name comes from
:func:`gpureg.io.results.lock_path`) holding the writer's host, PID and start
time as JSON, and locked with ``flock`` while the run lasts. The kernel drops
``flock`` when the process dies, so a lock left by a killed run is stale by
construction: the next run takes it over (and logs whose it was). Within one
process the lock is re-entrant (``watch`` holds it and then calls ``run``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from .files import InputError, default_file_mode

__all__ = ["LockedError", "OutputLock"]

_log = logging.getLogger("gpureg")
_HELD = {}  # lock path -> [fd, depth], this process's locks
_GUARD = threading.Lock()


class LockedError(InputError):
    """The output is being written by another run (the message names its PID and host)."""


class OutputLock:
    """Exclusive, re-entrant (per process) lock of ``target``, held in the file ``lock``.

    Parameters
    ----------
    target : str or Path
        The file being protected (named in messages).
    lock : str or Path
        The lock file (created; removed on release).

    Use as a context manager; :class:`LockedError` when another live process holds it.
    """

    def __init__(self, target, lock):
        self.target, self.lock = Path(target), Path(lock)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def acquire(self) -> None:
        import fcntl

        key = str(self.lock.resolve())
        with _GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
                return
            for _ in range(20):  # retry only when the holder removed the file between our open and flock
                fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, default_file_mode())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read(fd)
                    os.close(fd)
                    raise LockedError(f"{self.target} is being written by PID {holder.get('pid', '?')} on "
                                      f"{holder.get('host', '?')} (since {holder.get('started', '?')}; lock "
                                      f"{self.lock}); wait for that run to end") from None
                if not self.lock.exists() or os.fstat(fd).st_ino != os.stat(self.lock).st_ino:
                    os.close(fd)  # we locked a file its holder had just removed: take the new one
                    continue
                old = _read(fd)
                if old:
                    _log.warning("gpureg: %s: stale lock of PID %s on %s (that run is gone) taken over",
                                 self.target, old.get("pid", "?"), old.get("host", "?"))
                doc = {"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "target": str(self.target)}
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(doc).encode(), 0)
                os.fsync(fd)
                _HELD[key] = [fd, 1]
                return
            raise LockedError(f"{self.target}: could not take the lock {self.lock} (it keeps changing)")

    def release(self) -> None:
        key = str(self.lock.resolve())
        with _GUARD:
            held = _HELD.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _HELD[key]
            try:
                self.lock.unlink()  # while still locked, so nobody takes a file about to vanish
            except FileNotFoundError:
                pass
            os.close(held[0])


def _read(fd) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data.decode()) if data.strip() else {}
    except (OSError, ValueError):
        return {}
