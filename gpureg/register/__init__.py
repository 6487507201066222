"""Registration: preparation (binarize/denoise/smooth), affine registration, series, per-particle registration,
deformable (B-spline) refinement."""

from .affine import MODELS, RegistrationResult, register_affine, register_prepared
from .deformable import (DeformableResult, apply_deformation, deformation_field, register_deformable,
                         register_deformable_prepared)
from .particle_check import detect_relative_motion
from .particles import (PARTICLE_MODELS, ParticleOptions, ParticleResult, apply_piecewise, particle_regions,
                        piecewise_map, register_particles)
from .prepare import (
                      Prep,
                      center_of_mass,
                      downsample2,
                      foreground_fraction,
                      level_to_fine,
                      prepare_reference,
                      prepare_volume,
                      pyramid,
)
from .residuals import RelativeMotionWarning, ResidualReport
from .series import SeriesResult, register_series

__all__ = [
    "center_of_mass", "downsample2", "foreground_fraction", "level_to_fine", "Prep", "prepare_reference", "prepare_volume", "pyramid",
    "MODELS", "RegistrationResult", "register_affine", "register_prepared",
    "SeriesResult", "register_series",
    "PARTICLE_MODELS", "ParticleOptions", "ParticleResult", "apply_piecewise", "particle_regions", "piecewise_map",
    "register_particles",
    "RelativeMotionWarning", "ResidualReport", "detect_relative_motion",
    "DeformableResult", "apply_deformation", "deformation_field", "register_deformable",
    "register_deformable_prepared",
]
