"""The series-smoothing pass of a run (``RunOptions.series_window``, issue 27).

Once every energy is registered, the transforms are smoothed along the series
(:mod:`gpureg.register.consistency`; per-particle corrections and B-spline
coefficients over twice ``series_window``) and every energy is resampled once from
its stored reconstruction with the smoothed transform: the affine (all
runs), the piecewise per-particle alignment (``per_particle``: particle masks
from the reference's labels, each region grown by 3 voxels as in
:func:`gpureg.register_particles`, the global transform within 3 voxels of
another particle), the B-spline deformation
(``deformable``), or both (the B-spline on the piecewise alignment,
:func:`gpureg.pipeline.deform.composed_displacement`). Per-particle and deformable runs also get the smoothed
affine-only alignment (``/aligned_global``), so their maps can be compared
with the affine map of the same run.

The per-energy fits stay in the result (``registration/*_raw``); the pass is
idempotent, so a run interrupted during it resumes by running it again.
"""

from __future__ import annotations

import logging

import numpy as np

from ..core.backend import to_host
from ..core.transform import apply_affine
from .deform import check_folding

__all__ = ["smooth_series_pass"]

_log = logging.getLogger("gpureg")

# Voxels within 3 voxels of another particle's region keep the global transform (apply_piecewise's guard:
# at 48^3 the contact then has as many edge energies outside the truth's range as the affine map, 7-21).
CONTACT_GUARD = 3


def smooth_series_pass(store, options, devices, reference, *, smooth_affine: bool = True) -> None:
    """Smooth the transforms of ``store`` along the series and resample every used energy with them.

    Parameters
    ----------
    store : gpureg.io.results.ResultStore
        Every energy registered (``done``).
    options : RunOptions
        ``series_window`` (> 0), ``per_particle``, ``deformable``, ``allow_folding``.
    devices : Devices
        Resampling runs on ``devices.registration``.
    reference : gpureg.register.prepare.PreparedReference
        Its Otsu mask gives the centre the global affine keeps.
    smooth_affine : bool
        False: the affines stay as registered (given matrices, e.g. a watch's
        re-referenced fits); only the B-spline coefficients are smoothed.

    Raises
    ------
    gpureg.io.files.InputError
        A smoothed deformation folds and ``allow_folding`` is off.
    """
    from ..register.consistency import residual_weights, series_positions, smooth_affines

    window, dev = int(options.series_window), devices.registration
    used = store.used()
    if used.size < 3:
        return
    raw = store.raw_fits()
    x = series_positions(store.energies[used])
    pin = int(np.flatnonzero(used == store.ref)[0]) if store.ref in used else None
    mask = np.asarray(to_host(reference.mask), dtype=bool)
    center = np.argwhere(mask).mean(axis=0) if mask.any() else (np.asarray(mask.shape) - 1) / 2.0
    # Energies whose registration residual stands out weigh less (issue 27; register/consistency.py)
    affine_mse = raw.get("bspline_mse_affine", raw["mse_after"])[used]
    glob = smooth_affines(raw["matrix"][used], x, center, window=window, pin=pin,
                          weights=residual_weights(affine_mse)) if smooth_affine else raw["matrix"][used]
    particles = _particles(store, raw, used, glob, x, pin, window) if options.per_particle else None
    coeffs = None
    if options.deformable:
        from ..register.consistency import smooth_coefficients

        coeffs = (smooth_coefficients(raw["bspline_coefficients"][used], x, window=2 * window, pin=pin,
                                      weights=residual_weights(raw["mse_after"][used])), raw["bspline_spacing"])
    if particles is not None or coeffs is not None:
        store.ensure_aligned_global()
    for j, i in enumerate(used):
        vol = store.recon(i)
        extra, aligned_global = {}, None
        if particles is not None or coeffs is not None:
            aligned_global = to_host(apply_affine(vol, glob[j], device=dev))
        if coeffs is not None:
            aligned, jac = _deform(vol, coeffs[0][j], glob[j], coeffs[1], dev,
                                   None if particles is None else (particles[0][j], particles[1]))
            check_folding(store, i, jac, options, "the series-smoothed deformation")
            extra.update(coefficients=coeffs[0][j], min_jacobian=jac)
        elif particles is not None:
            from ..register.particles import apply_piecewise

            aligned = to_host(apply_piecewise(vol, particles[0][j], particles[1], device=dev, guard=CONTACT_GUARD))
        else:
            aligned = to_host(apply_affine(vol, glob[j], device=dev))
        if particles is not None:
            extra["particle_matrices"] = particles[0][j]
        store.write_smoothed(i, aligned, glob[j], aligned_global=aligned_global, **extra)
    store.mark_series(window)
    _log.info("gpureg: transforms smoothed along the series (%d energies each side) and every energy resampled",
              window)


def _particles(store, raw, used, glob, x, pin, window):
    """Per-particle matrices ``(n_used, n_labels + 1, 4, 4)`` (row 0 the smoothed global) and the regions."""
    from ..register.consistency import residual_weights, smooth_corrections
    from ..register.particles import particle_regions

    labels = store.particle_labels(lambda: None)
    fits = raw["particle_matrix"][used]
    out = np.repeat(glob[:, None], fits.shape[1], axis=1)
    for k in range(1, fits.shape[1]):
        if (labels == k).any():
            out[:, k] = smooth_corrections(raw["matrix"][used], fits[:, k], glob, x, window=2 * window, pin=pin,
                                           weights=residual_weights(raw["particle_mse"][used, k]))
    return out, particle_regions(labels)


def _deform(vol, coefficients, matrix, spacing, dev, particles=None):
    """``vol`` resampled once through the deformation, and the smallest Jacobian determinant of its transform.

    ``particles``: ``(matrices, regions)``, the B-spline refines that piecewise alignment (its Jacobian:
    the B-spline's own).
    """
    from ..register import bspline
    from ..register.deformable import apply_deformation, deformation_field
    from .deform import composed_displacement

    if particles is None:
        disp = deformation_field(coefficients, matrix, vol.shape, spacing, device=dev)
    else:
        disp = composed_displacement(coefficients, spacing, *particles, vol.shape, guard=CONTACT_GUARD)
        matrix = np.eye(4)
    aligned = to_host(apply_deformation(vol, disp, device=dev))
    jac = float(bspline.jacobian_determinant(coefficients, matrix, vol.shape, spacing).min())
    return aligned, jac
