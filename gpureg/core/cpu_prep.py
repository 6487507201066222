"""Compiled CPU preparation (numba): Gaussian smoothing, 3x3x3 median, impulse-noise removal, Otsu histogram.

Multithreaded twins of the SciPy/NumPy calls of :mod:`gpureg.core.segment`
and :func:`gpureg.register.prepare_volume`, with the same results:

- :func:`gaussian_filter` is ``scipy.ndimage.gaussian_filter(v, sigma)``
  (``mode="reflect"``, ``truncate=4``, axis by axis, float64 sums, float32
  between axes, the symmetric-kernel summation order of SciPy's ``correlate1d``);
- :func:`median3` is ``scipy.ndimage.median_filter(v, size=3)`` (``mode="reflect"``);
- :func:`histogram` is ``numpy.histogram(v, bins, range=(lo, hi))``;
- :func:`remove_impulses` is the arithmetic of
  :func:`gpureg.core.segment.remove_impulses` (salt-and-pepper noise: each
  voxel at the volume's minimum or maximum takes the mean of its non-extreme
  neighbours), summed exactly per voxel instead of by SciPy's float32 box
  filters (equal within float32 rounding, not bit for bit).

numba is imported here only; callers import this module lazily when
:func:`gpureg.core.backend.cpu_engine` is ``"numba"``.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .cpu_kernels import use_threads

__all__ = ["gaussian_filter", "histogram", "median3", "minmax", "remove_impulses"]


def gaussian_filter(volume, sigma: float, order=(0, 0, 0)) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(volume, sigma, order)`` of a 3D float32 volume, multithreaded.

    ``order`` per axis is 0 (smoothing) or 1 (first derivative of the Gaussian,
    SciPy's kernel ``-x / sigma^2 * phi(x)`` applied as a convolution).
    """
    v = np.ascontiguousarray(volume, dtype=np.float32)
    order = tuple(int(o) for o in order)
    if len(order) != 3 or any(o not in (0, 1) for o in order):
        raise ValueError(f"order must be three of 0 or 1, got {order}")
    if sigma <= 0:
        if any(order):
            raise ValueError(f"a derivative needs sigma > 0, got {sigma}")
        return v.copy()
    radius = int(4.0 * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / float(sigma) ** 2 * x**2)
    phi = phi / phi.sum()
    # (weights of offsets 0..radius, sign of the -j side): out = w0 v + sum_j w_j (v[+j] + sign v[-j]).
    kernels = {0: (phi[radius:].copy(), 1.0), 1: ((x * phi / float(sigma) ** 2)[radius:].copy(), -1.0)}
    use_threads(v.size)
    a = np.empty_like(v)
    b = np.empty_like(v)
    _smooth_zy(v, *kernels[order[0]], a, 0)
    _smooth_zy(a, *kernels[order[1]], b, 1)
    _smooth_x(b, *kernels[order[2]], a)
    return a


def median3(volume) -> np.ndarray:
    """``scipy.ndimage.median_filter(volume, size=3)`` (reflect at the faces), multithreaded."""
    v = np.ascontiguousarray(volume, dtype=np.float32)
    out = np.empty_like(v)
    use_threads(v.size)
    _median3(v, out)
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
    use_threads(v.size)
    n = _impulses(v, out, int(size), np.float32(lo), np.float32(hi), (hi - lo) / 4)
    return out, float(n) / v.size


def minmax(volume) -> tuple[float, float, bool]:
    """Minimum, maximum and whether every value is finite, in one pass."""
    v = np.ascontiguousarray(volume, dtype=np.float32).reshape(-1)
    if v.size == 0:
        raise ValueError("empty volume")
    use_threads(v.size)
    chunks = max(1, min(64, v.size // 65536))
    los, his, ok = np.empty(chunks, np.float32), np.empty(chunks, np.float32), np.empty(chunks, np.bool_)
    _minmax(v, los, his, ok)
    return float(los.min()), float(his.max()), bool(ok.all())


def histogram(volume, bins: int, lo: float, hi: float) -> np.ndarray:
    """Counts of ``numpy.histogram(volume, bins, range=(lo, hi))`` (int64), multithreaded."""
    v = np.ascontiguousarray(volume, dtype=np.float32).reshape(-1)
    edges = np.linspace(lo, hi, bins + 1)
    chunks = max(1, min(64, v.size // 65536))
    parts = np.zeros((chunks, bins), dtype=np.int64)
    use_threads(v.size)
    _histogram(v, edges, bins / (edges[-1] - edges[0]), parts)
    return parts.sum(axis=0)


@nb.njit(cache=True)
def _reflect(i, n):
    # scipy's "reflect" (d c b a | a b c d | d c b a), any distance outside
    period = 2 * n
    i = i % period
    return period - 1 - i if i >= n else i


@nb.njit(parallel=True, cache=True)
def _smooth_zy(v, w, sign, out, axis):
    # One pass along z (axis 0) or y (axis 1): whole rows at once, vectorised along x.
    nz, ny, nx = v.shape
    r = w.size - 1
    for zu in nb.prange(nz):
        z = np.int64(zu)
        acc = np.empty(nx)
        for y in range(ny):
            for x in range(nx):
                acc[x] = np.float64(v[z, y, x]) * w[0]
            for j in range(1, r + 1):
                if axis == 0:
                    zp, zm, yp, ym = _reflect(z + j, nz), _reflect(z - j, nz), y, y
                else:
                    zp, zm, yp, ym = z, z, _reflect(y + j, ny), _reflect(y - j, ny)
                for x in range(nx):
                    acc[x] += (np.float64(v[zp, yp, x]) + sign * np.float64(v[zm, ym, x])) * w[j]
            for x in range(nx):
                out[z, y, x] = np.float32(acc[x])


@nb.njit(parallel=True, cache=True)
def _smooth_x(v, w, sign, out):
    nz, ny, nx = v.shape
    r = w.size - 1
    for z in nb.prange(nz):
        line = np.empty(nx + 2 * r)
        for y in range(ny):
            for k in range(r):  # reflected borders; the interior copied as it is
                line[k] = np.float64(v[z, y, _reflect(k - r, nx)])
                line[nx + r + k] = np.float64(v[z, y, _reflect(nx + k, nx)])
            for k in range(nx):
                line[k + r] = np.float64(v[z, y, k])
            for x in range(nx):
                acc = line[x + r] * w[0]
                for j in range(1, r + 1):
                    acc += (line[x + r + j] + sign * line[x + r - j]) * w[j]
                out[z, y, x] = np.float32(acc)


@nb.njit(parallel=True, cache=True)
def _median3(v, out):
    # For size 3, "reflect" is a clamp: index -1 -> 0, n -> n - 1. When at least 14
    # of the 27 values equal the centre, the median is the centre (no selection).
    nz, ny, nx = v.shape
    for z in nb.prange(nz):
        buf = np.empty(27, dtype=np.float32)
        zi = np.int64(z)
        zs = (max(zi - 1, 0), zi, min(zi + 1, nz - 1))
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


@nb.njit(parallel=True, cache=True)
def _impulses(v, out, size, lo, hi, jump):
    # Per extreme voxel: float64 sum and count of the non-extreme neighbours in the
    # cube (clipped at the faces), counts of each extreme for the fallback.
    nz, ny, nx = v.shape
    a = -(size // 2)
    b = size - size // 2 - 1
    changed = np.zeros(nz, dtype=np.int64)
    for zu in nb.prange(nz):
        z = np.int64(zu)
        z0, z1 = max(z + a, 0), min(z + b, nz - 1)
        for y in range(ny):
            y0, y1 = max(y + a, 0), min(y + b, ny - 1)
            for x in range(nx):
                c = v[z, y, x]
                if c > lo and c < hi:
                    out[z, y, x] = c
                    continue
                x0, x1 = max(x + a, 0), min(x + b, nx - 1)
                acc = 0.0
                good = 0
                n_lo = 0
                n_hi = 0
                for zz in range(z0, z1 + 1):
                    for yy in range(y0, y1 + 1):
                        for xx in range(x0, x1 + 1):
                            w = v[zz, yy, xx]
                            if w <= lo:
                                n_lo += 1
                            elif w >= hi:
                                n_hi += 1
                            else:
                                acc += w
                                good += 1
                if good > 0:
                    m = np.float32(acc / good)
                else:
                    m = lo if n_lo >= n_hi else hi
                out[z, y, x] = m
                if abs(np.float64(m) - np.float64(c)) > jump:
                    changed[z] += 1
    return changed.sum()


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


@nb.njit(parallel=True, cache=True)
def _minmax(v, los, his, ok):
    n, chunks = v.size, los.size
    for c in nb.prange(chunks):
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


@nb.njit(parallel=True, cache=True)
def _histogram(v, edges, norm, parts):
    # numpy.histogram's uniform-bin rule: index from (x - first) * norm, then corrected against the edges.
    n = v.size
    chunks, bins = parts.shape
    first, last = edges[0], edges[-1]
    for c in nb.prange(chunks):
        a, b = c * n // chunks, (c + 1) * n // chunks
        for i in range(a, b):
            x = np.float64(v[i])
            if not (x >= first and x <= last):
                continue
            k = int((x - first) * norm)
            if k == bins:
                k -= 1
            if x < edges[k]:
                k -= 1
            elif x >= edges[k + 1] and k != bins - 1:
                k += 1
            parts[c, k] += 1
