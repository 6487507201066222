"""Transforms made consistent along an energy series: robust smoothing of what varies slowly.

Why (issue 27): an edge-energy map divides every voxel's spectrum by its own
edge jump, so a misalignment that is the same at every energy (a voxel that is
half particle at every energy) cancels, while one that changes from energy to
energy (half particle at one energy, a quarter at the next) distorts the
spectrum. Measured on ``gpureg simulate --size 48`` (Mn K-edge, 29 energies,
3 seeds), the per-energy affine has about 0.09 voxel of energy-to-energy
noise (mostly a spurious magnification at the edge energies, where the
binarized surface moves with the contrast); removing it while keeping the
affine's slowly varying error halves the map error at particle borders (median
0.24 -> 0.15 eV), although the mean transform error barely changes. Per-particle
and B-spline fits, made from fewer voxels or with more parameters, are noisier
still, which is why they made the maps worse although they were more accurate
on average.

What is smoothed (the sample model; :func:`gpureg.synth.default_motion` is one):

- the **linear part** of the global affine (tilt, magnification, shear: the
  zone plate refocusing with energy and slow stage drift), not its
  translation, which jitters from energy to energy; the translation is
  re-chosen so that the centre of the particles maps where the per-energy fit
  put it (the centre is the best-determined point of a fit);
- each particle's **correction to the global affine** (particles drift slowly
  relative to each other; the global affine is a compromise between them);
- the **B-spline coefficients** (the sample deforms slowly).

The corrections and coefficients are fitted from fewer voxels and are noisier,
so the pipeline smooths them over twice the affine's window. Measured (48^3, 3
seeds, median / 95th percentile of the map error, eV): per-particle
corrections over 6 energies each side 0.125-0.177 / 0.697-0.785, over 12
0.125-0.158 / 0.687-0.767 (smoothed affine alone 0.124-0.150 / 0.699-0.851);
projecting the corrections onto rigid motions gave 0.122-0.153 / 0.692-0.833.

Energies where the image content changes (issue 27): across the absorption
edge each particle, and each part of a particle of graded composition,
brightens at its own energy, so the prepared (binarized) moving volume
differs from the reference whatever the transform: the registration residual
jumps there (5-20x the series' median on ``gpureg simulate --relative-motion``
at 6548-6554 eV) and the fits are biased exactly where the edge energy is
read (a spurious magnification of +1.4 to +3.6 % of the per-particle fits).
:func:`residual_weights` turns each energy's residual into a prior weight, so
the smoothing there leans on the neighbouring energies; the maps of every
mode, the affine one included, improved (48^3, seeds 0-2).

Smoother: a local linear fit in series order (the acquisition order of a
XANES scan is the energy order) over the ``2 window + 1`` nearest energies
with tricube weights, refitted twice with bisquare weights on the residuals
(Cleveland's LOWESS) so that a single bad energy does not pull its
neighbours; the reference energy keeps its identity exactly.
"""

from __future__ import annotations

import numpy as np

__all__ = ["residual_weights", "series_positions", "smooth_affines", "smooth_coefficients", "smooth_corrections",
           "smooth_series"]


def series_positions(energies) -> np.ndarray:
    """Position of each energy along the series (its rank by energy, float64): the smoothing coordinate."""
    e = np.asarray(energies, dtype=np.float64).reshape(-1)
    out = np.empty(e.size)
    out[np.argsort(e, kind="stable")] = np.arange(e.size, dtype=np.float64)
    return out


def smooth_series(values, positions, *, window: int = 6, pin: int | None = None, robust: int = 2,
                  weights=None) -> np.ndarray:
    """Robust local-linear smoothing of per-energy values along the series.

    Parameters
    ----------
    values : (n, ...) array_like
        One row per energy (any trailing shape; rows are compared as vectors).
    positions : (n,) array_like
        Series coordinate of each row (:func:`series_positions`).
    window : int
        Each row is fitted from its ``2 window + 1`` nearest rows (all rows
        when there are fewer); 0 returns the values unchanged.
    pin : int, optional
        Row kept exactly (the reference energy); it also anchors its neighbours' fits.
    robust : int
        Bisquare reweighting passes (0: plain local linear fit).
    weights : (n,) array_like, optional
        Prior reliability of each row (> 0), multiplying the tricube and bisquare weights.

    Returns
    -------
    (n, ...) ndarray of float64
    """
    y = np.asarray(values, dtype=np.float64)
    x = np.asarray(positions, dtype=np.float64).reshape(-1)
    n = y.shape[0]
    if x.size != n:
        raise ValueError(f"smooth_series: {n} rows of values but {x.size} positions")
    if int(window) < 0:
        raise ValueError(f"smooth_series: window must be >= 0 energies, got {window}")
    if int(window) == 0 or n < 3:
        return y.copy()
    flat = y.reshape(n, -1)
    order = np.argsort(x, kind="stable")
    m = min(n, 2 * int(window) + 1)
    pinned = np.zeros(n, bool)
    if pin is not None:
        pinned[int(pin)] = True
    rob = np.ones(n)
    prior = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if prior.size != n or not np.all(prior > 0):
        raise ValueError(f"smooth_series: weights must be {n} positive values")
    out = np.empty_like(flat)
    for _ in range(int(robust) + 1):
        for rank, i in enumerate(order):
            lo = min(max(rank - m // 2, 0), n - m)
            idx = order[lo:lo + m]
            d = np.abs(x[idx] - x[i])
            h = max(float(d.max()), 1e-12) * 1.0001
            tricube = (1.0 - (d / h) ** 3) ** 3 * prior[idx]
            w = tricube * rob[idx]
            if np.count_nonzero(w > 0) < 2:  # every neighbour rejected as an outlier: the plain local fit
                w = tricube
            w[pinned[idx]] = 1e3 * max(float(w.max()), 1.0)
            out[i] = _weighted_line(x[idx] - x[i], flat[idx], w)
        resid = np.sqrt(((flat - out) ** 2).sum(axis=1))
        tiny = 1e-9 * max(float(np.abs(flat).max()), 1e-300)
        if float(resid.max()) <= tiny:  # an exact fit: nothing to reweight
            break
        scale = max(6.0 * float(np.median(resid)), tiny)
        rob = np.clip(1.0 - (resid / scale) ** 2, 0.0, 1.0) ** 2
    out[pinned] = flat[pinned]
    return out.reshape(y.shape)


def residual_weights(residuals, *, scale: float = 1.5) -> np.ndarray:
    """Prior weight of each energy's fit from its registration residual: ``1 / (1 + (r / (scale m))^4)``.

    Parameters
    ----------
    residuals : (n,) array_like
        Residual MSE after each energy's registration (the reference's 0, a missing one NaN: weight 1).
    scale : float
        Residuals up to about ``scale`` times the median ``m`` of the positive ones keep a weight near 1
        (0.84 at ``m``, 0.5 at ``scale m``, 0.24 at ``2 m``); five times the median weighs about 0.008.

    Returns
    -------
    (n,) ndarray of float64
        In (0, 1].

    Notes
    -----
    Across the edge the residual of the binarized volumes rises 3-40x over 5-8 energies (each particle
    brightens at its own energy, so the threshold cuts their shapes differently) and those fits carry a
    shared bias. The default 1.5 (3 before) was chosen on ``gpureg simulate --size 48 --energies fine``,
    map error against the truth (``bench/maps.py``, ``bench/results/maps_fine_weights-*`` against
    ``maps_fine*``): over seeds 0-14 with ``--relative-motion`` the per-particle map's median is lower in 14
    (mean -0.008 eV, at most +0.0015) and its 95th percentile in all 15 (mean -0.027 eV), and so is the run's
    affine map; with ``--deformation 3`` the B-spline map's median is lower in 14 (mean -0.008 eV, at most
    +0.0024) and its 95th percentile in 14 (mean -0.047 eV). Plain affine runs (seeds 0-4, default and fine
    grids, smoothing recomputed from each run's own fits) moved by -0.004 to +0.002 eV. ``scale=1`` gained a
    little more on the same recomputed runs but gives half of a series weights under 0.5.
    """
    r = np.nan_to_num(np.asarray(residuals, dtype=np.float64).reshape(-1), nan=0.0, posinf=0.0)
    pos = r[r > 0]
    if pos.size == 0:
        return np.ones(r.size)
    w = 1.0 / (1.0 + (r / (float(scale) * float(np.median(pos)))) ** 4)
    return np.maximum(w, 1e-6)


def smooth_affines(matrices, positions, center, *, window: int = 6, pin: int | None = None,
                   weights=None) -> np.ndarray:
    """Affines with their linear part smoothed along the series and ``center``'s image kept.

    Parameters
    ----------
    matrices : (n, 4, 4) array_like
        ``moving_from_reference`` per energy.
    positions : (n,) array_like
        Series coordinate (:func:`series_positions`).
    center : (3,) array_like
        Reference-grid point (z, y, x) whose image each matrix keeps (the
        centre of the particles).
    window, pin, weights
        As in :func:`smooth_series`.

    Returns
    -------
    (n, 4, 4) ndarray of float64
    """
    m = _matrices(matrices)
    c = np.asarray(center, dtype=np.float64).reshape(3)
    lin = smooth_series(m[:, :3, :3], positions, window=window, pin=pin, weights=weights)
    return _with_image(lin, m[:, :3, :3] @ c + m[:, :3, 3], c)


def smooth_corrections(raw_global, matrices, smoothed_global, positions, *, window: int = 12,
                       pin: int | None = None, weights=None) -> np.ndarray:
    """One particle's transforms: its correction to the global affine, smoothed, on the smoothed global affine.

    The correction ``D = raw_global^-1 @ matrices`` of each energy (the
    particle's motion relative to the sample, and what the global affine, a
    compromise between particles, got wrong for it) is smoothed along the
    series and composed with ``smoothed_global``.

    Parameters
    ----------
    raw_global, matrices, smoothed_global : (n, 4, 4) array_like
        The per-energy global fit, the particle's own fit, and the smoothed global affine.
    positions : (n,) array_like
        Series coordinate (:func:`series_positions`).
    window, pin, weights
        As in :func:`smooth_series`.

    Returns
    -------
    (n, 4, 4) ndarray of float64
        ``smoothed_global @ smooth(D)``.
    """
    g, p, gs = _matrices(raw_global), _matrices(matrices), _matrices(smoothed_global)
    if not g.shape == p.shape == gs.shape:
        raise ValueError(f"smooth_corrections: matrices of shapes {g.shape}, {p.shape}, {gs.shape} differ")
    d = np.linalg.solve(g, p)
    out = np.repeat(np.eye(4)[None], len(d), axis=0)
    out[:, :3, :] = smooth_series(d[:, :3, :], positions, window=window, pin=pin, weights=weights)
    return gs @ out


def smooth_coefficients(coefficients, positions, *, window: int = 6, pin: int | None = None,
                        weights=None) -> np.ndarray:
    """B-spline coefficients ``(n, 3, cz, cy, cx)`` smoothed along the series (float32; ``window``, ``pin``,
    ``weights`` as in :func:`smooth_series`)."""
    c = np.asarray(coefficients)
    if c.ndim != 5 or c.shape[1] != 3:
        raise ValueError(f"smooth_coefficients: expected (n_energy, 3, cz, cy, cx), got shape {c.shape}")
    return smooth_series(c, positions, window=window, pin=pin, weights=weights).astype(np.float32)


def _weighted_line(dx, y, w):
    """Intercept at ``dx = 0`` of the weighted least-squares line through ``(dx, y)`` (every column of ``y``)."""
    sw = w.sum()
    mx = (w * dx).sum() / sw
    my = (w[:, None] * y).sum(axis=0) / sw
    sxx = (w * (dx - mx) ** 2).sum()
    if sxx <= 1e-12 * max(sw, 1e-300):
        return my
    slope = (w[:, None] * (dx - mx)[:, None] * (y - my)).sum(axis=0) / sxx
    return my - slope * mx


def _matrices(matrices):
    m = np.asarray(matrices, dtype=np.float64)
    if m.ndim != 3 or m.shape[1:] != (4, 4):
        raise ValueError(f"expected (n_energy, 4, 4) matrices, got shape {m.shape}")
    return m


def _with_image(linear, image, center):
    """Affines with linear parts ``linear`` (n, 3, 3) that map ``center`` to ``image`` (n, 3)."""
    out = np.repeat(np.eye(4)[None], len(linear), axis=0)
    out[:, :3, :3] = linear
    out[:, :3, 3] = image - linear @ center
    return out
