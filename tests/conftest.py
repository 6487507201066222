"""Shared fixtures: backend-parametrized ``xp`` and the ``gpu`` marker."""

import dataclasses

import numpy as np
import pytest

from gpureg.core.backend import cupy_or_none
from gpureg.core.config import config


def pytest_collection_modifyitems(config, items):
    if cupy_or_none() is not None:
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        # The marker, not ``"gpu" in item.keywords``: keywords also hold the names of parent
        # folders, so a checkout in a folder named ``gpu`` would skip every test.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def xp(request):
    """NumPy, and CuPy when a GPU is usable (skipped otherwise)."""
    if request.param == "numpy":
        return np
    return cupy_or_none()


@pytest.fixture(autouse=True)
def _config_restored():
    """Every test starts from, and leaves, the process-wide ``gpureg.config`` it found (``--threads`` sets it)."""
    saved = config.get()
    yield
    config.set(**dataclasses.asdict(saved))
