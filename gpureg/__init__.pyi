# ruff: noqa: F401 - a stub of re-exports: every import here is a public name
"""The public API of gpureg, declared once: ``gpureg/__init__.py`` loads these names lazily from this stub
(``lazy_loader.attach_stub``, as scikit-image does), and type checkers read it."""

from . import cli, core, figures, io, pipeline, recon, register, synth, validate, viewer, xanes
from .core.backend import get_xp, gpu_available, to_device, to_host
from .core.config import config
from .core.errors import GpuregError, GPUUnavailableError
from .core.metric import mse_terms
from .core.segment import binarize, otsu_threshold, particle_labels
from .core.terms import MetricTerms
from .core.transform import (apply_affine, compose, displacement_error, invert, matrix_from_params,
                             params_from_matrix, rotation_matrix, scale_matrix)
from .core.version import __version__
from .io.dataexchange import write_dataexchange
from .io.readers import open_input
from .pipeline.options import RunOptions
from .pipeline.runner import run
from .recon.align import AlignmentResult, align_projections
from .recon.fbp import reconstruct_energy, reconstruct_fbp
from .recon.flatfield import flatfield_correct
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
