"""Per-projection jitter of a simulated scan (stage run-out, drift): the truth of projection alignment.

Only the part that projection alignment can observe is simulated: column
shifts orthogonal to ``a + b cos(theta) + c sin(theta)`` and row shifts of zero
mean (the rest is a sample translation, :func:`gpureg.recon.align.unobservable_part`),
so ``/truth/projection_shifts`` is directly comparable with
``/alignment/projection_shifts``. Convention as in :mod:`gpureg.recon.align`:
``measured(r, c) = ideal(r - dr, c - dc)``.
"""

from __future__ import annotations

import numpy as np

from ..core.errors import ParameterError
from ..recon.align import shift_projections, unobservable_part

__all__ = ["apply_jitter", "projection_jitter"]


def projection_jitter(n_energy: int, theta_deg, rms: float, *, seed: int = 0) -> np.ndarray:
    """Random observable shifts per energy and projection, RMS exactly ``rms`` per component.

    Independent per energy (zone-plate refocusing and thermal drift between
    energies), Gaussian per projection, then the unobservable part removed and
    each energy's rows and columns scaled to RMS ``rms``.

    Parameters
    ----------
    n_energy : int
    theta_deg : (n_angle,) array_like
    rms : float
        Pixels (row and column each); 0 gives zeros.
    seed : int

    Returns
    -------
    (n_energy, n_angle, 2) ndarray of float64
        ``(row, column)`` shift in detector pixels.
    """
    theta = np.asarray(theta_deg, dtype=np.float64).ravel()
    if not np.isfinite(rms) or rms < 0:
        raise ParameterError(f"jitter must be >= 0 pixels, got {rms}")
    out = np.zeros((int(n_energy), theta.size, 2))
    if rms == 0:
        return out
    rng = np.random.default_rng([int(seed), 25025])
    for i in range(out.shape[0]):
        s = rng.normal(size=(theta.size, 2))
        s -= unobservable_part(s, theta)
        out[i] = s * (rms / np.sqrt((s ** 2).mean(axis=0)))
    return out


def apply_jitter(line_integrals, shifts) -> np.ndarray:
    """Displace each projection by its shift (``measured(r, c) = ideal(r - dr, c - dc)``), sub-pixel.

    Parameters
    ----------
    line_integrals : (n_angle, nz, nx) ndarray
    shifts : (n_angle, 2) array_like

    Returns
    -------
    (n_angle, nz, nx) ndarray of float32
    """
    return shift_projections(line_integrals, -np.asarray(shifts, dtype=np.float64))
