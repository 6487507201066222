"""The cases of the validation sweep: known distortions of the two-particle phantom, noise, summaries.

Distortions (``magnitude`` units)
---------------------------------
- ``translation``: shift along a fixed oblique direction, fraction of the grid size.
- ``rotation``: degrees about an oblique axis through the grid centre (the axis
  changes from one magnitude to the next).
- ``scale``: isotropic factor about the grid centre.
- ``shear``: ``gamma`` of the shear ``x += gamma z``, ``y += gamma / 2 x`` about the centre.
- ``deformation``: smooth non-affine warp (:class:`gpureg.synth.SmoothWarp`: three sinusoidal modes of
  about one period over the grid), largest displacement as a fraction of the grid size.

Noise: salt-and-pepper of fraction ``f`` sets ``f / 2`` of the voxels to the volume's
minimum and ``f / 2`` to its maximum (:func:`gpureg.synth.salt_and_pepper`).

The distorted volumes themselves are made in :mod:`gpureg.synth.distort` (synthetic data lives in ``synth``).
"""

from __future__ import annotations

import math

import numpy as np

from ..synth.distort import AFFINE_DISTORTIONS

__all__ = ["DEFAULT_MAGNITUDES", "DISTORTIONS", "distances", "MAGNITUDE_UNITS", "MODES", "NOISE_LEVELS", "QUICK", "summarize"]

DISTORTIONS = (*AFFINE_DISTORTIONS, "deformation")


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
