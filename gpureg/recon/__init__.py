"""Reconstruction: flat/dark normalisation, per-projection alignment, FBP (ASTRA, CUDA when available), forward
projection, centre finding."""

from .align import AlignmentResult, AlignmentWarning, align_energy, align_projections

from .fbp import (FILTERS, astra_cuda_available, astra_cuda_probe, fbp_device, reconstruct_energy, reconstruct_fbp,
                  reconstruct_file)
from .flatfield import NonPositiveTransmissionWarning, normalize
from .project import estimate_center, forward_project

__all__ = [
    "AlignmentResult", "AlignmentWarning", "align_energy", "align_projections",
    "NonPositiveTransmissionWarning", "normalize",
    "FILTERS", "reconstruct_fbp", "reconstruct_energy", "reconstruct_file",
    "astra_cuda_available", "astra_cuda_probe", "fbp_device",
    "estimate_center", "forward_project",
]
