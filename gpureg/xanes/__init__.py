"""XANES: per-voxel edge energy maps (in slabs), regions of interest, per-particle distributions, model spectra."""

from .edge import METHODS, edge_energy, edge_ranges, normalize
from .model import EDGE_SHAPES, scan_energies, synthetic_spectra
from .regions import edge_distribution, roi_spectra
from .stack import edge_energy_map
from .write import write_xanes

__all__ = [
    "METHODS", "edge_energy", "edge_ranges", "normalize",
    "edge_energy_map", "edge_distribution", "roi_spectra",
    "EDGE_SHAPES", "scan_energies", "synthetic_spectra",
    "write_xanes",
]
