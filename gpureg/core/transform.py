"""The affine transform: parameters <-> 4x4 matrices, composition, resampling.

Convention (one, everywhere; see DESIGN.md)
-------------------------------------------
A 4x4 homogeneous ``matrix`` in voxel-index units and ``(z, y, x)`` order maps
a voxel ``p`` of the **reference (fixed)** grid to the point ``q`` of the
**moving** volume, ``q = A @ p + t`` (the ``matrix``/``offset`` of
``scipy.ndimage.affine_transform``). Hence ``apply_affine(moving, matrix)``
lies on the reference grid and approximates ``fixed``. Name such matrices
``moving_from_reference``.

The 12 optimisation parameters are taken about the grid centre ``c``:
``q = (I + D)(p - c) + c + s``, ordered ``(D[0,0], D[0,1], ..., D[2,2], s_z, s_y, s_x)``
(``D`` row-major, then the shift ``s`` in voxels).
"""

from __future__ import annotations

import numpy as np

from .backend import array_device, cpu_engine, resolve_device, to_device

__all__ = ["apply_affine", "compose", "displacement_error", "grid_center", "identity", "invert", "matrix_from_params", "params_from_matrix", "rotation_matrix", "scale_matrix"]


def identity() -> np.ndarray:
    """The 4x4 identity (float64)."""
    return np.eye(4)


def grid_center(shape) -> np.ndarray:
    """Centre ``c = (n - 1) / 2`` of a grid of ``shape`` in voxel indices (float64)."""
    return (np.asarray(shape[-3:], dtype=np.float64) - 1.0) / 2.0


def matrix_from_params(params, center) -> np.ndarray:
    """4x4 matrix from the 12 parameters ``(D, s)`` about ``center``.

    Parameters
    ----------
    params : (12,) array_like
        ``D`` row-major (9 values) then ``s`` (3 values, voxels).
    center : (3,) array_like
        Centre ``c`` in voxel indices, ``(z, y, x)``.

    Returns
    -------
    (4, 4) ndarray of float64
        ``moving_from_reference``: ``q = (I + D)(p - c) + c + s``.
    """
    params = np.asarray(params, dtype=np.float64)
    if params.shape != (12,):
        raise ValueError(f"params must have shape (12,), got {params.shape}")
    c = np.asarray(center, dtype=np.float64)
    a = np.eye(3) + params[:9].reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = c - a @ c + params[9:]
    return m


def params_from_matrix(matrix, center) -> np.ndarray:
    """Inverse of :func:`matrix_from_params`: the 12 parameters about ``center``."""
    m = _check_matrix(matrix)
    c = np.asarray(center, dtype=np.float64)
    a = m[:3, :3]
    s = m[:3, 3] - c + a @ c
    return np.concatenate([(a - np.eye(3)).ravel(), s])


def compose(*matrices) -> np.ndarray:
    """Matrix product ``m1 @ m2 @ ...`` of 4x4 transforms.

    ``compose(moving_from_mid, mid_from_reference)`` gives ``moving_from_reference``.
    """
    out = np.eye(4)
    for m in matrices:
        out = out @ _check_matrix(m)
    return out


def invert(matrix) -> np.ndarray:
    """Inverse 4x4 transform (``reference_from_moving`` from ``moving_from_reference``)."""
    m = _check_matrix(matrix)
    a = m[:3, :3]
    if abs(np.linalg.det(a)) < 1e-12:
        raise ValueError("matrix is singular and cannot be inverted")
    return np.linalg.inv(m)


def rotation_matrix(angle_deg: float, axis=(1.0, 0.0, 0.0), center=None) -> np.ndarray:
    """Rotation by ``angle_deg`` about ``axis`` (``(z, y, x)``) through ``center``."""
    axis = np.asarray(axis, dtype=np.float64)
    norm = np.linalg.norm(axis)
    if norm == 0:
        raise ValueError("rotation axis must be non-zero")
    k = axis / norm
    theta = np.deg2rad(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    r = np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * kx @ kx
    return _about_center(r, center)


def scale_matrix(scale, center=None) -> np.ndarray:
    """Scaling by ``scale`` (scalar or per axis ``(z, y, x)``) about ``center``."""
    s = np.broadcast_to(np.asarray(scale, dtype=np.float64), (3,))
    return _about_center(np.diag(s), center)


def displacement_error(matrix_a, matrix_b, shape=None, mask=None) -> tuple[float, float]:
    """Mean and maximum distance (voxels) between where two transforms send voxels.

    Parameters
    ----------
    matrix_a, matrix_b : (4, 4) array_like
        Transforms on the same reference grid.
    shape : tuple of int, optional
        Reference grid shape; all its voxels are used when ``mask`` is None.
    mask : (Z, Y, X) array_like of bool, optional
        Evaluate only over these reference voxels (e.g. the sample).

    Returns
    -------
    (float, float)
        Mean and maximum of ``|matrix_a @ p - matrix_b @ p|`` over the voxels.
    """
    diff = _check_matrix(matrix_a) - _check_matrix(matrix_b)
    if mask is not None:
        pts = np.argwhere(np.asarray(to_device(mask, "cpu"), dtype=bool)).astype(np.float64)
        if pts.size == 0:
            raise ValueError("mask selects no voxel")
    elif shape is not None:
        pts = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape[-3:]], indexing="ij"), -1).reshape(-1, 3)
    else:
        raise ValueError("give shape or mask")
    d = pts @ diff[:3, :3].T + diff[:3, 3]
    dist = np.sqrt((d * d).sum(axis=1))
    return float(dist.mean()), float(dist.max())


def apply_affine(volume, matrix, *, order: int = 1, cval: float = 0.0, output_shape=None, device: str = "auto"):
    """Resample ``volume`` (the moving one) onto the reference grid.

    Parameters
    ----------
    volume : (Z, Y, X) ndarray
        Moving volume (NumPy or CuPy); converted to float32.
    matrix : (4, 4) array_like
        ``moving_from_reference`` in voxel indices, ``(z, y, x)``.
    order : int
        Interpolation order: 1 (trilinear, both devices) or 0/3 (CPU only, scipy).
    cval : float
        Value of reference voxels whose sample point falls outside the volume.
    output_shape : tuple of int, optional
        Reference grid shape (default: the volume's).
    device : str
        ``"auto"``, ``"cpu"`` or ``"gpu"``; a CuPy input always runs on the GPU.

    Returns
    -------
    (Z, Y, X) ndarray of float32
        On the device of the input when it was a CuPy array, else NumPy.

    Convention
    ----------
    ``out[p] = volume(A @ p + t)`` with trilinear interpolation; a sample is
    inside when ``0 <= q_k <= n_k - 1`` on every axis, else ``cval``.
    """
    m = _check_matrix(matrix)
    if getattr(volume, "ndim", None) != 3:
        raise ValueError(f"volume must be 3D (Z, Y, X), got shape {getattr(volume, 'shape', None)}")
    out_shape = tuple(volume.shape) if output_shape is None else tuple(int(n) for n in output_shape)
    on_gpu = array_device(volume) == "gpu" or resolve_device(device) == "gpu"
    if on_gpu:
        if order != 1:
            raise ValueError(f"order={order} is CPU-only; the GPU resampler is trilinear (order=1)")
        from . import cuda

        out = cuda.resample_affine(to_device(volume, "gpu", np.float32), m, out_shape, cval=cval)
        return out if array_device(volume) == "gpu" else out.get()
    return _resample_cpu(np.asarray(volume, dtype=np.float32), m, out_shape, order, cval)


def _resample_cpu(volume, matrix, out_shape, order, cval):
    if order == 1 and min(volume.shape) >= 2 and cpu_engine() == "numba":
        from . import cpu_kernels

        return cpu_kernels.resample_affine(volume, matrix, out_shape, cval=cval)
    from scipy import ndimage

    # mode="constant": no interpolation beyond the edges, i.e. a sample is
    # inside when 0 <= q_k <= n_k - 1 (the same rule as the metric and kernels).
    return ndimage.affine_transform(volume, matrix[:3, :3], offset=matrix[:3, 3], output_shape=out_shape,
                                    order=order, mode="constant", cval=cval).astype(np.float32, copy=False)


def _about_center(a, center):
    m = np.eye(4)
    m[:3, :3] = a
    if center is not None:
        c = np.asarray(center, dtype=np.float64)
        m[:3, 3] = c - a @ c
    return m


def _check_matrix(matrix) -> np.ndarray:
    m = np.asarray(to_device(matrix, "cpu"), dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"affine matrix must have shape (4, 4), got {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("affine matrix contains NaN or inf")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError(f"last row of an affine matrix must be [0, 0, 0, 1], got {m[3].tolist()}")
    return m
