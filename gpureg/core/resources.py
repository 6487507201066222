"""Will it fit? Memory and disk estimates checked before a command starts.

Each command states what it needs (bytes of host memory, GPU memory when it
runs on the GPU, disk in its output folder); :func:`check_fits` compares that
with what is available now and refuses with one line naming the device and
the numbers, instead of failing with ``MemoryError`` (or ``No space left``)
an hour in. GPU memory is only mentioned when the command runs on a GPU.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .errors import ResourceError

__all__ = ["available_memory", "check_fits", "format_bytes", "ResourceError"]

_log = logging.getLogger("gpureg")


def format_bytes(n: float) -> str:
    """``"1.5 GiB"``-style size."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"


def available_memory() -> int | None:
    """Host memory available now (bytes; ``MemAvailable`` on Linux), or ``None`` when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(what: str, *, memory: float = 0, disk: float = 0, folder=None, gpu_memory: float = 0,
               device: str = "cpu") -> None:
    """Refuse (:class:`ResourceError`) when ``what`` needs more than is available.

    Parameters
    ----------
    what : str
        The command and its size, for the message (``"simulate --size 2000"``).
    memory : float
        Host memory needed (bytes).
    disk : float
        Disk needed in ``folder`` (bytes).
    folder : str or Path, optional
        Where the output goes (for ``disk``).
    gpu_memory : float
        GPU memory needed (bytes); checked only when ``device == "gpu"``.
    device : {"cpu", "gpu"}
        The resolved device.
    """
    avail = available_memory()
    if memory and avail is not None and memory > avail:
        raise ResourceError(f"{what}: needs about {format_bytes(memory)} of memory, only {format_bytes(avail)} "
                            f"is available on this machine (CPU); use a smaller size")
    if disk and folder is not None:
        free = shutil.disk_usage(Path(folder)).free
        if disk > free:
            raise ResourceError(f"{what}: needs about {format_bytes(disk)} of disk in {folder}, only "
                                f"{format_bytes(free)} is free")
    if gpu_memory and device == "gpu":
        from .backend import cupy_or_none

        cp = cupy_or_none()
        if cp is not None:
            free, _total = cp.cuda.runtime.memGetInfo()
            if gpu_memory > free:
                name = _gpu_label()
                raise ResourceError(f"{what}: needs about {format_bytes(gpu_memory)} of GPU memory, only "
                                    f"{format_bytes(free)} is free on {name}; use device='cpu' or a smaller size")
    _log.info("gpureg: %s: estimated memory %s, disk %s%s", what, format_bytes(memory), format_bytes(disk),
              f", GPU memory {format_bytes(gpu_memory)}" if device == "gpu" else "")


def _gpu_label():
    from .backend import gpu_name

    return gpu_name() or "the GPU"
