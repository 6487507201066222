"""Validation sweep against known transforms (and SimpleITK when installed)."""

from .cases import DEFAULT_MAGNITUDES, DISTORTIONS, MAGNITUDE_UNITS, MODES, NOISE_LEVELS, QUICK, summarize
from .sitk import register_sitk, sitk_available
from .sweep import ValidationResult, run_validation

__all__ = [
    "ValidationResult", "run_validation",
    "DEFAULT_MAGNITUDES", "DISTORTIONS", "MAGNITUDE_UNITS", "MODES", "NOISE_LEVELS", "QUICK", "summarize",
    "register_sitk", "sitk_available",
]
