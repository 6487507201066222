"""The CUDA kernel loader: finds ``kernels/*.cu``, compiles each once per device, hands out kernels.

The CUDA C sources live in ``kernels/*.cu`` (shipped as ``gpureg/kernels/``
in a wheel); each is compiled with a ``#line`` prefix so compiler errors name
the real file and line, once per device and process (and cached on disk by
CuPy). Importing this module needs neither CuPy nor a GPU: CuPy is fetched
through :func:`gpureg.core.backend.cupy_or_none` when a kernel is first asked for.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from pathlib import Path

from .backend import GPUUnavailableError, cupy_or_none
from .kernel_layout import MSE_MIN_BLOCKS, THREADS, define_flags

__all__ = ["compile_options", "get_kernel", "kernel_dir", "KERNEL_FILES", "kernel_source", "require_cupy", "resident_blocks",
           "THREADS", "WIDE_INDEX"]

# Kernel source -> the name expressions CuPy compiles (templates by name, never by string formatting).
KERNEL_FILES = {
    "affine.cu": ("resample_affine", "reduce_partials", "classify_rows", "classify_rows_state",
                  "mse_terms_pass<true, float>", "mse_terms_pass<false, float>",
                  "mse_terms_pass<true, bool>", "mse_terms_pass<false, bool>",
                  "mse_terms_state_pass<true, float>", "mse_terms_state_pass<true, bool>"),
    "solver.cu": ("lm_step",),
    "volume.cu": ("downsample2", "com_moments", "radix_histogram", "reduce_partials"),
    "bspline.cu": ("ffd_residual_pass", "reduce_partials"),
}


# Thread-block shapes: THREADS (the kernels' __launch_bounds__, defined in kernel_layout);
# 32 x 8 for the 3D-grid kernels: a warp covers 32 consecutive x (coalesced). Not tuned on a GPU yet.
# The compile variant with 64-bit voxel indices (kernels/voxel_math.cuh, index_t).
WIDE_INDEX = "-DGPUREG_WIDE_INDEX=1"
_lock = threading.Lock()  # one compilation at a time


def kernel_dir() -> Path:
    """Folder holding ``voxel_math.cuh`` and the ``*.cu`` sources.

    ``gpureg/kernels`` in an installed wheel, ``kernels/`` beside ``gpureg/``
    in a source checkout.
    """
    return _find_kernel_dir(Path(__file__).resolve().parents[1])


def kernel_source(name: str) -> str:
    """CUDA source of ``kernels/<name>`` as handed to CuPy.

    Prefixed with a digest of the headers (CuPy's on-disk cache keys on the
    source text only, so a header change must change the text) and a
    ``#line`` directive, so compiler messages point at the real file and line.
    """
    folder = kernel_dir()
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"no kernel source {name!r} in {folder}")
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(folder.glob("*.cuh")))).hexdigest()[:16]
    return f'// gpureg headers {digest}\n#line 1 "kernels/{name}"\n' + path.read_text()


def compile_options(wide: bool = False) -> tuple:
    """Compiler options for the kernel sources (NVRTC through CuPy, or nvcc).

    The shared constants arrive as ``-D`` options (:func:`gpureg.core.kernel_layout.define_flags`);
    CuPy's on-disk cache keys on the options too, so a changed constant recompiles. ``wide``:
    the variant with 64-bit voxel indices (:data:`WIDE_INDEX`), for volumes over 2^31 - 1 voxels.
    """
    return ("--std=c++17", f"-I{kernel_dir()}", *define_flags(), *((WIDE_INDEX,) if wide else ()))


def require_cupy():
    cp = cupy_or_none()
    if cp is None:
        raise GPUUnavailableError("gpureg.cuda needs CuPy and a CUDA GPU; none is usable here")
    return cp


def get_kernel(name: str, function: str, wide: bool = False):
    """The compiled kernel ``function`` of ``kernels/<name>`` on the current device.

    ``wide``: from the build with 64-bit voxel indices (:func:`gpureg.core.cuda.wide_index` says when).
    """
    return _kernel_on(name, function, require_cupy().cuda.Device().id, bool(wide))


def resident_blocks(name: str, function: str, wide: bool = False) -> int:
    """Blocks of ``THREADS`` threads that fill the current device (grid of the grid-stride kernels)."""
    return _resident_blocks_on(name, function, require_cupy().cuda.Device().id, bool(wide))


def _find_kernel_dir(package_dir: Path) -> Path:
    for candidate in (package_dir / "kernels", package_dir.parent / "kernels"):
        if (candidate / "voxel_math.cuh").is_file():
            return candidate
    raise FileNotFoundError(f"gpureg kernel sources not found: looked for voxel_math.cuh in "
                            f"{package_dir / 'kernels'} (installed) and {package_dir.parent / 'kernels'} (checkout)")


@functools.lru_cache(maxsize=None)
def _module(name: str, device_id: int, wide: bool):
    cp = require_cupy()
    return cp.RawModule(code=kernel_source(name), options=compile_options(wide), name_expressions=KERNEL_FILES[name])


@functools.lru_cache(maxsize=None)
def _kernel_on(name: str, function: str, device_id: int, wide: bool = False):
    if function not in KERNEL_FILES[name]:
        raise ValueError(f"kernel {function!r} is not declared for {name} (have {KERNEL_FILES[name]})")
    with _lock:  # compilation is not reentrant across threads
        return _module(name, device_id, wide).get_function(function)


@functools.lru_cache(maxsize=None)
def _resident_blocks_on(name: str, function: str, device_id: int, wide: bool = False) -> int:
    cp = require_cupy()
    sms = int(cp.cuda.Device(device_id).attributes["MultiProcessorCount"])
    kernel = _kernel_on(name, function, device_id, wide)
    try:
        per_sm = int(cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, THREADS, 0))
    except Exception:  # older CuPy without the occupancy API: what the kernels are built for
        per_sm = MSE_MIN_BLOCKS
    return sms * max(per_sm, 1)
