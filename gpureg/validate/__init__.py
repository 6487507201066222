"""Validation sweep against known transforms (and SimpleITK when installed)."""

from .cases import (
    DEFAULT_MAGNITUDES,
    DISTORTIONS,
    MAGNITUDE_UNITS,
    MODES,
    NOISE_LEVELS,
    QUICK,
    SmoothDeformation,
    distortion_matrix,
    salt_and_pepper,
    summarize,
)
from .sweep import ValidationResult, run_validation
from .sitk import register_sitk, sitk_available

__all__ = ["DEFAULT_MAGNITUDES", "distortion_matrix", "DISTORTIONS", "MAGNITUDE_UNITS", "MODES", "NOISE_LEVELS", "QUICK", "register_sitk", "run_validation", "salt_and_pepper", "sitk_available", "SmoothDeformation", "summarize", "ValidationResult"]
