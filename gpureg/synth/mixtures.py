"""Two-compound Mn chemistry for the synthetic sample: voxels that are mixtures of two reference spectra.

With ``simulate(..., mixture=True)`` every voxel's spectrum is
``f * mu_Mn2O3(E) + (1 - f) * mu_MnO(E)`` instead of a single model spectrum
with a shifted edge: two reference compounds of the parametric model
(:func:`gpureg.xanes.synthetic_spectra` with ``MN_SPECTRUM``, unit edge jump), ``MnO``-like (edge
6549 eV, white line 0.35) and ``Mn2O3``-like (edge 6555.5 eV, white line 0.74),
the ends of :data:`MN_EDGE_RANGE`. The fraction ``f`` of Mn2O3 follows the same
spatial pattern as the default chemistry (particle 1 oxidised core, reduced
surface; particle 2 a gentle gradient), so ``f = (e0 - 6549) / 6.5`` of the
default model. The references are written as two-column text files (energy eV,
mu) on a 0.25 eV grid, so linear-combination fitting can be checked against the
known fractions (``/truth/fractions``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..xanes.model import synthetic_spectra
from .spectra import MN_EDGE_RANGE, MN_SPECTRUM, half_crossing_and_peak

__all__ = ["COMPOUNDS", "compound_spectrum", "fraction_from_e0", "mixture_edge_offsets", "mixture_spectra", "reference_spectra", "write_references"]

COMPOUNDS = {"MnO": {"e0": MN_EDGE_RANGE[0], "white_line": 0.35},
             "Mn2O3": {"e0": MN_EDGE_RANGE[1], "white_line": 0.35 + 0.06 * (MN_EDGE_RANGE[1] - MN_EDGE_RANGE[0])}}
"""The two reference compounds: edge position (eV) and white-line height of the Mn model (``MN_SPECTRUM``)."""


def fraction_from_e0(e0):
    """Fraction of Mn2O3 from the default model's edge position (linear over :data:`MN_EDGE_RANGE`)."""
    lo, hi = MN_EDGE_RANGE
    return np.clip((np.asarray(e0, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def mixture_spectra(energies, fraction, *, normalized: bool = False) -> np.ndarray:
    """Spectra of MnO/Mn2O3 mixtures: (n_energy, *fraction.shape) float64, unit edge jump.

    Parameters
    ----------
    energies : (n_energy,) array_like
        eV.
    fraction : array_like
        Fraction of Mn2O3 (0..1) per voxel.
    normalized : bool
        Without the Victoreen pre-edge background.
    """
    f = np.asarray(fraction, dtype=np.float64)
    a, b = (compound_spectrum(energies, name, normalized=normalized) for name in COMPOUNDS)
    a = a.reshape((-1,) + (1,) * f.ndim)
    b = b.reshape((-1,) + (1,) * f.ndim)
    return f * b + (1.0 - f) * a


def compound_spectrum(energies, name, *, normalized: bool = False) -> np.ndarray:
    """Spectrum (n_energy,) float64 of one compound: the simulated Mn model (``MN_SPECTRUM``) at its edge and
    white line; ``normalized`` drops the Victoreen pre-edge background."""
    kw = dict(MN_SPECTRUM, victoreen=0.0) if normalized else MN_SPECTRUM
    c = COMPOUNDS[name]
    return np.asarray(synthetic_spectra(np.asarray(energies, dtype=np.float64).reshape(-1), c["e0"],
                                        white_line=c["white_line"], **kw)).reshape(-1)


def reference_spectra(energies=None) -> dict:
    """``{name: (energy, mu)}`` of the two compounds (default grid 6400-6800 eV, 0.25 eV)."""
    e = np.arange(6400.0, 6800.0 + 1e-9, 0.25) if energies is None else np.asarray(energies, dtype=np.float64)
    return {name: (e, compound_spectrum(e, name)) for name in COMPOUNDS}


def write_references(directory) -> list[Path]:
    """Write ``MnO.txt`` and ``Mn2O3.txt`` (two columns: energy eV, mu) into ``directory``; return the paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (e, mu) in reference_spectra().items():
        p = d / f"{name}.txt"
        np.savetxt(p, np.c_[e, mu], fmt="%.4f %.8f",
                   header=f"gpureg synthetic reference {name}: energy_eV mu (unit edge jump)")
        paths.append(p)
    return paths


def mixture_edge_offsets(fraction) -> tuple[np.ndarray, np.ndarray]:
    """Energy (eV) of the first 0.5 crossing of the normalised mixture spectrum, and of its white-line peak.

    Tabulated over 201 fractions on a 0.005 eV grid and linearly interpolated.
    """
    f = np.asarray(fraction, dtype=np.float64)
    table = np.linspace(0.0, 1.0, 201)
    e = np.arange(6520.0, 6580.0, 0.005)
    mu = mixture_spectra(e, table, normalized=True)
    half, peak = half_crossing_and_peak(e, mu, peak_from=MN_EDGE_RANGE[0])
    return np.interp(f, table, half), np.interp(f, table, peak)
