"""Gaussian-smoothed random warps for bench/deformable.py: amplitude and smoothness set separately.

``GaussianWarp(shape, amplitude, sigma)`` is white noise per component,
smoothed with a Gaussian of ``sigma`` voxels and scaled so that the largest
``|w|`` over the grid is ``amplitude`` voxels; ``w`` between voxels is the
cubic B-spline interpolant of the sampled field, so ``q(p) = A p + t + w(p)``
is exact at every point (the truth) and the moving volume is drawn through
its inverse (fixed-point iteration, as :class:`gpureg.synth.deform.SmoothWarp`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


class GaussianWarp:
    """Smooth random deformation ``w`` (Gaussian-filtered noise) on top of an affine ``matrix``."""

    def __init__(self, shape, amplitude: float, sigma: float, *, matrix=None, seed: int = 0):
        self.shape = tuple(int(n) for n in shape)
        self.matrix = np.eye(4) if matrix is None else np.asarray(matrix, dtype=np.float64)
        self._inverse = np.linalg.inv(self.matrix)
        rng = np.random.default_rng([int(seed), 2711])
        w = np.stack([ndimage.gaussian_filter(rng.normal(size=self.shape), float(sigma), mode="reflect")
                      for _ in range(3)])
        w *= float(amplitude) / max(float(np.linalg.norm(w, axis=0).max()), 1e-30)
        self.field = w
        self._coef = [ndimage.spline_filter(c, order=3, mode="mirror") for c in w]
        jac = np.stack([np.stack(np.gradient(c), 0) for c in w])  # (3, 3, Z, Y, X): d w_i / d p_k
        # largest spectral norm of grad w, against the affine's inverse: the fixed point contracts when < 1
        g = np.linalg.norm(np.moveaxis(jac, (0, 1), (-2, -1)).reshape(-1, 3, 3), ord=2, axis=(1, 2)).max()
        self.max_gradient = float(g)
        self.contraction = float(g * np.linalg.norm(self._inverse[:3, :3], 2))
        full = np.eye(3)[:, :, None, None, None] + jac + (self.matrix[:3, :3] - np.eye(3))[:, :, None, None, None]
        self.min_jacobian = float(np.linalg.det(np.moveaxis(full, (0, 1), (-2, -1))).min())

    def offset(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        return np.stack([ndimage.map_coordinates(c, p.T, order=3, mode="mirror", prefilter=False)
                         for c in self._coef], axis=1)

    def moving_from_reference(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        return p @ self.matrix[:3, :3].T + self.matrix[:3, 3] + self.offset(p)

    def reference_from_moving(self, points, *, tol: float = 1e-6, max_iter: int = 100) -> np.ndarray:
        q = np.asarray(points, dtype=np.float64)
        a_inv, t = self._inverse[:3, :3], self.matrix[:3, 3]
        p = (q - t) @ a_inv.T
        for _ in range(max_iter):
            nxt = (q - t - self.offset(p)) @ a_inv.T
            done = float(np.abs(nxt - p).max(initial=0.0)) < tol
            # damped where the plain iteration would not contract (large amplitude against a short sigma)
            p = nxt if self.contraction < 0.8 else 0.5 * (p + nxt)
            if done:
                break
        return p

    def best_affine(self, points) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        sol, *_ = np.linalg.lstsq(np.c_[p, np.ones(len(p))], self.moving_from_reference(p), rcond=None)
        m = np.eye(4)
        m[:3, :3] = sol[:3].T
        m[:3, 3] = sol[3]
        return m
