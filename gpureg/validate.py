"""Validation suite: known synthetic distortions of a two-particle tomogram, with noise.

Reproduces the synthetic tests of the reference study (its Fig. S1-S3) on the
analytic two-particle phantom (:func:`gpureg.two_particle_phantom`): every
distortion of growing magnitude is crossed with salt-and-pepper noise levels
and registered binarized and raw, by gpureg and, when SimpleITK is installed
(the ``bench`` extra), by SimpleITK's affine mean-squares registration on the
very same arrays.

Distortions (``magnitude`` units)
---------------------------------
- ``translation``: shift along a fixed oblique direction, fraction of the grid size.
- ``rotation``: degrees about an oblique axis through the grid centre (the axis
  changes from one magnitude to the next).
- ``scale``: isotropic factor about the grid centre.
- ``shear``: ``gamma`` of the shear ``x += gamma z``, ``y += gamma / 2 x`` about the centre.
- ``deformation``: smooth non-affine warp (two sinusoidal modes of one period
  over the grid), largest displacement as a fraction of the grid size.

Ground truth
------------
Affine cases sample the analytic phantom through the true transform (no
interpolation error); the error is the mean distance (voxels) between where
the estimated and the true ``moving_from_reference`` send the particle voxels
(:func:`gpureg.displacement_error`). The deformed volume is the reference
resampled (cubic) through the warp; its error is the mean distance between
the estimated affine and the true warp over the particle voxels. No affine
matches a warp, so the rows also give ``floor_vox``: the error of the
least-squares affine fit to the warp (the best any affine method can do).

Settings (identical for both methods)
-------------------------------------
Salt-and-pepper noise of fraction ``f`` sets ``f / 2`` of the voxels to the
volume's minimum and ``f / 2`` to its maximum, independently seeded in the
reference and the moving volume. Both volumes are then prepared once by
:func:`gpureg.register.prepare_volume`: a median filter 3 voxels wide on the
noisy cases (``denoise="auto"``, what a user seeing salt-and-pepper noise
would switch on; on clean data the median costs accuracy: 0.13-0.17 instead
of 0.03-0.09 voxel binarized at 64^3), in ``binarized`` mode Otsu
binarization (each volume its own threshold, as in :func:`gpureg.register_affine`),
then a Gaussian of sigma ``smooth`` = 1 voxel (gpureg's default, grey and binary):
exactly what ``register_affine(..., binarize=..., denoise=...)`` registers.
gpureg (:func:`gpureg.register.register_prepared`, the registration of
:func:`gpureg.register_affine` without its preparation) and SimpleITK
(:func:`gpureg.sitk_reference.register_sitk`) register those same prepared
arrays; their times exclude the common preparation (``prep_seconds``).
The MSE columns are computed by one function (:func:`gpureg.metric.mse_terms`)
for both methods: on the registration inputs (``mse_before``/``mse_after``) and
on the noise-free grey volumes (``mse_clean_before``/``mse_clean_after``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import transform as tf
from .backend import resolve_device, to_host

__all__ = [
    "DEFAULT_MAGNITUDES",
    "DISTORTIONS",
    "MAGNITUDE_UNITS",
    "MODES",
    "NOISE_LEVELS",
    "QUICK",
    "SmoothDeformation",
    "ValidationResult",
    "distortion_matrix",
    "run_validation",
    "salt_and_pepper",
    "summarize",
]

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

_log = logging.getLogger("gpureg")

# Oblique directions (z, y, x) for the translation and the rotation axes.
_SHIFT_DIRECTION = np.array([0.5, -0.7, 0.5])
_ROTATION_AXES = ((1.0, 1.0, 0.0), (0.3, 1.0, 0.8), (1.0, -0.5, 0.7), (0.2, 0.6, -1.0))

_CSV_FIELDS = ("distortion", "magnitude", "noise", "mode", "filter", "method", "device", "size", "error_vox",
               "error_max_vox", "floor_vox", "mse_before", "mse_after", "mse_clean_before", "mse_clean_after",
               "seconds", "prep_seconds", "iterations", "status")


@dataclass
class ValidationResult:
    """Outcome of :func:`run_validation`.

    Attributes
    ----------
    rows : list of dict
        One row per case and method, with the keys of ``validation.csv``:
        ``distortion, magnitude, noise, mode, filter, method, device, size, error_vox,
        error_max_vox, floor_vox, mse_before, mse_after, mse_clean_before,
        mse_clean_after, seconds, prep_seconds, iterations, status`` (``"ok"``
        or ``"error: ..."``).
    settings : dict
        The sweep's parameters and environment (versions, device, threads).
    files : list of Path
        Everything written (empty without ``outdir``).
    """

    rows: list
    settings: dict
    files: list = field(default_factory=list)

    def select(self, **where) -> list:
        """Rows whose keys equal the given values, e.g. ``select(method="gpureg", noise=0.1)``."""
        return [r for r in self.rows if all(_same(r.get(k), v) for k, v in where.items())]

    @property
    def failures(self) -> list:
        """Rows whose registration raised."""
        return [r for r in self.rows if r["status"] != "ok"]


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


def run_validation(outdir=None, *, size: int = 64, device: str = "auto", distortions=DISTORTIONS,
                   magnitudes=None, noise=NOISE_LEVELS, modes=MODES, sitk: bool | None = None,
                   denoise: str | None = "auto", smooth: float = 1.0, edge_width: float = 1.0, seed: int = 0,
                   figures: bool = True, progress=None) -> ValidationResult:
    """Run the validation sweep and (with ``outdir``) write its table, summary and figures.

    Parameters
    ----------
    outdir : str or Path, optional
        Folder for ``validation.csv`` (written row by row as cases finish),
        ``validation.json``, ``summary.md`` and the PNG figures; created if
        missing. None: compute only.
    size : int
        Edge of the cubic grid (>= 24).
    device : {"auto", "cpu", "gpu"}
        Where gpureg registers (SimpleITK always runs on the CPU).
    distortions : sequence of str
        Subset of :data:`DISTORTIONS`.
    magnitudes : dict {distortion: sequence of float}, optional
        Overrides :data:`DEFAULT_MAGNITUDES` per distortion.
    noise : sequence of float
        Salt-and-pepper fractions in ``[0, 1)`` (0.1 = 10 %).
    modes : sequence of {"binarized", "raw"}
        Register Otsu-binarized volumes, raw grey values, or both.
    sitk : bool, optional
        Also run SimpleITK; None: when it is installed. True without
        SimpleITK is an error.
    denoise : {"auto", "median", None, "gaussian"}
        Filter applied to both volumes before registering (both methods);
        ``"auto"``: median on the noisy cases, none at noise 0.
    smooth : float
        Gaussian sigma (voxels) applied to both prepared volumes (after
        binarization), as ``register_affine(smooth=...)``; 0 = off.
    edge_width : float
        Soft edge of the phantom particles in voxels (1 voxel: a sharp but
        realistic tomographic edge).
    seed : int
        Phantom, noise and deformation seed.
    figures : bool
        Write the figures (needs ``outdir``).
    progress : callable, optional
        Called as ``progress(done, total, rows)`` after each case with that
        case's rows (one per method).

    Returns
    -------
    ValidationResult
    """
    from . import __version__, two_particle_phantom
    from .metric import mse_terms
    from .register import prepare_volume, register_prepared
    from .segment import DENOISE
    from .sitk_reference import register_sitk, sitk_available

    size = int(size)
    if size < 24:
        raise ValueError(f"validation size must be >= 24 voxels, got {size}")
    distortions = tuple(distortions)
    bad = [d for d in distortions if d not in DISTORTIONS]
    if bad or not distortions:
        raise ValueError(f"distortions must be a non-empty subset of {DISTORTIONS}, got {list(distortions)}")
    mags = {d: tuple(float(x) for x in (magnitudes or {}).get(d, DEFAULT_MAGNITUDES[d])) for d in distortions}
    if magnitudes and set(magnitudes) - set(DISTORTIONS):
        raise ValueError(f"magnitudes has unknown distortions {sorted(set(magnitudes) - set(DISTORTIONS))}; "
                         f"expected keys among {DISTORTIONS}")
    empty = [d for d, v in mags.items() if not v]
    if empty:
        raise ValueError(f"no magnitude given for {empty}")
    noise = tuple(float(x) for x in noise)
    if not noise or any(not 0 <= x < 1 for x in noise):
        raise ValueError(f"noise levels must be fractions in [0, 1) (0.1 = 10 %), got {list(noise)}")
    modes = tuple(modes)
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")
    if not smooth >= 0:
        raise ValueError(f"smooth must be a Gaussian sigma >= 0 voxels, got {smooth}")
    if denoise != "auto" and denoise not in DENOISE:
        raise ValueError(f"denoise must be 'auto' or one of {DENOISE}, got {denoise!r}")
    have_sitk = sitk_available()
    if sitk and not have_sitk:
        raise RuntimeError("SimpleITK is not installed; install the bench extra (pip install 'gpureg[bench]') "
                           "or run without the SimpleITK comparison")
    use_sitk = have_sitk if sitk is None else bool(sitk)
    dev = resolve_device(device)
    out = None
    if outdir is not None:
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)

    shape = (size,) * 3
    fixed_clean, labels = two_particle_phantom(shape, seed=seed, edge_width=edge_width, return_labels=True)
    mask = labels > 0
    points = np.argwhere(mask).astype(np.float64)
    settings = {
        "size": size, "device": dev, "distortions": list(distortions), "magnitudes": {d: list(v) for d, v in mags.items()},
        "magnitude_units": {d: MAGNITUDE_UNITS[d] for d in distortions}, "noise": list(noise), "modes": list(modes),
        "denoise": denoise, "smooth_sigma": smooth, "edge_width": edge_width, "seed": seed,
        "simpleitk": use_sitk, "gpureg_version": __version__, **_environment(dev, use_sitk),
    }
    if dev == "gpu":  # compile kernels and warm the memory pool outside the timings
        warm = prepare_volume(fixed_clean, dev, binarize=True)
        register_prepared(warm, warm, max_iter=2)

    writer = _CsvRows(out / "validation.csv") if out is not None else None
    rows, examples = [], {}
    total = sum(len(v) for v in mags.values()) * len(noise) * len(modes)
    done = 0
    fixed_noisy = {k: salt_and_pepper(fixed_clean, x, seed=seed * 7919 + 2 * k + 1) for k, x in enumerate(noise)}
    for di, dist in enumerate(distortions):
        for mi, mag in enumerate(mags[dist]):
            moving_clean, true_points, floor = _moving_case(dist, mag, mi, fixed_clean, points, seed=seed,
                                                            edge_width=edge_width)
            mse_clean_before = mse_terms(fixed_clean, moving_clean, np.eye(4), hessian=False).mse
            for ni, level in enumerate(noise):
                moving_noisy = salt_and_pepper(moving_clean, level, seed=seed * 7919 + 1000 * (di + 1) + 10 * mi + 2 * ni)
                filt = ("median" if level > 0 else None) if denoise == "auto" else denoise
                for mode in modes:
                    t0 = time.perf_counter()
                    prep_kw = dict(binarize=mode == "binarized", denoise=filt, smooth=smooth)
                    a = prepare_volume(fixed_noisy[ni], dev, name="fixed", **prep_kw)
                    b = prepare_volume(moving_noisy, dev, name="moving", **prep_kw)
                    prep = time.perf_counter() - t0
                    mse_before = mse_terms(a, b, np.eye(4), hessian=False).mse
                    case = {"distortion": dist, "magnitude": mag, "noise": level, "mode": mode, "filter": filt or "none",
                            "size": size, "floor_vox": floor, "mse_before": mse_before, "mse_clean_before": mse_clean_before,
                            "prep_seconds": prep}
                    methods = [("gpureg", dev, lambda a=a, b=b: _run_gpureg(register_prepared, a, b))]
                    if use_sitk:
                        methods.append(("SimpleITK", "cpu", lambda a=a, b=b: _run_sitk(register_sitk, a, b)))
                    case_rows = []
                    for method, where, fn in methods:
                        row, matrix = _evaluate(fn, {**case, "method": method, "device": where}, points, true_points,
                                                (a, b), (fixed_clean, moving_clean))
                        if matrix is not None:
                            examples.setdefault((dist, method), {})[(mag, level, mode)] = matrix
                        case_rows.append(row)
                        if writer is not None:
                            writer.write(row)
                    rows.extend(case_rows)
                    done += 1
                    _log.info("validation %d/%d: %s", done, total, "; ".join(_short(r) for r in case_rows))
                    if progress is not None:
                        progress(done, total, case_rows)
            if figures and out is not None and mi == len(mags[dist]) - 1:
                examples.setdefault("_clean", {})[dist] = moving_clean  # for the Canny overlays
    result = ValidationResult(rows=rows, settings=settings)
    if writer is not None:
        result.files.append(writer.path)
    if out is not None:
        result.files.extend(_write_reports(result, out))
        if figures:
            result.files.extend(_write_figures(result, out, fixed_clean, examples))
    return result


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
        if (noise is None or _same(r["noise"], noise)) and (mode is None or r["mode"] == mode) and k not in keys:
            keys.append(k)
    out = []
    for dist, md, nz, method in keys:
        sel = [r for r in rows if (r["distortion"], r["mode"], r["method"]) == (dist, md, method) and _same(r["noise"], nz)]
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


# --------------------------------------------------------------------------- helpers

def _moving_case(dist, mag, index, fixed_clean, points, *, seed, edge_width):
    """Noise-free moving volume, true moving positions of ``points`` and the best-affine floor."""
    from .phantom import two_particle_phantom

    shape = fixed_clean.shape
    if dist == "deformation":
        warp = SmoothDeformation(shape, mag * min(shape), seed=seed)  # same field, growing amplitude
        true_points = warp.moving_from_reference(points)
        floor = float(_distances(warp.best_affine(points), points, true_points).mean())
        return warp.warp(fixed_clean), true_points, floor
    truth = distortion_matrix(dist, mag, shape, index=index)
    moving = two_particle_phantom(shape, truth, seed=seed, edge_width=edge_width)
    return moving, points @ truth[:3, :3].T + truth[:3, 3], 0.0


def _evaluate(fn, row, points, true_points, inputs, clean):
    """Run one registration ``fn() -> (matrix, seconds, iterations)``; fill ``row``; return (row, matrix or None)."""
    from .metric import mse_terms

    try:
        matrix, seconds, iterations = fn()
    except Exception as exc:  # one failing case must not end the sweep; it is reported
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"validation case {row['distortion']} {row['magnitude']:g} noise {row['noise']:g} {row['mode']} "
                      f"{row['method']} failed: {msg}", RuntimeWarning, stacklevel=3)
        row.update(error_vox=math.nan, error_max_vox=math.nan, mse_after=math.nan, mse_clean_after=math.nan,
                   seconds=math.nan, iterations="", status=f"error: {msg}")
        return row, None
    d = _distances(matrix, points, true_points)
    row.update(error_vox=float(d.mean()), error_max_vox=float(d.max()),
               mse_after=mse_terms(*inputs, matrix, hessian=False).mse,
               mse_clean_after=mse_terms(*clean, matrix, hessian=False).mse,
               seconds=seconds, iterations=iterations, status="ok")
    return row, matrix


def _distances(matrix, points, true_points):
    """Distance (voxels) from ``matrix @ points`` to ``true_points``, both (N, 3)."""
    d = points @ matrix[:3, :3].T + matrix[:3, 3] - true_points
    return np.sqrt((d * d).sum(axis=1))


def _run_gpureg(register_prepared, a, b):
    res = register_prepared(a, b)
    return res.matrix, res.seconds, "/".join(str(n) for n in res.iterations)


def _run_sitk(register_sitk, a, b):
    matrix, seconds = register_sitk(to_host(a), to_host(b))
    return matrix, seconds, ""


def _environment(dev, use_sitk):
    import os
    import platform

    env = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if dev == "gpu":
        from .backend import gpu_name

        env["gpu"] = gpu_name()
    if use_sitk:
        import SimpleITK as sitk

        env["simpleitk_version"] = sitk.Version_VersionString()
        env["simpleitk_threads"] = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    return env


class _CsvRows:
    """``validation.csv`` written row by row, so a long sweep leaves its finished cases behind."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "w", newline="") as fh:
            csv.writer(fh).writerow(_CSV_FIELDS)

    def write(self, row):
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([_fmt(row.get(k, "")) for k in _CSV_FIELDS])


def _fmt(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return v


def _same(a, b):
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) < 1e-9
        except (TypeError, ValueError):
            return False
    return a == b


def _short(r):
    return f"{r['method']} {r['distortion']} {r['magnitude']:g} noise {r['noise']:g} {r['mode']}: " + (
        f"{r['error_vox']:.3f} vox {r['seconds']:.2f} s" if r["status"] == "ok" else r["status"])


def _write_reports(result, out):
    from .io import atomic_path

    files = []
    path = out / "validation.json"
    doc = {"benchmark": "validation", "settings": result.settings, "summary": summarize(result.rows),
           "rows": result.rows}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    files.append(path)
    path = out / "summary.md"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(_markdown(result))
    files.append(path)
    return files


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _markdown(result):
    s = result.settings
    methods = sorted({r["method"] for r in result.rows}, key=lambda m: m != "gpureg")
    lines = [
        "# gpureg validation: synthetic distortions of a two-particle phantom",
        "",
        f"Grid {s['size']}^3; gpureg on {s['device']}"
        + (f" ({s.get('gpu')})" if s.get("gpu") else f" ({s['cpu']}, {s['cpu_count']} cores)")
        + (f"; SimpleITK {s.get('simpleitk_version', '')} on the CPU with {s.get('simpleitk_threads')} threads"
           if s["simpleitk"] else "; SimpleITK not run") + f"; gpureg {s['gpureg_version']}.",
        "",
        "Every case: salt-and-pepper noise, then both volumes filtered ("
        + ("3-voxel median on the noisy cases, none at 0 %" if s["denoise"] == "auto" else str(s["denoise"] or "no filter"))
        + "), in `binarized` mode Otsu-binarized, then smoothed (Gaussian sigma "
        + f"{s['smooth_sigma']:g} voxel, gpureg's default, both modes); gpureg and SimpleITK register those "
        "same arrays (times exclude this common preparation). Error: mean distance (voxels) between the "
        "estimated and the true transform over the particle voxels; for the non-affine deformation, to the "
        "true warp (`floor` = error of the best least-squares affine, the lower bound of any affine method).",
        "",
        "Magnitudes: " + "; ".join(f"{d} {', '.join(f'{m:g}' for m in v)} ({s['magnitude_units'][d]})"
                                   for d, v in s["magnitudes"].items()) + ".",
        "",
    ]
    failures = result.failures
    lines += [f"Cases: {len({(r['distortion'], r['magnitude'], r['noise'], r['mode']) for r in result.rows})}, "
              f"registrations: {len(result.rows)}, failed: {len(failures)}.", ""]
    headline = [x for x in (0.10, 0.30) if any(_same(x, n) for n in s["noise"])] or [max(s["noise"])]
    for level in headline:
        lines += _table(result.rows, methods, noise=level, title=f"Noise {100 * level:g} %")
    lines += ["## Mean error (voxels) over the magnitudes, every noise level", ""]
    header = "| distortion | mode | method | " + " | ".join(f"{100 * n:g} %" for n in s["noise"]) + " |"
    lines += [header, "|" + "---|" * (3 + len(s["noise"]))]
    summ = summarize(result.rows)
    for dist in s["distortions"]:
        for mode in s["modes"]:
            for method in methods:
                cells = []
                for n in s["noise"]:
                    hit = [x for x in summ if (x["distortion"], x["mode"], x["method"]) == (dist, mode, method)
                           and _same(x["noise"], n)]
                    cells.append(f"{hit[0]['error_mean_vox']:.3f}" if hit else "")
                lines.append(f"| {dist} | {mode} | {method} | " + " | ".join(cells) + " |")
    lines.append("")
    if failures:
        lines += ["## Failed registrations", ""] + [f"- {_short(r)}" for r in failures] + [""]
    lines += ["Full table: `validation.csv` / `validation.json`. Figures: `error_vs_magnitude_<mode>.png`, "
              "`time_<mode>.png`, `examples/*.png` (Canny edges of the central slice before/after).", ""]
    return "\n".join(lines)


def _table(rows, methods, *, noise, title):
    summ = summarize(rows, noise=noise)
    lines = [f"## {title}: error (voxels, mean / worst over magnitudes) and median time (s)", ""]
    head = "| distortion | mode | " + " | ".join(f"{m} error | {m} time" for m in methods)
    if "SimpleITK" in methods and "gpureg" in methods:
        head += " | time ratio SimpleITK/gpureg"
    lines += [head + " | affine floor |", "|" + "---|" * (2 + 2 * len(methods) + ("SimpleITK" in methods) + 1)]
    for dist, mode in dict.fromkeys((x["distortion"], x["mode"]) for x in summ):
        by = {x["method"]: x for x in summ if (x["distortion"], x["mode"]) == (dist, mode)}
        cells = []
        for m in methods:
            x = by.get(m)
            fail = f" ({x['failed']} failed)" if x and x["failed"] else ""
            cells += [f"{x['error_mean_vox']:.3f} / {x['error_worst_vox']:.3f}{fail}" if x else "",
                      f"{x['median_seconds']:.2f}" if x else ""]
        if "SimpleITK" in methods and "gpureg" in methods:
            g, r = by.get("gpureg"), by.get("SimpleITK")
            cells.append(f"{r['median_seconds'] / g['median_seconds']:.2f}" if g and r and g["median_seconds"] > 0 else "")
        x = next(iter(by.values()))
        lines.append(f"| {dist} | {mode} | " + " | ".join(cells)
                     + f" | {x['floor_mean_vox']:.3f} / {x['floor_worst_vox']:.3f} |")
    return lines + [""]


def _write_figures(result, out, fixed_clean, examples):
    from .plots import canny_overlay

    s = result.settings
    files = []
    for mode in s["modes"]:
        files.append(_error_figure(result.rows, s, mode, out / f"error_vs_magnitude_{mode}.png"))
        files.append(_time_figure(result.rows, s, mode, out / f"time_{mode}.png"))
    ex = out / "examples"
    ex.mkdir(exist_ok=True)
    # Canny overlays of the central z slice (noise-free grey volumes, for legibility), largest magnitude,
    # with the matrices estimated at the noise level closest to 10 % in the first mode.
    level = min(s["noise"], key=lambda n: abs(n - 0.10))
    mode = s["modes"][0]
    zc = fixed_clean.shape[0] // 2
    for dist in s["distortions"]:
        mag = s["magnitudes"][dist][-1]
        moving_clean = examples["_clean"][dist]
        files.append(canny_overlay(fixed_clean[zc], moving_clean[zc], ex / f"{dist}_before.png",
                                   title=f"{dist} {mag:g}: before registration"))
        for method in ("gpureg", "SimpleITK"):
            mats = examples.get((dist, method), {})
            matrix = mats.get((mag, level, mode))
            if matrix is None:
                continue
            aligned = tf.apply_affine(moving_clean, matrix, device="cpu")
            row = [r for r in result.rows if (r["distortion"], r["method"], r["mode"]) == (dist, method, mode)
                   and _same(r["magnitude"], mag) and _same(r["noise"], level)]
            err = f", error {row[0]['error_vox']:.2f} vox" if row and row[0]["status"] == "ok" else ""
            files.append(canny_overlay(fixed_clean[zc], aligned[zc], ex / f"{dist}_after_{method.lower()}.png",
                                       title=f"{dist} {mag:g}, {method} ({mode}, {100 * level:g} % noise{err})"))
    return files


def _figure(ncols, figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(1, ncols, squeeze=False)[0])


def _save(fig, path):
    from .io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(path)


def _error_figure(rows, s, mode, path):
    dists = s["distortions"]
    fig, axes = _figure(len(dists), (3.2 * len(dists), 3.4))
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    styles = {"gpureg": dict(ls="-", marker="o"), "SimpleITK": dict(ls="--", marker="s", mfc="none")}
    for ax, dist in zip(axes, dists):
        mags = s["magnitudes"][dist]
        for k, level in enumerate(s["noise"]):
            color = cmap(k / max(1, len(s["noise"]) - 1) * 0.9)
            for method, style in styles.items():
                sel = {r["magnitude"]: r for r in rows if (r["distortion"], r["mode"], r["method"]) == (dist, mode, method)
                       and _same(r["noise"], level) and r["status"] == "ok"}
                if not sel:
                    continue
                x = [m for m in mags if m in sel]
                ax.plot(x, [sel[m]["error_vox"] for m in x], color=color, ms=4, lw=1.2,
                        label=f"{method} {100 * level:g} %", **style)
        if dist == "deformation":
            fl = {r["magnitude"]: r["floor_vox"] for r in rows if r["distortion"] == dist}
            ax.plot(mags, [fl.get(m, math.nan) for m in mags], color="k", ls=":", lw=1.5, label="best affine")
        ax.set_yscale("log")
        ax.set_title(dist)
        ax.set_xlabel(s["magnitude_units"][dist])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mean displacement error (voxel)")
    handles, labels = axes[-1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, fontsize=6, loc="best")
    fig.suptitle(f"{mode} registration, {s['size']}^3: solid gpureg, dashed SimpleITK; colour = salt-and-pepper noise")
    return _save(fig, path)


def _time_figure(rows, s, mode, path):
    fig, axes = _figure(1, (6.4, 3.6))
    ax = axes[0]
    dists = s["distortions"]
    methods = [m for m in ("gpureg", "SimpleITK") if any(r["method"] == m for r in rows)]
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        med = []
        for dist in dists:
            t = [r["seconds"] for r in rows if (r["distortion"], r["mode"], r["method"]) == (dist, mode, method)
                 and r["status"] == "ok"]
            med.append(float(np.median(t)) if t else math.nan)
        ax.bar(np.arange(len(dists)) + (k - (len(methods) - 1) / 2) * width, med, width, label=method)
    ax.set_xticks(np.arange(len(dists)), dists)
    ax.set_ylabel("median registration time (s)")
    ax.set_title(f"{mode}, {s['size']}^3, all noise levels; gpureg on {s['device']}")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)
