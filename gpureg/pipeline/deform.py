"""Deformable refinement inside a pipeline run (``run(deformable=True)``, ``gpureg run --deformable``, issue 16)."""

from __future__ import annotations

from ..core.backend import to_host
from ..io.files import InputError

__all__ = ["DeformableStep", "deformation_maps"]


class DeformableStep:
    """Per energy: a B-spline deformation on top of its affine, stored as coefficients.

    The store keeps the coefficients (``/registration/bspline_*``), not the
    dense field; the aligned grey volume is resampled through the deformation.
    A deformation that folds (Jacobian determinant <= 0 somewhere) stops the
    run with an :class:`~gpureg.io.files.InputError` unless the options allow it.
    """

    def __init__(self, store, options, device):
        self.store, self.options, self.device, self.result = store, options, device, None

    def register(self, i, fixed, moving, affine):
        """Refine ``affine`` (a RegistrationResult) for energy ``i``; returns the deformable result."""
        from ..register.deformable import register_deformable_prepared

        o = self.options
        res = register_deformable_prepared(fixed, moving, init=affine.matrix, spacing=o.spacing,
                                           regularization=o.regularization)
        if res.min_jacobian <= 0 and not o.allow_folding:
            raise InputError(f"energy {self.store.energies[i]:g} eV: the deformation folds (smallest Jacobian "
                             f"determinant {res.min_jacobian:.3g} <= 0); use a larger spacing= or "
                             "regularization=, or pass allow_folding=True")
        self.store.write_bspline(i, res.coefficients, res.spacing, res.min_jacobian, res.mse_affine)
        self.result = res
        return res

    def apply(self, volume):
        """The grey volume resampled through the last deformation (host float32)."""
        from ..register.deformable import apply_deformation

        return to_host(apply_deformation(volume, self.result, device=self.device))


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
    import numpy as np

    from ..register import bspline
    from ..register.deformable import deformation_field

    u = deformation_field(coefficients, np.eye(4), shape, spacing)
    magnitude = np.sqrt((u.astype(np.float64) ** 2).sum(axis=0)).astype(np.float32)
    return magnitude, bspline.jacobian_determinant(np.asarray(coefficients), matrix, shape, spacing)
