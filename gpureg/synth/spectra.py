"""A synthetic TXM-XANES experiment at the Mn K-edge, with exact ground truth.

The sample is the two-particle phantom of :mod:`gpureg.phantom` (same
geometry, same seed) given a Mn chemistry: particle 1 has a core-shell
gradient of oxidation state (edge energy about 6555.5 eV in the core falling
to 6549 eV at the surface), particle 2 a gentle linear gradient around
6551.5 eV. Every voxel's absorption follows the parametric XANES model of
:func:`xanes_model` (pre-edge background, pre-edge peak, arctan edge,
white line, post-edge slope and damped EXAFS-like wiggle), scaled by the
particle's density and texture.

Per energy the sample moves (drift, small tilt, magnification, shear;
optionally one particle relative to the other); the motion is exact (the
phantom is a continuous function, sampled without interpolation), the
highest energy is the reference (identity). Parallel-beam projections over
-90..90 degrees come from ASTRA's forward projector (:func:`gpureg.recon.forward_project`),
with a non-uniform, energy-dependent beam, flat and dark frames, Poisson
photon noise plus Gaussian read noise, and optional dead/hot pixels.

Units: attenuation in 1 / voxel (what FBP of ``-log`` transmission returns),
energies in eV, angles in degrees. Truth matrices follow DESIGN.md:
``apply_affine(recon[e], truth["matrices"][e])`` is the unmoved sample at
energy ``e`` on the reference grid.
"""

from __future__ import annotations

import numpy as np

__all__ = ["edge_offsets", "MN_EDGE_RANGE", "mn_energy_grid", "parse_energies", "xanes_model"]

MN_EDGE_RANGE = (6549.0, 6555.5)


def mn_energy_grid(start: float = 6485.0, stop: float = 6710.0, *, edge_start: float = 6530.0,
                   edge_stop: float = 6578.0, coarse: float = 15.0, fine: float = 3.0) -> np.ndarray:
    """Energies of a Mn K-edge XANES scan: coarse steps off the edge, fine steps across it.

    Parameters
    ----------
    start, stop : float
        First and last energy (eV); the coarse grids are anchored on
        ``edge_start`` (going down) and on ``stop`` (going down to the edge region).
    edge_start, edge_stop : float
        The finely sampled region around the edge (eV, inclusive).
    coarse, fine : float
        Step sizes (eV).

    Returns
    -------
    (n_energy,) ndarray of float64
        Strictly increasing; the default gives 29 energies, 6485-6515 eV every
        15 eV, 6530-6578 eV every 3 eV, 6590-6710 eV every 15 eV.
    """
    if not (start <= edge_start < edge_stop <= stop):
        raise ValueError(f"need start <= edge_start < edge_stop <= stop, got {start}, {edge_start}, {edge_stop}, {stop}")
    if coarse <= 0 or fine <= 0:
        raise ValueError(f"steps must be positive, got coarse={coarse}, fine={fine}")
    near = np.arange(edge_start, edge_stop + 1e-6, fine)
    pre = np.arange(edge_start - coarse, start - 1e-6, -coarse)[::-1]
    post = np.arange(stop, near[-1] + 1e-6, -coarse)[::-1]
    post = post[post > near[-1] + 1e-6]
    return np.round(np.concatenate([pre, near, post]), 6)


def parse_energies(text: str) -> np.ndarray:
    """Energies from text: ``"default"``, ``"6540,6550,6560"`` or ``"start:stop:step"`` (inclusive).

    Returns
    -------
    (n_energy,) ndarray of float64, strictly increasing
    """
    t = str(text).strip()
    if t.lower() in ("", "default", "mn"):
        return mn_energy_grid()
    try:
        if ":" in t:
            parts = [float(v) for v in t.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise ValueError
            e = np.arange(parts[0], parts[1] + parts[2] * 1e-6, parts[2])
        else:
            e = np.array([float(v) for v in t.split(",") if v.strip()])
    except ValueError:
        raise ValueError(f"energies must be 'default', a comma list (6540,6550) or start:stop:step, got {text!r}") from None
    e = np.sort(e)
    if e.size < 1 or np.any(np.diff(e) <= 0):
        raise ValueError(f"energies must be distinct, got {text!r}")
    return e


def xanes_model(energies, e0, *, white_line=0.6, edge_width: float = 1.5, wl_offset: float = 6.0,
                wl_width: float = 3.5, pre_peak: float = 0.04, pre_offset: float = -12.0,
                post_slope: float = -4.5e-4, exafs: float = 0.03, pre_edge: float = 0.25,
                normalized: bool = False) -> np.ndarray:
    """Parametric K-edge absorption spectrum, edge jump 1.

    ``mu(E) = pre_edge (E / e0)^-3 + step(E) (1 + post_slope (E - e0) + wiggle(E))
    + white_line G(E; e0 + wl_offset, wl_width) + pre_peak G(E; e0 + pre_offset, 1.5)``
    with ``step = 1/2 + arctan((E - e0) / edge_width) / pi`` and Gaussians ``G``
    of unit height; the wiggle is a damped sine above the edge (EXAFS-like).

    Parameters
    ----------
    energies : (n_energy,) array_like
        eV.
    e0 : float or ndarray
        Edge position (eV; the arctan inflection), any shape.
    white_line : float or ndarray
        White-line height (broadcast with ``e0``).
    edge_width, wl_offset, wl_width, pre_peak, pre_offset, post_slope, exafs, pre_edge : float
        Shape parameters (eV, or relative to the edge jump).
    normalized : bool
        Drop the pre-edge background term, i.e. the spectrum as normalised
        XANES analysis sees it (pre-edge subtracted, unit edge jump).

    Returns
    -------
    (n_energy, *broadcast shape of e0 and white_line) ndarray of float64
    """
    e = np.asarray(energies, dtype=np.float64).reshape(-1)
    e0 = np.asarray(e0, dtype=np.float64)
    wl = np.asarray(white_line, dtype=np.float64)
    shape = np.broadcast_shapes(e0.shape, wl.shape)
    e = e.reshape((-1,) + (1,) * len(shape))
    d = e - e0
    step = 0.5 + np.arctan(d / edge_width) / np.pi
    above = 0.5 * (1.0 + np.tanh(d / 4.0))
    wiggle = exafs * np.sin(2.0 * np.pi * (d - wl_offset) / 40.0) * np.exp(-np.clip(d, 0, None) / 120.0) * above
    mu = (step * (1.0 + post_slope * d + wiggle)
          + wl * np.exp(-0.5 * ((d - wl_offset) / wl_width) ** 2)
          + pre_peak * np.exp(-0.5 * ((d - pre_offset) / 1.5) ** 2))
    if not normalized:
        mu = mu + pre_edge * (e / e0) ** -3
    return np.broadcast_to(mu, (e.shape[0],) + shape).copy()


def edge_offsets(white_line, **model) -> tuple[np.ndarray, np.ndarray]:
    """Where the normalised model spectrum first crosses 0.5, and its white-line peak, relative to ``e0``.

    Parameters
    ----------
    white_line : array_like
        White-line heights.
    **model
        Other :func:`xanes_model` shape parameters.

    Returns
    -------
    (half, peak) : ndarrays like ``white_line``
        ``E_half - e0`` (the edge energy as DESIGN.md defines it, evaluated on a
        0.005 eV grid and linearly interpolated) and ``E_peak - e0`` (maximum of
        the normalised spectrum within 25 eV above the edge).
    """
    wl = np.asarray(white_line, dtype=np.float64)
    table = np.linspace(0.0, max(1.5, float(wl.max(initial=0.0)) + 0.01), 151)
    d = np.arange(-30.0, 25.0, 0.005)
    mu = xanes_model(d, np.zeros_like(table), white_line=table, normalized=True, **model)  # (n_d, n_table)
    half = np.empty(table.size)
    peak = np.empty(table.size)
    for k in range(table.size):
        m = mu[:, k]
        i = int(np.flatnonzero(m >= 0.5)[0])
        half[k] = d[i - 1] + (0.5 - m[i - 1]) * (d[i] - d[i - 1]) / (m[i] - m[i - 1])
        sel = d >= 0
        peak[k] = d[sel][np.argmax(m[sel])]
    return np.interp(wl, table, half), np.interp(wl, table, peak)
