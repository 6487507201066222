"""Reconstruction: flat/dark normalisation, FBP (ASTRA, CUDA when available), forward projection, centre finding."""

from .fbp import (FILTERS, astra_cuda_available, astra_cuda_probe, fbp_device, reconstruct_energy, reconstruct_fbp,
                  reconstruct_file)
from .flatfield import NonPositiveTransmissionWarning, normalize
from .project import estimate_center, forward_project

__all__ = [
    "NonPositiveTransmissionWarning", "normalize",
    "FILTERS", "reconstruct_fbp", "reconstruct_energy", "reconstruct_file",
    "astra_cuda_available", "astra_cuda_probe", "fbp_device",
    "estimate_center", "forward_project",
]
