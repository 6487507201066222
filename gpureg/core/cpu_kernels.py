"""Compiled CPU kernels (numba): the fused MSE pass, trilinear resampling, cell support, pyramid, moments.

The CPU twin of ``kernels/affine.cu`` / ``kernels/volume.cu``: the same
per-voxel arithmetic as ``kernels/voxel_math.cuh`` (``q = p + u`` with
``u = D (p - c) + t`` in float32, the cell and out-of-bounds rule of
``cell_1d``, interpolation along x, then y, then z), one reference row per
task, the 26 row sums of ``accumulate_voxel`` per row. Interpolation and
sums are float64 here (float32 in the header): integer positions then
interpolate exactly, as in the NumPy reference (the identity gives ``r = 0``) folded per row with the monomials
``1, z', y', z'^2, z'y', y'^2`` (``combine_row``) into per-plane sums, so
:func:`gpureg.core.cuda.unpack_terms` assembles both backends' results.
Planes are summed in a fixed order, so a pass is deterministic for any
thread count.

numba is imported here only; :mod:`gpureg.core.metric` and friends import
this module lazily, when the compiled CPU engine is selected
(:func:`gpureg.core.backend.cpu_engine`). Functions are compiled on first
use and cached on disk (``cache=True``). Threads: ``gpureg.config.threads``
(environment ``GPUREG_THREADS``; default: all cores).

**Threads.** Every kernel is a serial numba function over a range of z planes
(``nogil=True``), and :func:`run_planes` runs ranges of planes on a pool of
Python threads. Each plane writes its own outputs (results do not depend on
the thread count). numba's own ``parallel=True`` compiled each kernel 2-4x
slower (a 32^3 registration's kernels: 12 s on first use, 2-core CPU) and
started an OpenMP pool that spun between kernels on a shared machine.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba as nb
import numpy as np

from .config import config
from .cuda import N_MONOMIALS, N_TERMS, affine_args, unpack_terms
from .terms import MetricTerms

__all__ = ["cell_support", "center_of_mass", "corner_values", "downsample2", "mse_terms", "resample_affine", "run_planes",
           "set_threads", "threads", "use_threads"]

_ROW_TERMS = 26  # kS0..kCount of voxel_math.cuh
_LIM = np.float32(1.0e9)
_F0, _F1 = np.float32(0.0), np.float32(1.0)
_NO_MASK = np.zeros((1, 1, 1), dtype=np.bool_)
# Below this many voxels a kernel runs on the calling thread only: a pass over a
# 32^3 pyramid level takes well under a millisecond, less than waking the other
# threads costs when the machine is shared (loads of 5-14 on 2 cores here).
SMALL_VOLUME = 1 << 16


def threads() -> int:
    """Thread count the kernels use: ``gpureg.config.threads`` (environment: ``GPUREG_THREADS``), else all cores.

    At most numba's maximum (``NUMBA_NUM_THREADS``, the number of cores).
    """
    n = config.threads
    return max(1, min(nb.config.NUMBA_NUM_THREADS if n is None else n, nb.config.NUMBA_NUM_THREADS))


def set_threads(n: int | None) -> int:
    """Set the kernels' thread count for the whole process (``None``: all cores); returns the count in effect.

    Same as ``gpureg.config.set(threads=n)``; ``with gpureg.config(threads=n):`` sets it for a block.
    """
    if n is not None and (isinstance(n, bool) or int(n) != n or int(n) < 1):
        raise ValueError(f"threads must be >= 1, got {n}")
    config.set(threads=None if n is None else int(n))
    return threads()


def use_threads(n_voxels: int) -> int:
    """Threads for a kernel over ``n_voxels``: 1 below :data:`SMALL_VOLUME`, else :func:`threads`."""
    return 1 if n_voxels < SMALL_VOLUME else threads()


def run_planes(kernel, n_planes: int, *args, n_voxels: int) -> None:
    """Run ``kernel(*args, z0, z1)`` over planes ``0 <= z < n_planes``, split among :func:`use_threads` threads.

    ``kernel`` is a ``nogil`` numba function that processes planes ``z0 <= z < z1``
    and writes per-plane outputs; the planes are cut into ``4 x threads`` ranges
    (uneven work per plane, e.g. empty space, balances out) taken by a pool of
    threads. Exceptions of a range are raised here.

    Re-entrant: called from one of the pool's own threads (a kernel range that
    runs another kernel), it runs ``kernel`` over all planes on that thread
    instead of waiting on a pool whose threads all wait, which would deadlock.
    """
    n = min(use_threads(n_voxels), n_planes)
    if n <= 1 or getattr(_IN_POOL, "active", False):
        kernel(*args, 0, n_planes)
        return
    parts = min(n_planes, 4 * n)
    bounds = [n_planes * k // parts for k in range(parts + 1)]
    pool = _pool(n)
    jobs = [pool.submit(_in_pool, kernel, *args, a, b) for a, b in itertools.pairwise(bounds) if b > a]
    for job in jobs:
        job.result()


_IN_POOL = threading.local()  # .active: this thread is one of the pools' workers


def _in_pool(kernel, *args):
    _IN_POOL.active = True
    kernel(*args)


# One pool per thread count, kept for the process (a caller that changes the count while
# another thread still runs kernels on the old one is not disturbed).
_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def _pool(n: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        if n not in _POOLS:
            _POOLS[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="gpureg-cpu")
        return _POOLS[n]


def _after_fork_in_child() -> None:
    """A forked child has the pool objects but not their threads, and the lock in whatever state
    another thread of the parent left it (held: the child's first :func:`_pool` would wait forever)."""
    global _POOLS_LOCK
    _POOLS_LOCK = threading.Lock()
    _POOLS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def mse_terms(fixed, moving, matrix, center, mask=None, hessian: bool = True, support=None) -> MetricTerms:
    """One fused compiled pass: the :class:`MetricTerms` of :func:`gpureg.core.metric.mse_terms`.

    Parameters
    ----------
    fixed : (Z, Y, X) ndarray of float32
    moving : (Z', Y', X') ndarray of float32
        Each axis at least 2 long.
    matrix : (4, 4) ndarray of float64
        ``moving_from_reference``.
    center : (3,) ndarray of float64
        Centre ``c`` of the parameters.
    mask : (Z, Y, X) ndarray of bool, optional
    hessian : bool
    support : (Z', Y', X') ndarray of bool, optional
        :func:`cell_support` of ``moving``: valid voxels with ``F = 0`` whose
        cell has no non-zero corner only add to the count (exact).
    """
    fixed = np.ascontiguousarray(fixed, dtype=np.float32)
    moving = np.ascontiguousarray(moving, dtype=np.float32)
    if min(moving.shape) < 2:
        raise ValueError(f"moving must be at least 2 voxels along every axis, got shape {moving.shape}")
    msk = _NO_MASK if mask is None else np.ascontiguousarray(mask, dtype=np.bool_)
    sup = _NO_MASK if support is None else np.ascontiguousarray(support, dtype=np.bool_)
    aff = np.array(affine_args(matrix, center), dtype=np.float32)
    planes = np.zeros((fixed.shape[0], _ROW_TERMS, N_MONOMIALS))
    run_planes(_mse_planes, fixed.shape[0], fixed, moving, msk, mask is not None, sup, support is not None, aff,
               bool(hessian), planes, n_voxels=fixed.size)
    sums = np.zeros((N_TERMS, N_MONOMIALS))
    sums[:_ROW_TERMS] = planes.sum(axis=0)
    return unpack_terms(sums, hessian)


def resample_affine(volume, matrix, out_shape, cval: float = 0.0) -> np.ndarray:
    """Trilinear ``out[p] = volume(A p + t)`` on a grid of ``out_shape`` (``cval`` outside), float32."""
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    out = np.empty(tuple(int(n) for n in out_shape), dtype=np.float32)
    if out.size == 0:
        return out
    if min(volume.shape) < 2:
        raise ValueError(f"volume must be at least 2 voxels along every axis, got shape {volume.shape}")
    aff = np.array(affine_args(matrix, np.zeros(3)), dtype=np.float32)
    run_planes(_resample, out.shape[0], volume, aff, np.float32(cval), out, n_voxels=out.size)
    return out


def cell_support(moving) -> np.ndarray:
    """Compiled :func:`gpureg.core.metric.cell_support` (any non-zero corner of each cell)."""
    v = np.ascontiguousarray(moving, dtype=np.float32)
    out = np.empty(v.shape, dtype=np.bool_)
    run_planes(_support, v.shape[0], v, out, n_voxels=v.size)
    return out


def downsample2(volume) -> np.ndarray:
    """2x2x2 block mean (``box_mean8``), odd trailing planes dropped."""
    v = np.ascontiguousarray(volume, dtype=np.float32)
    out = np.empty(tuple(n // 2 for n in v.shape), dtype=np.float32)
    if out.size:
        run_planes(_downsample2, out.shape[0], v, out, n_voxels=v.size)
    return out


def center_of_mass(volume) -> np.ndarray:
    """Centre of mass ``(z, y, x)`` of ``max(volume - median, 0)`` (grid centre when it is all 0)."""
    v = np.ascontiguousarray(volume, dtype=np.float32)
    med = np.float32(np.median(v))
    planes = np.zeros((v.shape[0], 4))
    run_planes(_moments, v.shape[0], v, med, planes, n_voxels=v.size)
    m = planes.sum(axis=0)
    if not m[0] > 0:
        return (np.asarray(v.shape, dtype=np.float64) - 1.0) / 2.0
    return m[1:] / m[0]


@nb.njit(inline="always", cache=True)
def _row_base(aff, ez, y):
    # row_base of voxel_math.cuh: the part of u constant along the row (z, y), float32
    ey = np.float32(y) - aff[13]
    return ey, aff[0] * ez + (aff[1] * ey + aff[9]), aff[3] * ez + (aff[4] * ey + aff[10]), aff[6] * ez + (
        aff[7] * ey + aff[11])


@nb.njit(inline="always", cache=True)
def corner_values(vol, iz, iy, ix):
    """The 8 values of the cell with lower corner ``(iz, iy, ix)`` as float64, x fastest (v000, v001, ... v111)."""
    return (np.float64(vol[iz, iy, ix]), np.float64(vol[iz, iy, ix + 1]), np.float64(vol[iz, iy + 1, ix]),
            np.float64(vol[iz, iy + 1, ix + 1]), np.float64(vol[iz + 1, iy, ix]), np.float64(vol[iz + 1, iy, ix + 1]),
            np.float64(vol[iz + 1, iy + 1, ix]), np.float64(vol[iz + 1, iy + 1, ix + 1]))


@nb.njit(inline="always", cache=True)
def _cell(b, u, n):
    # cell_1d of voxel_math.cuh: lower corner in [0, n - 2], fraction, inside [0, n - 1].
    uc = min(max(u, -_LIM), _LIM)
    fl = np.floor(uc)
    i = b + int(fl)
    frac = uc - fl
    inside = i >= 0 and (i < n - 1 or (i == n - 1 and frac == _F0))
    if i >= n - 1:
        return inside, n - 2, _F1
    if i < 0:
        return inside, 0, frac
    return inside, i, frac


@nb.njit(nogil=True, cache=True)
def _mse_planes(fixed, moving, mask, use_mask, support, use_support, aff, hessian, planes, z0, z1):
    ny, nx = fixed.shape[1], fixed.shape[2]
    mz, my, mx = moving.shape
    for z in range(z0, z1):
        ez = np.float32(z) - aff[12]
        for y in range(ny):
            ey, b0, b1, b2 = _row_base(aff, ez, y)
            s00 = s01 = s02 = s03 = s04 = s05 = 0.0
            s10 = s11 = s12 = s13 = s14 = s15 = 0.0
            s20 = s21 = s22 = s23 = s24 = s25 = 0.0
            r00 = r01 = r02 = r10 = r11 = r12 = 0.0
            sse = 0.0
            cnt = 0
            for x in range(nx):
                if use_mask and not mask[z, y, x]:
                    continue
                ex = np.float32(x) - aff[14]
                okz, iz, fz = _cell(z, aff[2] * ex + b0, mz)
                oky, iy, fy = _cell(y, aff[5] * ex + b1, my)
                okx, ix, fx = _cell(x, aff[8] * ex + b2, mx)
                if not (okz and oky and okx):
                    continue
                f = fixed[z, y, x]
                if use_support and f == _F0 and not support[iz, iy, ix]:
                    cnt += 1  # r = 0 and g = 0: only the count changes
                    continue
                # float64 from here on (the header stays in float32): exact at integer
                # positions, as the NumPy reference (identity gives r = 0 exactly)
                v000, v001, v010, v011, v100, v101, v110, v111 = corner_values(moving, iz, iy, ix)
                wx, wy, wz = np.float64(fx), np.float64(fy), np.float64(fz)
                dx00 = v001 - v000
                dx01 = v011 - v010
                dx10 = v101 - v100
                dx11 = v111 - v110
                c00 = wx * dx00 + v000
                c01 = wx * dx01 + v010
                c10 = wx * dx10 + v100
                c11 = wx * dx11 + v110
                dy0 = c01 - c00
                dy1 = c11 - c10
                c0 = wy * dy0 + c00
                c1 = wy * dy1 + c10
                r = (wz * (c1 - c0) + c0) - np.float64(f)
                g0 = c1 - c0
                g1 = wz * (dy1 - dy0) + dy0
                lx0 = wy * (dx01 - dx00) + dx00
                lx1 = wy * (dx11 - dx10) + dx10
                g2 = wz * (lx1 - lx0) + lx0
                e = np.float64(ex)
                if hessian:
                    h0, h1, h2 = g0 * e, g1 * e, g2 * e
                    s00 += g0 * g0
                    s01 += g0 * g1
                    s02 += g0 * g2
                    s03 += g1 * g1
                    s04 += g1 * g2
                    s05 += g2 * g2
                    s10 += g0 * h0
                    s11 += g0 * h1
                    s12 += g0 * h2
                    s13 += g1 * h1
                    s14 += g1 * h2
                    s15 += g2 * h2
                    s20 += h0 * h0
                    s21 += h0 * h1
                    s22 += h0 * h2
                    s23 += h1 * h1
                    s24 += h1 * h2
                    s25 += h2 * h2
                rg0, rg1, rg2 = r * g0, r * g1, r * g2
                r00 += rg0
                r01 += rg1
                r02 += rg2
                r10 += rg0 * e
                r11 += rg1 * e
                r12 += rg2 * e
                sse += r * r
                cnt += 1
            if cnt == 0:
                continue
            # combine_row: each row sum times the row's monomials
            dz, dy = np.float64(ez), np.float64(ey)
            mono = (1.0, dz, dy, dz * dz, dz * dy, dy * dy)
            row = (s00, s01, s02, s03, s04, s05, s10, s11, s12, s13, s14, s15, s20, s21, s22, s23, s24, s25,
                   r00, r01, r02, r10, r11, r12, sse, np.float64(cnt))
            for k in range(_ROW_TERMS):
                for j in range(N_MONOMIALS):
                    planes[z, k, j] += row[k] * mono[j]


@nb.njit(nogil=True, cache=True)
def _resample(vol, aff, cval, out, z0, z1):
    ny, nx = out.shape[1], out.shape[2]
    mz, my, mx = vol.shape
    for z in range(z0, z1):
        ez = np.float32(z) - aff[12]
        for y in range(ny):
            _, b0, b1, b2 = _row_base(aff, ez, y)
            for x in range(nx):
                ex = np.float32(x) - aff[14]
                okz, iz, fz = _cell(z, aff[2] * ex + b0, mz)
                oky, iy, fy = _cell(y, aff[5] * ex + b1, my)
                okx, ix, fx = _cell(x, aff[8] * ex + b2, mx)
                if not (okz and oky and okx):
                    out[z, y, x] = cval
                    continue
                v000, v001 = np.float64(vol[iz, iy, ix]), np.float64(vol[iz, iy, ix + 1])
                v010, v011 = np.float64(vol[iz, iy + 1, ix]), np.float64(vol[iz, iy + 1, ix + 1])
                v100, v101 = np.float64(vol[iz + 1, iy, ix]), np.float64(vol[iz + 1, iy, ix + 1])
                v110, v111 = np.float64(vol[iz + 1, iy + 1, ix]), np.float64(vol[iz + 1, iy + 1, ix + 1])
                gx, gy, gz = np.float64(fx), np.float64(fy), np.float64(fz)
                c00 = gx * (v001 - v000) + v000
                c01 = gx * (v011 - v010) + v010
                c10 = gx * (v101 - v100) + v100
                c11 = gx * (v111 - v110) + v110
                c0 = gy * (c01 - c00) + c00
                c1 = gy * (c11 - c10) + c10
                out[z, y, x] = np.float32(gz * (c1 - c0) + c0)


@nb.njit(nogil=True, cache=True)
def _support(v, out, z0, z1):
    nz, ny, nx = v.shape
    for z in range(z0, z1):
        zn = min(z + 1, nz - 1)  # the next plane (not z1: that is the range's end)
        for y in range(ny):
            yn = min(y + 1, ny - 1)
            for x in range(nx):
                xn = min(x + 1, nx - 1)
                out[z, y, x] = (v[z, y, x] != 0 or v[z, y, xn] != 0 or v[z, yn, x] != 0 or v[z, yn, xn] != 0
                                or v[zn, y, x] != 0 or v[zn, y, xn] != 0 or v[zn, yn, x] != 0 or v[zn, yn, xn] != 0)


@nb.njit(nogil=True, cache=True)
def _downsample2(v, out, z0, z1):
    oy, ox = out.shape[1], out.shape[2]
    eighth = np.float32(0.125)
    for z in range(z0, z1):
        for y in range(oy):
            for x in range(ox):
                lo = (v[2 * z, 2 * y, 2 * x] + v[2 * z, 2 * y, 2 * x + 1]) + (
                    v[2 * z, 2 * y + 1, 2 * x] + v[2 * z, 2 * y + 1, 2 * x + 1])
                hi = (v[2 * z + 1, 2 * y, 2 * x] + v[2 * z + 1, 2 * y, 2 * x + 1]) + (
                    v[2 * z + 1, 2 * y + 1, 2 * x] + v[2 * z + 1, 2 * y + 1, 2 * x + 1])
                out[z, y, x] = (lo + hi) * eighth


@nb.njit(nogil=True, cache=True)
def _moments(v, med, planes, z0, z1):
    ny, nx = v.shape[1], v.shape[2]
    for z in range(z0, z1):
        for y in range(ny):
            w = 0.0
            wx = 0.0
            for x in range(nx):
                d = max(np.float64(v[z, y, x]) - np.float64(med), 0.0)
                w += d
                wx += d * x
            planes[z, 0] += w
            planes[z, 1] += w * z
            planes[z, 2] += w * y
            planes[z, 3] += wx
