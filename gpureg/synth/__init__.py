"""Synthetic data: the two-particle phantom and simulated TXM-XANES scans with known truth."""

from .phantom import PARTICLES, particle_fields, two_particle_phantom
from .deform import SmoothWarp
from .scan import default_motion, deformation_truth, sample_truth, sample_volumes, simulate
from .spectra import MN_EDGE_RANGE, MN_SPECTRUM, edge_offsets, mn_energy_grid, parse_energies

__all__ = [
    "PARTICLES", "particle_fields", "two_particle_phantom",
    "default_motion", "deformation_truth", "SmoothWarp", "sample_truth", "sample_volumes", "simulate",
    "MN_EDGE_RANGE", "MN_SPECTRUM", "edge_offsets", "mn_energy_grid", "parse_energies",
]
