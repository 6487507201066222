"""Figures (matplotlib, Agg): registration quality, edge-energy maps, spectra; :func:`plot_result` for a result file."""

from .maps import edge_energy_3d, edge_energy_slice, orthogonal_slices
from .plots import canny_overlay, edge_distributions, mse_per_energy, roi_spectra, squared_difference
from .result import plot_result

__all__ = [
    "canny_overlay", "mse_per_energy", "squared_difference",
    "edge_energy_slice", "edge_energy_3d", "orthogonal_slices", "roi_spectra", "edge_distributions",
    "plot_result",
]
