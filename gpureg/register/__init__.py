"""Registration: preparation (binarize/denoise/smooth), affine registration, series, per-particle registration."""

from .affine import MODELS, RegistrationResult, register_affine, register_prepared
from .particle_check import detect_relative_motion
from .particles import (
    PARTICLE_MODELS,
    ParticleResult,
    apply_piecewise,
    particle_regions,
    register_particles,
)
from .prepare import center_of_mass, downsample2, foreground_fraction, level_to_fine, prepare_volume, pyramid
from .residuals import RelativeMotionWarning, ResidualReport
from .series import SeriesResult, register_series

__all__ = ["downsample2", "level_to_fine", "apply_piecewise", "center_of_mass", "detect_relative_motion", "foreground_fraction", "MODELS", "PARTICLE_MODELS", "particle_regions", "ParticleResult", "prepare_volume", "pyramid", "register_affine", "register_particles", "register_prepared", "register_series", "RegistrationResult", "RelativeMotionWarning", "ResidualReport", "SeriesResult"]
