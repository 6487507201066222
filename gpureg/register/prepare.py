"""Affine registration by mean squared error (CPU and GPU through the same code).

The coarse-to-fine driver (:func:`register_affine`) is separate from the
solver (:func:`levenberg_marquardt`), which only sees a function returning
:class:`~gpureg.metric.MetricTerms` for a parameter vector. On the GPU that
function is one fused kernel pass; the solver runs on the host on the 1 + 1 +
12 + 78 reduced numbers.
"""

from __future__ import annotations

import numpy as np

from ..core import transform as tf
from ..core.backend import (
    array_device,
    ndimage_of,
    to_device,
    to_host,
    xp_of,
)
from ..core.segment import binarize as _binarize
from ..core.segment import denoise as denoise_volume

__all__ = ["center_of_mass", "foreground_fraction", "prepare_volume", "pyramid"]

def prepare_volume(volume, device: str, *, name: str = "volume", binarize: bool = False, denoise=None,
                   smooth: float = 1.0, fraction: float | None = None):
    """Validate a volume and return it as float32 on ``device`` (optionally binarized).

    The volume (Otsu-binarized with ``binarize``) is then smoothed with a
    Gaussian of sigma ``smooth`` voxels (0: not smoothed); see :func:`register_affine`.
    ``fraction``: the reference's foreground fraction, see
    :func:`gpureg.segment.binarize` (series use :func:`foreground_fraction`).

    Raises a ``ValueError`` naming ``name`` for a non-3D, too small, non-real,
    non-finite or constant volume.
    """
    shape = getattr(volume, "shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"{name} must be a 3D (Z, Y, X) array, got shape {shape}")
    if min(shape) < 4:
        raise ValueError(f"{name} must be at least 4 voxels along every axis, got shape {tuple(shape)}")
    dtype = np.dtype(getattr(volume, "dtype", np.float64))
    if dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {dtype}")
    v = to_device(volume, device, np.float32)
    xp = xp_of(v)
    if not bool(xp.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    if float(v.max()) == float(v.min()):
        raise ValueError(f"{name} is constant (all values {float(v.max()):g}); there is nothing to register")
    v = denoise_volume(v, denoise)
    if binarize:
        try:
            v = _binarize(v, fraction=fraction)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if smooth > 0:
        v = ndimage_of(v).gaussian_filter(v, sigma=float(smooth))
    return v


def foreground_fraction(volume, *, denoise=None) -> float:
    """Fraction of voxels in the Otsu foreground (of the reference, for :func:`prepare_volume`)."""
    return float(_binarize(to_device(volume, array_device(volume), np.float32), denoise=denoise).mean())


def center_of_mass(volume) -> np.ndarray:
    """Centre of mass ``(z, y, x)`` of ``max(volume - median, 0)`` (robust to a flat background)."""
    if array_device(volume) == "gpu":
        from ..core import cuda

        return cuda.center_of_mass(volume)  # exact radix-select median + one moments pass, no sort
    xp = xp_of(volume)
    w = xp.maximum(volume - xp.median(volume), 0)
    total = float(w.sum())
    if total <= 0:
        return tf.grid_center(volume.shape)
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        marginal = to_host(w.sum(axis=other)).astype(np.float64)
        out.append(float(marginal @ np.arange(volume.shape[axis])) / total)
    return np.asarray(out)


def center_of_mass_init(fixed, moving) -> np.ndarray:
    """Translation taking the reference's centre of mass onto the moving one's."""
    m = np.eye(4)
    m[:3, 3] = center_of_mass(moving) - center_of_mass(fixed)
    return m


def pyramid(volume, min_size: int = 24) -> list:
    """Volumes from fine to coarse by 2x block averaging while the smallest axis stays >= ``min_size``.

    Level ``l`` voxel ``k`` covers fine voxels ``2^l k .. 2^l (k + 1) - 1``, so its
    centre is at fine index ``2^l k + (2^l - 1) / 2``.
    """
    levels = [volume]
    while min(levels[-1].shape) // 2 >= min_size:
        levels.append(downsample2(levels[-1]))
    return levels


def downsample2(v):
    if array_device(v) == "gpu" and v.dtype == np.float32:
        from ..core import cuda

        return cuda.downsample2(v)
    nz, ny, nx = (n // 2 for n in v.shape)
    c = v[: 2 * nz, : 2 * ny, : 2 * nx]
    return c.reshape(nz, 2, ny, 2, nx, 2).mean(axis=(1, 3, 5), dtype=c.dtype)


def level_to_fine(level: int) -> np.ndarray:
    s = float(2 ** level)
    m = np.diag([s, s, s, 1.0])
    m[:3, 3] = (s - 1.0) / 2.0
    return m
