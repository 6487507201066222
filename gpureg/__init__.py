"""gpureg: GPU engine for synchrotron spectro-tomography (TXM-XANES).

FBP per energy, Otsu binarization, 3D affine MSE registration of every energy
to a reference, and per-voxel edge-energy maps; compiled, multithreaded numba kernels on the CPU
(NumPy/SciPy as the reference), CuPy raw CUDA kernels on an NVIDIA GPU. The public API is declared once, in
``__init__.pyi``, and loaded
lazily (``import gpureg`` imports no heavy module: no CuPy, numba, matplotlib, ASTRA, Dask, typer); the layers
below (``core`` -> ``io`` -> ``recon``/``register``/``xanes`` -> ``figures``/``synth`` ->
``pipeline``/``validate``/``viewer`` -> ``cli``) are described in README.md.
"""

import warnings as _warnings

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)
_public_getattr = __getattr__

_RENAMED = {"normalize": "flatfield_correct"}  # old name -> new (deprecated; gone in the next release)


def __getattr__(name):  # noqa: F811 - the lazy loader's, plus the deprecated names
    if name in _RENAMED:
        _warnings.warn(f"gpureg.{name} is renamed gpureg.{_RENAMED[name]}; the old name goes in the next release",
                       DeprecationWarning, stacklevel=2)
        name = _RENAMED[name]
    return _public_getattr(name)
