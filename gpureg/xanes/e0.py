"""Larch's ``find_e0`` for every voxel at once: the edge energy E0 as a grid index.

A first pass takes the maximum of the plain derivative ``gradient(mu) /
gradient(E)`` among points whose normalised derivative exceeds 0.6 (and whose
neighbours do too); that point fixes a sub-range (+-75 points) and a smoothing
width ``estep``; a second pass takes the same maximum of the
Lorentzian-smoothed derivative over the sub-range. As in Larch, E0 is a grid
energy. Used by :func:`gpureg.xanes.preedge.pre_edge` and for the common E0 of
a stack (:func:`gpureg.xanes.edge.edge_ranges`).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["find_e0_index"]


def find_e0_index(xp, mu, E):
    """Grid index of Larch's ``find_e0`` for every column of ``mu`` (n_energy, N) float32 -> (N,) int32."""
    n, N = mu.shape
    # Pass 1: plain derivative. Larch's _finde0 drops the last point (its "ordered" index test).
    L = n - 1
    en = E[:L]
    dmu = _gradient_rows(xp, mu[:L], en)
    i1 = _high_deriv_argmax(xp, dmu, L)
    del dmu
    estep1 = _energy_step(en)
    i1_h = np.asarray(i1.get() if hasattr(i1, "get") else i1)
    out = xp.empty(N, dtype=xp.int32)
    ks = np.unique(i1_h)
    if ks.size > 1:                      # one gather; every group is then a contiguous block of columns
        perm_h = np.argsort(i1_h, kind="stable")
        perm = xp.asarray(perm_h)
        mu_s = mu[:, perm]
        bounds = np.searchsorted(i1_h[perm_h], ks, side="left").tolist() + [N]
    for j, k in enumerate(ks):
        e1 = float(en[k])
        istart, istop = max(3, k - 75), min(k + 75, n - 3)
        if k < 0.05 * n:
            e1 = float(E.mean())
            istart, istop = max(3, k - 20), n - 3
        estep = 0.5 * (max(0.01, min(1.0, estep1)) + max(0.01, min(1.0, e1 / 25000.0)))
        S = xp.asarray(_smoothed_gradient(E[istart:istop].tobytes(), estep))   # (M-1, M)
        block = mu[istart:istop] if ks.size == 1 else mu_s[istart:istop, bounds[j]:bounds[j + 1]]
        ix = _high_deriv_argmax(xp, S @ block, S.shape[0])
        ix = xp.where(ix < 1, xp.int32(istart + 2), ix.astype(xp.int32) + xp.int32(istart))
        if ks.size == 1:
            out[...] = ix
        else:
            out[perm[bounds[j]:bounds[j + 1]]] = ix
    return out


def _energy_step(E):
    """Larch ``find_energy_step`` (NaN for fewer than 100 energies, as Larch's empty slice; Larch then uses 1 eV)."""
    n = E.size
    nskip = int(0.01 * n)
    if nskip == 0:
        return 1.0          # min(1.0, nan) -> 1.0 in Larch's estep formula
    ediff = np.diff(E[:-1][nskip:-nskip])
    return float(np.sort(ediff)[nskip:nskip + 10].mean())


def _gradient_rows(xp, y, x):
    """``np.gradient(y, axis=0) / np.gradient(x)`` for (L, N) ``y`` (Larch's derivative)."""
    gx = np.gradient(x).astype(np.float32)
    d = xp.empty_like(y)
    d[1:-1] = (y[2:] - y[:-2]) * xp.float32(0.5)
    d[0] = y[1] - y[0]
    d[-1] = y[-1] - y[-2]
    d /= xp.asarray(gx)[:, None]
    return d


def _high_deriv_argmax(xp, dmu, L):
    """Larch ``_finde0``'s choice of index from derivatives ``dmu`` (L, N) (float32): (N,) int."""
    nmin = max(3, int(L * 0.02))
    dmu = xp.where(xp.isfinite(dmu), dmu, xp.float32(-1.0))
    if L - 2 * nmin < 1:  # a grid too short for Larch's interior window (a dozen energies): the largest slope
        return xp.argmax(dmu[:L], axis=0)
    inner = dmu[nmin:L - nmin]
    lo = inner.min(axis=0)
    ptp = xp.maximum(inner.max(axis=0) - lo, xp.float32(1e-10))
    d = (dmu - lo[None, :]) / ptp[None, :]
    dhigh = 0.60 if L > 20 else 0.30
    c0 = (d > dhigh).sum(axis=0)
    thr = xp.where(c0 < 3, xp.float32(dhigh * 0.5), xp.float32(dhigh))
    c1 = (d > thr[None, :]).sum(axis=0)
    thr = xp.where((c0 < 3) & (c1 <= 3), xp.float32(dhigh * 0.25), thr)
    high = d > thr[None, :]
    every = high.sum(axis=0) < 3
    high |= every[None, :]
    cand = xp.zeros_like(high)
    lo_i, hi_i = nmin, min(L - nmin, L - 2)
    cand[lo_i:hi_i + 1] = high[lo_i:hi_i + 1] & high[lo_i - 1:hi_i] & high[lo_i + 1:hi_i + 2]
    cand &= d > 0
    score = xp.where(cand, d, xp.float32(-np.inf))
    imax = xp.argmax(score, axis=0)
    return xp.where(cand.any(axis=0), imax, 0)


@functools.lru_cache(maxsize=256)
def _smoothed_gradient(e_bytes, estep):
    """(M-1, M) float32 matrix: Larch's smooth(en, gradient(mu)/gradient(en), xstep=estep, sigma=estep)."""
    E = np.frombuffer(e_bytes, dtype=np.float64)
    en = E[:-1]
    L = en.size
    G = np.zeros((L, E.size))
    gx = np.gradient(en)
    for i in range(L):
        if i == 0:
            G[0, 0], G[0, 1] = -1.0, 1.0
        elif i == L - 1:
            G[i, i - 1], G[i, i] = -1.0, 1.0
        else:
            G[i, i - 1], G[i, i + 1] = -0.5, 0.5
    G /= gx[:, None]
    Sm = np.stack([_larch_smooth(en, col, estep, estep) for col in np.eye(L)], axis=1)   # (L, L)
    return (Sm @ G).astype(np.float32)


def _larch_smooth(x, y, xstep, sigma, npad=5):
    """Larch ``smooth(x, y, sigma, xstep=xstep)`` with the Lorentzian window (linear in ``y``)."""
    xmin = xstep * int((x.min() - npad * xstep) / xstep)
    xmax = xstep * int((x.max() + npad * xstep) / xstep)
    npts1 = 1 + int(abs(xmax - xmin + xstep * 0.1) / xstep)
    npts = min(npts1, 50 * len(x))
    x0 = np.linspace(xmin, xmax, npts)
    y0 = np.interp(x0, x, y)
    sig = sigma / xstep
    wx = np.arange(2 * npts)
    win = 1.0 / (1.0 + ((wx - npts) / sig) ** 2) / (np.pi * sig)
    y1 = np.concatenate((y0[npts:0:-1], y0, y0[-1:-npts - 1:-1]))
    y2 = np.convolve(win / win.sum(), y1, mode="valid")
    if len(y2) > len(x0):
        nex = int((len(y2) - len(x0)) / 2)
        y2 = (y2[nex:])[:len(x0)]
    return np.interp(x, x0, y2)
