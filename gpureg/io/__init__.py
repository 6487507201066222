"""Input and output: readers of beamline files into one lazy, read-only object, the Data Exchange writer,
file helpers (atomic writes) and :mod:`gpureg.io.results`, the single owner of the result-file layout.
Bad inputs raise :class:`gpureg.core.errors.InputError`.
"""

from .base import InputReader
from .dataexchange import write_dataexchange
from .detect import describe_input
from .files import atomic_path, load_volume, save_matrix, save_volume
from .readers import open_input
from .results import STAGES

__all__ = [
    "InputReader", "describe_input", "open_input",
    "write_dataexchange", "atomic_path", "load_volume", "save_matrix", "save_volume",
    "STAGES",
]
