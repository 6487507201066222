"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

This is the only module that imports CuPy. Everything else asks it for the
array module (``xp``) and moves arrays with :func:`to_device` / :func:`to_host`.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from .config import config
from .errors import GPUUnavailableError

__all__ = ["array_device", "cpu_engine", "cupy_or_none", "cupy_probe", "DEVICES", "HARDWARE", "get_xp", "gpu_available", "gpu_name", "GPUUnavailableError", "ndimage_of", "resolve_device", "to_device", "to_host", "xp_of"]

HARDWARE = ("cpu", "gpu")  # what a device choice resolves to
DEVICES = ("auto", *HARDWARE)


_log = logging.getLogger("gpureg")


def cupy_or_none():
    """Return the ``cupy`` module when it imports and sees a device, else ``None``.

    ``gpureg.config.disable_gpu`` (environment: ``GPUREG_DISABLE_GPU=1``) hides
    the GPU (useful to force the CPU path in tests and benchmarks).
    """
    return cupy_probe()[0]


def cupy_probe() -> tuple:
    """``(cupy module, "")`` when CuPy imports and sees a CUDA device, else ``(None, reason)``.

    CuPy and the device are probed once per process; ``gpureg.config.disable_gpu``
    hides the GPU (checked at every call). ASTRA's CUDA support is probed
    separately, by :func:`gpureg.recon.fbp.astra_cuda_probe`.
    """
    if config.disable_gpu:
        return None, "GPU use is disabled (gpureg.config.disable_gpu; GPUREG_DISABLE_GPU)"
    return _cupy_probe()


def gpu_available() -> bool:
    """True when CuPy imports and at least one CUDA device answers."""
    return cupy_or_none() is not None


def gpu_name() -> str | None:
    """Name of the current CUDA device, or ``None`` without one."""
    cp = cupy_or_none()
    if cp is None:
        return None
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def resolve_device(device: str = "auto", *, probe=None, what: str = "") -> str:
    """Turn ``"auto" | "cpu" | "gpu"`` into ``"cpu"`` or ``"gpu"``.

    Parameters
    ----------
    device : str
        ``"auto"`` picks the GPU when CuPy and a device are usable and falls
        back to the CPU otherwise (logged once). ``"gpu"`` without a usable
        GPU raises :class:`GPUUnavailableError`.
    probe : callable, optional
        ``probe() -> (usable, reason)`` of the library that would use the GPU;
        default :func:`cupy_probe` (FBP passes ASTRA's CUDA probe).
    what : str
        The stage, for the messages (e.g. ``"FBP (ASTRA CUDA)"``).

    Returns
    -------
    str
        ``"cpu"`` or ``"gpu"``.
    """
    if not isinstance(device, str) or device.lower() not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    device = device.lower()
    if device == "cpu":
        return "cpu"
    usable, why = (probe or cupy_probe)()
    if usable:
        return "gpu"
    where = f" for {what}" if what else ""
    if device == "gpu":
        raise GPUUnavailableError(f"device='gpu' was requested but no GPU is usable{where}: {why}")
    _note_fallback(why, where)
    return "cpu"


def get_xp(device: str = "auto"):
    """Array module for ``device``: ``numpy`` or ``cupy``.

    Parameters
    ----------
    device : str
        ``"auto"``, ``"cpu"`` or ``"gpu"`` (see :func:`resolve_device`).
    """
    return cupy_or_none() if resolve_device(device) == "gpu" else np


def array_device(array) -> str:
    """``"gpu"`` for a CuPy array, ``"cpu"`` for anything else."""
    return "gpu" if type(array).__module__.split(".")[0] == "cupy" else "cpu"


def xp_of(array):
    """Array module of ``array``: ``cupy`` for a CuPy array, else ``numpy``."""
    return cupy_or_none() if array_device(array) == "gpu" else np


def ndimage_of(array):
    """``cupyx.scipy.ndimage`` for a CuPy array, else ``scipy.ndimage``."""
    if array_device(array) == "gpu":
        import cupyx.scipy.ndimage as nd
    else:
        from scipy import ndimage as nd
    return nd


def to_device(array, device: str = "auto", dtype=None):
    """Return ``array`` on ``device`` (a no-op when it is already there).

    Parameters
    ----------
    array : array_like
        NumPy or CuPy array (or anything ``numpy.asarray`` takes).
    device : str
        ``"auto"``, ``"cpu"`` or ``"gpu"``.
    dtype : dtype, optional
        Convert to this dtype on the way.
    """
    target = resolve_device(device)
    if target == "gpu":
        cp = cupy_or_none()
        return cp.asarray(array, dtype=dtype)
    return np.asarray(to_host(array), dtype=dtype)


def to_host(array):
    """Return ``array`` as a NumPy array (copies from the GPU when needed)."""
    if array_device(array) == "gpu":
        return array.get()
    return np.asarray(array)


def cpu_engine() -> str:
    """Implementation of the CPU kernels: ``"numba"`` (compiled, multithreaded) or ``"numpy"``.

    ``gpureg.config.cpu_backend`` (environment: ``GPUREG_CPU_BACKEND``):
    ``"numba"`` unless ``"numpy"`` selects the pure NumPy/SciPy reference
    (readable, single-threaded, what the tests compare the compiled kernels
    against), or numba is not installed (then NumPy, logged once). Read at
    every call, so ``with gpureg.config(cpu_backend="numpy")`` switches it.
    """
    name = config.cpu_backend
    if name == "numba" and not _numba_installed():
        _note_once("gpureg: numba is not installed; the CPU runs the NumPy reference kernels (slower)")
        return "numpy"
    return name


@functools.lru_cache(maxsize=1)
def _numba_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


@functools.lru_cache(maxsize=1)
def _cupy_probe():
    try:
        import cupy as cp
    except Exception as exc:  # ImportError, or a broken CUDA install
        return None, f"CuPy is not installed or does not import ({type(exc).__name__}); install gpureg[cuda12] or gpureg[cuda13]"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"CuPy found no CUDA driver/device ({exc})"
    if n < 1:
        return None, "CuPy sees no CUDA device"
    why = _cannot_compile(cp)
    if why:
        return None, why
    return cp, ""


_CANNOT_COMPILE = "CuPy cannot compile CUDA kernels"
_PROBE_KERNEL = 'extern "C" __global__ void gpureg_probe(int* out) { *out = 1; }'


def _cannot_compile(cp) -> str:
    """Why CuPy cannot build gpureg's kernels here (NVRTC missing or broken), or "" when it can.

    Every gpureg kernel is compiled at run time by NVRTC: without it ``device="auto"`` would
    pick the GPU and fail at the first kernel. One tiny kernel is compiled (cached on disk by CuPy).
    """
    try:
        cp.RawKernel(_PROBE_KERNEL, "gpureg_probe").compile()
    except Exception as exc:  # noqa: BLE001 - NVRTC missing (ImportError/OSError) or failing (CompileException)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{_CANNOT_COMPILE}: NVRTC is missing or broken ({type(exc).__name__}: {first[:200]})"
    return ""


@functools.lru_cache(maxsize=None)
def _note_fallback(why: str, where: str = "") -> None:
    # A GPU that is there but unusable (no NVRTC) is a warning; no CuPy or no device is the normal CPU case.
    level = logging.WARNING if why.startswith(_CANNOT_COMPILE) else logging.INFO
    _log.log(level, "gpureg: no usable GPU%s (%s); running on the CPU", where, why)


@functools.lru_cache(maxsize=None)
def _note_once(message: str) -> None:
    _log.info(message)
