"""The deformable objective on one pyramid level: MSE + bending energy and its analytic gradient.

Convention
----------
Level ``l`` voxel ``k`` has its centre at fine position ``2^l k + (2^l - 1) / 2``
(:func:`gpureg.register.prepare.pyramid`). The control grid and its
coefficients live in fine voxels on every level; a level voxel ``p`` samples
the level's moving volume at

    q(p) = A_l p + t_l + u(P(p)) / 2^l

with ``A_l, t_l`` the affine on the level grid, ``P(p)`` the fine position and
``u`` the B-spline displacement (fine voxels). With the residual
``r = M_l(q) - F_l(p)`` over the valid samples (``q`` inside the moving
volume, and inside ``mask`` when given) and ``g = grad M_l(q)`` (trilinear),

    E(C) = sum r^2 / (N0 v) + lambda B(C)
    dE/dC[d, ijk] = 2 / (N0 v) sum r g_d / 2^l W_z[z, i] W_y[y, j] W_x[x, k] + lambda dB/dC

where ``N0`` is the valid count at the level's first evaluation (fixed, so
that leaving the volume is not rewarded), ``v`` is the variance of the prepared full-resolution reference (so that
``lambda`` does not depend on the grey scale) and ``B`` is
:func:`gpureg.register.bspline.bending_energy`. The valid set is held fixed
in the derivative (as in the affine path). The sum ``r g`` per voxel is one
pass (the numba kernel of :mod:`gpureg.core.cpu_ffd`, its NumPy reference
here, or the fused CUDA kernel of ``kernels/bspline.cu``); the
scatter to the coefficients is the separable :func:`~gpureg.register.bspline.adjoint`.
"""

from __future__ import annotations

import numpy as np

from ..core import transform as tf
from ..core.backend import array_device, cpu_engine, ndimage_of, to_host, xp_of
from . import bspline
from .prepare import level_to_fine

__all__ = ["LevelObjective", "level_positions", "sample_cpu"]


def level_positions(level: int, n: int) -> np.ndarray:
    """Fine positions (float64) of the ``n`` voxel centres of one axis of pyramid level ``level``."""
    s = float(2 ** level)
    return s * np.arange(n, dtype=np.float64) + (s - 1.0) / 2.0


class LevelObjective:
    """``E(C)`` and ``dE/dC`` of one level (see the module docstring).

    Parameters
    ----------
    fixed, moving : (Z, Y, X) ndarray of float32
        Prepared level volumes (NumPy or CuPy, same device and shape).
    matrix : (4, 4) array_like
        The affine ``moving_from_reference`` on the **fine** grid.
    level : int
        Pyramid level of ``fixed``/``moving``.
    spacing : float
        Control-point spacing (fine voxels).
    control : tuple of 3 int
        Control grid shape (:func:`~gpureg.register.bspline.control_shape` of the fine shape).
    variance : float
        ``v`` of the module docstring (> 0).
    regularization : float
        ``lambda`` (>= 0).
    mask : (Z, Y, X) ndarray of bool, optional
        Level mask of the reference voxels that count.
    interpolation : {"linear", "cubic"}
        How the moving volume is sampled: trilinear (every backend) or cubic
        B-spline (the compiled CPU engine,
        :func:`gpureg.core.cpu_ffd.residual_gradient_cubic`, and the GPU kernel).
    """

    def __init__(self, fixed, moving, matrix, *, level: int, spacing: float, control, variance: float,
                 regularization: float, mask=None, interpolation: str = "linear"):
        self.fixed, self.moving, self.mask = fixed, moving, mask
        self.device = array_device(fixed)
        self.interpolation = interpolation
        self._coef = None
        if interpolation == "cubic":
            if self.device == "cpu" and cpu_engine() != "numba":
                raise ValueError("interpolation='cubic' needs the compiled CPU engine or the GPU (the NumPy "
                                 "reference is trilinear)")
            # the moving volume's cubic B-spline coefficients, once per level (scipy or cupyx)
            self._coef = ndimage_of(moving).spline_filter(moving, order=3, mode="mirror").astype(np.float32)
        elif interpolation != "linear":
            raise ValueError(f"interpolation must be 'linear' or 'cubic', got {interpolation!r}")
        self.level, self.spacing, self.control = int(level), float(spacing), tuple(int(c) for c in control)
        self.scale = float(2 ** self.level)
        self.variance, self.regularization = float(variance), float(regularization)
        to_fine = level_to_fine(self.level)
        self.matrix_level = np.linalg.inv(to_fine) @ tf.compose(matrix) @ to_fine
        xp = xp_of(fixed)
        # float32 weights and coefficients: u to ~1e-7 voxel, and the separable products run in single-precision
        # BLAS (NumPy's batched float64 matmul was 50x slower here).
        self.weights = tuple(xp.asarray(bspline.axis_weights(level_positions(self.level, n), spacing, c),
                                        dtype=np.float32) for n, c in zip(fixed.shape, self.control))
        self.evaluations = 0
        self.count0 = None
        if self.device == "cpu":
            grid = np.indices(fixed.shape, dtype=np.float64).reshape(3, -1)
            # (3, N) affine part of q, float32 (7.6e-6 voxel at 128 voxels; the GPU kernels also sample in float32)
            self._base = (self.matrix_level[:3, :3] @ grid + self.matrix_level[:3, 3:4]).astype(np.float32)
            self._fixed_flat = np.asarray(fixed, dtype=np.float32).reshape(-1)
            self._mask_flat = None if mask is None else np.asarray(mask, dtype=bool).reshape(-1)
            self._moving_flat = np.asarray(moving, dtype=np.float32).reshape(-1)

    @property
    def size(self) -> int:
        """Number of coefficients (``3 * prod(control)``)."""
        return 3 * int(np.prod(self.control))

    def __call__(self, coeffs_flat):
        """``(E, dE/dC)`` at the flat float64 coefficients (host arrays; the form scipy's L-BFGS-B takes)."""
        value, grad, _ = self.evaluate(coeffs_flat)
        return value, grad

    def evaluate(self, coeffs_flat, *, gradient: bool = True, host: bool = True):
        """``(E, dE/dC or None, mse)``: the objective, its gradient and the data term's plain MSE.

        ``host=False``: ``coeffs_flat`` may be on the volumes' device and the
        gradient stays there (float64; :func:`gpureg.register.lbfgs.minimize_lbfgs`
        keeps its state on the GPU); else the gradient is a host array.
        """
        xp = xp_of(self.fixed)
        c64 = xp.asarray(coeffs_flat, dtype=xp.float64).reshape(3, *self.control)
        c = c64.astype(xp.float32)
        rg, sse, count = self.residual_gradient(c)
        self.evaluations += 1
        if self.count0 is None:
            self.count0 = count
        if count == 0 or count < 0.5 * self.count0:
            # A trial step of the line search that pushes most of the grid out of the moving volume:
            # a large value makes it step back (the mean over the few samples left could look better).
            zeros = (np if host else xp).zeros(self.size)
            return 1e6, (zeros if gradient else None), float("inf")
        mse = sse / count
        bend, bend_grad = bspline.bending_energy(c64, self.spacing, gradient=gradient)
        # sum r^2 / N0 with N0 the valid count of the level's first evaluation: with the valid set held
        # fixed, the gradient below is exact (a mean over the varying count would reward leaving the volume).
        value = sse / (self.count0 * self.variance) + self.regularization * bend
        if not gradient:
            return value, None, mse
        data = bspline.adjoint(rg, self.weights).astype(xp.float64) * (2.0 / (self.count0 * self.variance))
        grad = (data + self.regularization * bend_grad).ravel()
        return value, (to_host(grad) if host else grad), mse

    def residual_gradient(self, coeffs):
        """``(rg, sse, count)``: ``r g / 2^l`` per voxel ``(3, Z, Y, X)`` (0 where invalid), ``sum r^2``, ``N``."""
        if self.device == "gpu":
            from ..core import cuda_ffd

            cubic = self._coef is not None
            return cuda_ffd.residual_gradient(self.fixed, self._coef if cubic else self.moving, coeffs,
                                              self.matrix_level, level=self.level, spacing=self.spacing,
                                              mask=self.mask, cubic=cubic)
        if self._coef is not None:
            from ..core import cpu_ffd

            return cpu_ffd.residual_gradient_cubic(self.fixed, self._coef, bspline.evaluate(coeffs, self.weights),
                                                   self.matrix_level, self.scale, mask=self.mask)
        if cpu_engine() == "numba":
            from ..core import cpu_ffd

            return cpu_ffd.residual_gradient(self.fixed, self.moving, bspline.evaluate(coeffs, self.weights),
                                             self.matrix_level, self.scale, mask=self.mask)
        return self._residual_gradient_cpu(coeffs)

    def _residual_gradient_cpu(self, coeffs):
        q = bspline.evaluate(coeffs, self.weights).reshape(3, -1)
        q *= np.float32(1.0 / self.scale)
        q += self._base
        value, grad, valid = sample_cpu(self._moving_flat, self.moving.shape, q)
        if self._mask_flat is not None:
            valid &= self._mask_flat
        r = np.where(valid, value - self._fixed_flat, np.float32(0.0))
        grad *= r * np.float32(1.0 / self.scale)
        r64 = r.astype(np.float64)
        return grad.reshape(3, *self.fixed.shape), float(r64 @ r64), int(np.count_nonzero(valid))


def sample_cpu(flat, shape, q):
    """Trilinear value, gradient ``(3, N)`` and validity of a volume at points ``q`` ``(3, N)`` float32.

    The rule of :func:`gpureg.core.metric.trilinear_sample` (cell lower corner
    ``min(floor(q), n - 2)``, valid when ``0 <= q_k <= n_k - 1``, x then y then z)
    in float32; invalid points give value and gradient 0.
    """
    valid = np.ones(q.shape[1], dtype=bool)
    idx = np.zeros(q.shape[1], dtype=np.int64)
    frac = np.empty_like(q)
    stride = 1
    for k in (2, 1, 0):
        n = shape[k]
        qk = q[k]
        valid &= (qk >= 0) & (qk <= n - 1)
        i0 = np.clip(np.floor(qk), 0, n - 2)
        frac[k] = np.clip(qk - i0, 0, 1)
        idx += i0.astype(np.int64) * stride
        stride *= n
    sy, sz = shape[2], shape[1] * shape[2]
    v000, v001 = flat[idx], flat[idx + 1]
    v010, v011 = flat[idx + sy], flat[idx + sy + 1]
    v100, v101 = flat[idx + sz], flat[idx + sz + 1]
    v110, v111 = flat[idx + sz + sy], flat[idx + sz + sy + 1]
    fz, fy, fx = frac
    dx00, dx01, dx10, dx11 = v001 - v000, v011 - v010, v101 - v100, v111 - v110
    c00, c01, c10, c11 = v000 + fx * dx00, v010 + fx * dx01, v100 + fx * dx10, v110 + fx * dx11
    dy0, dy1 = c01 - c00, c11 - c10
    c0, c1 = c00 + fy * dy0, c10 + fy * dy1
    grad = np.empty_like(q)
    grad[0] = c1 - c0
    grad[1] = dy0 + fz * (dy1 - dy0)
    dxa, dxb = dx00 + fy * (dx01 - dx00), dx10 + fy * (dx11 - dx10)
    grad[2] = dxa + fz * (dxb - dxa)
    value = c0 + fz * grad[0]
    value[~valid] = 0
    grad[:, ~valid] = 0
    return value, grad, valid
