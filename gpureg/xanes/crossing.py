"""The first rising crossing of a level by sampled curves, read from their monotone cubic interpolant.

:func:`crossing` is the edge-energy estimator of :func:`gpureg.xanes.edge_energy` (the 0.5 crossing of
the normalised spectrum): the monotone cubic (PCHIP, Fritsch-Carlson) interpolant of the samples around
the first rising crossing, solved by safeguarded Newton. All array code is ``xp``-generic (NumPy or CuPy).
"""

from __future__ import annotations

import numpy as np

__all__ = ["crossing"]


def crossing(xp, y, level, E, i_lo, i_hi):
    """First rising crossing of ``level`` by ``y`` (n, N) between rows ``i_lo`` and ``i_hi``, read from the
    monotone cubic (PCHIP) interpolant: (energy, slope dy/dE there, bracketing row i, fraction t; NaN if none)
    and the number of rising crossings in the window (int32)."""
    W = i_hi - i_lo + 1
    j, found, count = _first_crossing(xp, y[i_lo:i_hi + 1], xp.float32(level))
    n, N = y.shape
    i = xp.where(found, j, 0).astype(xp.int32) + xp.int32(i_lo)
    if W < 2:
        nan = xp.full(N, np.nan, dtype=xp.float32)
        return nan, nan, i, nan, count
    cols = xp.arange(N)
    Ex = xp.asarray(E.astype(np.float32))
    im, ip, ip2 = xp.maximum(i - 1, 0), i + 1, xp.minimum(i + 2, n - 1)
    y0, y1 = y[i, cols], y[ip, cols]
    h = Ex[ip] - Ex[i]
    dl = (y0 - y[im, cols]) / xp.where(im < i, Ex[i] - Ex[im], xp.float32(1))
    dc = (y1 - y0) / h
    dr = (y[ip2, cols] - y1) / xp.where(ip2 > ip, Ex[ip2] - Ex[ip], xp.float32(1))
    hl = xp.where(im < i, Ex[i] - Ex[im], h)
    hr = xp.where(ip2 > ip, Ex[ip2] - Ex[ip], h)
    m0 = _pchip_slope(xp, xp.where(im < i, dl, dc), dc, hl, h)
    m1 = _pchip_slope(xp, dc, xp.where(ip2 > ip, dr, dc), h, hr)
    # Hermite cubic on t in [0, 1]: H(t) = h00 y0 + h10 h m0 + h01 y1 + h11 h m1 (monotone: one root).
    a0, a1 = y0 - xp.float32(level), h * m0
    b0, b1 = y1 - xp.float32(level), h * m1
    lo = xp.zeros(N, dtype=xp.float32)
    hi = xp.ones(N, dtype=xp.float32)
    t = xp.clip(-a0 / xp.where(b0 - a0 != 0, b0 - a0, xp.float32(1)), 0, 1)
    for _ in range(8):                       # safeguarded Newton: quadratic convergence, stays in the bracket
        t2, t3 = t * t, t * t * t
        f = (2 * t3 - 3 * t2 + 1) * a0 + (t3 - 2 * t2 + t) * a1 + (-2 * t3 + 3 * t2) * b0 + (t3 - t2) * b1
        fp = (6 * t2 - 6 * t) * a0 + (3 * t2 - 4 * t + 1) * a1 + (-6 * t2 + 6 * t) * b0 + (3 * t2 - 2 * t) * b1
        neg = f < 0
        lo = xp.where(neg, t, lo)
        hi = xp.where(neg, hi, t)
        tn = t - f / xp.where(fp > 0, fp, xp.float32(1))
        t = xp.where((fp > 0) & (tn > lo) & (tn < hi), tn, 0.5 * (lo + hi))
    t2 = t * t
    fp = (6 * t2 - 6 * t) * a0 + (3 * t2 - 4 * t + 1) * a1 + (-6 * t2 + 6 * t) * b0 + (3 * t2 - 2 * t) * b1
    nan = xp.float32(np.nan)
    e = xp.where(found, Ex[i] + t * h, nan)
    return e, xp.where(found, fp / h, nan), i, xp.where(found, t, nan), count


def _pchip_slope(xp, d0, d1, h0, h1):
    """Fritsch-Carlson slope at a node from the secants on each side (weighted harmonic mean; 0 at an extremum)."""
    w1, w2 = 2 * h1 + h0, h1 + 2 * h0
    same = (d0 * d1) > 0
    den = xp.where(same, w1 / xp.where(same, d0, 1) + w2 / xp.where(same, d1, 1), xp.float32(1))
    return xp.where(same, (w1 + w2) / den, xp.float32(0))


def _first_crossing(xp, d, level):
    """Row ``j`` where ``d`` (W, N) first rises through ``level`` (between rows j and j + 1), whether it does,
    and how many times it rises through it (int32).

    A loop over the W energies of the window with whole-row operations: rows
    are contiguous, so this is cache-friendly on the CPU and a handful of
    small kernels per energy on the GPU (an ``argmax`` over axis 0 is a
    strided reduction, several times slower on the CPU).
    """
    W, N = d.shape
    idx = xp.zeros(N, dtype=xp.int32)
    todo = xp.ones(N, dtype=bool)
    prev = d[0] >= level
    up = xp.empty_like(prev)
    hit = xp.empty_like(prev)
    count = xp.zeros(N, dtype=xp.int32)
    for j in range(1, W):
        # In-place, branch-free row operations: masked copies (where/copyto) with scattered
        # masks are ~30x slower than arithmetic in NumPy.
        xp.greater_equal(d[j], level, out=up)
        xp.greater(up, prev, out=hit)           # up and not prev (bool order False < True)
        count += hit
        xp.logical_and(hit, todo, out=hit)      # only the first crossing counts
        idx += hit.astype(xp.int32) * xp.int32(j - 1)
        xp.greater(todo, hit, out=todo)         # todo and not hit
        prev, up = up, prev
    return idx, ~todo, count
