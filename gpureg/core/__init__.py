"""Core: array backends, the CUDA kernel loader and launchers, the affine transform, the MSE metric,
segmentation primitives, the Levenberg-Marquardt solver, the energy-axis check and the error family.

Everything above builds on these; nothing here imports another gpureg layer.
"""

from .backend import (DEVICES, array_device, cupy_or_none, get_xp, gpu_available, gpu_name,
                      ndimage_of, resolve_device, to_device, to_host, xp_of)
from .energies import check_energies
from .errors import (EnergyGridError, GpuregError, GPUUnavailableError, InputError, OutputError, ParameterError,
                     ResourceError)
from .metric import cell_support, mse_terms, trilinear_sample, voxel_jacobian
from .prefetch import HostToDevicePrefetcher
from .segment import DENOISE, binarize, denoise, otsu_threshold, particle_labels
from .solver import LMResult, levenberg_marquardt
from .terms import MetricTerms
from .transform import (apply_affine, compose, displacement_error, grid_center, identity, invert, matrix_from_params,
                        params_from_matrix, rotation_matrix, scale_matrix)

__all__ = [
    # backend
    "DEVICES", "GPUUnavailableError", "array_device", "cupy_or_none", "get_xp", "gpu_available", "gpu_name",
    "ndimage_of", "resolve_device", "to_device", "to_host", "xp_of",
    # errors, energies
    "EnergyGridError", "GpuregError", "InputError", "OutputError", "ParameterError", "ResourceError", "check_energies",
    # metric, solver
    "MetricTerms", "cell_support", "mse_terms", "trilinear_sample", "voxel_jacobian",
    "LMResult", "levenberg_marquardt",
    # segmentation
    "DENOISE", "binarize", "denoise", "otsu_threshold", "particle_labels",
    # transform
    "apply_affine", "compose", "displacement_error", "grid_center", "identity", "invert", "matrix_from_params",
    "params_from_matrix", "rotation_matrix", "scale_matrix",
    # streaming
    "HostToDevicePrefetcher",
]
