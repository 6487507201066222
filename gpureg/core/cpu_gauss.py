"""Compiled CPU Gaussian filters (numba): smoothing, derivatives and the partial-volume ramp.

Multithreaded twins of :func:`gpureg.core.segment.gaussian` and
:func:`gpureg.core.segment.partial_volume`, bit for bit:

- :func:`gaussian_filter` is ``scipy.ndimage.gaussian_filter(v, sigma, order)``
  (``mode="reflect"``, ``truncate=4``, axis by axis, float64 sums, float32
  between axes, the symmetric-kernel summation order of SciPy's ``correlate1d``);
- :func:`partial_volume` is the NumPy arithmetic of
  :func:`gpureg.core.segment.partial_volume` (three Gaussian derivatives of
  sigma 0.7, their float32 norm, the clipped ramp), with the three derivatives
  sharing their separable passes (5 passes along z and y instead of 6, one
  fused pass along x instead of 3 and the NumPy arithmetic after them).

**Constant rows.** Every pass works on rows of voxels along x. A row whose
inputs are all constant along x (a flat background, the 0 and 1 plateaus of a
binarized volume) gives a constant output row, computed once from the same
numbers in the same order and filled in, so the result is the same bit for
bit. Each pass tells the next which of its output rows are constant. On the
benchmark phantoms (flat background, particles filling a few per cent of the
volume) this skips most of the work; on a tomogram with a noisy background
only the binarized volume's plateaus are skipped.

numba is imported here only; callers import this module lazily when
:func:`gpureg.core.backend.cpu_engine` is ``"numba"``.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .cpu_kernels import run_planes

__all__ = ["gaussian_filter", "gaussian_weights", "partial_volume", "row_constants"]

_F0, _F1 = np.float32(0.0), np.float32(1.0)


def gaussian_weights(sigma: float, order: int) -> tuple[np.ndarray, float]:
    """Half-kernel of SciPy's Gaussian (``order`` 0) or first-derivative (``order`` 1) filter.

    Returns ``(w, sign)``: weights of offsets ``0..radius`` (``radius = int(4 sigma + 0.5)``)
    and the sign of the ``-j`` side, so that ``out = w0 v + sum_j w_j (v[+j] + sign v[-j])``.
    """
    radius = int(4.0 * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / float(sigma) ** 2 * x**2)
    phi = phi / phi.sum()
    if order == 0:
        return phi[radius:].copy(), 1.0
    return (x * phi / float(sigma) ** 2)[radius:].copy(), -1.0


def row_constants(volume) -> tuple[np.ndarray, np.ndarray]:
    """Which rows ``volume[z, y, :]`` are constant, and their first values.

    Returns ``(const, value)``, arrays of shape ``(Z, Y)`` (bool, float32). NaN
    rows are never constant.
    """
    v = np.ascontiguousarray(volume, dtype=np.float32)
    const = np.empty(v.shape[:2], dtype=np.bool_)
    value = np.empty(v.shape[:2], dtype=np.float32)
    run_planes(_row_constants, v.shape[0], v, const, value, n_voxels=v.size)
    return const, value


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
    rows = row_constants(v)
    for axis in range(3):
        v, rows = _pass(v, gaussian_weights(sigma, order[axis]), axis, rows)
    return v


def partial_volume(volume, threshold: float, ramp: float, sigma: float, floor: float) -> tuple[np.ndarray, int]:
    """The partial-volume ramp of :func:`gpureg.core.segment.partial_volume`, and the foreground count.

    Parameters
    ----------
    volume : (Z, Y, X) ndarray of float32
    threshold, ramp, sigma : float
        As in :func:`gpureg.core.segment.partial_volume` (``sigma > 0``).
    floor : float
        Lower bound of the gradient norm (flat regions).

    Returns
    -------
    out : (Z, Y, X) ndarray of float32
        ``clip(0.5 + (v - t) / max(|grad G_sigma v|, floor) / ramp, 0, 1)``, float32
        arithmetic as NumPy's.
    n_foreground : int
        Number of voxels with ``v > threshold``.
    """
    v = np.ascontiguousarray(volume, dtype=np.float32)
    g, d = gaussian_weights(sigma, 0), gaussian_weights(sigma, 1)
    rows = row_constants(v)
    gz_, rz = _pass(v, g, 0, rows)  # G_z v: feeds d/dy and d/dx
    dz_, rdz = _pass(v, d, 0, rows)  # D_z v
    gx_in, rx = _pass(gz_, g, 1, rz)  # G_y G_z v, then D_x
    gy_in, ry = _pass(gz_, d, 1, rz)  # D_y G_z v, then G_x
    gz_in, rzz = _pass(dz_, g, 1, rdz)  # G_y D_z v, then G_x
    out = gz_
    flags = np.stack([rows[0], rzz[0], ry[0], rx[0]])
    values = np.stack([rows[1], rzz[1], ry[1], rx[1]])
    counts = np.zeros(v.shape[0], dtype=np.int64)
    run_planes(_ramp_x, v.shape[0], v, gz_in, gy_in, gx_in, flags, values, g[0], d[0], np.float32(threshold),
               np.float32(ramp), np.float32(floor), out, counts, n_voxels=v.size)
    return out, int(counts.sum())


def _pass(v, weights, axis, rows):
    out = np.empty_like(v)
    const = np.empty(v.shape[:2], dtype=np.bool_)
    value = np.empty(v.shape[:2], dtype=np.float32)
    run_planes(_smooth, v.shape[0], v, weights[0], weights[1], out, axis, rows[0], rows[1], const, value,
               n_voxels=v.size)
    return out, (const, value)


@nb.njit(cache=True)
def _reflect(i, n):
    # scipy's "reflect" (d c b a | a b c d | d c b a), any distance outside
    period = 2 * n
    i = i % period
    return period - 1 - i if i >= n else i


@nb.njit(nogil=True, cache=True)
def _row_constants(v, const, value, z0, z1):
    nz, ny, nx = v.shape
    for z in range(z0, z1):
        for y in range(ny):
            c = v[z, y, 0]
            same = c == c
            x = 1
            while same and x < nx:
                same = v[z, y, x] == c
                x += 1
            const[z, y] = same
            value[z, y] = c


@nb.njit(nogil=True, cache=True)
def _smooth(v, w, sign, out, axis, cin, vin, cout, vout, z0, z1):
    # One pass along z (axis 0) or y (axis 1), whole rows at once (vectorised along x), or
    # along x (axis 2) from a reflected copy of each row. A row whose inputs are all constant
    # along x is computed once and filled; cout/vout: the output rows known constant.
    for z in range(z0, z1):
        _smooth_plane(v, w, sign, out, axis, cin, vin, cout, vout, z)


@nb.njit(cache=True)
def _smooth_plane(v, w, sign, out, axis, cin, vin, cout, vout, z):
    nz, ny, nx = v.shape
    r = w.size - 1
    acc = np.empty(nx)
    line = np.empty(nx + 2 * r)
    for y in range(ny):
        flat = cin[z, y]
        for j in range(1, r + 1):
            if not flat or axis == 2:
                break
            if axis == 0:
                flat = cin[_reflect(z + j, nz), y] and cin[_reflect(z - j, nz), y]
            else:
                flat = cin[z, _reflect(y + j, ny)] and cin[z, _reflect(y - j, ny)]
        if flat:
            a = np.float64(vin[z, y]) * w[0]
            for j in range(1, r + 1):
                if axis == 0:
                    p, m = vin[_reflect(z + j, nz), y], vin[_reflect(z - j, nz), y]
                elif axis == 1:
                    p, m = vin[z, _reflect(y + j, ny)], vin[z, _reflect(y - j, ny)]
                else:
                    p, m = vin[z, y], vin[z, y]
                a += (np.float64(p) + sign * np.float64(m)) * w[j]
            f = np.float32(a)
            for x in range(nx):
                out[z, y, x] = f
            cout[z, y] = True
            vout[z, y] = f
            continue
        if axis == 2:
            _fill_line(v, z, y, line, r)
            _conv_x(line, w, sign, acc)
        else:
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
        cout[z, y] = False
        vout[z, y] = out[z, y, 0]


@nb.njit(cache=True)
def _flat_x(c, w, sign):
    # The x pass of a constant row (every position sees the same reflected values).
    a = np.float64(c) * w[0]
    for j in range(1, w.size):
        a += (np.float64(c) + sign * np.float64(c)) * w[j]
    return np.float32(a)


@nb.njit(cache=True)
def _conv_x(line, w, sign, acc):
    # The x pass of one row from its reflected copy ``line`` (offset r), tap by tap over
    # the whole row (vectorised; per output the same order as SciPy: w0, then j = 1..r).
    r = w.size - 1
    nx = acc.size
    for x in range(nx):
        acc[x] = line[x + r] * w[0]
    for j in range(1, r + 1):
        wj = w[j]
        for x in range(nx):
            acc[x] += (line[x + r + j] + sign * line[x + r - j]) * wj


@nb.njit(cache=True)
def _fill_line(v, z, y, line, r):
    nx = v.shape[2]
    for k in range(r):  # reflected borders; the interior copied as it is
        line[k] = np.float64(v[z, y, _reflect(k - r, nx)])
        line[nx + r + k] = np.float64(v[z, y, _reflect(nx + k, nx)])
    for k in range(nx):
        line[k + r] = np.float64(v[z, y, k])


@nb.njit(cache=True)
def _ramp_value(c, gz, gy, gx, t, ramp, floor):
    # segment.partial_volume's float32 arithmetic; each float64 operation on float32
    # operands rounded to float32 is the float32 operation (53 >= 2 * 24 + 2 bits).
    norm = np.float32(np.sqrt(np.float32(np.float32(np.float32(gz * gz) + np.float32(gy * gy))
                                         + np.float32(gx * gx))))
    d = np.float32(np.float32(c - t) / max(norm, floor))
    p = np.float32(np.float32(0.5) + np.float32(d / ramp))
    return min(max(p, np.float32(0.0)), np.float32(1.0))


@nb.njit(nogil=True, cache=True)
def _ramp_x(v, bz, by, bx, flags, values, g, d, t, ramp, floor, out, counts, z0, z1):
    # Last pass: G_x of the z and y derivative volumes, D_x of the smoothed one, then the ramp.
    # flags/values: row constants of v, bz, by, bx. counts[z]: voxels of plane z with v > t.
    for z in range(z0, z1):
        counts[z] = _ramp_plane(v, bz, by, bx, flags, values, g, d, t, ramp, floor, out, z)


@nb.njit(cache=True)
def _ramp_plane(v, bz, by, bx, flags, values, g, d, t, ramp, floor, out, z):
    nz, ny, nx = v.shape
    r = g.size - 1
    count = 0
    floor2 = np.float64(floor) * np.float64(floor)
    half2 = 1.0201 * 0.25 * np.float64(ramp) * np.float64(ramp)  # (1.01 ramp / 2)^2
    lz, ly, lx = np.empty(nx + 2 * r), np.empty(nx + 2 * r), np.empty(nx + 2 * r)
    az, ay, ax = np.empty(nx), np.empty(nx), np.empty(nx)
    for y in range(ny):
        if flags[0, z, y] and flags[1, z, y] and flags[2, z, y] and flags[3, z, y]:
            c = values[0, z, y]
            f = _ramp_value(c, _flat_x(values[1, z, y], g, 1.0), _flat_x(values[2, z, y], g, 1.0),
                            _flat_x(values[3, z, y], d, -1.0), t, ramp, floor)
            for x in range(nx):
                out[z, y, x] = f
            if c > t:
                count += nx
            continue
        _fill_line(bz, z, y, lz, r)
        _fill_line(by, z, y, ly, r)
        _fill_line(bx, z, y, lx, r)
        _conv_x(lz, g, 1.0, az)
        _conv_x(ly, g, 1.0, ay)
        _conv_x(lx, d, -1.0, ax)
        for x in range(nx):
            c = v[z, y, x]
            gz, gy, gx = np.float32(az[x]), np.float32(ay[x]), np.float32(ax[x])
            # Far from the surface (|d| > 1.01 ramp / 2, tested without the root and the
            # divisions) the float32 ramp is clipped: 0 or 1 by the sign of v - t.
            e = np.float64(c) - np.float64(t)
            n2 = max(np.float64(gz) * gz + np.float64(gy) * gy + np.float64(gx) * gx, floor2)
            if e * e > half2 * n2:
                out[z, y, x] = _F1 if c > t else _F0
            else:
                out[z, y, x] = _ramp_value(c, gz, gy, gx, t, ramp, floor)
            if c > t:
                count += 1
    return count
