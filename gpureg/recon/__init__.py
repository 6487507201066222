"""Reconstruction: flat/dark normalisation, per-projection alignment, FBP (ASTRA, CUDA when available), forward
projection, centre finding."""

from .align import AlignmentResult, AlignmentWarning, align_energy, align_projections

from .fbp import FILTERS, astra_cuda_available, astra_cuda_probe, fbp_device, reconstruct_energy, reconstruct_fbp
from .flatfield import NonPositiveTransmissionWarning, flatfield_correct
from .project import estimate_center, forward_project

__all__ = [
    "AlignmentResult", "AlignmentWarning", "align_energy", "align_projections",
    "NonPositiveTransmissionWarning", "flatfield_correct",
    "FILTERS", "reconstruct_fbp", "reconstruct_energy",
    "astra_cuda_available", "astra_cuda_probe", "fbp_device",
    "estimate_center", "forward_project",
]


def __getattr__(name):
    if name == "normalize":  # deprecated: gpureg.xanes.normalize normalises spectra, this corrects flat/dark
        from .flatfield import normalize

        return normalize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
