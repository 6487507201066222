"""gpureg: GPU engine for synchrotron spectro-tomography (TXM-XANES).

FBP per energy, Otsu binarization, 3D affine MSE registration of every energy
to a reference, and per-voxel edge-energy maps; NumPy on the CPU, CuPy raw
CUDA kernels on an NVIDIA GPU. The public API is listed here once; the layers
below (``core`` -> ``io``/``recon``/``register``/``xanes`` -> ``figures`` ->
``synth`` -> ``pipeline``/``validate`` -> ``cli``) are described in README.md.
"""

from .core.backend import GPUUnavailableError, get_xp, gpu_available, to_device, to_host
from .core.config import config
from .core.metric import mse_terms
from .core.segment import binarize, otsu_threshold, particle_labels
from .core.terms import MetricTerms
from .core.transform import (
                             apply_affine,
                             compose,
                             displacement_error,
                             invert,
                             matrix_from_params,
                             params_from_matrix,
                             rotation_matrix,
                             scale_matrix,
)
from .core.version import __version__
from .io.dataexchange import write_dataexchange
from .io.readers import open_input
from .pipeline.options import RunOptions
from .pipeline.runner import run
from .recon.align import AlignmentResult, align_projections
from .recon.fbp import reconstruct_energy, reconstruct_fbp
from .recon.flatfield import normalize
from .register.affine import RegistrationResult, register_affine, register_prepared
from .register.deformable import DeformableResult, apply_deformation, register_deformable
from .register.particle_check import detect_relative_motion
from .register.particles import ParticleOptions, ParticleResult, apply_piecewise, register_particles
from .register.prepare import Prep
from .register.series import SeriesResult, register_series
from .synth.phantom import two_particle_phantom
from .synth.scan import simulate
from .validate.sweep import run_validation
from .xanes.cluster import cluster_spectra, spectral_components
from .xanes.edge import edge_energy
from .xanes.lcf import FitResult, fit_references
from .xanes.stack import edge_energy_map

__all__ = [
    "AlignmentResult",
    "align_projections",
    "GPUUnavailableError",
    "MetricTerms",
    "ParticleOptions",
    "ParticleResult",
    "Prep",
    "RegistrationResult",
    "RunOptions",
    "SeriesResult",
    "__version__",
    "apply_affine",
    "apply_deformation",
    "DeformableResult",
    "register_deformable",
    "apply_piecewise",
    "binarize",
    "compose",
    "config",
    "detect_relative_motion",
    "displacement_error",
    "cluster_spectra",
    "edge_energy",
    "edge_energy_map",
    "fit_references",
    "FitResult",
    "spectral_components",
    "get_xp",
    "gpu_available",
    "invert",
    "matrix_from_params",
    "mse_terms",
    "normalize",
    "open_input",
    "otsu_threshold",
    "params_from_matrix",
    "particle_labels",
    "reconstruct_energy",
    "reconstruct_fbp",
    "register_affine",
    "register_particles",
    "register_prepared",
    "register_series",
    "rotation_matrix",
    "run",
    "run_validation",
    "scale_matrix",
    "simulate",
    "to_device",
    "to_host",
    "two_particle_phantom",
    "write_dataexchange",
]
