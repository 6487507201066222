"""The cases of the validation sweep: known distortions of the two-particle phantom, noise, summaries.

Distortions (``magnitude`` units)
---------------------------------
- ``translation``: shift along a fixed oblique direction, fraction of the grid size.
- ``rotation``: degrees about an oblique axis through the grid centre (the axis
  changes from one magnitude to the next).
- ``scale``: isotropic factor about the grid centre.
- ``shear``: ``gamma`` of the shear ``x += gamma z``, ``y += gamma / 2 x`` about the centre.
- ``deformation``: smooth non-affine warp (two sinusoidal modes of one period
  over the grid), largest displacement as a fraction of the grid size.

Noise: salt-and-pepper of fraction ``f`` sets ``f / 2`` of the voxels to the volume's
minimum and ``f / 2`` to its maximum (:func:`salt_and_pepper`).
"""

from __future__ import annotations

import math

import numpy as np

from ..core import transform as tf
from ..core.backend import to_host

__all__ = ["DEFAULT_MAGNITUDES", "distortion_matrix", "DISTORTIONS", "MAGNITUDE_UNITS", "MODES", "NOISE_LEVELS", "QUICK", "random_affine", "salt_and_pepper", "SmoothDeformation", "summarize"]

DISTORTIONS = ("translation", "rotation", "scale", "shear", "deformation")


NOISE_LEVELS = (0.0, 0.02, 0.05, 0.10, 0.30)


MODES = ("binarized", "raw")


MAGNITUDE_UNITS = {
    "translation": "shift (fraction of size)",
    "rotation": "angle (deg)",
    "scale": "scale factor",
    "shear": "shear gamma",
    "deformation": "max displacement (fraction of size)",
}


# Full sweep: three magnitudes per distortion over the study's ranges (translation
# 0-10 % of the size, rotation 0-15 deg, scale 0.85-1.15 on both sides of 1).
DEFAULT_MAGNITUDES = {
    "translation": (0.025, 0.05, 0.10),
    "rotation": (5.0, 10.0, 15.0),
    "scale": (0.85, 1.07, 1.15),
    "shear": (0.05, 0.10, 0.15),
    "deformation": (0.01, 0.025, 0.05),
}


# ``gpureg validate --quick``: 32^3, the largest magnitude of each distortion, 0 and 10 % noise, binarized.
QUICK = {
    "size": 32,
    "magnitudes": {"translation": (0.10,), "rotation": (15.0,), "scale": (1.15,), "shear": (0.15,),
                   "deformation": (0.05,)},
    "noise": (0.0, 0.10),
    "modes": ("binarized",),
}


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
        raise ValueError(f"salt-and-pepper fraction must be in [0, 1), got {fraction}")
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
            raise ValueError(f"scale magnitude must be > 0, got {magnitude}")
        return tf.scale_matrix(float(magnitude), c)
    if distortion == "shear":
        a = np.eye(3)
        a[2, 0] = float(magnitude)
        a[1, 2] = float(magnitude) / 2
        m = np.eye(4)
        m[:3, :3] = a
        m[:3, 3] = c - a @ c
        return m
    raise ValueError(f"distortion must be one of {DISTORTIONS[:4]} for a matrix, got {distortion!r}")


class SmoothDeformation:
    """Smooth non-affine warp with a known inverse, for the ``deformation`` cases.

    The moving volume is ``moving(q) = fixed(q + w(q))``, where ``w`` is the sum
    of two sinusoidal modes of one period over the grid (random directions and
    phases, seeded), scaled so that ``max |w|`` over the grid equals
    ``amplitude`` voxels. The true map of a reference voxel ``p`` into the moving
    volume is the solution ``q`` of ``q + w(q) = p`` (fixed-point iteration,
    contracting while ``amplitude * 2 pi * 2 / min(shape) < 1``).

    Parameters
    ----------
    shape : tuple of 3 int
        Grid ``(Z, Y, X)``.
    amplitude : float
        Largest displacement in voxels.
    seed : int
        Seed of the modes.
    """

    def __init__(self, shape, amplitude: float, *, seed: int = 0):
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) != 3:
            raise ValueError(f"shape must have 3 axes, got {self.shape}")
        if amplitude < 0:
            raise ValueError(f"deformation amplitude must be >= 0 voxels, got {amplitude}")
        rng = np.random.default_rng(1000 + seed)
        n = np.asarray(self.shape, dtype=np.float64)
        self._waves = rng.normal(size=(2, 3))
        self._waves *= 2 * np.pi / np.linalg.norm(self._waves, axis=1, keepdims=True) / n  # one period per grid
        self._amps = rng.normal(size=(2, 3))
        self._phases = rng.uniform(0, 2 * np.pi, size=(2, 3))
        self._center = tf.grid_center(self.shape)
        self._norm = 1.0
        peak = float(np.linalg.norm(self._raw(self._grid_points(step=max(1, min(self.shape) // 16))), axis=1).max())
        self._norm = float(amplitude) / peak if peak > 0 else 0.0
        self.amplitude = float(amplitude)
        if self.amplitude * 2 * np.pi * 2 / min(self.shape) >= 1:
            raise ValueError(f"deformation amplitude {amplitude} voxels is too large for shape {self.shape} "
                             f"(needs < {min(self.shape) / (4 * np.pi):.3g} voxels to stay invertible)")

    def displacement(self, points) -> np.ndarray:
        """``w(q)`` (voxels) at ``points`` ``(N, 3)``, ``(z, y, x)``."""
        return self._norm * self._raw(np.asarray(points, dtype=np.float64))

    def moving_from_reference(self, points, *, iterations: int = 50) -> np.ndarray:
        """True positions ``q`` in the moving volume of reference points ``p`` ``(N, 3)``."""
        p = np.asarray(points, dtype=np.float64)
        q = p.copy()
        for _ in range(iterations):
            q = p - self.displacement(q)
        return q

    def warp(self, volume) -> np.ndarray:
        """The moving volume ``fixed(q + w(q))`` (cubic interpolation, 0 outside), float32."""
        from scipy import ndimage

        v = np.asarray(to_host(volume), dtype=np.float32)
        if v.shape != self.shape:
            raise ValueError(f"volume shape {v.shape} differs from the deformation's shape {self.shape}")
        q = self._grid_points()
        coords = (q + self.displacement(q)).T.reshape((3,) + self.shape)
        out = ndimage.map_coordinates(v, coords, order=3, mode="constant", cval=0.0)
        return np.clip(out, float(v.min()), float(v.max())).astype(np.float32)

    def best_affine(self, points) -> np.ndarray:
        """Least-squares affine ``moving_from_reference`` fitted to the warp at ``points`` ``(N, 3)``."""
        p = np.asarray(points, dtype=np.float64)
        design = np.c_[p, np.ones(len(p))]
        sol, *_ = np.linalg.lstsq(design, self.moving_from_reference(p), rcond=None)
        m = np.eye(4)
        m[:3, :3] = sol[:3].T
        m[:3, 3] = sol[3]
        return m

    def _raw(self, q):
        arg = (q - self._center) @ self._waves.T  # (N, 2): phase of each mode
        return sum(self._amps[k] * np.sin(arg[:, k:k + 1] + self._phases[k]) for k in range(2))  # (N, 3)

    def _grid_points(self, step: int = 1):
        axes = [np.arange(0, n, step, dtype=np.float64) for n in self.shape]
        return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


# --------------------------------------------------------------------------- helpers

def moving_case(dist, mag, index, fixed_clean, points, *, seed, edge_width):
    """Noise-free moving volume, true moving positions of ``points`` and the best-affine floor."""
    from ..synth.phantom import two_particle_phantom

    shape = fixed_clean.shape
    if dist == "deformation":
        warp = SmoothDeformation(shape, mag * min(shape), seed=seed)  # same field, growing amplitude
        true_points = warp.moving_from_reference(points)
        floor = float(distances(warp.best_affine(points), points, true_points).mean())
        return warp.warp(fixed_clean), true_points, floor
    truth = distortion_matrix(dist, mag, shape, index=index)
    moving = two_particle_phantom(shape, truth, seed=seed, edge_width=edge_width)
    return moving, points @ truth[:3, :3].T + truth[:3, 3], 0.0


def distances(matrix, points, true_points):
    """Distance (voxels) from ``matrix @ points`` to ``true_points``, both (N, 3)."""
    d = points @ matrix[:3, :3].T + matrix[:3, 3] - true_points
    return np.sqrt((d * d).sum(axis=1))


def same_value(a, b):
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) < 1e-9
        except (TypeError, ValueError):
            return False
    return a == b


def summarize(rows, *, noise=None, mode=None) -> list:
    """Per distortion (and mode, noise, method): mean/max error over magnitudes and median time.

    Parameters
    ----------
    rows : list of dict
        :attr:`ValidationResult.rows`.
    noise, mode : optional
        Keep only this noise level / mode.

    Returns
    -------
    list of dict
        Keys ``distortion, mode, noise, method, cases, failed, error_mean_vox,
        error_worst_vox, floor_mean_vox, floor_worst_vox, median_seconds``.
    """
    keys = []
    for r in rows:
        k = (r["distortion"], r["mode"], r["noise"], r["method"])
        if (noise is None or same_value(r["noise"], noise)) and (mode is None or r["mode"] == mode) and k not in keys:
            keys.append(k)
    out = []
    for dist, md, nz, method in keys:
        sel = [r for r in rows if (r["distortion"], r["mode"], r["method"]) == (dist, md, method) and same_value(r["noise"], nz)]
        ok = [r for r in sel if r["status"] == "ok"]
        err = [r["error_vox"] for r in ok]
        out.append({"distortion": dist, "mode": md, "noise": nz, "method": method, "cases": len(sel),
                    "failed": len(sel) - len(ok),
                    "error_mean_vox": float(np.mean(err)) if err else math.nan,
                    "error_worst_vox": float(np.max(err)) if err else math.nan,
                    "floor_mean_vox": float(np.mean([r["floor_vox"] for r in sel])),
                    "floor_worst_vox": float(np.max([r["floor_vox"] for r in sel])),
                    "median_seconds": float(np.median([r["seconds"] for r in ok])) if ok else math.nan})
    return out
