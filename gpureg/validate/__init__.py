"""Validation sweep against known transforms (and SimpleITK when installed)."""

from .cases import (DEFAULT_MAGNITUDES, DISTORTIONS, MAGNITUDE_UNITS, MODES, NOISE_LEVELS, QUICK, SmoothDeformation,
                    distortion_matrix, random_affine, salt_and_pepper, summarize)
from .sitk import register_sitk, sitk_available
from .sweep import ValidationResult, run_validation

__all__ = [
    "ValidationResult", "run_validation",
    "DEFAULT_MAGNITUDES", "DISTORTIONS", "MAGNITUDE_UNITS", "MODES", "NOISE_LEVELS", "QUICK", "random_affine",
    "SmoothDeformation", "distortion_matrix", "salt_and_pepper", "summarize",
    "register_sitk", "sitk_available",
]
