"""Compiled CPU Gaussian filters (numba): smoothing, derivatives and the partial-volume ramp.

Multithreaded twins of :func:`gpureg.core.segment.gaussian` and
:func:`gpureg.core.segment.partial_volume`, bit for bit:

- :func:`gaussian_filter` is ``scipy.ndimage.gaussian_filter(v, sigma, order)``
  (``mode="reflect"``, ``truncate=4``, axis by axis, float64 sums, float32
  between axes, the symmetric-kernel summation order of SciPy's ``correlate1d``);
- :func:`partial_volume` is the NumPy arithmetic of
  :func:`gpureg.core.segment.partial_volume` (three Gaussian derivatives of
  sigma 0.7, their float32 norm, the clipped ramp), with the three derivatives
  sharing their separable passes (5 row passes along z and y instead of 6, one
  along x that also forms the ramp, instead of 3 and the NumPy arithmetic).

**One plane at a time.** For each output plane z, the pass along z fills a
plane buffer from the 2r + 1 input planes around z, the pass along y another
plane buffer, and the pass along x writes the output plane: the intermediate
results stay in the cache instead of travelling through memory as whole
volumes (each pass still rounds to float32, as SciPy does between axes).

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
    const, value = row_constants(v)
    (wz, sz), (wy, sy), (wx, sx) = (gaussian_weights(sigma, o) for o in order)
    out = np.empty_like(v)
    run_planes(_gauss_planes, v.shape[0], v, const, value, wz, sz, wy, sy, wx, sx, out, n_voxels=v.size)
    return out


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
    g, d = gaussian_weights(sigma, 0)[0], gaussian_weights(sigma, 1)[0]
    const, value = row_constants(v)
    out = np.empty_like(v)
    counts = np.zeros(v.shape[0], dtype=np.int64)
    run_planes(_ramp_planes, v.shape[0], v, const, value, g, d, np.float32(threshold), np.float32(ramp),
               np.float32(floor), out, counts, n_voxels=v.size)
    return out, int(counts.sum())


@nb.njit(cache=True)
def _reflect(i, n):
    # scipy's "reflect" (d c b a | a b c d | d c b a), any distance outside
    if 0 <= i < n:  # most calls: no integer division
        return i
    period = 2 * n
    i = i % period
    return period - 1 - i if i >= n else i


@nb.njit(nogil=True, cache=True)
def _row_constants(v, const, value, z0, z1):
    ny, nx = v.shape[1], v.shape[2]
    for z in range(z0, z1):
        for y in range(ny):
            c = v[z, y, 0]
            same = not np.isnan(c)
            x = 1
            while same and x < nx:
                same = v[z, y, x] == c
                x += 1
            const[z, y] = same
            value[z, y] = c


@nb.njit(cache=True)
def _z_row(v, z, y, w, sign, cin, vin, acc, out, cout, vout):
    # Row (z, y) of the pass along z of volume v into row y of the plane buffer ``out``
    # (vectorised along x). A row whose window rows are all constant along x is computed
    # once and filled; cout/vout[y]: whether the output row is known constant, and its value.
    nz = v.shape[0]
    nx = v.shape[2]
    r = w.size - 1
    flat = cin[z, y]
    for j in range(1, r + 1):
        if not flat:
            break
        flat = cin[_reflect(z + j, nz), y] and cin[_reflect(z - j, nz), y]
    if flat:
        a = np.float64(vin[z, y]) * w[0]
        for j in range(1, r + 1):
            a += (np.float64(vin[_reflect(z + j, nz), y]) + sign * np.float64(vin[_reflect(z - j, nz), y])) * w[j]
        _fill_flat(out, y, np.float32(a), cout, vout)
        return
    for x in range(nx):
        acc[x] = np.float64(v[z, y, x]) * w[0]
    for j in range(1, r + 1):
        zp, zm = _reflect(z + j, nz), _reflect(z - j, nz)
        for x in range(nx):
            acc[x] += (np.float64(v[zp, y, x]) + sign * np.float64(v[zm, y, x])) * w[j]
    _store(out, y, acc, cout, vout)


@nb.njit(cache=True)
def _y_row(p, y, w, sign, cin, vin, acc, out, cout, vout):
    # Row y of the pass along y of the plane p (rows' constancy cin/vin) into the plane ``out``.
    ny, nx = p.shape
    r = w.size - 1
    flat = cin[y]
    for j in range(1, r + 1):
        if not flat:
            break
        flat = cin[_reflect(y + j, ny)] and cin[_reflect(y - j, ny)]
    if flat:
        a = np.float64(vin[y]) * w[0]
        for j in range(1, r + 1):
            a += (np.float64(vin[_reflect(y + j, ny)]) + sign * np.float64(vin[_reflect(y - j, ny)])) * w[j]
        _fill_flat(out, y, np.float32(a), cout, vout)
        return
    for x in range(nx):
        acc[x] = np.float64(p[y, x]) * w[0]
    for j in range(1, r + 1):
        yp, ym = _reflect(y + j, ny), _reflect(y - j, ny)
        for x in range(nx):
            acc[x] += (np.float64(p[yp, x]) + sign * np.float64(p[ym, x])) * w[j]
    _store(out, y, acc, cout, vout)


@nb.njit(cache=True)
def _fill_flat(out, y, f, cout, vout):
    for x in range(out.shape[1]):
        out[y, x] = f
    cout[y] = True
    vout[y] = f


@nb.njit(cache=True)
def _store(out, y, acc, cout, vout):
    for x in range(out.shape[1]):
        out[y, x] = np.float32(acc[x])
    cout[y] = False
    vout[y] = out[y, 0]


@nb.njit(cache=True)
def _x_row(row, w, sign, line, acc):
    # The pass along x of one row into acc (float64): a reflected copy of the row in ``line``
    # (offset r), then tap by tap over the whole row (vectorised; per output the same order
    # as SciPy: w0, then j = 1..r).
    nx = row.size
    r = w.size - 1
    for k in range(r):  # reflected borders; the interior copied as it is
        line[k] = np.float64(row[_reflect(k - r, nx)])
        line[nx + r + k] = np.float64(row[_reflect(nx + k, nx)])
    for k in range(nx):
        line[k + r] = np.float64(row[k])
    for x in range(nx):
        acc[x] = line[x + r] * w[0]
    for j in range(1, r + 1):
        wj = w[j]
        for x in range(nx):
            acc[x] += (line[x + r + j] + sign * line[x + r - j]) * wj


@nb.njit(cache=True)
def _flat_x(c, w, sign):
    # The pass along x of a constant row (every position sees the same reflected values).
    a = np.float64(c) * w[0]
    for j in range(1, w.size):
        a += (np.float64(c) + sign * np.float64(c)) * w[j]
    return np.float32(a)


@nb.njit(nogil=True, cache=True)
def _gauss_planes(v, cin, vin, wz, sz, wy, sy, wx, sx, out, z0, z1):
    ny, nx = v.shape[1], v.shape[2]
    pz, py = np.empty((ny, nx), np.float32), np.empty((ny, nx), np.float32)
    cz, cy = np.empty(ny, np.bool_), np.empty(ny, np.bool_)
    vz, vy = np.empty(ny, np.float32), np.empty(ny, np.float32)
    acc = np.empty(nx)
    line = np.empty(nx + 2 * (wx.size - 1))
    for z in range(z0, z1):
        for y in range(ny):
            _z_row(v, z, y, wz, sz, cin, vin, acc, pz, cz, vz)
        for y in range(ny):
            _y_row(pz, y, wy, sy, cz, vz, acc, py, cy, vy)
        for y in range(ny):
            if cy[y]:
                f = _flat_x(vy[y], wx, sx)
                for x in range(nx):
                    out[z, y, x] = f
                continue
            _x_row(py[y], wx, sx, line, acc)
            for x in range(nx):
                out[z, y, x] = np.float32(acc[x])


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
def _ramp_planes(v, cin, vin, g, d, t, ramp, floor, out, counts, z0, z1):
    # Per plane: G_z v and D_z v; G_y G_z v (then D_x: the x derivative), D_y G_z v (then G_x:
    # the y derivative), G_y D_z v (then G_x: the z derivative); the ramp. counts[z]: voxels
    # of plane z with v > t.
    ny, nx = v.shape[1], v.shape[2]
    r = g.size - 1
    gz, dz = np.empty((ny, nx), np.float32), np.empty((ny, nx), np.float32)
    bx, by, bz = np.empty((ny, nx), np.float32), np.empty((ny, nx), np.float32), np.empty((ny, nx), np.float32)
    flags = np.empty((5, ny), np.bool_)
    values = np.empty((5, ny), np.float32)
    acc = np.empty(nx)
    az, ay, ax = np.empty(nx), np.empty(nx), np.empty(nx)
    line = np.empty(nx + 2 * r)
    floor2 = np.float64(floor) * np.float64(floor)
    half2 = 1.0201 * 0.25 * np.float64(ramp) * np.float64(ramp)  # (1.01 ramp / 2)^2
    for z in range(z0, z1):
        for y in range(ny):
            _z_row(v, z, y, g, 1.0, cin, vin, acc, gz, flags[0], values[0])
            _z_row(v, z, y, d, -1.0, cin, vin, acc, dz, flags[1], values[1])
        for y in range(ny):
            _y_row(gz, y, g, 1.0, flags[0], values[0], acc, bx, flags[2], values[2])
            _y_row(gz, y, d, -1.0, flags[0], values[0], acc, by, flags[3], values[3])
            _y_row(dz, y, g, 1.0, flags[1], values[1], acc, bz, flags[4], values[4])
        count = 0
        for y in range(ny):
            if cin[z, y] and flags[2, y] and flags[3, y] and flags[4, y]:
                c = vin[z, y]
                f = _ramp_value(c, _flat_x(values[4, y], g, 1.0), _flat_x(values[3, y], g, 1.0),
                                _flat_x(values[2, y], d, -1.0), t, ramp, floor)
                for x in range(nx):
                    out[z, y, x] = f
                if c > t:
                    count += nx
                continue
            _x_row(bz[y], g, 1.0, line, az)
            _x_row(by[y], g, 1.0, line, ay)
            _x_row(bx[y], d, -1.0, line, ax)
            for x in range(nx):
                c = v[z, y, x]
                gzx, gyx, gxx = np.float32(az[x]), np.float32(ay[x]), np.float32(ax[x])
                # Far from the surface (|d| > 1.01 ramp / 2, tested without the root and the
                # divisions) the float32 ramp is clipped: 0 or 1 by the sign of v - t.
                e = np.float64(c) - np.float64(t)
                n2 = max(np.float64(gzx) * gzx + np.float64(gyx) * gyx + np.float64(gxx) * gxx, floor2)
                if e * e > half2 * n2:
                    out[z, y, x] = _F1 if c > t else _F0
                else:
                    out[z, y, x] = _ramp_value(c, gzx, gyx, gxx, t, ramp, floor)
                if c > t:
                    count += 1
        counts[z] = count
