"""gpureg: GPU engine for synchrotron spectro-tomography (TXM-XANES).

FBP per energy, Otsu binarization, 3D affine MSE registration of every energy
to a reference, and per-voxel edge-energy maps; NumPy on the CPU, CuPy raw
CUDA kernels on an NVIDIA GPU.
"""

from importlib.metadata import PackageNotFoundError, version as _version

from .backend import GPUUnavailableError, get_xp, gpu_available, to_device, to_host
from .io import open_input, write_dataexchange
from .io import open_input, write_dataexchange
from .metric import MetricTerms, mse_terms
from .particles import ParticleResult, apply_piecewise, detect_relative_motion, register_particles
from .phantom import two_particle_phantom
from .recon import normalize, reconstruct_energy, reconstruct_fbp
from .recon import normalize, reconstruct_energy, reconstruct_fbp
from .register import RegistrationResult, SeriesResult, register_affine, register_series
from .segment import binarize, otsu_threshold
from .synth import simulate
from .synth import simulate
from .transform import (apply_affine, compose, displacement_error, invert, matrix_from_params,
                        params_from_matrix, rotation_matrix, scale_matrix)
from .xanes import edge_energy, edge_energy_map, particle_labels
from .validate import run_validation

try:
    __version__ = _version("gpureg")
except PackageNotFoundError:  # running from a source checkout
    __version__ = "0.1.0+src"

__all__ = [
    "GPUUnavailableError",
    "MetricTerms",
    "RegistrationResult",
    "SeriesResult",
    "__version__",
    "apply_affine",
    "binarize",
    "compose",
    "displacement_error",
    "get_xp",
    "gpu_available",
    "invert",
    "matrix_from_params",
    "mse_terms",
    "normalize",
    "open_input",
    "normalize",
    "open_input",
    "otsu_threshold",
    "params_from_matrix",
    "reconstruct_energy",
    "reconstruct_fbp",
    "reconstruct_energy",
    "reconstruct_fbp",
    "register_affine",
    "register_series",
    "run_validation",
    "rotation_matrix",
    "scale_matrix",
    "simulate",
    "simulate",
    "to_device",
    "to_host",
    "two_particle_phantom",
    "write_dataexchange",
    "write_dataexchange",
    "edge_energy",
    "edge_energy_map",
    "particle_labels",
    "ParticleResult",
    "apply_piecewise",
    "detect_relative_motion",
    "register_particles",
]
