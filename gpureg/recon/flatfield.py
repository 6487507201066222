"""Flat/dark normalisation: raw counts to line integrals ``-log((I - D) / (F - D))``.

Frames are averaged once per energy; non-positive transmissions are floored
(``floor``) and reported once (:class:`NonPositiveTransmissionWarning`).
Array code is written once against ``xp`` (NumPy or CuPy).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from ..core.backend import (
    xp_of,
)
from ..core.errors import InputError

__all__ = ["energy_problem", "flatfield_correct", "NonPositiveTransmissionWarning"]

_log = logging.getLogger("gpureg")

_WARNED = False


class NonPositiveTransmissionWarning(UserWarning):
    """Some flat/dark-corrected transmissions were not positive and were clipped."""


def normalize(*args, **kwargs):
    """Deprecated name of :func:`flatfield_correct` (``gpureg.xanes.normalize`` normalises spectra)."""
    warnings.warn("gpureg.normalize (flat/dark correction) is renamed gpureg.flatfield_correct; the old name goes "
                  "in the next release", DeprecationWarning, stacklevel=2)
    return flatfield_correct(*args, **kwargs)


def flatfield_correct(projections, flat, dark=None, *, floor: float = 1e-3, return_count: bool = False,
                      warn: bool = True):
    """Flat/dark correction and ``-log``: line integrals of attenuation.

    Parameters
    ----------
    projections : (n_angle, ny, nx) or (ny, nx) ndarray
        Raw counts (NumPy or CuPy, any numeric dtype).
    flat : (n_flat, ny, nx) or (ny, nx) ndarray
        Open-beam frames; averaged over the first axis when 3D.
    dark : (n_dark, ny, nx) or (ny, nx) ndarray, optional
        Dark frames; averaged when 3D; zero when None.
    floor : float
        Transmissions below ``floor`` (including non-positive ones, e.g. dead
        pixels or a flat not above the dark) are raised to it, so that
        ``-log`` stays finite (at most ``-log(floor)``).
    return_count : bool
        Also return the number of non-positive (or NaN) transmissions.
    warn : bool
        Report clipped transmissions (off when the caller repairs and records them:
        :func:`~gpureg.recon.repair.repair_projections`).

    Returns
    -------
    (n_angle, ny, nx) ndarray of float32
        ``-log((projections - dark) / (flat - dark))`` on the input's device.
    int
        Only when ``return_count``.

    Notes
    -----
    Non-positive transmissions are counted and reported once per process
    with a :class:`NonPositiveTransmissionWarning` (later occurrences go to
    the ``gpureg`` logger at INFO level), never once per pixel.
    """
    if not (0.0 < float(floor) < 1.0):
        raise ValueError(f"floor must be in (0, 1), got {floor}")
    xp = xp_of(projections)
    p = xp.asarray(projections, dtype=xp.float32)
    if p.ndim not in (2, 3):
        raise ValueError(f"projections must be (n_angle, ny, nx) or (ny, nx), got shape {p.shape}")
    f = frame_mean(xp, flat, "flat", p.shape[-2:])
    d = xp.zeros_like(f) if dark is None else frame_mean(xp, dark, "dark", p.shape[-2:])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (p - d) / (f - d)
    bad = ~(t > 0)  # also catches NaN (0/0) and a flat at or below the dark
    count = int(bad.sum())
    t = xp.where(bad | (t < floor), xp.float32(floor), t)
    out = (-xp.log(t)).astype(xp.float32, copy=False)
    if count and warn:
        _report_nonpositive(count, p.size)
    return (out, count) if return_count else out


def energy_problem(projections, flat, dark=None, *, limit: float = 0.5) -> str | None:
    """Why one energy's frames cannot give a valid volume, or ``None`` when they can.

    An energy is bad when more than ``limit`` of its flat-field pixels are not
    above the dark (a zero flat field), or more than ``limit`` of its
    projection values are NaN/inf, or give non-positive transmissions (data at
    or below the dark). A few bad pixels are not: :func:`flatfield_correct` clips them.

    Parameters
    ----------
    projections : (n_angle, ny, nx) ndarray
    flat : (n_flat, ny, nx) or (ny, nx) ndarray
    dark : (n_dark, ny, nx) or (ny, nx) ndarray, optional
    limit : float
        Largest acceptable bad fraction.

    Returns
    -------
    str or None
        A few words (``"flat field is zero (not above the dark)"``...).
    """
    xp = xp_of(projections)
    p = xp.asarray(projections, dtype=xp.float32)
    f = frame_mean(xp, flat, "flat", p.shape[-2:])
    d = xp.zeros_like(f) if dark is None else frame_mean(xp, dark, "dark", p.shape[-2:])
    if float((~(f - d > 0)).mean()) > limit:
        return "flat field is zero (not above the dark)"
    if float((~xp.isfinite(p)).mean()) > limit:
        return "projections are NaN/inf"
    if float((~(p - d > 0)).mean()) > limit:
        return "projections are zero (no transmitted signal above the dark)"
    return None


def frame_mean(xp, frames, name, shape):
    f = xp.asarray(frames, dtype=xp.float32)
    if f.ndim == 3:
        if f.shape[0] < 1:
            raise InputError(f"{name} has no frames (shape {f.shape})")
        f = f.mean(axis=0)
    if f.ndim != 2 or f.shape != tuple(shape):
        raise InputError(f"{name} frames must be (n, {shape[0]}, {shape[1]}) or ({shape[0]}, {shape[1]}), "
                         f"got shape {tuple(xp.asarray(frames).shape)}")
    return f


def _report_nonpositive(count, total):
    global _WARNED
    msg = (f"{count} of {total} flat/dark-corrected transmissions were not positive (dead pixels, or a flat "
           f"not above the dark) and were clipped")
    if not _WARNED:
        _WARNED = True
        warnings.warn(msg + "; further occurrences are logged at INFO level", NonPositiveTransmissionWarning,
                      stacklevel=3)
    else:
        _log.info("gpureg: %s", msg)
