"""XANES chemical mapping: per-voxel edge energy, edge jump and white line.

Every voxel of an aligned energy stack carries an absorption spectrum
``mu(E)``. This module normalises it the usual way (Athena/Larch): a line is
fitted to the pre-edge and another to the post-edge region, the pre-edge line
is subtracted and the result divided by the edge jump (post-line minus
pre-line at the edge). From the normalised spectrum it measures

* the **edge energy**: where the normalised spectrum first crosses 0.5
  (linear interpolation between samples, ``method="half"``), or where
  ``dmu/dE`` is largest after light Gaussian smoothing (the Larch ``E0``
  definition, ``method="derivative"``; parabolic refinement of the peak);
* the **edge jump** (in the units of the input);
* the **white-line** energy: peak of the normalised spectrum above the edge.

Voxels whose jump is too small (background) or whose spectrum has a non-finite
value are masked out. Particles are connected components of a mask; ROI
spectra and per-particle edge-energy distributions summarise them.

Convention
----------
Spectra are ``(n_energy, ...)`` with the energy axis first; maps have shape
``spectra.shape[1:]``. Energies are in eV and strictly increasing. All array
code is written once against ``xp`` (NumPy or CuPy): results come back on the
input's device. The line fits are the same linear map for every voxel, so they
are one small matrix product ``(4, n_energy) @ (n_energy, n_voxel)``; the
edge search runs only over the energies between the two fit ranges.
"""

from __future__ import annotations

import numpy as np

from ..core.backend import to_host, xp_of

__all__ = ["scan_energies", "synthetic_spectra"]

# Automatic edge-jump threshold: this fraction of the 99.5th percentile of the
# positive jumps (background voxels have a jump near zero; particles near 1 in
# normalised units). Pass min_jump= to set an absolute threshold instead.
MIN_JUMP_FRACTION = 0.1

PERCENTILE_SAMPLE = 1 << 20


# Default gaps (eV) between the edge and the fit ranges when the grid has no
# distinct fine-step region (uniform scans).
PRE_GAP_EV = 20.0


POST_GAP_EV = 40.0


def scan_energies(start: float = 6480.0, stop: float = 6710.0, *, fine=(6528.0, 6600.0), fine_step: float = 3.0,
                  coarse_step: float = 15.0) -> np.ndarray:
    """Energy grid of a typical TXM-XANES scan: coarse away from the edge, fine across it.

    The defaults mimic a Mn K-edge scan (edge near 6540-6555 eV): 15 eV steps
    from 6480 eV, 3 eV steps over 6528-6600 eV, then 15 eV steps to 6710 eV
    (36 energies). ``fine_step=1.5`` gives 60 energies.

    Returns
    -------
    (n_energy,) ndarray of float64
        Strictly increasing, eV.
    """
    f0, f1 = (float(v) for v in fine)
    if not (start < f0 < f1 < stop) or fine_step <= 0 or coarse_step <= 0:
        raise ValueError(f"scan_energies: need start < fine[0] < fine[1] < stop and positive steps, got "
                         f"start={start}, fine={fine}, stop={stop}, fine_step={fine_step}, coarse_step={coarse_step}")
    eps = 1e-9
    e = np.r_[np.arange(start, f0 - eps, coarse_step), np.arange(f0, f1 + eps, fine_step),
              np.arange(f1 + coarse_step, stop + eps, coarse_step)]
    return np.unique(np.round(e, 6))


def synthetic_spectra(energies, e0, *, jump=1.0, width=3.0, white_line=0.5, wl_offset=8.0, wl_width=4.0,
                      pre_offset=0.1, pre_slope=-2e-4, post_slope=-1e-3):
    """Model K-edge spectra with a known edge: error-function step, Gaussian white line, sloped lines.

    ``mu(E) = p(E) + S(E) (q(E) - p(E)) + jump * W(E)`` with the pre-edge line
    ``p(E) = pre_offset + pre_slope (E - e0)``, the post-edge line
    ``q(E) = p(E) + jump (1 + post_slope (E - e0))``, the step
    ``S = (1 + erf((E - e0) / width)) / 2`` and the white line
    ``W = white_line exp(-((E - e0 - wl_offset) / wl_width)^2 / 2)``.
    Far from the edge (more than ~4 ``width`` below, ~5 ``wl_width`` above)
    ``mu`` equals the lines to float precision, so a line fit there is exact.
    ``e0`` is the step's midpoint; the 0.5 crossing of the normalised
    spectrum is slightly below it when a white line overlaps the step.

    Parameters
    ----------
    energies : (n_energy,) array_like
        eV.
    e0 : float or ndarray (...)
        Step centres, eV. Its array module (NumPy/CuPy) and shape set the
        output's; the other parameters broadcast against it.

    Returns
    -------
    (n_energy, ...) ndarray of float32
    """
    xp = xp_of(e0) if hasattr(e0, "shape") else np
    e0 = xp.asarray(e0, dtype=xp.float64)
    E = xp.asarray(np.asarray(to_host(energies), dtype=np.float64)).reshape((-1,) + (1,) * e0.ndim)
    p = [xp.asarray(v, dtype=xp.float64) if not np.isscalar(v) else v
         for v in (jump, width, white_line, wl_offset, wl_width, pre_offset, pre_slope, post_slope)]
    jump, width, white_line, wl_offset, wl_width, pre_offset, pre_slope, post_slope = p
    x = E - e0
    erf = erf_of(xp)
    step = 0.5 * (1.0 + erf(x / width))
    pre = pre_offset + pre_slope * x
    peak = white_line * xp.exp(-0.5 * ((x - wl_offset) / wl_width) ** 2)
    mu = pre + step * jump * (1.0 + post_slope * x) + jump * peak
    return mu.astype(xp.float32)


def line_weights(x, idx):
    """Rows (intercept, slope) of least-squares line-fit weights over ``x[idx]`` (2, n)."""
    w = np.zeros((2, x.size))
    xi = x[idx]
    xm = xi.mean()
    sxx = ((xi - xm) ** 2).sum()
    slope = (xi - xm) / sxx
    w[1, idx] = slope
    w[0, idx] = 1.0 / idx.size - xm * slope
    return w


def fine_region(E):
    """(pre_lo, pre_hi, post_lo, post_hi) from a distinct fine-step run of the grid, or None."""
    h = np.diff(E)
    if h.size < 6:
        return None
    fine = h <= 0.6 * h.max()
    best, start = (0, 0), None
    for i, f in enumerate(np.r_[fine, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    a, b = best                    # steps a..b-1 are fine: energies a..b
    if b - a < 4 or a < 1 or (E.size - 1 - b) < 1:
        return None
    return (E[0], E[a], E[b], E[-1])


def snap_range(E, r, name):
    try:
        lo, hi = (float(v) for v in r)
    except (TypeError, ValueError):
        raise ValueError(f"edge_ranges: {name} must be a (low, high) pair of energies in eV, got {r!r}") from None
    if not lo <= hi:
        raise ValueError(f"edge_ranges: {name} range must have low <= high, got {r!r}")
    sel = E[(E >= lo - 1e-6) & (E <= hi + 1e-6)]
    if sel.size < 2:
        raise ValueError(f"edge_ranges: {name}-edge range {(lo, hi)} eV holds {sel.size} energies; a line fit needs "
                         f"at least 2 (grid {E[0]:g}..{E[-1]:g} eV)")
    return (float(sel[0]), float(sel[-1]))


def as_energy_vector(energies, where="energies"):
    E = np.asarray(to_host(energies), dtype=np.float64)
    if E.ndim != 1:
        raise ValueError(f"{where} must be a 1D array of eV, got shape {E.shape}")
    if E.size < 5:
        raise ValueError(f"{where}: need at least 5 energies (pre-edge, edge and post-edge), got {E.size}")
    if not np.isfinite(E).all():
        raise ValueError(f"{where} contain NaN or inf")
    if np.unique(E).size != E.size:
        raise ValueError(f"{where}: repeated energies {np.unique(E[np.r_[np.diff(np.sort(E)) == 0, False]]).tolist()}")
    return E


def spectra_matrix(spectra, E, caller):
    """(xp, spectra as float32 (n_energy, n_voxel), voxel shape), checking the energy axis."""
    if not hasattr(spectra, "shape"):
        spectra = np.asarray(spectra)
    if spectra.ndim < 1 or spectra.shape[0] != E.size:
        raise ValueError(f"{caller}: spectra must have shape (n_energy={E.size}, ...), got {tuple(spectra.shape)}")
    xp = xp_of(spectra)
    return xp, xp.asarray(spectra, dtype=xp.float32).reshape(E.size, -1), tuple(spectra.shape[1:])


def check_energies(energies):
    E = as_energy_vector(energies)
    if not (np.diff(E) > 0).all():
        k = int(np.flatnonzero(np.diff(E) <= 0)[0])
        raise ValueError(f"energies must be strictly increasing (sort the stack with them); energy[{k}]={E[k]:g} eV "
                         f"is followed by {E[k + 1]:g} eV")
    return E


def auto_min_jump(xp, jumps):
    j = jumps[jumps > 0] if jumps.size else jumps
    if j.size == 0:
        return 0.0
    step = max(1, int(j.size) // PERCENTILE_SAMPLE)
    sample = to_host(j[::step]).astype(np.float64)
    return MIN_JUMP_FRACTION * float(np.percentile(sample, 99.5))


def erf_of(xp):
    if xp is np:
        from scipy.special import erf
    else:
        from cupyx.scipy.special import erf
    return erf
