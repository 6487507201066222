"""Does a projection series wobble? Centre-of-mass residuals, cheap and without a reconstruction.

The part of a per-projection shift that is a sample translation (``unobservable_part``)
is what projection alignment cannot recover and leaves to the 3D registration; the
centre-of-mass residuals (``com_shifts``) are the start of :func:`gpureg.recon.align_projections`
and what ``gpureg info`` reports (``input_wobble``). Conventions: :mod:`gpureg.recon.align`.
"""

from __future__ import annotations

import numpy as np

from ..core.backend import to_host, xp_of
from ..core.errors import InputError

__all__ = ["WOBBLE_HINT_PX", "com_shifts", "input_wobble", "unobservable_part", "wobble_estimate"]

WOBBLE_HINT_PX = 0.5  # centre-of-mass residual (RMS, row or column) above which `gpureg info` suggests the option


def unobservable_part(shifts, theta_deg):
    """The part of ``shifts`` that is a sample translation (or a rotation-centre offset).

    Column shifts ``a + b cos(theta) + c sin(theta)`` (least squares) and the
    mean row shift; ``shifts - unobservable_part(shifts, theta)`` is what
    projection alignment can recover.

    Parameters
    ----------
    shifts : (n_angle, 2) array_like
    theta_deg : (n_angle,) array_like

    Returns
    -------
    (n_angle, 2) ndarray of float64
    """
    s = np.asarray(shifts, dtype=np.float64).reshape(-1, 2)
    t = np.deg2rad(np.asarray(theta_deg, dtype=np.float64).ravel())
    design = np.stack([np.ones_like(t), np.cos(t), np.sin(t)], axis=1)
    coef, *_ = np.linalg.lstsq(design, s[:, 1], rcond=None)
    out = np.empty_like(s)
    out[:, 0] = s[:, 0].mean()
    out[:, 1] = design @ coef
    return out


def com_shifts(projections, theta_deg, *, tolerance: float = 0.02):
    """Shifts from each projection's centre of mass, or None when the projections do not conserve their total.

    For a parallel beam every projection holds the same total attenuation and
    the same row centre of mass; its column centre of mass follows
    ``a + b cos(theta) + c sin(theta)``. Deviations from both are the shifts
    (constrained as in :func:`unobservable_part`).

    Parameters
    ----------
    projections : (n_angle, nz, nx) ndarray
        Line integrals (negative values are clipped to 0).
    theta_deg : (n_angle,) array_like
    tolerance : float
        Largest relative spread (std / mean) of the projection totals for which the
        centre of mass is trusted (the sample stays inside the field of view).

    Returns
    -------
    (n_angle, 2) ndarray of float64, or None
    """
    xp = xp_of(projections)
    p = xp.clip(xp.asarray(projections, dtype=xp.float32), 0, None)
    rows = to_host(p.sum(axis=2, dtype=xp.float64))  # (n_angle, nz)
    cols = to_host(p.sum(axis=1, dtype=xp.float64))  # (n_angle, nx)
    total = rows.sum(axis=1)
    if total.min() <= 0 or total.std() > tolerance * total.mean():
        return None
    com = np.stack([(rows * np.arange(rows.shape[1])).sum(axis=1), (cols * np.arange(cols.shape[1])).sum(axis=1)],
                   axis=1) / total[:, None]
    return com - unobservable_part(com, theta_deg)


def wobble_estimate(projections, theta_deg) -> dict:
    """Does a projection series wobble? Centre-of-mass residuals (cheap; no reconstruction).

    Parameters
    ----------
    projections : (n_angle, nz, nx) ndarray
        Line integrals of one energy.
    theta_deg : (n_angle,) array_like

    Returns
    -------
    dict
        ``row_rms``, ``column_rms``, ``max`` (pixels; NaN when the projections
        do not conserve their total, so the centre of mass cannot be trusted)
        and ``total_spread`` (std / mean of the projection totals).
    """
    p = to_host(projections)
    totals = np.clip(np.asarray(p, dtype=np.float64), 0, None).sum(axis=(1, 2))
    spread = float(totals.std() / totals.mean()) if totals.mean() > 0 else float("nan")
    s = com_shifts(p, theta_deg)
    if s is None:
        return {"row_rms": float("nan"), "column_rms": float("nan"), "max": float("nan"), "total_spread": spread}
    rms = np.sqrt((s ** 2).mean(axis=0))
    return {"row_rms": float(rms[0]), "column_rms": float(rms[1]), "max": float(np.abs(s).max()),
            "total_spread": spread}


def input_wobble(reader, i: int | None = None) -> dict:
    """:func:`wobble_estimate` of one energy of an open projection input (default: the middle one).

    Returns
    -------
    dict
        :func:`wobble_estimate`'s keys plus ``energy`` (eV) and ``suggest`` (True when a
        residual exceeds :data:`WOBBLE_HINT_PX`: try ``--align-projections``).
    """
    from .flatfield import flatfield_correct

    if reader.kind != "projections":
        raise InputError(f"{reader.path}: holds reconstructions; the wobble estimate needs projections")
    i = reader.n_energy // 2 if i is None else int(i)
    out = wobble_estimate(flatfield_correct(reader.projections(i), reader.flat(i), reader.dark(i)), reader.theta)
    out["energy"] = float(reader.energies[i])
    out["suggest"] = bool(max(out["row_rms"], out["column_rms"]) > WOBBLE_HINT_PX)
    return out
