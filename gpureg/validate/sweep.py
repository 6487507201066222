"""Validation suite: known synthetic distortions of a two-particle tomogram, with noise.

Reproduces the synthetic tests of the reference study (its Fig. S1-S3) on the
analytic two-particle phantom (:func:`gpureg.two_particle_phantom`): every
distortion of growing magnitude is crossed with salt-and-pepper noise levels
and registered binarized and raw, by gpureg and, when SimpleITK is installed
(the ``bench`` extra), by SimpleITK's affine mean-squares registration on the
very same arrays.

The distortions, noise and ground-truth moving volumes are built by
:mod:`gpureg.validate.cases`; the CSV, JSON, Markdown and figures are
written by :mod:`gpureg.validate.report`.

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
:func:`gpureg.register.prepare_volume`: on the noisy cases the saturated
voxels are replaced (``denoise="auto"`` = ``"impulse"``,
:func:`gpureg.core.segment.remove_impulses`; until issue 13 a 3x3x3 median,
which erodes the particles more in the noisier volume and biased every
binarized row by 0.05-0.15 voxel), in ``binarized`` mode Otsu binarization
with gpureg's default partial-volume ramp of 3 voxels (each volume its own
threshold, as in :func:`gpureg.register_affine`), then a Gaussian of sigma ``smooth`` = 1 voxel (gpureg's default, grey and binary):
exactly what ``register_affine(..., prep=Prep(binarize=..., denoise=...))`` registers.
gpureg (:func:`gpureg.register.register_prepared`, the registration of
:func:`gpureg.register_affine` without its preparation), SimpleITK
(:func:`gpureg.validate.sitk.register_sitk`) and, when asked, elastix
(:func:`gpureg.validate.elastix.register_elastix`) register those same prepared
arrays; their times exclude the common preparation (``prep_seconds``).
The MSE columns are computed by one function (:func:`gpureg.core.metric.mse_terms`)
for both methods: on the registration inputs (``mse_before``/``mse_after``) and
on the noise-free grey volumes (``mse_clean_before``/``mse_clean_after``).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.backend import resolve_device, to_host
from ..core.errors import DependencyError, ParameterError
from ..synth.distort import distorted_phantom, salt_and_pepper
from .cases import (
    DEFAULT_MAGNITUDES,
    DISTORTIONS,
    MAGNITUDE_UNITS,
    MODES,
    NOISE_LEVELS,
    distances,
    same_value,
)
from .report import CsvRows, short_row, write_figures, write_reports

__all__ = ["run_validation", "ValidationResult"]

_log = logging.getLogger("gpureg")


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
        return [r for r in self.rows if all(same_value(r.get(k), v) for k, v in where.items())]

    @property
    def failures(self) -> list:
        """Rows whose registration raised."""
        return [r for r in self.rows if r["status"] != "ok"]


def run_validation(outdir=None, *, size: int = 64, device: str = "auto", distortions=DISTORTIONS,
                   magnitudes=None, noise=NOISE_LEVELS, modes=MODES, sitk: bool | None = None,
                   elastix: bool | None = False,
                   denoise: str | None = "auto", smooth: float = 1.0, edge_width: float = 1.0, seed: int = 0,
                   figures: bool = True, deformable: bool = False, progress=None) -> ValidationResult:
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
    elastix : bool, optional
        Also run elastix (:func:`gpureg.validate.elastix.register_elastix`:
        mean squares on 2048 random samples per iteration) on the same
        prepared arrays; None: when itk-elastix is installed; default False.
    denoise : {"auto", "impulse", "median", None, "gaussian"}
        Filter applied to both volumes before registering (both methods);
        ``"auto"``: ``"impulse"`` on the noisy cases, none at noise 0.
    smooth : float
        Gaussian sigma (voxels) applied to both prepared volumes (after
        binarization), as ``Prep(smooth=...)``; 0 = off.
    edge_width : float
        Soft edge of the phantom particles in voxels (1 voxel: a sharp but
        realistic tomographic edge).
    seed : int
        Phantom, noise and deformation seed.
    deformable : bool
        Also register the ``deformation`` cases with gpureg's B-spline
        refinement (:func:`gpureg.register_deformable`; method ``"gpureg deformable"``,
        errors from its displacement field at the particle voxels).
    figures : bool
        Write the figures (needs ``outdir``).
    progress : callable, optional
        Called as ``progress(done, total, rows)`` after each case with that
        case's rows (one per method).

    Returns
    -------
    ValidationResult
    """
    from ..core.metric import mse_terms
    from ..core.segment import DENOISE
    from ..core.version import __version__
    from ..register.affine import register_prepared
    from ..register.prepare import Prep, prepare_volume
    from ..synth.phantom import two_particle_phantom
    from .sitk import register_sitk, sitk_available

    size = int(size)
    if size < 24:
        raise ParameterError(f"validation size must be >= 24 voxels, got {size}")
    distortions = tuple(distortions)
    bad = [d for d in distortions if d not in DISTORTIONS]
    if bad or not distortions:
        raise ParameterError(f"distortions must be a non-empty subset of {DISTORTIONS}, got {list(distortions)}")
    mags = {d: tuple(float(x) for x in (magnitudes or {}).get(d, DEFAULT_MAGNITUDES[d])) for d in distortions}
    if magnitudes and set(magnitudes) - set(DISTORTIONS):
        raise ParameterError(f"magnitudes has unknown distortions {sorted(set(magnitudes) - set(DISTORTIONS))}; "
                         f"expected keys among {DISTORTIONS}")
    empty = [d for d, v in mags.items() if not v]
    if empty:
        raise ParameterError(f"no magnitude given for {empty}")
    noise = tuple(float(x) for x in noise)
    if not noise or any(not 0 <= x < 1 for x in noise):
        raise ParameterError(f"noise levels must be fractions in [0, 1) (0.1 = 10 %), got {list(noise)}")
    modes = tuple(modes)
    if not modes or any(m not in MODES for m in modes):
        raise ParameterError(f"modes must be a non-empty subset of {MODES}, got {list(modes)}")
    if not smooth >= 0:
        raise ParameterError(f"smooth must be a Gaussian sigma >= 0 voxels, got {smooth}")
    if denoise != "auto" and denoise not in DENOISE:
        raise ParameterError(f"denoise must be 'auto' or one of {DENOISE}, got {denoise!r}")
    have_sitk = sitk_available()
    if sitk and not have_sitk:
        raise DependencyError("SimpleITK is not installed; install the bench extra (pip install 'gpureg[bench]') "
                           "or run without the SimpleITK comparison")
    use_sitk = have_sitk if sitk is None else bool(sitk)
    from .elastix import elastix_available, register_elastix

    have_elastix = elastix_available() if elastix is not False else False
    if elastix and not have_elastix:
        raise DependencyError("itk-elastix is not installed; install the bench extra (pip install 'gpureg[bench]') "
                           "or run without the elastix comparison")
    use_elastix = have_elastix if elastix is None else bool(elastix)
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
        "simpleitk": use_sitk, "elastix": use_elastix, "gpureg_version": __version__, **_environment(dev, use_sitk),
    }
    if dev == "gpu":  # compile kernels and warm the memory pool outside the timings
        warm = prepare_volume(fixed_clean, dev, Prep())
        register_prepared(warm, warm, max_iter=2)

    writer = CsvRows(out / "validation.csv") if out is not None else None
    rows, examples = [], {}
    total = sum(len(v) for v in mags.values()) * len(noise) * len(modes)
    done = 0
    fixed_noisy = {k: salt_and_pepper(fixed_clean, x, seed=seed * 7919 + 2 * k + 1) for k, x in enumerate(noise)}
    for di, dist in enumerate(distortions):
        for mi, mag in enumerate(mags[dist]):
            moving_clean, true_points, best = distorted_phantom(dist, mag, shape, points, index=mi, seed=seed,
                                                                edge_width=edge_width)
            floor = float(distances(best, points, true_points).mean())
            mse_clean_before = mse_terms(fixed_clean, moving_clean, np.eye(4), hessian=False).mse
            for ni, level in enumerate(noise):
                moving_noisy = salt_and_pepper(moving_clean, level, seed=seed * 7919 + 1000 * (di + 1) + 10 * mi + 2 * ni)
                filt = ("impulse" if level > 0 else None) if denoise == "auto" else denoise
                for mode in modes:
                    t0 = time.perf_counter()
                    how = Prep(binarize=mode == "binarized", denoise=filt, smooth=smooth)
                    a = prepare_volume(fixed_noisy[ni], dev, how, name="fixed")
                    b = prepare_volume(moving_noisy, dev, how, name="moving")
                    prep = time.perf_counter() - t0
                    mse_before = mse_terms(a, b, np.eye(4), hessian=False).mse
                    case = {"distortion": dist, "magnitude": mag, "noise": level, "mode": mode, "filter": filt or "none",
                            "size": size, "floor_vox": floor, "mse_before": mse_before, "mse_clean_before": mse_clean_before,
                            "prep_seconds": prep}
                    methods = [("gpureg", dev, lambda a=a, b=b: _run_gpureg(register_prepared, a, b))]
                    if use_sitk:
                        methods.append(("SimpleITK", "cpu", lambda a=a, b=b: _run_sitk(register_sitk, a, b)))
                    if deformable and dist == "deformation":
                        methods.append(("gpureg deformable", dev, lambda a=a, b=b: _run_deformable(a, b)))
                    if use_elastix:
                        methods.append(("elastix", "cpu", lambda a=a, b=b: _run_sitk(register_elastix, a, b)))
                    case_rows = []
                    for method, where, fn in methods:
                        row, matrix = _evaluate(fn, {**case, "method": method, "device": where}, points, true_points,
                                                (a, b), (fixed_clean, moving_clean))
                        if matrix is not None and np.shape(matrix) == (4, 4):
                            examples.setdefault((dist, method), {})[(mag, level, mode)] = matrix
                        case_rows.append(row)
                        if writer is not None:
                            writer.write(row)
                    rows.extend(case_rows)
                    done += 1
                    _log.info("validation %d/%d: %s", done, total, "; ".join(short_row(r) for r in case_rows))
                    if progress is not None:
                        progress(done, total, case_rows)
            if figures and out is not None and mi == len(mags[dist]) - 1:
                examples.setdefault("_clean", {})[dist] = moving_clean  # for the Canny overlays
    result = ValidationResult(rows=rows, settings=settings)
    if writer is not None:
        result.files.append(writer.path)
    if out is not None:
        result.files.extend(write_reports(result, out))
        if figures:
            result.files.extend(write_figures(result, out, fixed_clean, examples))
    return result


def _evaluate(fn, row, points, true_points, inputs, clean):
    """Run one registration ``fn() -> (matrix, seconds, iterations)``; fill ``row``; return (row, matrix or None)."""
    from ..core.metric import mse_terms

    try:
        matrix, seconds, iterations = fn()
    except Exception as exc:  # one failing case must not end the sweep; it is reported
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"validation case {row['distortion']} {row['magnitude']:g} noise {row['noise']:g} {row['mode']} "
                      f"{row['method']} failed: {msg}", RuntimeWarning, stacklevel=3)
        row.update(error_vox=math.nan, error_max_vox=math.nan, mse_after=math.nan, mse_clean_after=math.nan,
                   seconds=math.nan, iterations="", status=f"error: {msg}")
        return row, None
    if np.ndim(matrix) == 4:  # a deformation: the displacement field (3, Z, Y, X) on the reference grid
        from ..register.deformable import deformation_mse

        field = to_host(matrix)
        idx = tuple(np.round(points).astype(int).T)
        q = points + np.stack([f[idx] for f in field], axis=1)
        d = np.sqrt(((q - true_points) ** 2).sum(axis=1))
        mse_after, mse_clean = (deformation_mse(*(to_host(v) for v in pair), field) for pair in (inputs, clean))
    else:
        d = distances(matrix, points, true_points)
        mse_after, mse_clean = (mse_terms(*pair, matrix, hessian=False).mse for pair in (inputs, clean))
    row.update(error_vox=float(d.mean()), error_max_vox=float(d.max()), mse_after=mse_after, mse_clean_after=mse_clean,
               seconds=seconds, iterations=iterations, status="ok")
    return row, matrix


def _run_gpureg(register_prepared, a, b):
    res = register_prepared(a, b)
    return res.matrix, res.seconds, "/".join(str(n) for n in res.iterations)


def _run_deformable(a, b):
    from ..register.deformable import register_deformable_prepared

    res = register_deformable_prepared(a, b)
    return res.displacement, res.seconds, "/".join(str(n) for n in res.iterations)


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
        from ..core.backend import gpu_name

        env["gpu"] = gpu_name()
    if use_sitk:
        import SimpleITK as sitk

        env["simpleitk_version"] = sitk.Version_VersionString()
        env["simpleitk_threads"] = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    return env
