"""Synthetic data: the two-particle phantom and simulated TXM-XANES scans with known truth."""

from .phantom import PARTICLES, particle_fields, two_particle_phantom
from .scan import default_motion, sample_truth, sample_volumes, simulate
from .spectra import (
    MN_EDGE_RANGE,
    edge_offsets,
    mn_energy_grid,
    parse_energies,
    xanes_model,
)

__all__ = ["default_motion", "edge_offsets", "MN_EDGE_RANGE", "mn_energy_grid", "parse_energies", "particle_fields", "PARTICLES", "sample_truth", "sample_volumes", "simulate", "two_particle_phantom", "xanes_model"]
