"""Dead, hot and NaN detector pixels and outlier projections, repaired before FBP (the tomography packages' way).

Works on the line integrals of one energy (``-log`` transmission, :func:`~gpureg.recon.normalize`),
``(n_angle, ny, nx)``:

- **invalid pixels**: not finite, or floored by :func:`~gpureg.recon.normalize` (a transmission at
  or below zero: a dead pixel, a zero-count column);
- **outlier pixels** (hot pixels, zingers, dead pixels that still count a little): as TomoPy's
  ``remove_outlier``, a pixel farther than a threshold from the median of its 3 x 3 neighbours in
  the same projection, and also from the median of itself and the same pixel at the two neighbouring
  angles (a real edge moves between angles but stays on a line within a projection, so it passes one
  of the two tests). The threshold is ``max(10 sigma, 0.1)``, ``sigma`` the robust (MAD) spread of
  the angle second differences: noise, not structure;
- **outlier projections**: for parallel beam the sum of a projection's line integrals is the same at
  every angle (the sample's total attenuation); a projection whose sum differs from the median of its
  four nearest angles by more than ``max(10 sigma, 5 %)`` (beam dump, shutter, a frame of another
  scan), or with more than 5 % of its pixels repaired, is replaced by the mean of its two neighbours.

Repaired pixels take the median of their valid 3 x 3 neighbours and of the same pixel at the
neighbouring angles (valid ones only). What was repaired comes back as a :class:`Repair` (recorded
in the result by the pipeline, flagged in the report).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.backend import to_host, xp_of

__all__ = ["Repair", "repair_projections"]

FLOOR_LOG = -np.log(1e-3)  # what normalize() gives a floored (non-positive) transmission
SIGMAS, MIN_STEP = 10.0, 0.1
PROJECTION_SIGMAS, PROJECTION_MIN, PROJECTION_FRACTION = 10.0, 0.05, 0.05


@dataclass
class Repair:
    """What :func:`repair_projections` changed in one energy's projections."""

    invalid: int = 0       # non-finite or non-positive transmissions (dead pixels)
    outliers: int = 0      # pixels far from both their neighbours in the projection and at adjacent angles
    projections: list = field(default_factory=list)  # indices of the projections replaced
    threshold: float = 0.0  # outlier threshold used (line-integral units)

    @property
    def pixels(self) -> int:
        return int(self.invalid + self.outliers)

    def to_dict(self) -> dict:
        return {"invalid_pixels": int(self.invalid), "outlier_pixels": int(self.outliers),
                "projections": [int(k) for k in self.projections], "threshold": float(self.threshold)}


def repair_projections(p, *, floor_log: float = FLOOR_LOG):
    """Repair dead/hot/NaN pixels and outlier projections of one energy (see the module notes).

    Parameters
    ----------
    p : (n_angle, ny, nx) ndarray
        Line integrals (NumPy or CuPy), angles in acquisition order.
    floor_log : float
        The value :func:`~gpureg.recon.normalize` gives a floored transmission.

    Returns
    -------
    (n_angle, ny, nx) ndarray of float32
        A repaired copy (the input itself when nothing needed repair).
    Repair
    """
    xp = xp_of(p)
    p = xp.asarray(p, dtype=xp.float32)
    n = p.shape[0]
    rep = Repair()
    invalid = ~xp.isfinite(p) | (p >= xp.float32(floor_log * (1 - 1e-6)))
    clean = xp.where(invalid, xp.float32(0), p)
    if n >= 3:
        prev, nxt = xp.roll(clean, 1, axis=0), xp.roll(clean, -1, axis=0)
        second = clean - 0.5 * (prev + nxt)  # the angles wrap around: edges of the scan are slightly pessimistic
        spread = 1.4826 * float(xp.median(xp.abs(second[~invalid]))) if bool((~invalid).any()) else 0.0
        rep.threshold = max(SIGMAS * spread / np.sqrt(1.5), MIN_STEP)
        med_angle = clean + prev + nxt - xp.minimum(xp.minimum(clean, prev), nxt) - \
            xp.maximum(xp.maximum(clean, prev), nxt)
        candidates = (xp.abs(clean - med_angle) > rep.threshold) & ~invalid
        idx = xp.nonzero(candidates)
        if idx[0].size:
            med_space = _neighbour_median(clean, invalid, idx, with_angles=False)
            far = xp.abs(clean[idx] - med_space) > rep.threshold
            outlier = xp.zeros_like(invalid)
            outlier[tuple(i[far] for i in idx)] = True
            rep.outliers = int(outlier.sum())
            bad = invalid | outlier
        else:
            bad = invalid
    else:
        bad = invalid
    rep.invalid = int(invalid.sum())
    if not bool(bad.any()) and n < 5:
        return p, rep
    out = p.copy() if bool(bad.any()) else p
    if bool(bad.any()):
        idx = xp.nonzero(bad)
        out[idx] = _neighbour_median(clean, bad, idx, with_angles=True)
    rep.projections = _outlier_projections(out, bad)
    if rep.projections:
        out = out if out is not p else p.copy()
        for k in rep.projections:
            out[k] = 0.5 * (out[(k - 1) % n] + out[(k + 1) % n])
    return out, rep


def _neighbour_median(values, bad, idx, *, with_angles):
    """Median of the valid 3 x 3 neighbours (and, ``with_angles``, the same pixel at the two adjacent angles) of
    each pixel ``idx``; the pixel's own value when it has no valid neighbour."""
    xp = xp_of(values)
    n, ny, nx = values.shape
    a, y, x = idx
    offsets = [(0, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    if with_angles:
        offsets += [(-1, 0, 0), (1, 0, 0)]
    cols = []
    for da, dy, dx in offsets:
        aa, yy, xx = (a + da) % n, y + dy, x + dx
        inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        yy, xx = xp.clip(yy, 0, ny - 1), xp.clip(xx, 0, nx - 1)
        v = values[aa, yy, xx].astype(xp.float32)
        cols.append(xp.where(inside & ~bad[aa, yy, xx], v, xp.float32(np.nan)))
    stack = to_host(xp.stack(cols, axis=1))
    with np.errstate(all="ignore"), _quiet_nanmedian():
        med = np.nanmedian(stack, axis=1)
    own = to_host(values[idx])
    med = np.where(np.isfinite(med), med, own).astype(np.float32)
    return xp.asarray(med)


def _outlier_projections(p, repaired) -> list:
    """Projections whose total attenuation departs from their neighbours', or with > 5 % of pixels repaired."""
    n = p.shape[0]
    if n < 5:
        return []
    sums = to_host(p.reshape(n, -1).sum(axis=1)).astype(np.float64)
    frac = to_host(repaired.reshape(n, -1).mean(axis=1))
    near = np.stack([np.roll(sums, s) for s in (-2, -1, 1, 2)])
    ref = np.median(near, axis=0)
    dev = np.abs(sums - ref) / np.maximum(np.abs(ref), 1e-12)
    spread = 1.4826 * float(np.median(np.abs(dev - np.median(dev))))
    limit = max(PROJECTION_SIGMAS * spread + float(np.median(dev)), PROJECTION_MIN)
    return [int(k) for k in np.flatnonzero((dev > limit) | (frac > PROJECTION_FRACTION))]


class _quiet_nanmedian:
    """``np.nanmedian`` of an all-NaN row warns; the row is handled (the pixel keeps its value)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)
