"""Gaussian-smoothed random warps for bench/deformable.py: amplitude and smoothness set separately.

``GaussianWarp(shape, amplitude, sigma)`` is white noise per component,
smoothed with a Gaussian of ``sigma`` voxels and scaled so that the largest
``|w|`` over the grid is ``amplitude`` voxels; ``w`` between voxels is the
cubic B-spline interpolant of the sampled field, so ``q(p) = A p + t + w(p)``
is exact at every point (the truth). Everything else (the inverse drawn by
fixed-point iteration, the truth, the best affine) is
:class:`gpureg.synth.deform.SmoothWarp`'s.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from gpureg.synth.deform import SmoothWarp


class GaussianWarp(SmoothWarp):
    """Smooth random deformation ``w`` (Gaussian-filtered noise) on top of an affine ``matrix``.

    ``max_gradient`` is the largest spectral norm of ``grad w`` on the grid and
    ``min_jacobian`` the smallest ``det(dq/dp)`` (> 0: the warp is invertible).
    """

    def __init__(self, shape, amplitude: float, sigma: float, *, matrix=None, seed: int = 0):
        super().__init__(shape, 0.0, matrix=matrix, seed=seed)  # the affine part and the inverse iteration
        rng = np.random.default_rng([int(seed), 2711])
        w = np.stack([ndimage.gaussian_filter(rng.normal(size=self.shape), float(sigma), mode="reflect")
                      for _ in range(3)])
        w *= float(amplitude) / max(float(np.linalg.norm(w, axis=0).max()), 1e-30)
        self.amplitude = float(amplitude)
        self._coef = [ndimage.spline_filter(c, order=3, mode="mirror") for c in w]
        jac = np.stack([np.stack(np.gradient(c), 0) for c in w])  # (3, 3, Z, Y, X): d w_i / d p_k
        jac = np.moveaxis(jac, (0, 1), (-2, -1)).reshape(-1, 3, 3)
        self.max_gradient = float(np.linalg.norm(jac, ord=2, axis=(1, 2)).max())
        self.min_jacobian = float(np.linalg.det(jac + self.matrix[:3, :3]).min())

    def offset(self, points) -> np.ndarray:
        """``w(p)`` (voxels) at reference points ``(N, 3)``: the cubic interpolant of the sampled field."""
        p = np.asarray(points, dtype=np.float64)
        return np.stack([ndimage.map_coordinates(c, p.T, order=3, mode="mirror", prefilter=False)
                         for c in self._coef], axis=1)
