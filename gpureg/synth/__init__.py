"""Synthetic data: the two-particle phantom, simulated TXM-XANES scans, known distortions and noise, with truth."""

from .phantom import PARTICLES, particle_fields, two_particle_phantom
from .deform import SmoothWarp
from .distort import AFFINE_DISTORTIONS, distorted_phantom, distortion_matrix, random_affine, salt_and_pepper
from .scan import default_motion, deformation_truth, sample_truth, sample_volumes, simulate
from .spectra import MN_EDGE_RANGE, MN_SPECTRUM, edge_offsets, mn_energy_grid, mn_fine_energy_grid, parse_energies

__all__ = [
    "PARTICLES", "particle_fields", "two_particle_phantom",
    "default_motion", "deformation_truth", "SmoothWarp", "sample_truth", "sample_volumes", "simulate",
    "AFFINE_DISTORTIONS", "distorted_phantom", "distortion_matrix", "random_affine", "salt_and_pepper",
    "MN_EDGE_RANGE", "MN_SPECTRUM", "edge_offsets", "mn_energy_grid", "mn_fine_energy_grid", "parse_energies",
]
