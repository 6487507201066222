"""Deformable refinement inside a pipeline run (``run(deformable=True)``, ``gpureg run --deformable``, issue 16).

With ``per_particle`` too (issue 27) the B-spline refines the piecewise
per-particle alignment instead of the global affine: it is registered on the
prepared moving volume resampled piecewise, so the transform is
``q(p) = P(p + u(p))`` (``P`` the per-particle affine of the region of
``p + u(p)``, ``u`` the B-spline), stored as coefficients with the attribute
``base = "piecewise"``; the grey volume is resampled once through the
composition (:func:`composed_displacement`).
"""

from __future__ import annotations

import numpy as np

from ..core.backend import to_host
from ..io.files import InputError

__all__ = ["DeformableStep", "check_folding", "composed_displacement", "deformation_maps", "register_bspline"]


def register_bspline(fixed, moving, init, options):
    """The run's B-spline registration of one energy (local runs and Dask workers alike).

    Trilinear sampling and 25 L-BFGS iterations per control grid (the
    library's defaults are cubic sampling, 25 iterations), chosen on the edge
    maps: ``bench/maps.py --modes deformable``, 48^3, seeds 0 / 1 / 2, median
    and p95 edge error of the deformable map (eV): trilinear 25 iterations
    .184/.638, .197/.586, .208/.678; cubic 15 iterations .185/.701,
    .199/.678, .211/.727; trilinear 40 iterations (before) .183/.661,
    .211/.676, .218/.762. The run registers binarized volumes (``Prep()``),
    whose ramp leaves trilinear sampling little bias; 25 iterations instead
    of 40 keep a 48^3 ``--deformable`` run under 2x the affine run's time.

    Parameters
    ----------
    fixed, moving : (Z, Y, X) ndarray
        Prepared volumes (same device).
    init : (4, 4) array_like
        The affine the B-spline refines.
    options : RunOptions
        Its ``spacing`` and ``regularization``.

    Returns
    -------
    DeformableResult
    """
    from ..register.deformable import register_deformable_prepared

    return register_deformable_prepared(fixed, moving, init=init, spacing=options.spacing,
                                        regularization=options.regularization, max_iter=25,
                                        interpolation="linear")


def check_folding(store, i, min_jacobian, options, what="the deformation"):
    """Raise the one-line :class:`InputError` when ``min_jacobian <= 0`` and ``options.allow_folding`` is off."""
    if min_jacobian <= 0 and not options.allow_folding:
        raise InputError(f"energy {store.energies[i]:g} eV: {what} folds (smallest Jacobian determinant "
                         f"{min_jacobian:.3g} <= 0); use a larger spacing= or regularization=, or pass "
                         "allow_folding=True")


class DeformableStep:
    """Per energy: a B-spline deformation on top of its affine (or per-particle) alignment, stored as coefficients.

    The store keeps the coefficients (``/registration/bspline_*``), not the
    dense field; the aligned grey volume is resampled through the deformation.
    A deformation that folds (Jacobian determinant <= 0 somewhere) stops the
    run with an :class:`~gpureg.io.files.InputError` unless the options allow it.
    """

    def __init__(self, store, options, device):
        self.store, self.options, self.device, self.result, self.particles = store, options, device, None, None

    def register(self, i, fixed, moving, affine, particles=None):
        """Refine ``affine`` (a RegistrationResult) for energy ``i``; returns the deformable result.

        ``particles`` (a :class:`~gpureg.register.ParticleResult`): refine its piecewise alignment instead.
        """
        o = self.options
        init = affine.matrix
        if particles is not None:
            from ..register.particles import apply_piecewise

            moving, init = apply_piecewise(moving, particles.matrices, particles.regions, device=self.device), np.eye(4)
        res = register_bspline(fixed, moving, init, o)
        check_folding(self.store, i, res.min_jacobian, o)
        self.store.write_bspline(i, res.coefficients, res.spacing, res.min_jacobian, res.mse_affine,
                                 base="affine" if particles is None else "piecewise")
        self.result, self.particles = res, particles
        return res

    def apply(self, volume):
        """The grey volume resampled through the last deformation (host float32), once."""
        from ..register.deformable import apply_deformation

        res, pp = self.result, self.particles
        field = res if pp is None else composed_displacement(res.coefficients, res.spacing, pp.matrices, pp.regions,
                                                             volume.shape)
        return to_host(apply_deformation(volume, field, device=self.device))


def composed_displacement(coefficients, spacing, matrices, regions, shape, *, guard: int = 0):
    """Displacement ``(3, Z, Y, X)`` float32 of ``q(p) = P(p + u(p))``: a B-spline on a piecewise alignment.

    Parameters
    ----------
    coefficients : (3, cz, cy, cx) array_like
        B-spline of ``u`` (fine voxels, registered with the identity as its affine).
    spacing : float
        Control-point spacing (voxels).
    matrices : (n_labels + 1, 4, 4) array_like
        Per-region ``moving_from_reference`` (row 0 the global transform).
    regions : (Z, Y, X) array_like of int
        The regions of :func:`gpureg.register.particle_regions`.
    shape : tuple of 3 int
        Reference grid.
    guard : int
        As in :func:`gpureg.register.apply_piecewise`.

    Returns
    -------
    (3, Z, Y, X) ndarray of float32
        ``displacement[:, p] = q(p) - p`` (host), for :func:`gpureg.register.apply_deformation`.
    """
    from ..register.deformable import deformation_field
    from ..register.particles import piecewise_map

    shape = tuple(int(n) for n in shape)
    grid = np.indices(shape, dtype=np.float64)
    r = grid + to_host(deformation_field(coefficients, np.eye(4), shape, spacing))
    return (piecewise_map(r, matrices, regions, guard=guard) - grid).astype(np.float32)


def deformation_maps(coefficients, matrix, shape, spacing):
    """Displacement magnitude (voxels, deformation only: the affine removed) and Jacobian determinant, host float32.

    Parameters
    ----------
    coefficients : (3, cz, cy, cx) array_like
    matrix : (4, 4) array_like
        The energy's affine.
    shape : tuple of 3 int
    spacing : float

    Returns
    -------
    magnitude, jacobian : (Z, Y, X) ndarray of float32
    """
    from ..register import bspline
    from ..register.deformable import deformation_field

    u = deformation_field(coefficients, np.eye(4), shape, spacing)
    magnitude = np.sqrt((u.astype(np.float64) ** 2).sum(axis=0)).astype(np.float32)
    return magnitude, bspline.jacobian_determinant(np.asarray(coefficients), matrix, shape, spacing)
