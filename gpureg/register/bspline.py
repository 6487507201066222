"""Cubic B-spline free-form deformations: separable evaluation, adjoint, refinement, bending energy.

Convention
----------
A control grid of spacing ``S`` (voxels of the full-resolution reference grid)
has control point ``j`` of an axis at position ``(j - 1) S``; an axis of ``n``
voxels needs ``floor((n - 1) / S) + 4`` points (:func:`control_shape`). A
position ``x`` (fine voxels, ``0 <= x <= n - 1``) lies in cell
``k = min(floor(x / S), nc - 4)`` with fraction ``t = x / S - k`` and is moved by
the four points ``k .. k + 3`` with the uniform cubic B-spline weights
:func:`basis` ``(t)``. The displacement of a voxel is the tensor product

    u_d(z, y, x) = sum_ijk  W_z[z, i] W_y[y, j] W_x[x, k] C[d, i, j, k]

so evaluation and its adjoint (the gradient with respect to ``C``) are three
small matrix products per component (:func:`evaluate`, :func:`adjoint`), on
NumPy or CuPy alike. Coefficients are displacements in fine voxels, ``(z, y, x)``.
"""

from __future__ import annotations

import numpy as np

from ..core.backend import xp_of

__all__ = ["adjoint", "axis_weights", "basis", "basis_derivative", "bending_energy", "control_shape", "evaluate",
           "jacobian_determinant", "refine"]


def basis(t):
    """The four uniform cubic B-spline weights at fraction ``t`` in [0, 1]: array ``(..., 4)`` summing to 1."""
    t = np.asarray(t, dtype=np.float64)
    s = 1.0 - t
    t2, t3 = t * t, t * t * t
    return np.stack([s * s * s / 6.0, (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0, (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0,
                     t3 / 6.0], axis=-1)


def basis_derivative(t):
    """``d basis / d t`` at fraction ``t``: array ``(..., 4)`` summing to 0."""
    t = np.asarray(t, dtype=np.float64)
    s = 1.0 - t
    return np.stack([-0.5 * s * s, (3.0 * t * t - 4.0 * t) / 2.0, (-3.0 * t * t + 2.0 * t + 1.0) / 2.0, 0.5 * t * t],
                    axis=-1)


def control_shape(shape, spacing: float) -> tuple:
    """Control points per axis of a grid ``shape`` at ``spacing`` fine voxels."""
    return tuple(int(np.floor((int(n) - 1) / float(spacing))) + 4 for n in shape)


def axis_weights(positions, spacing: float, n_control: int, *, derivative: bool = False) -> np.ndarray:
    """Dense ``(len(positions), n_control)`` weight matrix of one axis (float64).

    Row ``i`` holds the four B-spline weights of position ``positions[i]``
    (fine voxels) in columns ``k .. k + 3`` (see the module convention); with
    ``derivative`` the weights of ``d/dx`` (per fine voxel).
    """
    x = np.asarray(positions, dtype=np.float64) / float(spacing)
    cell = np.clip(np.floor(x).astype(np.int64), 0, n_control - 4)
    t = x - cell
    w = basis_derivative(t) / float(spacing) if derivative else basis(t)
    out = np.zeros((x.size, n_control))
    rows = np.arange(x.size)
    for k in range(4):
        out[rows, cell + k] = w[:, k]
    return out


def evaluate(coeffs, weights):
    """Displacement field ``(D, nz, ny, nx)`` of coefficients ``(D, cz, cy, cx)``.

    ``weights`` are the three axis matrices ``(W_z, W_y, W_x)`` of
    :func:`axis_weights` (on the coefficients' device, same float dtype).
    """
    wz, wy, wx = weights
    d, cz = coeffs.shape[0], coeffs.shape[1]
    a = coeffs @ wx.T                                     # (D, cz, cy, nx)
    a = wy @ a                                            # (D, cz, ny, nx)
    ny, nx = a.shape[2], a.shape[3]
    a = wz @ a.reshape(d, cz, ny * nx)                    # (D, nz, ny * nx)
    return a.reshape(d, wz.shape[0], ny, nx)


def adjoint(field, weights):
    """Adjoint of :func:`evaluate`: coefficients ``(D, cz, cy, cx)`` of a field ``(D, nz, ny, nx)``.

    ``adjoint(g, w)`` is the gradient with respect to the coefficients of
    ``sum(g * evaluate(c, w))``.
    """
    wz, wy, wx = weights
    d, nz, ny, nx = field.shape
    a = wz.T @ field.reshape(d, nz, ny * nx)              # (D, cz, ny * nx)
    a = wy.T @ a.reshape(d, wz.shape[1], ny, nx)          # (D, cz, cy, nx)
    return a @ wx                                         # (D, cz, cy, cx)


def refine(coeffs, shape, old_spacing: float, new_spacing: float) -> np.ndarray:
    """Coefficients on a grid of ``new_spacing`` representing the same deformation.

    Exact when the new knots contain the old ones (halving the spacing);
    otherwise the least-squares fit over every voxel and half voxel.
    """
    c = np.asarray(coeffs, dtype=np.float64)
    new_shape = control_shape(shape, new_spacing)
    for axis, n in enumerate(shape):
        x = np.arange(0.0, n - 0.5, 0.5)
        old = axis_weights(x, old_spacing, c.shape[axis + 1])
        new = axis_weights(x, new_spacing, new_shape[axis])
        r, *_ = np.linalg.lstsq(new, old, rcond=None)     # (new, old)
        c = np.moveaxis(np.tensordot(r, c, axes=([1], [axis + 1])), 0, axis + 1)
    return c


def bending_energy(coeffs, spacing: float, *, gradient: bool = True):
    """Discrete bending energy of the control grid and its gradient.

    ``B = sum_d [sum_a |D_aa c_d|^2 + 2 sum_{a<b} |D_ab c_d|^2] / (S^4 n)``
    with second differences ``D`` of the coefficients (``n`` control points):
    the mean squared second derivative of the displacement (1 / voxel^2),
    zero for any affine field.

    Returns
    -------
    (float, ndarray or None)
        The energy and ``dB / dc`` (same shape as ``coeffs``).
    """
    xp = xp_of(coeffs)
    norm = float(spacing) ** 4 * int(np.prod(coeffs.shape[1:]))
    grad = xp.zeros_like(coeffs) if gradient else None
    total = 0.0
    for a in range(3):
        for b in range(a, 3):
            diff, weight = _second_difference(coeffs, a, b), (1.0 if a == b else 2.0)
            total += weight * float((diff * diff).sum())
            if gradient:
                _second_difference_adjoint(grad, diff * (2.0 * weight / norm), a, b)
    return total / norm, grad


def jacobian_determinant(coeffs, matrix, shape, spacing: float, *, z_chunk: int = 32) -> np.ndarray:
    """Determinant of ``d q / d p`` of ``q = A p + t + u(p)`` at every voxel of ``shape`` (float32, host).

    Float32 separable products (NumPy's batched float64 matmul is far slower);
    the determinant is good to ~1e-6.
    """
    c = np.asarray(coeffs, dtype=np.float32)
    a = np.asarray(matrix, dtype=np.float64)[:3, :3]
    pos = [np.arange(n, dtype=np.float64) for n in shape]
    w = [axis_weights(p, spacing, c.shape[i + 1]).astype(np.float32) for i, p in enumerate(pos)]
    dw = [axis_weights(p, spacing, c.shape[i + 1], derivative=True).astype(np.float32) for i, p in enumerate(pos)]
    out = np.empty(tuple(shape), dtype=np.float32)
    for z0 in range(0, shape[0], z_chunk):
        z1 = min(shape[0], z0 + z_chunk)
        j = [[None] * 3 for _ in range(3)]
        for k in range(3):  # d q / d p_k
            ws = [w[0][z0:z1], w[1], w[2]]
            ws[k] = dw[k][z0:z1] if k == 0 else dw[k]
            col = evaluate(c, tuple(ws))
            for i in range(3):
                j[i][k] = col[i] + np.float32(a[i, k])
        out[z0:z1] = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
                      - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
                      + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
    return out


def _second_difference(c, a, b):
    if a == b:
        return _shift(c, a, 2) - 2.0 * _shift(c, a, 1, 1) + _shift(c, a, 0, 2)
    hi_hi = _shift(_shift(c, a, 1), b, 1)
    hi_lo = _shift(_shift(c, a, 1), b, 0, 1)
    lo_hi = _shift(_shift(c, a, 0, 1), b, 1)
    lo_lo = _shift(_shift(c, a, 0, 1), b, 0, 1)
    return hi_hi - hi_lo - lo_hi + lo_lo


def _second_difference_adjoint(out, d, a, b):
    if a == b:
        _add_shift(out, d, (a, 2, 0), None, 1.0)
        _add_shift(out, d, (a, 1, 1), None, -2.0)
        _add_shift(out, d, (a, 0, 2), None, 1.0)
        return
    for sa, sb, sign in (((1, 0), (1, 0), 1.0), ((1, 0), (0, 1), -1.0), ((0, 1), (1, 0), -1.0),
                         ((0, 1), (0, 1), 1.0)):
        _add_shift(out, d, (a, *sa), (b, *sb), sign)


def _shift(c, axis, lo, hi=0):
    """``c`` sliced along spatial ``axis`` to ``[lo : n - hi]``."""
    sl = [slice(None)] * c.ndim
    sl[axis + 1] = slice(lo, c.shape[axis + 1] - hi)
    return c[tuple(sl)]


def _add_shift(out, d, first, second, sign):
    sl = [slice(None)] * out.ndim
    for spec in (first, second):
        if spec is not None:
            axis, lo, hi = spec
            sl[axis + 1] = slice(lo, out.shape[axis + 1] - hi)
    out[tuple(sl)] += sign * d
