"""The errors a user causes (:class:`GpuregError` and its family); anything else raised is a bug.

Every error of this family says in one line what was wrong and where (file,
dataset, parameter) and what was expected, so ``gpureg`` prints that line and
exits with code 2. Each subclass also derives from the built-in exception that
was raised before the family existed (``ValueError``, ``RuntimeError``), so
``except ValueError`` keeps working. Library messages speak of parameters
(``reference=``), never of command-line flags; the CLI names its flags itself.
"""

from __future__ import annotations

__all__ = ["DependencyError", "EnergyGridError", "GpuregError", "GPUUnavailableError", "InputError", "OutputError", "ParameterError", "ResourceError"]


class GpuregError(Exception):
    """Something the user can fix: a bad input, output, parameter, a missing GPU, too little memory."""


class InputError(GpuregError, ValueError):
    """A file, dataset or option is not what was expected (message names it)."""


class ParameterError(InputError):
    """A parameter value is out of its range or not one of its choices (message names the parameter)."""


class EnergyGridError(InputError):
    """The energies cannot give an edge map: too few of them, or none between the pre- and post-edge fit ranges.

    A property of the scan's energy grid, not of the data: a run keeps its registration and skips the maps.
    """


class OutputError(InputError):
    """The output cannot be written there: it exists, is the input, or its folder is missing or read-only."""


class DependencyError(GpuregError, RuntimeError):
    """An optional package or service is missing or unreachable (the message says what to install or check)."""


class GPUUnavailableError(DependencyError):
    """``device="gpu"`` was asked for but CuPy, ASTRA's CUDA or a CUDA device is missing."""


class ResourceError(GpuregError, ValueError):
    """The estimated memory or disk need exceeds what is available (message has the numbers)."""
