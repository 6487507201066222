"""Mean-squared-error metric with its analytic gradient and Gauss-Newton terms.

For a reference voxel ``p`` and ``q = A p + t`` (``moving_from_reference``),
residual ``r = M(q) - F(p)`` and trilinear gradient ``g = grad M(q)``. The
12 parameters are those of :func:`gpureg.transform.matrix_from_params`, whose
per-voxel Jacobian is ``J = (g_i (p_j - c_j) for i, j in zyx) ++ (g_z, g_y, g_x)``.
One pass accumulates the valid count ``N``, ``sum r^2``, ``sum r J`` (12) and
``sum J J^T`` (the 78 unique Gauss-Newton terms); then
``E = sum r^2 / N``, ``dE/dtheta = 2/N sum r J``, ``H ~= 2/N sum J J^T``.

A sample is valid when ``0 <= q_k <= n_k - 1`` on every axis (and the voxel is
inside the optional reference mask); invalid samples are excluded from every sum.
The same per-voxel arithmetic is in ``kernels/voxel_math.cuh`` for the GPU.
"""

from __future__ import annotations

import numpy as np

from .backend import array_device, cpu_engine
from .terms import MetricTerms

__all__ = ["cell_support", "mse_terms", "trilinear_sample", "voxel_jacobian"]

# Reference voxels processed per chunk on the CPU (bounds temporary memory to ~100 MB).
_CHUNK = 1 << 18


def mse_terms(fixed, moving, matrix, *, center=None, mask=None, hessian: bool = True, support=None) -> MetricTerms:
    """One metric pass: MSE, its gradient and Gauss-Newton sums.

    Parameters
    ----------
    fixed : (Z, Y, X) ndarray of float32
        Reference volume; defines the grid of ``p``.
    moving : (Z', Y', X') ndarray of float32
        Moving volume sampled at ``q = A p + t``.
    matrix : (4, 4) array_like
        ``moving_from_reference`` in voxel indices.
    center : (3,) array_like, optional
        Centre ``c`` of the parameters (default: centre of the fixed grid).
    mask : (Z, Y, X) ndarray of bool, optional
        Restrict the metric to these reference voxels.
    hessian : bool
        Also accumulate ``sum J J^T``.
    support : (Z', Y', X') ndarray of bool, optional
        CPU speed-up: :func:`cell_support` of ``moving``. Voxels where the
        fixed volume is 0 and the sample's cell has no non-zero corner add
        nothing but their count, so only the others are interpolated. Exact.

    Returns
    -------
    MetricTerms
        Float64 sums on the host. Runs on the GPU when ``fixed`` is a CuPy array;
        on the CPU as compiled numba kernels (:mod:`gpureg.core.cpu_kernels`), or
        as the NumPy reference below when ``gpureg.config.cpu_backend`` is ``"numpy"``
        (:func:`gpureg.core.backend.cpu_engine`).
    """
    m = np.asarray(matrix, dtype=np.float64)
    c = (np.asarray(fixed.shape, dtype=np.float64) - 1) / 2 if center is None else np.asarray(center, dtype=np.float64)
    if array_device(fixed) == "gpu":
        from . import cuda

        return cuda.mse_terms(fixed, moving, m, c, mask=mask, hessian=hessian)
    if cpu_engine() == "numba":
        from . import cpu_kernels

        msk = None if mask is None else np.asarray(mask) > 0.5
        return cpu_kernels.mse_terms(fixed, moving, m, c, mask=msk, hessian=hessian, support=support)
    return _mse_terms_cpu(fixed, moving, m, c, mask, hessian, support)


def cell_support(moving) -> np.ndarray:
    """``out[i, j, k]`` is True when any corner of the trilinear cell with lower
    corner ``(i, j, k)`` (voxels ``i..i+1, j..j+1, k..k+1``) is non-zero."""
    if cpu_engine() == "numba":
        from . import cpu_kernels

        return cpu_kernels.cell_support(moving)
    from scipy import ndimage

    nz = np.asarray(moving) != 0
    return ndimage.maximum_filter(nz, size=2, mode="constant", cval=False, origin=-1)


def trilinear_sample(volume, q, *, gradient: bool = True):
    """Trilinear value (and gradient) of ``volume`` at points ``q``.

    Parameters
    ----------
    volume : (Z, Y, X) ndarray
        Volume to sample (each axis at least 2 long).
    q : (N, 3) ndarray of float64
        Points in voxel indices ``(z, y, x)``.
    gradient : bool
        Also return the gradient of the trilinear interpolant.

    Returns
    -------
    value : (N,) float64
    grad : (N, 3) float64 or None
        ``d value / d q`` of the interpolant (one-sided at cell faces: the cell
        is the one with lower corner ``min(floor(q), n - 2)``).
    valid : (N,) bool
        ``0 <= q_k <= n_k - 1`` on every axis; value and gradient are 0 elsewhere.
    """
    n = np.asarray(volume.shape, dtype=np.int64)
    valid = np.all((q >= 0) & (q <= n - 1), axis=1)
    qc = np.clip(q, 0, n - 1)
    i0 = np.minimum(np.floor(qc).astype(np.int64), n - 2)
    f = qc - i0
    flat = volume.reshape(-1)
    sz, sy = n[1] * n[2], n[2]
    base = i0[:, 0] * sz + i0[:, 1] * sy + i0[:, 2]
    v = [flat[base + dz * sz + dy * sy + dx].astype(np.float64) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    v000, v001, v010, v011, v100, v101, v110, v111 = v
    fz, fy, fx = f[:, 0], f[:, 1], f[:, 2]
    # Interpolate along x, then y, then z (the order used in voxel_math.cuh).
    c00 = v000 + fx * (v001 - v000)
    c01 = v010 + fx * (v011 - v010)
    c10 = v100 + fx * (v101 - v100)
    c11 = v110 + fx * (v111 - v110)
    c0 = c00 + fy * (c01 - c00)
    c1 = c10 + fy * (c11 - c10)
    val = np.where(valid, c0 + fz * (c1 - c0), 0.0)
    if not gradient:
        return val, None, valid
    gz = c1 - c0
    gy = (1 - fz) * (c01 - c00) + fz * (c11 - c10)
    dx00, dx01, dx10, dx11 = v001 - v000, v011 - v010, v101 - v100, v111 - v110
    gx = (1 - fz) * ((1 - fy) * dx00 + fy * dx01) + fz * ((1 - fy) * dx10 + fy * dx11)
    grad = np.stack([gz, gy, gx], axis=1) * valid[:, None]
    return val, grad, valid


def voxel_jacobian(grad, p, center) -> np.ndarray:
    """Per-voxel Jacobian ``J`` (N, 12) of ``M(q(p))`` w.r.t. the 12 parameters.

    ``J[:, 3 i + j] = g_i (p_j - c_j)`` and ``J[:, 9 + i] = g_i``.
    """
    d = p - np.asarray(center, dtype=np.float64)
    jac = np.empty((grad.shape[0], 12))
    jac[:, :9] = (grad[:, :, None] * d[:, None, :]).reshape(-1, 9)
    jac[:, 9:] = grad
    return jac


def _mse_terms_cpu(fixed, moving, matrix, center, mask, hessian, support):
    fixed = np.asarray(fixed, dtype=np.float32)
    moving = np.asarray(moving, dtype=np.float32)
    nz, ny, nx = fixed.shape
    n = np.asarray(moving.shape)
    a, t = matrix[:3, :3], matrix[:3, 3]
    count, sse = 0, 0.0
    rj = np.zeros(12)
    jtj = np.zeros((12, 12)) if hessian else None
    msk = None if mask is None else np.asarray(mask) > 0.5
    zstep = max(1, _CHUNK // (ny * nx))
    yy = np.arange(ny, dtype=np.float64)[None, :, None]
    xx = np.arange(nx, dtype=np.float64)[None, None, :]
    for z0 in range(0, nz, zstep):
        z1 = min(nz, z0 + zstep)
        zz = np.arange(z0, z1, dtype=np.float64)[:, None, None]
        q = [a[k, 0] * zz + a[k, 1] * yy + a[k, 2] * xx + t[k] for k in range(3)]
        valid = (q[0] >= 0) & (q[0] <= n[0] - 1) & (q[1] >= 0) & (q[1] <= n[1] - 1) & (q[2] >= 0) & (q[2] <= n[2] - 1)
        if msk is not None:
            valid &= msk[z0:z1]
        fs = fixed[z0:z1]
        if support is not None:
            # Valid voxels with F = 0 whose cell has no non-zero corner add r = 0, g = 0.
            count += int(valid.sum())
            cell = [np.clip(np.floor(q[k]), 0, n[k] - 2).astype(np.intp) for k in range(3)]
            valid &= (fs != 0) | support[cell[0], cell[1], cell[2]]
        idx = np.flatnonzero(valid)
        if idx.size == 0:
            continue
        qv = np.stack([qk.reshape(-1)[idx] for qk in q], axis=1)
        val, grad, _ = trilinear_sample(moving, qv)
        r = val - fs.reshape(-1)[idx]
        pz, py, px = np.unravel_index(idx, valid.shape)
        p = np.stack([pz + z0, py, px], axis=1).astype(np.float64)
        if support is None:
            count += idx.size
        sse += float(r @ r)
        jac = voxel_jacobian(grad, p, center)
        rj += r @ jac
        if hessian:
            jtj += jac.T @ jac
    return MetricTerms(count=count, sse=sse, rj=rj, jtj=jtj)
