"""The installed version of gpureg (a leaf module: importing it pulls in nothing else)."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

__all__ = ["__version__"]

try:
    __version__ = _version("gpureg")
except PackageNotFoundError:  # running from a source checkout
    __version__ = "0.1.0+src"
