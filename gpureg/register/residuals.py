"""Residuals inside each particle after a registration, and the relative-motion warning.

See :mod:`gpureg.register.particles` for the method.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..core.backend import array_device, to_device

__all__ = ["RelativeMotionWarning", "ResidualReport"]


class RelativeMotionWarning(UserWarning):
    """After a global registration the particles do not all sit where it puts them."""


@dataclass
class ResidualReport:
    """Per-particle residuals of one global transform.

    Attributes
    ----------
    mse : dict {int: float}
        Label -> MSE over the valid voxels of its metric region.
    count : dict {int: int}
        Label -> number of valid voxels in its metric region.
    moved : dict {int: float}
        Label -> mean distance (voxels) between where the global transform
        and the particle's own transform put its voxels.
    ratio : float
        Largest over smallest MSE among the labels (1.0 with fewer than 2 labels).
    variance : float
        Variance of the prepared reference over all particle regions (the
        scale of the ``floor`` test).
    worst, best : int or None
        Labels with the largest and smallest MSE.
    suspect : bool
        Relative motion is likely (see :func:`detect_relative_motion`).
    """

    mse: dict
    count: dict
    moved: dict = field(default_factory=dict)
    ratio: float = 1.0
    variance: float = 0.0
    worst: int | None = None
    best: int | None = None
    suspect: bool = False


def region_variance(f, regions):
    sel = to_device(regions > 0, array_device(f))
    if not bool(sel.any()):
        return 0.0
    v = f[sel]
    return float(v.var())


def residual_report(mse, count, ratio, variance, floor=0.02, moved=None, shift_tol=0.3) -> ResidualReport:
    finite = {k: v for k, v in mse.items() if np.isfinite(v)}
    rep = ResidualReport(mse=dict(mse), count=dict(count), moved=dict(moved or {}), variance=float(variance))
    if len(finite) > 1:
        rep.worst = max(finite, key=finite.get)
        rep.best = min(finite, key=finite.get)
        hi, lo = finite[rep.worst], finite[rep.best]
        rep.ratio = float(hi / lo) if lo > 0 else (float("inf") if hi > 0 else 1.0)
    rep.suspect = is_suspect(rep, ratio, variance, floor, shift_tol)
    return rep


def is_suspect(rep, ratio, variance, floor, shift_tol):
    by_ratio = rep.worst is not None and rep.ratio > float(ratio) and rep.mse[rep.worst] > float(floor) * variance
    return bool(by_ratio or max(rep.moved.values(), default=0.0) > float(shift_tol))


def warn_relative(report, stacklevel):
    parts = []
    if report.worst is not None:
        parts.append(f"particle {report.worst}'s residual MSE is {report.ratio:.1f}x particle {report.best}'s "
                     f"({report.mse[report.worst]:.3g} vs {report.mse[report.best]:.3g})")
    if report.moved:
        parts.append("the particles' own transforms move them by "
                     + ", ".join(f"{v:.2f} (particle {k})" for k, v in sorted(report.moved.items()))
                     + " voxel on average")
    warnings.warn("after the global registration " + "; ".join(parts) + ": the particles may move relative to each "
                  "other; use per-particle registration (gpureg.register_particles, gpureg run --per-particle)",
                  RelativeMotionWarning, stacklevel=stacklevel + 1)
