"""The Mn K-edge chemistry of the simulated sample: scan energies and spectrum parameters.

The simulated spectra are :func:`gpureg.xanes.synthetic_spectra` with the
parameters :data:`MN_SPECTRUM` (arctan edge, pre-edge peak, white line,
post-edge slope, damped EXAFS-like wiggle, Victoreen-like pre-edge
background); the scan is :func:`mn_energy_grid`. :func:`edge_offsets` gives
where that model's normalised spectrum crosses 0.5 (the ground truth of the
edge-energy maps).
"""

from __future__ import annotations

import numpy as np

from ..core.errors import ParameterError
from ..xanes.model import scan_energies, synthetic_spectra

__all__ = ["edge_offsets", "MN_EDGE_RANGE", "MN_SPECTRUM", "mn_energy_grid", "mn_fine_energy_grid", "parse_energies"]

MN_EDGE_RANGE = (6549.0, 6555.5)
"""Range of the synthetic edge energies (eV): particle 1 spans it, particle 2 sits inside it."""

MN_SPECTRUM = dict(edge="arctan", width=1.5, wl_offset=6.0, wl_width=3.5, pre_offset=0.0, pre_slope=0.0,
                   post_slope=-4.5e-4, pre_peak=0.04, pre_peak_offset=-12.0, pre_peak_width=1.5, exafs=0.03,
                   victoreen=0.25, dtype=np.float64)
"""Keywords of :func:`gpureg.xanes.synthetic_spectra` for the simulated Mn spectra (edge jump 1,
float64); the white-line height varies per voxel and is passed separately."""


def mn_energy_grid() -> np.ndarray:
    """Energies of the simulated Mn K-edge XANES scan: coarse steps off the edge, fine steps across it.

    Returns
    -------
    (n_energy,) ndarray of float64
        29 energies: 6485-6515 eV every 15 eV, 6530-6578 eV every 3 eV,
        6590-6710 eV every 15 eV (:func:`gpureg.xanes.scan_energies`).
    """
    return scan_energies(6485.0, 6710.0, fine=(6530.0, 6578.0), fine_step=3.0, coarse_step=15.0)


def mn_fine_energy_grid() -> np.ndarray:
    """The Mn K-edge scan with 1.5 eV steps across the edge (``--energies fine``): 34 energies.

    Returns
    -------
    (n_energy,) ndarray of float64
        6485-6515 eV every 15 eV; 6530 and 6534 eV; 6538-6562 eV every 1.5 eV (across the simulated edges,
        6548.7-6555.2 eV, and their white lines); 6566, 6570 and 6578 eV; 6590-6710 eV every 15 eV.

    Notes
    -----
    The model edge is an arctan 1.5 eV wide. On :func:`mn_energy_grid`'s 3 eV steps the 0.5 crossing
    read from the samples of a noise-free model spectrum is off by -0.25 to +0.14 eV depending on where the
    edge falls between two samples (0.14 eV RMS over edge positions 6549-6555.5 eV and white-line heights
    0.3-1.4); on this grid by at most 0.054 eV (0.030 eV RMS). The 1.5 eV step is that of the TXM-like grid
    issue 26 checks real spectra on. Five energies more than the default grid.
    """
    return np.r_[np.arange(6485.0, 6515.1, 15.0), [6530.0, 6534.0], np.arange(6538.0, 6562.1, 1.5),
                 [6566.0, 6570.0, 6578.0], np.arange(6590.0, 6710.1, 15.0)]


def parse_energies(text: str) -> np.ndarray:
    """Energies from text: ``"default"``, ``"fine"``, ``"6540,6550,6560"`` or ``"start:stop:step"`` (inclusive).

    ``"default"`` is :func:`mn_energy_grid` (29 energies, 3 eV across the edge), ``"fine"``
    :func:`mn_fine_energy_grid` (34 energies, 1.5 eV across the edge).

    Returns
    -------
    (n_energy,) ndarray of float64, strictly increasing
    """
    t = str(text).strip()
    if t.lower() in ("", "default", "mn"):
        return mn_energy_grid()
    if t.lower() == "fine":
        return mn_fine_energy_grid()
    try:
        if ":" in t:
            parts = [float(v) for v in t.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise ValueError
            e = np.arange(parts[0], parts[1] + parts[2] * 1e-6, parts[2])
        else:
            e = np.array([float(v) for v in t.split(",") if v.strip()])
    except ValueError:
        raise ParameterError(f"energies must be 'default', 'fine', a comma list (6540,6550) or start:stop:step, got {text!r}") from None
    e = np.sort(e)
    if e.size < 1 or np.any(np.diff(e) <= 0):
        raise ParameterError(f"energies must be distinct, got {text!r}")
    return e


def edge_offsets(white_line, **model) -> tuple[np.ndarray, np.ndarray]:
    """Where the normalised model spectrum first crosses 0.5, and its white-line peak, relative to ``e0``.

    Parameters
    ----------
    white_line : array_like
        White-line heights.
    **model
        Other :func:`gpureg.xanes.synthetic_spectra` shape parameters (default :data:`MN_SPECTRUM`).

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
    shape = {**MN_SPECTRUM, **model, "victoreen": 0.0}  # normalised: no pre-edge background
    mu = synthetic_spectra(d, np.zeros_like(table), white_line=table, **shape)  # (n_d, n_table)
    half, peak = half_crossing_and_peak(d, mu, peak_from=0.0)
    return np.interp(wl, table, half), np.interp(wl, table, peak)


def half_crossing_and_peak(x, mu, *, peak_from: float):
    """Per column of tabulated normalised spectra: the first 0.5 crossing and the maximum at ``x >= peak_from``.

    Parameters
    ----------
    x : (n,) ndarray
        Energies (or offsets), ascending, finely sampled.
    mu : (n, k) ndarray
        Normalised spectra, one per column.
    peak_from : float
        The white-line peak is searched at ``x >= peak_from``.

    Returns
    -------
    half, peak : (k,) ndarray
        The 0.5 crossing (linear interpolation) and the peak position, in the units of ``x``.
    """
    half = np.empty(mu.shape[1])
    peak = np.empty(mu.shape[1])
    sel = x >= peak_from
    for k in range(mu.shape[1]):
        m = mu[:, k]
        i = int(np.flatnonzero(m >= 0.5)[0])
        half[k] = x[i - 1] + (0.5 - m[i - 1]) * (x[i] - x[i - 1]) / (m[i] - m[i - 1])
        peak[k] = x[sel][np.argmax(m[sel])]
    return half, peak
