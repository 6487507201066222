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

Backends
--------
CPU: ASTRA's ``FBP`` algorithm with the ``linear`` projector, slice by slice,
with the ASTRA objects created once and reused. GPU (ASTRA built with CUDA and
a device present): the sinograms are ramp-filtered with the same filter as
ASTRA's (CuPy FFT when CuPy is present, else NumPy), then back-projected with
``BP3D_CUDA`` in slabs of slices sized to the free device memory. The 3D CUDA
geometry is checked against the 2D CPU one once per process (orientation and
scale, on a small random sinogram) so both paths give the same volume.
All ASTRA objects are created through :class:`Astra`, which always frees them.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import numpy as np

from ..core.backend import (
    GPUUnavailableError,
    array_device,
    cupy_or_none,
    to_host,
)
from ..core.config import config
from .flatfield import energy_problem, normalize
from .project import Astra, estimate_center, set_astra_gpu

__all__ = ["astra_cuda_available", "astra_cuda_probe", "astra_gpu_index", "fbp_device", "FILTERS", "reconstruct_energy", "reconstruct_fbp", "reconstruct_file"]

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann", "none")


_log = logging.getLogger("gpureg")


def reconstruct_fbp(projections, theta_deg, *, center=None, filter: str = "ram-lak", device: str = "auto"):
    """Filtered back-projection of parallel-beam projections, slice by slice.

    Parameters
    ----------
    projections : (n_angle, nz, nx) ndarray
        Line integrals (``-log`` transmission, see :func:`normalize`), NumPy or CuPy.
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
        raise ValueError(f"projections must be (n_angle, nz, nx), got shape {getattr(projections, 'shape', None)}")
    n_angle, nz, nx = projections.shape
    if min(n_angle, nz, nx) < 1:
        raise ValueError(f"projections must not be empty, got shape {projections.shape}")
    theta = np.asarray(to_host(theta_deg), dtype=np.float64).ravel()
    if theta.shape != (n_angle,):
        raise ValueError(f"theta_deg must have one angle per projection ({n_angle}), got {theta.shape[0]}")
    if not np.all(np.isfinite(theta)):
        raise ValueError("theta_deg contains NaN or inf")
    filt = _check_filter(filter)
    if isinstance(center, str):
        if center.lower() != "auto":
            raise ValueError(f"center must be a number, None or 'auto', got {center!r}")
        center = estimate_center(projections, theta)
    mid = (nx - 1) / 2.0
    c = mid if center is None else float(center)
    if not np.isfinite(c) or not (-0.5 <= c <= nx - 0.5):
        raise ValueError(f"center must lie on the detector [-0.5, {nx - 0.5}], got {center}")
    shift = c - mid
    on_gpu_input = array_device(projections) == "gpu"
    if _use_cuda(device):
        try:
            out = _fbp_cuda(projections, np.deg2rad(theta), shift, filt)
        except Exception as exc:  # noqa: BLE001 - untested CUDA setups: fall back loudly under "auto"
            if device != "auto" or isinstance(exc, (ValueError, MemoryError)):
                raise
            warnings.warn(f"ASTRA CUDA FBP failed ({type(exc).__name__}: {exc}); using the CPU", RuntimeWarning,
                          stacklevel=2)
            out = None
        if out is not None:
            return out if on_gpu_input or array_device(out) == "cpu" else out.get()
    out = _fbp_cpu(np.asarray(to_host(projections), dtype=np.float32), np.deg2rad(theta), shift, filt)
    if on_gpu_input:
        return cupy_or_none().asarray(out)
    return out


def reconstruct_energy(reader, i: int, *, center=None, filter: str = "ram-lak", device: str = "auto"):
    """Reconstruct energy ``i`` of an input opened with :func:`gpureg.io.open_input`.

    Parameters
    ----------
    reader : gpureg.io.InputReader
        Open input (projections or reconstructed volumes).
    i : int
        Energy index (in the reader's ascending energy order).
    center, filter, device
        As in :func:`reconstruct_fbp`.

    Returns
    -------
    (nz, ny, nx) ndarray of float32
        ``normalize`` + ``reconstruct_fbp`` of the energy's projections; the
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
    p = normalize(raw, flat, dark)
    return reconstruct_fbp(p, reader.theta, center=center, filter=filter, device=device)


def _bad_energy(reader, i, reason):
    from ..io.files import BadEnergyError

    energy = float(reader.energies[i])
    raise BadEnergyError(f"{reader.path}: energy {energy:g} eV: {reason}", energy=energy, reason=reason)


def reconstruct_file(input_path, output_path, *, center=None, filter: str = "ram-lak", device: str = "auto",
                     progress=None) -> Path:
    """Reconstruct every energy of an input and write a Data Exchange recon file.

    Parameters
    ----------
    input_path : str or Path
        Anything :func:`gpureg.io.open_input` reads.
    output_path : str or Path
        HDF5 file written atomically: ``/exchange/recon (n_energy, nz, ny, nx)``,
        ``/exchange/energy``, ``/exchange/theta`` and the input's ``/truth`` group
        when present; one energy in memory at a time.
    center, filter, device
        As in :func:`reconstruct_fbp`.
    progress : callable, optional
        Called as ``progress(i, n_energy, energy_ev)`` after each energy.

    Returns
    -------
    Path
        ``output_path``.
    """
    from ..core.version import __version__
    from ..io.dataexchange import write_dataexchange
    from ..io.readers import open_input

    _check_filter(filter)
    with open_input(input_path) as reader:
        energies = reader.energies
        counts = []

        def volumes():
            for i in range(reader.n_energy):
                if reader.kind == "recon":
                    vol = reader.recon(i)
                else:
                    p, n_bad = normalize(reader.projections(i), reader.flat(i), reader.dark(i), return_count=True)
                    counts.append(n_bad)
                    vol = reconstruct_fbp(p, reader.theta, center=center, filter=filter, device=device)
                yield vol
                if progress is not None:
                    progress(i, reader.n_energy, float(energies[i]))

        attrs = {"source": str(reader.path), "source_kind": reader.kind, "gpureg_version": __version__,
                 "recon_parameters": {"center": center, "filter": filter, "device": device}}
        write_dataexchange(output_path, recon=volumes(), energy=energies, theta=reader.theta,
                           truth=reader.truth(), attrs=attrs)
    if sum(counts):
        _log.info("gpureg: %d non-positive transmissions clipped in total", sum(counts))
    return Path(output_path)


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

    ``"auto"`` falls back to the CPU (logged once) when ASTRA-CUDA is unusable;
    ``"gpu"`` then raises :class:`~gpureg.core.backend.GPUUnavailableError`.
    """
    return "gpu" if _use_cuda(device) else "cpu"


def _fbp_cpu(proj, theta_rad, shift, filt):
    """ASTRA CPU FBP (``linear`` projector), one reused algorithm for all slices."""
    n_angle, nz, nx = proj.shape
    if abs(shift) > 1e-6:
        proj = _fourier_shift(np, proj, shift)
    out = np.empty((nz, nx, nx), dtype=np.float32)
    with Astra() as a:
        vg = a.astra.create_vol_geom(nx, nx)
        pg = a.astra.create_proj_geom("parallel", 1.0, nx, theta_rad)
        pid = a.projector("linear", pg, vg)
        sid = a.data2d("-sino", pg)
        rid = a.data2d("-vol", vg)
        aid = a.algorithm({"type": "FBP", "ProjectorId": pid, "ProjectionDataId": sid,
                           "ReconstructionDataId": rid, "option": {"FilterType": filt}})
        for z in range(nz):
            a.astra.data2d.store(sid, np.ascontiguousarray(proj[:, z, :]))
            a.astra.algorithm.run(aid)
            out[z] = a.astra.data2d.get_shared(rid)
    return out


def _fbp_cuda(proj, theta_rad, shift, filt):
    """Ramp filter (CuPy or NumPy) + ASTRA ``BP3D_CUDA`` over slabs of slices."""
    n_angle, nz, nx = proj.shape
    cp = cupy_or_none()
    xp = cp if cp is not None else np
    set_astra_gpu(astra_gpu_index(cp, proj))  # before the calibration, which runs ASTRA too
    flip_vol, flip_det, scale = _cuda_calibration()
    h = _filter_response(xp, nx, filt, shift, scale * np.pi / (2.0 * n_angle))
    slab = _slab_size(cp, n_angle, nx, nz)
    dev_out = array_device(proj) == "gpu"
    out = cp.empty((nz, nx, nx), dtype=cp.float32) if dev_out else np.empty((nz, nx, nx), dtype=np.float32)
    with Astra() as a:
        for z0 in range(0, nz, slab):
            z1 = min(nz, z0 + slab)
            m = z1 - z0
            sino = xp.asarray(proj[:, z0:z1, :], dtype=xp.float32)
            sino = _apply_filter(xp, sino, h)  # (n_angle, m, nx)
            if flip_det:
                sino = sino[..., ::-1]
            sino = xp.ascontiguousarray(sino.transpose(1, 0, 2))  # ASTRA 3D: (rows, angles, cols)
            vg = a.astra.create_vol_geom(nx, nx, m)
            pg = a.astra.create_proj_geom("parallel3d", 1.0, 1.0, m, nx, theta_rad)
            vol = _backproject3d(a, xp, sino, pg, vg, (m, nx, nx))
            if flip_vol[0]:
                vol = vol[:, ::-1, :]
            if flip_vol[1]:
                vol = vol[:, :, ::-1]
            if dev_out or xp is np:
                out[z0:z1] = vol
            else:
                out[z0:z1] = vol.get()
    return out


def astra_gpu_index(cp, proj=None) -> int:
    """CUDA device for ASTRA: that of ``proj`` when it is a CuPy array, else CuPy's current one (0 without CuPy)."""
    if cp is None:
        return 0
    if array_device(proj) == "gpu":
        return int(proj.device.id)
    return int(cp.cuda.Device().id)


def _backproject3d(a, xp, sino, pg, vg, shape):
    """One BP3D_CUDA run on a slab; device-resident (DLPack link) with CuPy, host arrays otherwise."""
    if xp is np:
        sid = a.data3d("-sino", pg, sino)
        vid = a.data3d("-vol", vg, 0.0)
        aid = a.algorithm({"type": "BP3D_CUDA", "ProjectionDataId": sid, "ReconstructionDataId": vid})
        a.astra.algorithm.run(aid)
        return a.astra.data3d.get(vid)
    vol = xp.zeros(shape, dtype=xp.float32)
    sid = a.data3d("-sino", pg, sino, link=True)
    vid = a.data3d("-vol", vg, vol, link=True)
    aid = a.algorithm({"type": "BP3D_CUDA", "ProjectionDataId": sid, "ReconstructionDataId": vid})
    # ASTRA runs on its own CUDA stream: finish CuPy's filtering before, and ASTRA's kernels after.
    xp.cuda.Device().synchronize()
    a.astra.algorithm.run(aid)
    xp.cuda.Device().synchronize()
    return vol


@functools.lru_cache(maxsize=1)
def _cuda_calibration():
    """Orientation and scale of ASTRA's 3D CUDA back-projection relative to its 2D CPU one.

    ASTRA's 2D and 3D geometries are defined separately; rather than rely on
    their documentation, back-project one smooth random sinogram both ways and
    pick the volume/detector flips (and the scale) that make them agree.

    Returns
    -------
    ((bool, bool), bool, float)
        Flip of the volume's (y, x) axes, flip of the detector axis, and the
        factor that scales the 3D back-projection onto the 2D one.
    """
    from scipy import ndimage

    n, n_angle = 24, 36
    theta = np.deg2rad(np.linspace(-90.0, 90.0, n_angle, endpoint=False) + 3.0)
    rng = np.random.default_rng(0)
    sino = ndimage.gaussian_filter(rng.random((n_angle, n)), (0.0, 1.5)).astype(np.float32)
    sino[:, :3] = sino[:, -3:] = 0.0
    with Astra() as a:
        vg2 = a.astra.create_vol_geom(n, n)
        pg2 = a.astra.create_proj_geom("parallel", 1.0, n, theta)
        pid = a.projector("linear", pg2, vg2)
        sid = a.data2d("-sino", pg2, sino)
        rid = a.data2d("-vol", vg2)
        aid = a.algorithm({"type": "BP", "ProjectorId": pid, "ProjectionDataId": sid, "ReconstructionDataId": rid})
        a.astra.algorithm.run(aid)
        ref = a.astra.data2d.get(rid)
    best = None
    for flip_det in (False, True):
        s = sino[:, ::-1] if flip_det else sino
        s3 = np.ascontiguousarray(np.repeat(s[None], 2, axis=0))  # 2 rows, (rows, angles, cols)
        with Astra() as a:
            vg = a.astra.create_vol_geom(n, n, 2)
            pg = a.astra.create_proj_geom("parallel3d", 1.0, 1.0, 2, n, theta)
            vol = _backproject3d(a, np, s3, pg, vg, (2, n, n))[0]
        for fy in (False, True):
            for fx in (False, True):
                v = vol[::-1] if fy else vol
                v = v[:, ::-1] if fx else v
                k = float((v * ref).sum() / max((v * v).sum(), 1e-30))
                err = float(np.abs(k * v - ref).max() / np.abs(ref).max())
                if best is None or err < best[0]:
                    best = (err, (fy, fx), flip_det, k)
    err, flip_vol, flip_det, k = best
    if err > 0.05:
        raise RuntimeError(f"ASTRA's 3D CUDA back-projection does not match its 2D CPU one (error {err:.3f})")
    _log.info("gpureg: ASTRA CUDA calibration: flips %s, detector flip %s, scale %.4f (error %.2g)",
              flip_vol, flip_det, k, err)
    return flip_vol, flip_det, k


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


def _use_cuda(device) -> bool:
    if not isinstance(device, str) or device.lower() not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be one of ('auto', 'cpu', 'gpu'), got {device!r}")
    device = device.lower()
    if device == "cpu":
        return False
    ok, why = astra_cuda_probe()
    if ok:
        return True
    if device == "gpu":
        raise GPUUnavailableError(f"device='gpu' was requested for FBP but ASTRA CUDA is unusable: {why}")
    _note_cpu_fbp(why)
    return False


@functools.lru_cache(maxsize=None)
def _note_cpu_fbp(why):
    _log.info("gpureg: FBP on the CPU (%s)", why)


def _slab_size(cp, n_angle, nx, nz):
    """Slices per slab: sinogram, its FFT and the volume slab within 40% of free device memory."""
    per_slice = 4 * (3 * n_angle * 2 * nx + 2 * nx * nx)  # float32 sino + complex spectrum + volume
    budget = 2 << 30
    if cp is not None:
        free, _ = cp.cuda.Device().mem_info
        budget = int(0.4 * free)
    return int(max(1, min(nz, budget // per_slice)))


def _filter_response(xp, n, filt, shift, scale):
    """ASTRA's FBP filter (spatial-domain Ram-Lak times a window) for ``n`` columns, as an rfft response.

    Includes the FBP normalisation ``scale`` and, for an off-centre axis, the
    phase ramp that shifts the detector by ``shift`` columns.
    """
    size = _fft_size(n)
    if filt == "none":
        resp = np.ones(size // 2 + 1)
    else:
        i = np.arange(size)
        j = np.minimum(i, size - i)
        h = np.zeros(size)
        odd = i % 2 == 1
        h[odd] = -1.0 / (np.pi * j[odd]) ** 2
        h[0] = 0.25
        resp = 2.0 * np.fft.rfft(h).real
        w = 2.0 * np.pi * np.arange(size // 2 + 1) / size
        with np.errstate(invalid="ignore", divide="ignore"):
            window = {
                "ram-lak": np.ones_like(w),
                "shepp-logan": np.where(w > 0, np.sin(w / 2) / (w / 2), 1.0),
                "cosine": np.cos(w / 2),
                "hamming": 0.54 + 0.46 * np.cos(w),
                "hann": (1.0 + np.cos(w)) / 2.0,
            }[filt]
        window[0] = 1.0
        resp = resp * window
    resp = resp * scale
    if abs(shift) > 1e-6:
        k = np.arange(size // 2 + 1)
        resp = resp * np.exp(2j * np.pi * k * shift / size)
        return xp.asarray(resp.astype(np.complex64))
    return xp.asarray(resp.astype(np.float32))


def _apply_filter(xp, sino, resp):
    n = sino.shape[-1]
    size = _fft_size(n)
    spec = xp.fft.rfft(sino, size, axis=-1)
    spec *= resp
    return xp.fft.irfft(spec, size, axis=-1)[..., :n].astype(xp.float32)


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
        raise ValueError(f"filter must be one of {FILTERS}, got {filt!r}")
    return filt.lower()
