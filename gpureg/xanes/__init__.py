"""XANES: spectra, edge energies per voxel (in slabs), regions of interest and per-particle distributions."""

from .edge import METHODS, edge_energy, edge_ranges, normalize
from .regions import edge_distribution, roi_spectra
from .spectra import scan_energies, synthetic_spectra
from .stack import edge_energy_map
from .write import write_xanes

__all__ = ["METHODS", "edge_distribution", "edge_energy", "edge_energy_map", "edge_ranges", "normalize",
           "roi_spectra", "scan_energies", "synthetic_spectra", "write_xanes"]
