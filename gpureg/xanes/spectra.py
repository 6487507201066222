"""Shared steps of the XANES analysis: fit ranges on the grid, the spectra matrix, the jump threshold.

Used by :mod:`~gpureg.xanes.edge` (per-voxel normalisation and edge energy)
and :mod:`~gpureg.xanes.stack` (the same on a stack, slab by slab). The
energy axis is checked by :func:`gpureg.core.check_energies`.
"""

from __future__ import annotations

import numpy as np

from ..core.backend import to_host, xp_of
from ..core.errors import EnergyGridError, InputError, ParameterError

__all__ = ["MIN_ENERGIES", "auto_min_jump", "crude_jump", "edge_window", "fine_region", "snap_range", "spectra_matrix"]

MIN_ENERGIES = 5
"""Fewest energies a spectrum needs: pre-edge, edge and post-edge."""

# Automatic edge-jump threshold: this fraction of the 99.5th percentile of the
# positive jumps (background voxels have a jump near zero; particles near 1 in
# normalised units), estimated on at most _PERCENTILE_SAMPLE jumps. Pass
# min_jump= to set an absolute threshold instead.
_MIN_JUMP_FRACTION = 0.1
_PERCENTILE_SAMPLE = 1 << 20


def crude_jump(X):
    """Crude edge jump of spectra ``X`` (n_energy, ...), NumPy or CuPy: the mean of the last 3 energies minus
    the mean of the first 3 (1 each below 8 energies, 2 below 12)."""
    k = min(3, max(1, X.shape[0] // 4))
    return X[-k:].mean(axis=0) - X[:k].mean(axis=0)


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
    """``(lo, hi)`` of the range ``r`` as floats (eV), checked to hold at least 2 grid energies."""
    try:
        lo, hi = (float(v) for v in r)
    except (TypeError, ValueError):
        raise ParameterError(f"edge_ranges: {name} must be a (low, high) pair of energies in eV, got {r!r}") from None
    if not lo <= hi:
        raise ParameterError(f"edge_ranges: {name} range must have low <= high, got {r!r}")
    sel = E[(E >= lo - 1e-6) & (E <= hi + 1e-6)]
    if sel.size < 2:
        raise InputError(f"edge_ranges: {name}-edge range {(lo, hi)} eV holds {sel.size} energies; a fit needs "
                         f"at least 2 (grid {E[0]:g}..{E[-1]:g} eV)")
    return (lo, hi)


def edge_window(E, pre, post, *, given: bool = False):
    """The ``(pre, post)`` fit ranges (eV, each snapped by :func:`snap_range`), checked to leave the edge between.

    :class:`~gpureg.core.EnergyGridError` when no energy lies between them, or when they overlap and were
    chosen automatically (``given=False``): the grid cannot place the edge. Overlapping ranges that were both
    given are a :class:`~gpureg.core.ParameterError`.
    """
    pre, post = snap_range(E, pre, "pre"), snap_range(E, post, "post")
    if pre[1] >= post[0]:
        raise (ParameterError if given else EnergyGridError)(
            f"edge_ranges: pre-edge range {pre} must end below the post-edge range {post}")
    if int(np.searchsorted(E, post[0])) - int(np.searchsorted(E, pre[1])) < 2:
        raise EnergyGridError(f"edge_ranges: no energy lies between the pre-edge range {pre} and the post-edge "
                              f"range {post}; the edge cannot be located")
    return pre, post


def spectra_matrix(spectra, E, caller):
    """(xp, spectra as float32 (n_energy, n_voxel), voxel shape), checking the energy axis."""
    if not hasattr(spectra, "shape"):
        spectra = np.asarray(spectra)
    if spectra.ndim < 1 or spectra.shape[0] != E.size:
        raise ValueError(f"{caller}: spectra must have shape (n_energy={E.size}, ...), got {tuple(spectra.shape)}")
    xp = xp_of(spectra)
    return xp, xp.asarray(spectra, dtype=xp.float32).reshape(E.size, -1), tuple(spectra.shape[1:])


def auto_min_jump(xp, jumps):
    """The automatic edge-jump threshold of a set of jumps (see the module constants)."""
    j = jumps[jumps > 0] if jumps.size else jumps
    if j.size == 0:
        return 0.0
    step = max(1, int(j.size) // _PERCENTILE_SAMPLE)
    sample = to_host(j[::step]).astype(np.float64)
    return _MIN_JUMP_FRACTION * float(np.percentile(sample, 99.5))

