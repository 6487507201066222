"""A smooth non-rigid sample motion with an exact truth field (for deformable registration).

Convention
----------
The warp maps a reference voxel ``p`` to the moving point

    q(p) = A p + t + w(p),   w(p) = sum_k a_k sin(k_k . (p - c) + phi_k)

(``A, t``: an affine ``moving_from_reference``; ``w``: a few sinusoidal modes of
about ``periods`` periods over the grid, scaled so that ``max |w|`` over the grid is
``amplitude`` voxels). ``q(p)`` is the exact truth (analytic); the moving
volume needs the inverse ``p(q)``, found by the contracting fixed-point
iteration ``p = A^-1 (q - t - w(p))`` to 1e-9 voxel. With
``displacement_field()`` = ``q(p) - p`` this is the field a deformable
registration should recover (:class:`gpureg.register.DeformableResult`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["SmoothWarp"]

_MODES = 3


class SmoothWarp:
    """Smooth random deformation on top of an affine.

    Parameters
    ----------
    shape : tuple of 3 int
        Reference grid ``(Z, Y, X)``.
    amplitude : float
        Largest ``|w|`` over the grid (voxels, >= 0).
    matrix : (4, 4) array_like, optional
        The affine part (``moving_from_reference``; identity by default).
    seed : int
        Seed of the modes.
    periods : float
        Periods of each mode across the grid (about; larger: less affine).
    """

    def __init__(self, shape, amplitude: float, *, matrix=None, seed: int = 0, periods: float = 1.5):
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 3 or min(self.shape) < 4:
            raise ValueError(f"shape must be 3 axes of at least 4 voxels, got {self.shape}")
        if not np.isfinite(amplitude) or amplitude < 0:
            raise ValueError(f"deformation amplitude must be >= 0 voxels, got {amplitude}")
        self.matrix = np.eye(4) if matrix is None else np.asarray(matrix, dtype=np.float64)
        if self.matrix.shape != (4, 4):
            raise ValueError(f"matrix must have shape (4, 4), got {self.matrix.shape}")
        self._inverse = np.linalg.inv(self.matrix)
        rng = np.random.default_rng([int(seed), 7103])
        n = np.asarray(self.shape, dtype=np.float64)
        self.waves = rng.normal(size=(_MODES, 3))
        self.waves *= (2 * np.pi * float(periods) * rng.uniform(0.8, 1.2, size=(_MODES, 1))
                       / np.linalg.norm(self.waves * n, axis=1, keepdims=True))  
        self.amps = rng.normal(size=(_MODES, 3))
        self.phases = rng.uniform(0, 2 * np.pi, size=(_MODES, 3))
        self.center = (n - 1) / 2
        self.amplitude = float(amplitude)
        peak = float(np.linalg.norm(self._raw(_grid(self.shape, max(1, min(self.shape) // 32))), axis=1).max())
        self.amps *= self.amplitude / peak if peak > 0 else 0.0
        lip = float((np.linalg.norm(self.amps, axis=1) * np.linalg.norm(self.waves, axis=1)).sum())  # >= |grad w|
        if lip * np.linalg.norm(self._inverse[:3, :3], 2) >= 0.9:
            raise ValueError(f"deformation amplitude {amplitude} voxels is too large for shape {self.shape} "
                             "(the warp must stay invertible)")

    def offset(self, points) -> np.ndarray:
        """``w(p)`` (voxels) at reference points ``(N, 3)``."""
        return self._raw(np.asarray(points, dtype=np.float64))

    def moving_from_reference(self, points) -> np.ndarray:
        """Exact moving positions ``q(p)`` of reference points ``(N, 3)``, ``(z, y, x)``."""
        p = np.asarray(points, dtype=np.float64)
        return p @ self.matrix[:3, :3].T + self.matrix[:3, 3] + self.offset(p)

    def reference_from_moving(self, points, *, tol: float = 1e-9, max_iter: int = 200) -> np.ndarray:
        """Reference points ``p`` with ``q(p) = points`` ``(N, 3)`` (fixed-point iteration)."""
        q = np.asarray(points, dtype=np.float64)
        a_inv, t = self._inverse[:3, :3], self.matrix[:3, 3]
        p = (q - t) @ a_inv.T
        for _ in range(max_iter):
            nxt = (q - t - self.offset(p)) @ a_inv.T
            done = float(np.abs(nxt - p).max(initial=0.0)) < tol
            p = nxt
            if done:
                break
        return p

    def displacement_field(self) -> np.ndarray:
        """Truth ``q(p) - p`` on the reference grid, ``(3, Z, Y, X)`` float32."""
        p = _grid(self.shape)
        return (self.moving_from_reference(p) - p).T.reshape((3, *self.shape)).astype(np.float32)

    def best_affine(self, points) -> np.ndarray:
        """Least-squares affine ``moving_from_reference`` fitted to ``q`` at ``points`` ``(N, 3)``."""
        p = np.asarray(points, dtype=np.float64)
        sol, *_ = np.linalg.lstsq(np.c_[p, np.ones(len(p))], self.moving_from_reference(p), rcond=None)
        m = np.eye(4)
        m[:3, :3] = sol[:3].T
        m[:3, 3] = sol[3]
        return m

    def _raw(self, p):
        arg = (p - self.center) @ self.waves.T  # (N, modes)
        return sum(self.amps[k] * np.sin(arg[:, k:k + 1] + self.phases[k]) for k in range(_MODES))


def _grid(shape, step: int = 1):
    axes = [np.arange(0, n, step, dtype=np.float64) for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
