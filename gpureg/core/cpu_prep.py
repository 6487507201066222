"""Compiled CPU preparation (numba): 3x3x3 median, impulse-noise removal, Otsu histogram, min/max.

Multithreaded twins of the SciPy/NumPy calls of :mod:`gpureg.core.segment`
and :func:`gpureg.register.prepare_volume`, with the same results:

- :func:`median3` is ``scipy.ndimage.median_filter(v, size=3)`` (``mode="reflect"``);
- :func:`histogram` is ``numpy.histogram(v, bins, range=(lo, hi))``;
- :func:`remove_impulses` is the arithmetic of
  :func:`gpureg.core.segment.remove_impulses` (salt-and-pepper noise: each
  voxel at the volume's minimum or maximum takes the mean of its non-extreme
  neighbours), summed in float64 (column sums shared between neighbouring
  voxels) instead of by SciPy's float32 box filters (equal within float32
  rounding, not bit for bit).

numba is imported here only; callers import this module lazily when
:func:`gpureg.core.backend.cpu_engine` is ``"numba"``.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .cpu_kernels import run_planes

__all__ = ["histogram", "median3", "minmax", "remove_impulses"]


def median3(volume) -> np.ndarray:
    """``scipy.ndimage.median_filter(volume, size=3)`` (reflect at the faces), multithreaded."""
    v = np.ascontiguousarray(volume, dtype=np.float32)
    out = np.empty_like(v)
    run_planes(_median3, v.shape[0], v, out, n_voxels=v.size)
    return out


def remove_impulses(volume, size: int = 3) -> tuple[np.ndarray, float]:
    """Replace the saturated voxels of salt-and-pepper noise, multithreaded.

    Parameters
    ----------
    volume : (Z, Y, X) ndarray of float32
    size : int
        Edge of the neighbourhood cube, voxels (offsets ``-(size // 2)`` to
        ``size - size // 2 - 1``, as ``scipy.ndimage.uniform_filter``; voxels
        outside the volume are not neighbours).

    Returns
    -------
    out : (Z, Y, X) ndarray of float32
        ``volume`` where every voxel at its minimum or maximum takes the mean of
        the neighbours that are at neither; with no such neighbour, the extreme
        held by more neighbours (the minimum on a tie). Other voxels unchanged.
        ``volume`` itself (no copy) when it has a non-finite value.
    changed : float
        Fraction of voxels changed by more than a quarter of the value range
        (0 on clean phantoms, about half the salt-and-pepper fraction on noisy ones).
    """
    v = np.ascontiguousarray(volume, dtype=np.float32)
    lo, hi, finite = minmax(v)
    if not finite:
        return volume, 0.0
    out = np.empty_like(v)
    changed = np.zeros(v.shape[0], dtype=np.int64)
    run_planes(_impulses, v.shape[0], v, out, int(size), np.float32(lo), np.float32(hi), (hi - lo) / 4, changed,
               n_voxels=v.size)
    return out, float(changed.sum()) / v.size


def minmax(volume) -> tuple[float, float, bool]:
    """Minimum, maximum and whether every value is finite, in one pass."""
    v = np.ascontiguousarray(volume, dtype=np.float32).reshape(-1)
    if v.size == 0:
        raise ValueError("empty volume")
    chunks = max(1, min(64, v.size // 65536))
    los, his, ok = np.empty(chunks, np.float32), np.empty(chunks, np.float32), np.empty(chunks, np.bool_)
    run_planes(_minmax, chunks, v, los, his, ok, n_voxels=v.size)
    return float(los.min()), float(his.max()), bool(ok.all())


def histogram(volume, bins: int, lo: float, hi: float) -> np.ndarray:
    """Counts of ``numpy.histogram(volume, bins, range=(lo, hi))`` (int64), multithreaded.

    NumPy bins float32 data by float32 edges (``linspace`` cast to the data's type), so do we.
    """
    v = np.ascontiguousarray(volume, dtype=np.float32).reshape(-1)
    edges = np.linspace(lo, hi, bins + 1, dtype=np.float32).astype(np.float64)
    chunks = max(1, min(64, v.size // 65536))
    parts = np.zeros((chunks, bins), dtype=np.int64)
    run_planes(_histogram, chunks, v, edges, bins / (edges[-1] - edges[0]), parts, n_voxels=v.size)
    return parts.sum(axis=0)


@nb.njit(nogil=True, cache=True)
def _median3(v, out, z0, z1):
    # For size 3, "reflect" is a clamp: index -1 -> 0, n -> n - 1. When at least 14
    # of the 27 values equal the centre, the median is the centre (no selection).
    nz, ny, nx = v.shape
    buf = np.empty(27, dtype=np.float32)
    for z in range(z0, z1):
        zs = (max(z - 1, 0), z, min(z + 1, nz - 1))
        for y in range(ny):
            ys = (max(y - 1, 0), y, min(y + 1, ny - 1))
            for x in range(nx):
                c = v[z, y, x]
                xs = (max(x - 1, 0), x, min(x + 1, nx - 1))
                k = 0
                same = 0
                for zz in zs:
                    for yy in ys:
                        for xx in xs:
                            b = v[zz, yy, xx]
                            buf[k] = b
                            same += b == c
                            k += 1
                out[z, y, x] = c if same >= 14 else _select(buf, 13)


@nb.njit(nogil=True, cache=True)
def _impulses(v, out, size, lo, hi, jump, changed, z0, z1):
    # Per plane z: the z-sums of each row (float64 sum and count of the non-extreme values,
    # counts of each extreme over the ``size`` planes around z) are kept in a ring of ``size``
    # rows; a row's (z, y) neighbourhood is the sum of the ring's rows, and each extreme voxel
    # adds its ``size`` columns of that: ``size`` classified reads per voxel instead of size^3.
    nz, ny, nx = v.shape
    a = -(size // 2)
    b = size - size // 2 - 1
    ring_sum = np.empty((size, nx))
    ring_good = np.empty((size, nx), dtype=np.int64)
    ring_lo = np.empty((size, nx), dtype=np.int64)
    col_sum = np.empty(nx)
    col_good = np.empty(nx, dtype=np.int64)
    col_lo = np.empty(nx, dtype=np.int64)
    win_sum = np.empty(nx)
    win_good = np.empty(nx, dtype=np.int64)
    win_lo = np.empty(nx, dtype=np.int64)
    win_all = np.empty(nx, dtype=np.int64)
    for z in range(z0, z1):
        count = 0
        zlo, zhi = max(z + a, 0), min(z + b, nz - 1)
        filled = 0  # rows 0 .. filled - 1 are in the ring (slot yy % size)
        for y in range(ny):
            y0, y1 = max(y + a, 0), min(y + b, ny - 1)
            while filled <= y1:
                k = filled % size
                for x in range(nx):
                    ring_sum[k, x] = 0.0
                    ring_good[k, x] = 0
                    ring_lo[k, x] = 0
                for zz in range(zlo, zhi + 1):
                    for x in range(nx):  # branch-free, so that it vectorises
                        w = v[zz, filled, x]
                        good = (w > lo) & (w < hi)
                        ring_lo[k, x] += w <= lo
                        ring_good[k, x] += good
                        ring_sum[k, x] += np.float64(w) if good else 0.0
                filled += 1
            extreme = False
            for x in range(nx):
                c = v[z, y, x]
                out[z, y, x] = c
                extreme = extreme or not ((c > lo) & (c < hi))
            if not extreme:
                continue
            for x in range(nx):
                col_sum[x] = 0.0
                col_good[x] = 0
                col_lo[x] = 0
            for yy in range(y0, y1 + 1):
                k = yy % size
                for x in range(nx):
                    col_sum[x] += ring_sum[k, x]
                    col_good[x] += ring_good[k, x]
                    col_lo[x] += ring_lo[k, x]
            # sums over each voxel's x window, tap by tap over the row (vectorised; per voxel the
            # columns x + a .. x + b in that order)
            for x in range(nx):
                win_sum[x] = 0.0
                win_good[x] = 0
                win_lo[x] = 0
                win_all[x] = 0
            rows = (zhi - zlo + 1) * (y1 - y0 + 1)
            for j in range(a, b + 1):
                for x in range(max(0, -j), min(nx, nx - j)):
                    win_sum[x] += col_sum[x + j]
                    win_good[x] += col_good[x + j]
                    win_lo[x] += col_lo[x + j]
                    win_all[x] += rows
            for x in range(nx):  # every voxel computed, then selected (branch-free, vectorises)
                c = v[z, y, x]
                good = win_good[x]
                mean = np.float32(win_sum[x] / max(good, 1))
                majority = lo if win_lo[x] >= win_all[x] - win_lo[x] else hi
                m = c if (c > lo) & (c < hi) else (mean if good > 0 else majority)
                out[z, y, x] = m
                count += abs(np.float64(m) - np.float64(c)) > jump
        changed[z] = count


@nb.njit(cache=True)
def _select(a, k):
    # Hoare's quickselect: the k-th smallest of a (reordered in place).
    lo, hi = 0, a.size - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return a[k]
    return a[k]


@nb.njit(nogil=True, cache=True)
def _minmax(v, los, his, ok, z0, z1):
    n, chunks = v.size, los.size
    for c in range(z0, z1):
        a, b = c * n // chunks, (c + 1) * n // chunks
        lo, hi = np.inf, -np.inf
        good = True
        for i in range(a, b):
            x = v[i]
            if not np.isfinite(x):
                good = False
                continue
            lo = min(lo, x)
            hi = max(hi, x)
        los[c], his[c], ok[c] = lo, hi, good


@nb.njit(nogil=True, cache=True)
def _histogram(v, edges, norm, parts, z0, z1):
    # numpy.histogram's uniform-bin rule: index from (x - first) * norm, then corrected against the
    # edges. A run of equal values (a flat background) is binned once and counted as a run.
    n = v.size
    chunks, bins = parts.shape
    first, last = edges[0], edges[-1]
    for c in range(z0, z1):
        a, b = c * n // chunks, (c + 1) * n // chunks
        prev = np.float32(np.nan)
        k = -1  # bin of prev; -1: outside the range (or NaN)
        run = 0
        for i in range(a, b):
            if v[i] == prev:
                run += 1
                continue
            if k >= 0:
                parts[c, k] += run
            prev = v[i]
            run = 1
            x = np.float64(prev)
            if not (x >= first and x <= last):
                k = -1
                continue
            k = int((x - first) * norm)
            if k == bins:
                k -= 1
            if x < edges[k]:
                k -= 1
            elif x >= edges[k + 1] and k != bins - 1:
                k += 1
        if k >= 0:
            parts[c, k] += run
