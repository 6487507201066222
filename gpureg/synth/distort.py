"""Known distortions of the two-particle phantom and salt-and-pepper noise: the cases of the validation sweep
and of the accuracy tests and benchmarks (:mod:`gpureg.validate` measures; this module makes the data).

Distortions (``magnitude`` units): ``translation`` along a fixed oblique direction (fraction of the grid size),
``rotation`` (degrees about an oblique axis through the grid centre), ``scale`` (isotropic factor about the
centre), ``shear`` (``gamma`` of ``x += gamma z``, ``y += gamma / 2 x``), and ``deformation``
(:func:`distorted_phantom`: a smooth :class:`~gpureg.synth.SmoothWarp`).
"""

from __future__ import annotations

import numpy as np

from ..core import transform as tf
from ..core.backend import to_host
from ..core.errors import ParameterError

__all__ = ["AFFINE_DISTORTIONS", "distorted_phantom", "distortion_matrix", "random_affine", "salt_and_pepper"]

AFFINE_DISTORTIONS = ("translation", "rotation", "scale", "shear")

# Oblique directions (z, y, x) for the translation and the rotation axes.
_SHIFT_DIRECTION = np.array([0.5, -0.7, 0.5])


_ROTATION_AXES = ((1.0, 1.0, 0.0), (0.3, 1.0, 0.8), (1.0, -0.5, 0.7), (0.2, 0.6, -1.0))


def salt_and_pepper(volume, fraction: float, *, seed: int = 0) -> np.ndarray:
    """Copy of ``volume`` with salt-and-pepper noise.

    Parameters
    ----------
    volume : (Z, Y, X) ndarray
        Host array.
    fraction : float
        In ``[0, 1)``: ``fraction / 2`` of the voxels (drawn independently) are set
        to the volume's minimum and ``fraction / 2`` to its maximum.
    seed : int
        Seed of the voxel draw.

    Returns
    -------
    (Z, Y, X) ndarray of float32
    """
    if not 0.0 <= float(fraction) < 1.0:
        raise ParameterError(f"salt-and-pepper fraction must be in [0, 1), got {fraction}")
    v = np.array(to_host(volume), dtype=np.float32, copy=True)
    if fraction == 0:
        return v
    lo, hi = float(v.min()), float(v.max())
    u = np.random.default_rng(seed).random(v.shape)
    v[u < fraction / 2] = lo
    v[(u >= fraction / 2) & (u < fraction)] = hi
    return v


def random_affine(rng, n: int) -> np.ndarray:
    """A random ``moving_from_reference`` for an ``n``^3 grid, within issue 13's accuracy contract.

    Rotation <= 5 deg about a random axis, scale 0.95-1.05 per axis, shear <= 0.03,
    all about the grid centre, then a shift <= 6 % of ``n`` per axis.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the random draws (seed it for a reproducible case).
    n : int
        Grid size along each axis.

    Returns
    -------
    (4, 4) ndarray of float64
    """
    c = tf.grid_center((n,) * 3)
    m = tf.rotation_matrix(rng.uniform(-5, 5), rng.normal(size=3), c)
    s = np.diag(np.r_[rng.uniform(0.95, 1.05, 3), 1.0])
    s[:3, 3] = c - s[:3, :3] @ c
    sh = np.eye(4)
    sh[:3, :3] += np.triu(rng.uniform(-0.03, 0.03, (3, 3)), 1)
    sh[:3, 3] = c - sh[:3, :3] @ c
    m = m @ s @ sh
    m[:3, 3] += rng.uniform(-0.06, 0.06, 3) * n
    return m


def distortion_matrix(distortion: str, magnitude: float, shape, *, index: int = 0) -> np.ndarray:
    """The true ``moving_from_reference`` of an affine distortion.

    Parameters
    ----------
    distortion : {"translation", "rotation", "scale", "shear"}
    magnitude : float
        In the units of :data:`MAGNITUDE_UNITS`.
    shape : tuple of 3 int
        Grid; transforms are about its centre.
    index : int
        Picks the oblique rotation axis (varied from one magnitude to the next).

    Returns
    -------
    (4, 4) ndarray of float64
    """
    c = tf.grid_center(shape)
    if distortion == "translation":
        m = np.eye(4)
        m[:3, 3] = _SHIFT_DIRECTION / np.linalg.norm(_SHIFT_DIRECTION) * float(magnitude) * min(shape)
        return m
    if distortion == "rotation":
        return tf.rotation_matrix(float(magnitude), _ROTATION_AXES[index % len(_ROTATION_AXES)], c)
    if distortion == "scale":
        if magnitude <= 0:
            raise ParameterError(f"scale magnitude must be > 0, got {magnitude}")
        return tf.scale_matrix(float(magnitude), c)
    if distortion == "shear":
        a = np.eye(3)
        a[2, 0] = float(magnitude)
        a[1, 2] = float(magnitude) / 2
        m = np.eye(4)
        m[:3, :3] = a
        m[:3, 3] = c - a @ c
        return m
    raise ParameterError(f"distortion must be one of {AFFINE_DISTORTIONS} for a matrix, got {distortion!r}")


def distorted_phantom(distortion: str, magnitude: float, shape, points, *, index: int = 0, seed: int = 0,
                      edge_width: float = 1.0):
    """The two-particle phantom moved by a known distortion, with the truth at ``points``.

    Parameters
    ----------
    distortion : {"translation", "rotation", "scale", "shear", "deformation"}
        An affine distortion (:func:`distortion_matrix`) or ``"deformation"``: a
        :class:`~gpureg.synth.SmoothWarp` of about one period over the grid whose largest
        displacement is ``magnitude * min(shape)`` voxels (same field for every magnitude of a seed).
    magnitude : float
        In the units of :func:`distortion_matrix`, or the fraction of the grid size for ``"deformation"``.
    shape : tuple of 3 int
    points : (N, 3) ndarray
        Reference voxels ``(z, y, x)`` where the truth is wanted.
    index, seed, edge_width
        Rotation axis (:func:`distortion_matrix`), phantom and warp seed, phantom edge width.

    Returns
    -------
    moving : (Z, Y, X) ndarray of float32
        Noise-free moving volume.
    true_points : (N, 3) ndarray
        Where ``points`` lie in ``moving``.
    best_affine : (4, 4) ndarray
        The least-squares affine closest to the truth at ``points`` (the truth itself when affine).
    """
    from .deform import SmoothWarp
    from .phantom import two_particle_phantom

    points = np.asarray(points, dtype=np.float64)
    if distortion == "deformation":
        truth = SmoothWarp(shape, magnitude * min(shape), seed=seed, periods=1.0)
        true_points = truth.moving_from_reference(points)
        return (two_particle_phantom(shape, truth, seed=seed, edge_width=edge_width), true_points,
                truth.best_affine(points))
    m = distortion_matrix(distortion, magnitude, shape, index=index)
    moving = two_particle_phantom(shape, m, seed=seed, edge_width=edge_width)
    return moving, points @ m[:3, :3].T + m[:3, 3], m
