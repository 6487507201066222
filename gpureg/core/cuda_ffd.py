"""CUDA launcher of the B-spline free-form deformation pass (``kernels/bspline.cu``).

Convention as in :mod:`gpureg.register.ffd_level`: level volumes (float32,
C order), coefficients ``(3, cz, cy, cx)`` in fine voxels, the affine on the
level grid. Importing this module needs neither CuPy nor a GPU.
"""

from __future__ import annotations

import numpy as np

from .cuda import affine_args, check_size, pointer_or_null, wide_index
from .cuda_loader import THREADS, get_kernel, require_cupy, resident_blocks

__all__ = ["residual_gradient"]


def residual_gradient(fixed, moving, coeffs, matrix_level, *, level: int, spacing: float, mask=None,
                      cubic: bool = False):
    """One fused pass: ``r g / 2^l`` per voxel, ``sum r^2`` and the valid count.

    Parameters
    ----------
    fixed, moving : (Z, Y, X) cupy.ndarray of float32
        Level volumes of the same shape.
    coeffs : (3, cz, cy, cx) cupy.ndarray
        B-spline coefficients (fine voxels); converted to float32.
    matrix_level : (4, 4) array_like
        Affine ``moving_from_reference`` on the level grid.
    level : int
        Pyramid level (scale ``2^level``).
    spacing : float
        Control-point spacing (fine voxels).
    mask : (Z, Y, X) cupy.ndarray, optional
        Reference voxels that count (> 0.5 or True).
    cubic : bool
        ``moving`` holds the moving volume's cubic B-spline coefficients
        (``spline_filter(order=3, mode="mirror")``) and is sampled with cubic
        B-splines (the CPU twin: :func:`gpureg.core.cpu_ffd.residual_gradient_cubic`).

    Returns
    -------
    rg : (3, Z, Y, X) cupy.ndarray of float32
        0 where the sample is invalid or masked out.
    sse : float
    count : int
    """
    cp = require_cupy()
    if fixed.dtype != np.float32 or moving.dtype != np.float32 or fixed.shape != moving.shape:
        raise ValueError(f"fixed and moving must be float32 volumes of one shape, got {fixed.dtype} "
                         f"{tuple(fixed.shape)} and {moving.dtype} {tuple(moving.shape)}")
    check_size(fixed.shape, "fixed")
    wide = wide_index(fixed.shape)
    nz, ny, nx = fixed.shape
    center = (np.asarray(fixed.shape, dtype=np.float64) - 1.0) / 2.0
    with fixed.device:  # every buffer on the volumes' GPU, not the current one
        fixed, moving = cp.ascontiguousarray(fixed), cp.ascontiguousarray(moving)
        c = cp.ascontiguousarray(coeffs, dtype=cp.float32)
        if c.ndim != 4 or c.shape[0] != 3 or min(c.shape[1:]) < 4:
            raise ValueError(f"coeffs must have shape (3, cz, cy, cx) with at least 4 points per axis, got {c.shape}")
        m = None if mask is None else cp.ascontiguousarray(cp.asarray(mask), dtype=cp.float32)
        rg = cp.empty((3, nz, ny, nx), dtype=cp.float32)
        kernel = get_kernel("bspline.cu", "ffd_residual_pass", wide)
        blocks = max(1, min(-(-fixed.size // THREADS), resident_blocks("bspline.cu", "ffd_residual_pass", wide)))
        partials = cp.empty(2 * blocks, dtype=cp.float64)
        kernel((blocks,), (THREADS,),
               (fixed, moving, pointer_or_null(m), np.int32(nz), np.int32(ny), np.int32(nx), c, np.int32(c.shape[1]),
                np.int32(c.shape[2]), np.int32(c.shape[3]), *affine_args(matrix_level, center),
                np.float32(2.0 ** level), np.float32(1.0 / spacing), np.int32(bool(cubic)), rg, partials))
        sums = cp.empty(2, dtype=cp.float64)
        get_kernel("bspline.cu", "reduce_partials", wide)((2,), (THREADS,), (partials, np.int32(blocks), sums))
        sse, count = sums.get()
    return rg, float(sse), round(count)
