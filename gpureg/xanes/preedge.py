"""Larch-compatible XANES normalisation per voxel: E0, edge step, pre-edge line, post-edge polynomial, flattening.

This reproduces ``larch.xafs.pre_edge`` (xraylarch 2024-2026, ``npre=1``,
``nvict=0``, ``make_flat=True``: the ``flat`` array, not ``flat_alt``) for every
voxel at once, so that normalised voxel spectra can be compared with, and
fitted against, reference spectra normalised by Athena/Larch.

Algorithm (Larch's, step by step)
---------------------------------
1. **E0**: Larch's ``find_e0``. A first pass takes the maximum of the plain
   derivative ``gradient(mu) / gradient(E)`` among points whose normalised
   derivative exceeds 0.6 (and whose neighbours do too); that point fixes a
   sub-range (+-75 points) and a smoothing width ``estep``; a second pass
   takes the same maximum of the Lorentzian-smoothed derivative over the
   sub-range. As in Larch, E0 is a grid energy.
2. **Ranges** relative to E0: ``pre1`` = the second energy (rounded to 5 eV,
   or 2 eV when E0 is among the first 20 points), ``pre2 = pre1 / 2``;
   ``norm2`` = the last energy (rounded to 5 eV), ``norm1 = min(25, norm2/15
   rounded to 5 eV)``; post-edge polynomial degree ``nnorm`` 2, 1 or 0 for
   ranges of >= 300, >= 30 or < 30 eV. Index bounds follow Larch exactly
   (``index_of`` / ``index_nearest``; the upper bounds are exclusive).
3. **Pre-edge line** fitted to ``mu`` over the pre range (a constant when the
   range holds fewer than 3 points); **post-edge polynomial** fitted to
   ``mu - pre_edge`` over the post range; **edge step** = that polynomial at
   the grid point E0; ``norm = (mu - pre_edge) / step``; ``flat`` subtracts
   the post-edge curve's shape above E0.

Everything after E0 is linear in ``mu`` and depends only on E0's grid index,
so voxels are grouped by that index and each group costs a few small matrix
products; E0 itself is two vectorised passes. All array code runs on ``xp``
(NumPy or CuPy). Energies in eV, strictly increasing; spectra ``(n_energy, ...)``.
"""

from __future__ import annotations

import functools

import numpy as np

from .spectra import check_energies, spectra_matrix

__all__ = ["larch_ranges", "pre_edge"]


def pre_edge(spectra, energies, *, e0: float | None = None, pre1: float | None = None, pre2: float | None = None,
             norm1: float | None = None, norm2: float | None = None, nnorm: int | None = None,
             flatten: bool = True, mask=None) -> dict:
    """Larch ``pre_edge`` normalisation of every spectrum (per voxel E0, step and fit ranges).

    Parameters
    ----------
    spectra : (n_energy, ...) ndarray
        NumPy or CuPy absorption spectra (any units), energy axis first.
    energies : (n_energy,) array_like
        Strictly increasing, eV (at least 5; Larch's E0 search needs about 10).
    e0 : float, optional
        Edge energy (eV) for every spectrum; found per spectrum (Larch's
        ``find_e0``) when None or outside ``energies[1]..energies[-2]``.
    pre1, pre2, norm1, norm2 : float, optional
        Fit ranges relative to E0 (eV), as in Larch; defaults as Larch's.
    nnorm : int, optional
        Post-edge polynomial degree (0-2); default as Larch's.
    flatten : bool
        Also return ``flat`` (Larch's ``group.flat``).
    mask : (...) ndarray of bool, optional
        Spectra to process; the others (and any with a non-finite value) get NaN.

    Returns
    -------
    dict
        ``e0`` (...) float32 eV, ``edge_step`` (...) float32 (input units),
        ``norm`` (n_energy, ...) float32 and, with ``flatten``, ``flat``
        (n_energy, ...) float32; NaN where not processed. Arrays on the
        input's device.
    """
    E = check_energies(energies)
    xp, mu, vox = spectra_matrix(spectra, E, "pre_edge")
    n, N = mu.shape
    if n < 10 and e0 is None:
        raise ValueError(f"pre_edge: finding E0 needs at least 10 energies, got {n} (pass e0=)")
    ok = xp.isfinite(mu).all(axis=0)
    if mask is not None:
        m = xp.asarray(mask)
        if tuple(m.shape) != vox:
            raise ValueError(f"pre_edge: mask must have shape {vox} (spectra.shape[1:]), got {tuple(m.shape)}")
        ok &= m.reshape(-1).astype(bool)
    idx = xp.flatnonzero(ok)
    nan = np.float32(np.nan)
    out_e0 = xp.full(N, nan, dtype=xp.float32)
    out_step = xp.full(N, nan, dtype=xp.float32)
    out_norm = xp.full((n, N), nan, dtype=xp.float32)
    out_flat = xp.full((n, N), nan, dtype=xp.float32) if flatten else None
    if int(idx.size):
        sub = mu[:, idx]
        if e0 is None or not (E[1] <= float(e0) <= E[-2]):
            ie0 = find_e0_index(xp, sub, E)
            e0_val = None
        else:
            ie0 = xp.full(int(idx.size), int(np.abs(E - float(e0)).argmin()), dtype=xp.int32)
            e0_val = float(e0)
        ranges = dict(pre1=pre1, pre2=pre2, norm1=norm1, norm2=norm2, nnorm=nnorm)
        host_ie0 = np.asarray(ie0.get() if hasattr(ie0, "get") else ie0)
        for k in np.unique(host_ie0):
            sel_h = np.flatnonzero(host_ie0 == k)
            sel = xp.asarray(sel_h)
            cols = idx[sel]
            e_k = E[k] if e0_val is None else e0_val
            ops = _operators(E.tobytes(), float(e_k), int(k), tuple(sorted(ranges.items())))
            y = sub[:, sel]
            wpre, vpre, wpost, vpost = (xp.asarray(a) for a in ops)
            y1 = y - vpre @ (wpre @ y)                       # mu - pre_edge
            y2 = vpost @ (wpost @ y1)                        # post_edge - pre_edge
            raw = y2[int(k)]
            step = xp.maximum(xp.abs(raw), xp.float32(1e-12))
            norm = y1 / step[None, :]
            out_norm[:, cols] = norm
            out_step[cols] = step
            out_e0[cols] = xp.float32(e_k)
            if flatten:
                fl = norm - y2 / step[None, :] + (raw / step)[None, :]
                fl[:int(k)] = norm[:int(k)]
                out_flat[:, cols] = fl
    res = {"e0": out_e0.reshape(vox), "edge_step": out_step.reshape(vox), "norm": out_norm.reshape(n, *vox)}
    if flatten:
        res["flat"] = out_flat.reshape(n, *vox)
    return res


def larch_ranges(energies, e0: float, *, pre1=None, pre2=None, norm1=None, norm2=None, nnorm=None) -> dict:
    """Larch's pre-edge / post-edge fit ranges and index bounds for an edge at ``e0``.

    Parameters
    ----------
    energies : (n_energy,) array_like
        Strictly increasing, eV.
    e0 : float
        Edge energy, eV.
    pre1, pre2, norm1, norm2 : float, optional
        Ranges relative to ``e0`` (eV); Larch's defaults when None.
    nnorm : int, optional
        Post-edge polynomial degree; Larch's default when None.

    Returns
    -------
    dict
        ``pre1, pre2, norm1, norm2`` (eV relative to E0), ``npre`` (1 line, 0
        constant), ``nnorm``, ``ie0`` (index nearest E0) and the half-open
        index ranges ``pre_idx = (p1, p2)``, ``post_idx = (q1, q2)``.
    """
    E = np.asarray(energies, dtype=np.float64)
    n = E.size
    ie0 = int(np.abs(E - e0).argmin())
    if pre1 is None:
        pre1 = 5.0 * round((E[1] - e0) / 5.0) if ie0 > 20 else 2.0 * round((E[1] - e0) / 2.0)
    pre1 = max(pre1, E.min() - e0)
    if pre2 is None:
        pre2 = 0.5 * pre1
    if pre1 > pre2:
        pre1, pre2 = pre2, pre1
    npre = 0 if (_index_of(E - e0, pre2) - _index_of(E - e0, pre1)) < 3 else 1
    if norm2 is None:
        norm2 = 5.0 * round((E.max() - e0) / 5.0)
    if norm2 < 0:
        norm2 = E.max() - e0 - norm2
    norm2 = min(norm2, E.max() - e0)
    if norm1 is None:
        norm1 = min(25, 5.0 * round(norm2 / 15.0))
    if norm1 > norm2:
        norm1, norm2 = norm2, norm1
    norm1 = min(norm1, norm2 - 2)
    if nnorm is None:
        nnorm = 2
        if norm2 - norm1 < 300:
            nnorm = 1
        if norm2 - norm1 < 30:
            nnorm = 0
    nnorm = max(min(int(nnorm), 5), 0)
    p1, p2 = _index_of(E, pre1 + e0), int(np.abs(E - (pre2 + e0)).argmin())
    if npre == 0:
        if p2 == p1:
            p2 += 1
    elif p2 - p1 < 2:
        p2 = min(n, p1 + 2)
    q1, q2 = _index_of(E, norm1 + e0), int(np.abs(E - (norm2 + e0)).argmin())
    if q1 > n - 3:
        q1 = n - 3
    if q2 - q1 < 2:
        q1 -= 2
        nnorm = 0
    elif q2 - q1 < 5:
        nnorm = min(1, nnorm)
    return {"pre1": float(pre1), "pre2": float(pre2), "norm1": float(norm1), "norm2": float(norm2), "npre": npre,
            "nnorm": nnorm, "ie0": ie0, "pre_idx": (p1, p2), "post_idx": (q1, q2)}


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
    for k in np.unique(i1_h):
        sel_h = np.flatnonzero(i1_h == k)
        sel = xp.asarray(sel_h)
        e1 = float(en[k])
        istart, istop = max(3, k - 75), min(k + 75, n - 3)
        if k < 0.05 * n:
            e1 = float(E.mean())
            istart, istop = max(3, k - 20), n - 3
        estep = 0.5 * (max(0.01, min(1.0, estep1)) + max(0.01, min(1.0, e1 / 25000.0)))
        S = xp.asarray(_smoothed_gradient(E[istart:istop].tobytes(), estep))   # (M-1, M)
        d2 = S @ mu[istart:istop][:, sel]
        ix = _high_deriv_argmax(xp, d2, S.shape[0])
        out[sel] = xp.where(ix < 1, xp.int32(istart + 2), ix.astype(xp.int32) + xp.int32(istart))
    return out


# --------------------------------------------------------------------------- helpers

def _index_of(array, value):
    """Larch ``index_of``: last index with ``array <= value`` (0 below the range)."""
    if value < array.min():
        return 0
    return int(np.flatnonzero(array <= value).max())


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


@functools.lru_cache(maxsize=1024)
def _operators(e_bytes, e0, ie0, ranges):
    """Low-rank pre/post operators for one E0: ``pre = vpre @ (wpre @ mu)``, ``post - pre = vpost @ (wpost @ (mu - pre))``."""
    E = np.frombuffer(e_bytes, dtype=np.float64)
    r = larch_ranges(E, e0, **dict(ranges))
    x = E - e0
    scale = max(float(np.abs(x).max()), 1.0)
    t = x / scale
    (p1, p2), (q1, q2) = r["pre_idx"], r["post_idx"]
    deg_pre = r["npre"]
    vpre = np.vander(t, deg_pre + 1, increasing=True)                     # (n, deg+1)
    wpre = np.zeros((deg_pre + 1, E.size))
    wpre[:, p1:p2] = np.linalg.pinv(vpre[p1:p2])
    vpost = np.vander(t, r["nnorm"] + 1, increasing=True)
    wpost = np.zeros((r["nnorm"] + 1, E.size))
    wpost[:, q1:q2] = np.linalg.pinv(vpost[q1:q2])
    return tuple(a.astype(np.float32) for a in (wpre, vpre, wpost, vpost))
