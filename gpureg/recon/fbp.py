"""Flat/dark normalisation and filtered back-projection (FBP) per energy with ASTRA.

Geometry (parallel beam, one convention everywhere)
---------------------------------------------------
Projections are ``(n_angle, nz, nx)``: detector rows are the volume's ``z``
(the rotation axis), detector columns its ``x``. A reconstruction is
``(nz, nx, nx)`` in ``(z, y, x)``; slice ``z`` is the FBP of the sinogram
``projections[:, z, :]`` with ASTRA's 2D parallel geometry (angles in radians
inside ASTRA, degrees everywhere else). :func:`forward_project` is its exact
counterpart, so a volume forward-projected here and reconstructed here lands
on the same voxel grid (the synthetic experiment relies on it).
The rotation axis is at detector column ``center`` (default ``(nx - 1) / 2``,
ASTRA's detector middle); another centre is handled by a sub-pixel Fourier
shift of the detector axis before filtering.

Where a voxel projects (the convention, fixed once and tested against an analytic phantom)
-----------------------------------------------------------------------------------------
ASTRA's 2D ``parallel`` geometry with unit detector pixels and an ``nx x nx``
volume grid: with ``c = (nx - 1) / 2``, voxel ``(z, y, x)`` projects at angle
``theta`` onto detector row ``z``, column
``u = c + (x - c) cos(theta) - (y - c) sin(theta)``
(``tests/recon/test_fbp_geometry.py`` checks it on both devices with
analytic projections of off-centre Gaussian blobs, not ASTRA's own projector).

Backends
--------
The same ASTRA 2D geometry and ASTRA's own FBP filter on both: the ``FBP``
algorithm with the ``linear`` projector on the CPU, ``FBP_CUDA`` on the GPU
(ASTRA built with CUDA and a device present), slice by slice, with the ASTRA
objects created once per volume and reused. Nothing is calibrated at run time.
Until issue 23 the GPU path filtered with its own copy of ASTRA's filter and
back-projected with the 3D ``BP3D_CUDA`` in slabs, whose orientation and scale
relative to the 2D geometry were probed at run time (a random sinogram
back-projected both ways, every flip tried).
All ASTRA objects are created through :class:`Astra`, which always frees them.
"""

from __future__ import annotations

import functools
import logging
import warnings

import numpy as np

from ..core.backend import (
    array_device,
    cupy_or_none,
    resolve_device,
    to_host,
)
from ..core.config import config
from ..core.errors import InputError, ParameterError
from .flatfield import energy_problem, flatfield_correct
from .project import Astra, estimate_center, set_astra_gpu
from .repair import repair_projections

__all__ = ["astra_cuda_available", "astra_cuda_probe", "astra_gpu_index", "fbp_device", "FILTERS", "reconstruct_energy", "reconstruct_fbp"]

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann", "none")


_log = logging.getLogger("gpureg")


def reconstruct_fbp(projections, theta_deg, *, center=None, filter: str = "ram-lak", device: str = "auto"):
    """Filtered back-projection of parallel-beam projections, slice by slice.

    Parameters
    ----------
    projections : (n_angle, nz, nx) ndarray
        Line integrals (``-log`` transmission, see :func:`flatfield_correct`), NumPy or CuPy.
    theta_deg : (n_angle,) array_like
        Projection angles in degrees.
    center : float or "auto", optional
        Detector column of the rotation axis (sub-pixel); None: ``(nx - 1) / 2``;
        ``"auto"``: :func:`estimate_center` on these projections.
    filter : str
        One of :data:`FILTERS` (ASTRA's definitions; Ram-Lak by default).
    device : str
        ``"auto"`` (ASTRA CUDA when built with CUDA and a GPU is present, else
        CPU, logged once), ``"cpu"`` or ``"gpu"`` (an error without ASTRA CUDA).

    Returns
    -------
    (nz, nx, nx) ndarray of float32
        Attenuation per voxel (units: 1 / voxel), axes ``(z, y, x)``; on the
        GPU when the input was a CuPy array, else NumPy.
    """
    if getattr(projections, "ndim", None) != 3:
        raise InputError(f"projections must be (n_angle, nz, nx), got shape {getattr(projections, 'shape', None)}")
    n_angle, nz, nx = projections.shape
    if min(n_angle, nz, nx) < 1:
        raise InputError(f"projections must not be empty, got shape {projections.shape}")
    theta = np.asarray(to_host(theta_deg), dtype=np.float64).ravel()
    if theta.shape != (n_angle,):
        raise InputError(f"theta_deg must have one angle per projection ({n_angle}), got {theta.shape[0]}")
    if not np.all(np.isfinite(theta)):
        raise InputError("theta_deg contains NaN or inf")
    filt = _check_filter(filter)
    if isinstance(center, str):
        if center.lower() != "auto":
            raise ParameterError(f"center must be a number, None or 'auto', got {center!r}")
        center = estimate_center(projections, theta)
    mid = (nx - 1) / 2.0
    c = mid if center is None else float(center)
    if not np.isfinite(c) or not (-0.5 <= c <= nx - 0.5):
        raise ParameterError(f"center must lie on the detector [-0.5, {nx - 0.5}], got {center}")
    shift = c - mid
    on_gpu_input = array_device(projections) == "gpu"
    if abs(shift) > 1e-6:  # on the device the projections are on
        projections = _fourier_shift(cupy_or_none() if on_gpu_input else np, projections, shift)
    proj = np.asarray(to_host(projections), dtype=np.float32)
    out = None
    if fbp_device(device) == "gpu":
        try:
            set_astra_gpu(astra_gpu_index(cupy_or_none(), projections))
            out = _fbp_astra(proj, np.deg2rad(theta), filt, cuda=True)
        except Exception as exc:  # noqa: BLE001 - untested CUDA setups: fall back loudly under "auto"
            if device != "auto" or isinstance(exc, (ValueError, MemoryError)):
                raise
            warnings.warn(f"ASTRA CUDA FBP failed ({type(exc).__name__}: {exc}); using the CPU", RuntimeWarning,
                          stacklevel=2)
    if out is None:
        out = _fbp_astra(proj, np.deg2rad(theta), filt, cuda=False)
    return cupy_or_none().asarray(out) if on_gpu_input else out


def reconstruct_energy(reader, i: int, *, center=None, filter: str = "ram-lak", device: str = "auto",
                       repairs: dict | None = None):
    """Reconstruct energy ``i`` of an input opened with :func:`gpureg.io.open_input`.

    Parameters
    ----------
    reader : gpureg.io.InputReader
        Open input (projections or reconstructed volumes).
    i : int
        Energy index (in the reader's ascending energy order).
    center, filter, device
        As in :func:`reconstruct_fbp`.
    repairs : dict, optional
        Receives ``repairs[i]``: the :class:`~gpureg.recon.repair.Repair` of the
        dead/hot pixels and outlier projections repaired before FBP.

    Returns
    -------
    (nz, ny, nx) ndarray of float32
        ``flatfield_correct`` + ``repair_projections`` + ``reconstruct_fbp`` of the energy's projections; the
        stored volume itself for an input of kind ``"recon"``.

    Raises
    ------
    gpureg.io.BadEnergyError
        The energy cannot give a valid volume (:func:`~gpureg.recon.flatfield.energy_problem`:
        zero flat field, NaN or zero projections; a volume with NaN/inf voxels).
    """
    if reader.kind == "recon":
        vol = reader.recon(i)
        finite = np.isfinite(vol)
        if not finite.all():
            reason = "volume is all NaN/inf" if not finite.any() else \
                f"volume has {100 * (1 - finite.mean()):.1f} % NaN/inf voxels"
            _bad_energy(reader, i, reason)
        return vol
    raw, flat, dark = reader.projections(i), reader.flat(i), reader.dark(i)
    reason = energy_problem(raw, flat, dark)
    if reason is not None:
        _bad_energy(reader, i, reason)
    p, rep = repair_projections(flatfield_correct(raw, flat, dark, warn=False))
    if repairs is not None:
        repairs[i] = rep
    return reconstruct_fbp(p, reader.theta, center=center, filter=filter, device=device)


def _bad_energy(reader, i, reason):
    from ..io.files import BadEnergyError

    energy = float(reader.energies[i])
    raise BadEnergyError(f"{reader.path}: energy {energy:g} eV: {reason}", energy=energy, reason=reason)


def astra_cuda_available() -> bool:
    """True when ASTRA was built with CUDA and sees a GPU (``gpureg.config.disable_gpu`` hides it)."""
    return astra_cuda_probe()[0]


def astra_cuda_probe() -> tuple:
    """``(True, "")`` when ASTRA was built with CUDA and sees a GPU, else ``(False, reason)``.

    Probed once per process, independently of CuPy (:func:`gpureg.core.backend.cupy_probe`):
    CuPy may be usable while the installed ASTRA has no CUDA, and the other way round.
    ``gpureg.config.disable_gpu`` hides the GPU (checked at every call).
    """
    if config.disable_gpu:
        return False, "GPU use is disabled (gpureg.config.disable_gpu; GPUREG_DISABLE_GPU)"
    return _astra_cuda_probe()


def fbp_device(device: str = "auto") -> str:
    """The device FBP runs on for ``"auto" | "cpu" | "gpu"``: ``"gpu"`` means ASTRA-CUDA.

    :func:`gpureg.core.backend.resolve_device` with ASTRA's CUDA probe:
    ``"auto"`` falls back to the CPU (logged once) when ASTRA-CUDA is unusable;
    ``"gpu"`` then raises :class:`~gpureg.core.backend.GPUUnavailableError`.
    """
    return resolve_device(device, probe=astra_cuda_probe, what="FBP (ASTRA CUDA)")


def _fbp_astra(proj, theta_rad, filt, *, cuda: bool):
    """ASTRA's 2D FBP of every slice (``FBP`` + ``linear`` projector, or ``FBP_CUDA``), objects made once."""
    _, nz, nx = proj.shape
    out = np.empty((nz, nx, nx), dtype=np.float32)
    with Astra() as a:
        vg = a.astra.create_vol_geom(nx, nx)
        pg = a.astra.create_proj_geom("parallel", 1.0, nx, theta_rad)
        sid = a.data2d("-sino", pg)
        rid = a.data2d("-vol", vg)
        cfg = {"type": "FBP_CUDA" if cuda else "FBP", "ProjectionDataId": sid, "ReconstructionDataId": rid,
               "option": {"FilterType": filt}}
        if not cuda:
            cfg["ProjectorId"] = a.projector("linear", pg, vg)
        aid = a.algorithm(cfg)
        for z in range(nz):
            a.astra.data2d.store(sid, np.ascontiguousarray(proj[:, z, :]))
            a.astra.algorithm.run(aid)
            out[z] = a.astra.data2d.get_shared(rid)
    return out


def astra_gpu_index(cp, proj=None) -> int:
    """CUDA device for ASTRA: that of ``proj`` when it is a CuPy array, else CuPy's current one (0 without CuPy)."""
    if cp is None:
        return 0
    if array_device(proj) == "gpu":
        return int(proj.device.id)
    return int(cp.cuda.Device().id)


@functools.lru_cache(maxsize=1)
def _astra_cuda_probe():
    try:
        import astra
    except Exception as exc:  # noqa: BLE001 - missing or broken install
        return False, f"ASTRA does not import ({type(exc).__name__})"
    try:
        if not astra.use_cuda():
            return False, "ASTRA was built without CUDA or sees no GPU"
    except Exception as exc:  # noqa: BLE001
        return False, f"ASTRA CUDA probe failed ({exc})"
    return True, ""


def _fourier_shift(xp, proj, shift):
    """``out(u) = proj(u + shift)`` along the last axis (zero-padded, no wrap-around)."""
    n = proj.shape[-1]
    size = _fft_size(n)
    k = np.arange(size // 2 + 1)
    ramp = xp.asarray(np.exp(2j * np.pi * k * shift / size).astype(np.complex64))
    spec = xp.fft.rfft(xp.asarray(proj, dtype=xp.float32), size, axis=-1) * ramp
    return xp.fft.irfft(spec, size, axis=-1)[..., :n].astype(xp.float32)


def _fft_size(n):
    return max(64, 1 << int(np.ceil(np.log2(2 * n))))


def _check_filter(filt):
    if not isinstance(filt, str) or filt.lower() not in FILTERS:
        raise ParameterError(f"filter must be one of {FILTERS}, got {filt!r}")
    return filt.lower()
