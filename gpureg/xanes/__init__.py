"""XANES: per-voxel edge energy maps (in slabs), regions of interest, per-particle distributions, model spectra;
Larch-compatible normalisation, spectral denoising, linear-combination fits to references, PCA and k-means clusters."""

from .chemmap import chemistry_map
from .cluster import ClusterResult, Components, cluster_spectra, spectral_components
from .denoise import SpectralBasis, denoise_spectra
from .edge import METHODS, edge_energy, edge_ranges, normalize
from .lcf import FitResult, fit_references
from .model import EDGE_SHAPES, scan_energies, synthetic_spectra
from .preedge import larch_ranges, pre_edge
from .references import Reference, load_references
from .regions import edge_distribution, roi_spectra
from .stack import edge_energy_map

__all__ = [
    "METHODS", "edge_energy", "edge_ranges", "normalize",
    "edge_energy_map", "edge_distribution", "roi_spectra",
    "EDGE_SHAPES", "scan_energies", "synthetic_spectra",
    "pre_edge", "larch_ranges", "Reference", "load_references", "FitResult", "fit_references",
    "ClusterResult", "Components", "cluster_spectra", "spectral_components", "chemistry_map",
    "SpectralBasis", "denoise_spectra",
]
