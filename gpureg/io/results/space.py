"""Disk space of a run being written: the disk-full error, and a reserve that lets a failed HDF5 file close cleanly.

HDF5 keeps dirty chunks and metadata in memory; when the disk fills up, the
write that fails may come at any later flush or close, and closing a file that
cannot be written crashes the process (h5py 3, HDF5 1.14: a segmentation fault
at exit). So a run keeps a small reserve file beside its ``.partial`` file
(allocated with ``posix_fallocate``): when a write fails for lack of space, the
reserve is given back first and the HDF5 file then closes with what it held,
leaving a ``.partial`` whose flagged energies were all written (see
:meth:`gpureg.io.results.ResultStore.commit`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path

from ..files import InputError

__all__ = ["digest", "DiskFullError", "disk_full", "is_no_space", "Reserve"]

MB = 1e6
# What HDF5 may still have to write when a flush fails: its chunk cache (1 MiB per open dataset by default; two
# or three stacks are open) and dirty metadata. Measured on a 24^3 x 12 run: close needs < 0.1 MB after a failure.
RESERVE_BYTES = 4 << 20


class DiskFullError(InputError, OSError):
    """The output's file system is (or would become) full: ``disk full: N MB needed, M free on PATH``."""


def disk_full(folder, needed: float) -> DiskFullError:
    """The one-line error for ``needed`` bytes (the rest of the run) in ``folder``."""
    folder = Path(folder) if str(folder) else Path(".")
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    err = DiskFullError(f"disk full: {max(needed, 0) / MB:.1f} MB needed, {free / MB:.1f} MB free on {folder}; "
                        "free some space and run the same command again (it resumes)")
    err.errno = errno.ENOSPC
    return err


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed write for lack of space (``ENOSPC`` / ``EDQUOT``, also inside h5py's messages)."""
    if isinstance(exc, DiskFullError):
        return True
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "errno = 28" in text or "Disk quota exceeded" in text


def digest(*arrays) -> str:
    """BLAKE2b-128 (hex) of arrays read as float32 bytes: what a resumed run checks a done energy against."""
    import numpy as np

    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()


class Reserve:
    """A hidden file of ``size`` bytes beside ``path`` (``.NAME.reserve``), allocated now and given back on demand."""

    def __init__(self, path, size: int = RESERVE_BYTES):
        path = Path(path)
        self.path = path.with_name(f".{path.name}.reserve")
        self.size = int(size)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.size)
        except OSError as exc:
            os.close(fd)
            self.release()
            if is_no_space(exc):
                raise disk_full(self.path.parent, self.size) from None
            raise
        os.close(fd)

    def release(self) -> None:
        """Give the space back (idempotent)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
