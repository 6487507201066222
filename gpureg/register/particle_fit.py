"""The per-particle fits behind :func:`~gpureg.register.register_particles`.

:class:`Crop` holds one particle's box (fixed, moving, metric mask) and maps
full-grid matrices to box matrices; :func:`fit_shared_rigid` fits one shared
affine plus a rigid motion per particle, all particles at once, with the
solver of :mod:`gpureg.core.solver`.

Convention
----------
Every matrix is ``moving_from_reference`` in voxel indices ``(z, y, x)``
(DESIGN.md). A box index ``p_c`` is the grid index ``p = p_c + lo``.
"""

from __future__ import annotations

import numpy as np

from ..core import transform as tf
from ..core.backend import array_device, to_device, xp_of
from ..core.metric import mse_terms
from ..core.solver import levenberg_marquardt
from ..core.terms import MetricTerms
from .prepare import level_to_fine, pyramid

__all__ = ["Crop", "fit_shared_rigid", "mse_of", "region_terms", "shift_matrix"]


class Crop:
    """Fixed, moving and metric mask on a box around one region and its globally mapped position.

    A box index ``p_c`` is the grid index ``p = p_c + lo`` on both volumes, so a
    full-grid matrix ``M`` is ``T(-lo) M T(lo)`` on the box. The mask is the
    region minus its voxels within ``guard`` of another particle.
    """

    def __init__(self, f, m, regions, labels, k, box, matrix, margin, guard):
        from scipy import ndimage

        lo = np.array([s.start for s in box])
        hi = np.array([s.stop for s in box])
        corners = np.array([[z, y, x] for z in (lo[0], hi[0] - 1) for y in (lo[1], hi[1] - 1)
                            for x in (lo[2], hi[2] - 1)], dtype=np.float64)
        q = corners @ matrix[:3, :3].T + matrix[:3, 3]
        shape = np.asarray(f.shape)
        a = np.clip(np.minimum(lo, np.floor(q.min(axis=0)).astype(int)) - margin, 0, shape)
        b = np.clip(np.maximum(hi, np.ceil(q.max(axis=0)).astype(int) + 1) + margin, 0, shape)
        # register_prepared's pyramid and checks need at least 4 voxels per axis.
        a = np.clip(np.minimum(a, b - 4), 0, shape)
        b = np.clip(np.maximum(b, a + 4), 0, shape)
        self.slices = tuple(slice(int(i), int(j)) for i, j in zip(a, b))
        self.lo = a.astype(np.float64)
        xp = xp_of(f)
        self.fixed = xp.ascontiguousarray(f[self.slices])
        self.moving = xp.ascontiguousarray(m[self.slices])
        mask = regions[self.slices] == k  # the metric mask: the region less the guard band
        lab = labels[self.slices]
        other = (lab > 0) & (lab != k)
        if guard > 0 and other.any():
            mask &= ndimage.distance_transform_edt(~other) > guard
        self.region = to_device(np.ascontiguousarray(regions[self.slices] == k), array_device(f))
        self.mask = to_device(np.ascontiguousarray(mask), array_device(f))
        pts = np.argwhere(lab == k).astype(np.float64) + self.lo
        self.points = pts[::max(1, len(pts) // 20000)]
        self.centroid = pts.mean(axis=0) if pts.size else (lo + hi - 1) / 2.0
        # RMS radius: a rotation of 1/radius rad moves the particle's voxels by about 1 voxel.
        self.radius = max(float(np.sqrt(((pts - self.centroid) ** 2).sum(axis=1).mean())) if pts.size else 1.0, 1.0)

    def to_crop(self, matrix):
        return np.linalg.inv(shift_matrix(self.lo)) @ matrix @ shift_matrix(self.lo)

    def to_full(self, matrix):
        return shift_matrix(self.lo) @ matrix @ np.linalg.inv(shift_matrix(self.lo))

    def terms(self, matrix, region=False):
        """``(count, sse)`` over the metric mask (``region``: the whole region) for a full-grid matrix."""
        return region_terms(self.fixed, self.moving, self.to_crop(matrix), self.region if region else self.mask)

    def distance(self, matrix, reference):
        """Mean of ``|matrix @ p - reference @ p|`` over the particle's voxels (at most 20000 of them)."""
        d = (np.asarray(matrix) - np.asarray(reference))[:3]
        return float(np.linalg.norm(self.points @ d[:, :3].T + d[:, 3], axis=1).mean()) if len(self.points) else 0.0


def fit_shared_rigid(crops, order, matrix0, shape, *, min_size, max_iter, tol):
    """Joint fit of ``M_k = A @ R_k``: one affine ``A`` and a rigid ``R_k`` per particle (``R = I`` for ``order[0]``).

    The metric is the MSE over all particles' masks together. Per particle one
    pass gives the 12 affine-parameter sums of ``M_k`` on its box; the chain
    rule (numerical Jacobian of those 12 parameters w.r.t. ``A``'s 12 and
    ``R_k``'s 6, on the host) adds them into one Gauss-Newton system, solved
    by :func:`gpureg.core.solver.levenberg_marquardt`.
    Coarse to fine on a pyramid of each box (as many levels as the smallest has).

    Returns
    -------
    matrices : dict {int: (4, 4)}
        Full-grid ``moving_from_reference`` per particle.
    passes : list of int
        Joint metric evaluations per level, coarse to fine.
    """
    c0 = tf.grid_center(shape)
    cols = {k: np.r_[0:12] if i == 0 else np.r_[0:12, 12 + 6 * (i - 1):12 + 6 * i] for i, k in enumerate(order)}
    x = np.zeros(12 + 6 * (len(order) - 1))
    x[:12] = tf.params_from_matrix(matrix0, c0)

    def full(xk, k):
        a = tf.matrix_from_params(xk[:12], c0)
        return a if xk.size == 12 else a @ _rigid(xk[12:], crops[k].centroid, crops[k].radius)

    levels = {k: (pyramid(cr.fixed, min_size), pyramid(cr.moving, min_size),
                  pyramid(xp_of(cr.fixed).asarray(cr.mask, dtype=np.float32), min_size)) for k, cr in crops.items()}
    n_levels = min(len(v[0]) for v in levels.values())
    passes = []
    for level in range(n_levels - 1, -1, -1):
        joint = _JointLevel({k: tuple(v[level] for v in levels[k]) for k in order}, crops, cols, full, level)
        x, used, _ = levenberg_marquardt(joint.evaluate, x, joint.move, max_iter=max_iter, tol=tol,
                                         empty_start="the global transform maps every particle outside the "
                                                     "moving volume")
        passes.append(used)
    return {k: full(x[cols[k]], k) for k in order}, passes


def region_terms(f, m, matrix, mask):
    """``(count, sse)`` of one metric pass (no Gauss-Newton terms)."""
    t = mse_terms(f, m, matrix, mask=mask, hessian=False)
    return float(t.count), float(t.sse)


def mse_of(sums):
    """MSE of ``(count, sse)`` sums (``inf`` when empty)."""
    return sums[1] / sums[0] if sums[0] > 0 else float("inf")


def shift_matrix(lo):
    """Homogeneous translation by ``lo`` (3,)."""
    t = np.eye(4)
    t[:3, 3] = lo
    return t


class _JointLevel:
    """One pyramid level of the joint fit: metric sums and step sizes for the joint parameters."""

    def __init__(self, volumes, crops, cols, full, level):
        self.crops, self.cols, self.full = crops, cols, full
        self.to_fine = level_to_fine(level)
        self.from_fine = np.linalg.inv(self.to_fine)
        self.data = {k: (fl, ml, kl > 0.5, tf.grid_center(fl.shape), _corners(fl.shape))
                     for k, (fl, ml, kl) in volumes.items()}
        self.n = max(int(c.max()) for c in cols.values()) + 1

    def matrix(self, xk, k):
        """Level-grid box matrix of particle ``k`` for its parameters ``xk``."""
        return self.from_fine @ self.crops[k].to_crop(self.full(xk, k)) @ self.to_fine

    def evaluate(self, x):
        """The metric sums over all particles, in the joint parameters (``n`` of them)."""
        count, sse, rj, jtj = 0, 0.0, np.zeros(self.n), np.zeros((self.n, self.n))
        for k, (fl, ml, kl, cl, _) in self.data.items():
            idx = self.cols[k]
            xk = x[idx]
            t = mse_terms(fl, ml, self.matrix(xk, k), center=cl, mask=kl)
            jac = np.empty((12, idx.size))
            for j in range(idx.size):
                h = np.zeros(idx.size)
                h[j] = 1e-6
                jac[:, j] = (tf.params_from_matrix(self.matrix(xk + h, k), cl)
                             - tf.params_from_matrix(self.matrix(xk - h, k), cl)) / 2e-6
            count += t.count
            sse += t.sse
            rj[idx] += jac.T @ t.rj
            jtj[np.ix_(idx, idx)] += jac.T @ t.jtj @ jac
        return MetricTerms(count, sse, rj, jtj)

    def move(self, x, step):
        """Largest voxel displacement a step causes at any particle box's corners."""
        return max(float(np.abs(corners @ (self.matrix((x + step)[self.cols[k]], k)
                                           - self.matrix(x[self.cols[k]], k))[:3].T).max())
                   for k, (*_, corners) in self.data.items())


def _rigid(theta, center, radius):
    """Rotation ``theta[:3] / radius`` (rad, axis-angle vector, ``(z, y, x)``) about ``center``, then shift ``theta[3:]``."""
    w = np.asarray(theta[:3], dtype=np.float64) / radius
    angle = float(np.linalg.norm(w))
    m = np.eye(4) if angle == 0.0 else tf.rotation_matrix(np.rad2deg(angle), w, center)
    m[:3, 3] += theta[3:]
    return m


def _corners(shape):
    return np.array([[z, y, x, 1.0] for z in (0, shape[0] - 1) for y in (0, shape[1] - 1) for x in (0, shape[2] - 1)])
