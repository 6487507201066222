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
All ASTRA objects are created through :class:`_Astra`, which always frees them.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from .backend import GPUUnavailableError, array_device, cupy_or_none, to_host, xp_of

__all__ = [
    "FILTERS",
    "NonPositiveTransmissionWarning",
    "astra_cuda_available",
    "estimate_center",
    "forward_project",
    "normalize",
    "reconstruct_energy",
    "reconstruct_fbp",
    "reconstruct_file",
]

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann", "none")

_log = logging.getLogger("gpureg")
_WARNED = False


class NonPositiveTransmissionWarning(UserWarning):
    """Some flat/dark-corrected transmissions were not positive and were clipped."""


def normalize(projections, flat, dark=None, *, floor: float = 1e-3, return_count: bool = False):
    """Flat/dark correction and ``-log``: line integrals of attenuation.

    Parameters
    ----------
    projections : (n_angle, ny, nx) or (ny, nx) ndarray
        Raw counts (NumPy or CuPy, any numeric dtype).
    flat : (n_flat, ny, nx) or (ny, nx) ndarray
        Open-beam frames; averaged over the first axis when 3D.
    dark : (n_dark, ny, nx) or (ny, nx) ndarray, optional
        Dark frames; averaged when 3D; zero when None.
    floor : float
        Transmissions below ``floor`` (including non-positive ones, e.g. dead
        pixels or a flat not above the dark) are raised to it, so that
        ``-log`` stays finite (at most ``-log(floor)``).
    return_count : bool
        Also return the number of non-positive (or NaN) transmissions.

    Returns
    -------
    (n_angle, ny, nx) ndarray of float32
        ``-log((projections - dark) / (flat - dark))`` on the input's device.
    int
        Only when ``return_count``.

    Notes
    -----
    Non-positive transmissions are counted and reported once per process
    with a :class:`NonPositiveTransmissionWarning` (later occurrences go to
    the ``gpureg`` logger at INFO level), never once per pixel.
    """
    if not (0.0 < float(floor) < 1.0):
        raise ValueError(f"floor must be in (0, 1), got {floor}")
    xp = xp_of(projections)
    p = xp.asarray(projections, dtype=xp.float32)
    if p.ndim not in (2, 3):
        raise ValueError(f"projections must be (n_angle, ny, nx) or (ny, nx), got shape {p.shape}")
    f = _frame_mean(xp, flat, "flat", p.shape[-2:])
    d = xp.zeros_like(f) if dark is None else _frame_mean(xp, dark, "dark", p.shape[-2:])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (p - d) / (f - d)
    bad = ~(t > 0)  # also catches NaN (0/0) and a flat at or below the dark
    count = int(bad.sum())
    t = xp.where(bad | (t < floor), xp.float32(floor), t)
    out = (-xp.log(t)).astype(xp.float32, copy=False)
    if count:
        _report_nonpositive(count, p.size)
    return (out, count) if return_count else out


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
    """
    if reader.kind == "recon":
        return reader.recon(i)
    p = normalize(reader.projections(i), reader.flat(i), reader.dark(i))
    return reconstruct_fbp(p, reader.theta, center=center, filter=filter, device=device)


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
    from . import __version__
    from .io import open_input, write_dataexchange

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


def forward_project(volume, theta_deg, *, projector: str = "strip"):
    """Parallel-beam projections of a volume (CPU, ASTRA 2D, slice by slice).

    Parameters
    ----------
    volume : (nz, ny, nx) ndarray
        Attenuation per voxel; ``ny`` must equal ``nx`` (square slices).
    theta_deg : (n_angle,) array_like
        Angles in degrees.
    projector : str
        ASTRA CPU projector: ``"strip"`` (area-weighted, default), ``"line"`` or ``"linear"``.

    Returns
    -------
    (n_angle, nz, nx) ndarray of float32
        Line integrals in the geometry that :func:`reconstruct_fbp` inverts.
    """
    vol = np.asarray(to_host(volume), dtype=np.float32)
    if vol.ndim != 3 or vol.shape[1] != vol.shape[2]:
        raise ValueError(f"volume must be (nz, n, n) with square slices, got shape {vol.shape}")
    if projector not in ("strip", "line", "linear"):
        raise ValueError(f"projector must be 'strip', 'line' or 'linear', got {projector!r}")
    theta = np.deg2rad(np.asarray(theta_deg, dtype=np.float64).ravel())
    nz, n, _ = vol.shape
    out = np.empty((theta.size, nz, n), dtype=np.float32)
    with _Astra() as a:
        vg = a.astra.create_vol_geom(n, n)
        pg = a.astra.create_proj_geom("parallel", 1.0, n, theta)
        pid = a.projector(projector, pg, vg)
        vid = a.data2d("-vol", vg)
        sid = a.data2d("-sino", pg)
        aid = a.algorithm({"type": "FP", "ProjectorId": pid, "ProjectionDataId": sid, "VolumeDataId": vid})
        for z in range(nz):
            a.astra.data2d.store(vid, vol[z])
            a.astra.algorithm.run(aid)
            out[:, z, :] = a.astra.data2d.get_shared(sid)
    return out


def estimate_center(projections, theta_deg) -> float:
    """Rotation-axis column from two projections 180 degrees apart.

    The projection at ``theta + 180`` is the mirror image of the one at
    ``theta`` about the rotation axis; the shift that best aligns one with the
    mirrored other (FFT cross-correlation summed over rows, parabolic
    sub-pixel peak) gives the axis. Without a pair within 1 degree of 180
    apart, the axis is fitted from the sinusoidal path of each projection's
    centre of mass instead.

    Parameters
    ----------
    projections : (n_angle, nz, nx) ndarray
        Line integrals (``-log`` transmission).
    theta_deg : (n_angle,) array_like
        Angles in degrees.

    Returns
    -------
    float
        Detector column of the rotation axis (``(nx - 1) / 2`` when centred).
    """
    p = np.asarray(to_host(projections), dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"projections must be (n_angle, nz, nx), got shape {p.shape}")
    theta = np.asarray(to_host(theta_deg), dtype=np.float64).ravel()
    if theta.shape[0] != p.shape[0]:
        raise ValueError(f"theta_deg must have one angle per projection ({p.shape[0]}), got {theta.shape[0]}")
    nx = p.shape[-1]
    diff = np.abs(np.abs(theta[:, None] - theta[None, :]) - 180.0)
    i, j = np.unravel_index(np.argmin(diff), diff.shape)
    if diff[i, j] <= 1.0:
        a = p[i] - p[i].mean(axis=-1, keepdims=True)
        b = p[j][:, ::-1] - p[j].mean(axis=-1, keepdims=True)
        n = 2 * nx
        cc = np.fft.irfft(np.conj(np.fft.rfft(a, n)) * np.fft.rfft(b, n), n).sum(axis=0)
        k = int(np.argmax(cc))
        y0, y1, y2 = cc[k - 1], cc[k], cc[(k + 1) % n]
        den = y0 - 2 * y1 + y2
        lag = (k if k < nx else k - n) + (0.5 * (y0 - y2) / den if den < 0 else 0.0)
        # b(x) = p_i(2c - (nx-1) + x) peaks where x + lag matches, so 2c - (nx-1) = -lag.
        return float(((nx - 1) - lag) / 2.0)
    # Centre-of-mass path: com(theta) = c + a cos(theta) + b sin(theta).
    w = np.clip(p.sum(axis=1), 0, None)
    mass = w.sum(axis=1)
    ok = mass > 0
    if ok.sum() < 3:
        raise ValueError("cannot estimate the rotation centre: fewer than 3 projections with signal")
    com = (w[ok] * np.arange(nx)).sum(axis=1) / mass[ok]
    t = np.deg2rad(theta[ok])
    design = np.stack([np.ones_like(t), np.cos(t), np.sin(t)], axis=1)
    coef, *_ = np.linalg.lstsq(design, com, rcond=None)
    return float(coef[0])


def astra_cuda_available() -> bool:
    """True when ASTRA was built with CUDA and sees a GPU (``GPUREG_DISABLE_GPU`` hides it)."""
    return _astra_cuda_probe()[0]


# --------------------------------------------------------------------------- ASTRA


class _Astra:
    """The one place that creates ASTRA objects; frees every one of them on exit."""

    def __init__(self):
        import astra

        self.astra = astra
        self._made = []  # (module, id), freed in reverse order

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for module, oid in reversed(self._made):
            try:
                module.delete(oid)
            except Exception:  # noqa: BLE001 - freeing must never mask the original error
                _log.debug("gpureg: could not free ASTRA object %s", oid)
        self._made.clear()
        return False

    def _keep(self, module, oid):
        self._made.append((module, oid))
        return oid

    def data2d(self, kind, geom, data=0.0):
        return self._keep(self.astra.data2d, self.astra.data2d.create(kind, geom, data))

    def data3d(self, kind, geom, data=0.0, *, link=False):
        make = self.astra.data3d.link if link else self.astra.data3d.create
        return self._keep(self.astra.data3d, make(kind, geom, data))

    def projector(self, kind, proj_geom, vol_geom):
        return self._keep(self.astra.projector, self.astra.create_projector(kind, proj_geom, vol_geom))

    def algorithm(self, cfg):
        d = self.astra.astra_dict(cfg["type"])
        d.update({k: v for k, v in cfg.items() if k != "type"})
        return self._keep(self.astra.algorithm, self.astra.algorithm.create(d))


def _fbp_cpu(proj, theta_rad, shift, filt):
    """ASTRA CPU FBP (``linear`` projector), one reused algorithm for all slices."""
    n_angle, nz, nx = proj.shape
    if abs(shift) > 1e-6:
        proj = _fourier_shift(np, proj, shift)
    out = np.empty((nz, nx, nx), dtype=np.float32)
    with _Astra() as a:
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
    flip_vol, flip_det, scale = _cuda_calibration()
    h = _filter_response(xp, nx, filt, shift, scale * np.pi / (2.0 * n_angle))
    slab = _slab_size(cp, n_angle, nx, nz)
    dev_out = array_device(proj) == "gpu"
    out = cp.empty((nz, nx, nx), dtype=cp.float32) if dev_out else np.empty((nz, nx, nx), dtype=np.float32)
    with _Astra() as a:
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
    with _Astra() as a:
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
        with _Astra() as a:
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
    if os.environ.get("GPUREG_DISABLE_GPU", "") not in ("", "0"):
        return False, "GPUREG_DISABLE_GPU is set"
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
    ok, why = _astra_cuda_probe()
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


def _frame_mean(xp, frames, name, shape):
    f = xp.asarray(frames, dtype=xp.float32)
    if f.ndim == 3:
        if f.shape[0] < 1:
            raise ValueError(f"{name} has no frames (shape {f.shape})")
        f = f.mean(axis=0)
    if f.ndim != 2 or f.shape != tuple(shape):
        raise ValueError(f"{name} frames must be (n, {shape[0]}, {shape[1]}) or ({shape[0]}, {shape[1]}), "
                         f"got shape {tuple(xp.asarray(frames).shape)}")
    return f


def _report_nonpositive(count, total):
    global _WARNED
    msg = (f"{count} of {total} flat/dark-corrected transmissions were not positive (dead pixels, or a flat "
           f"not above the dark) and were clipped")
    if not _WARNED:
        _WARNED = True
        warnings.warn(msg + "; further occurrences are logged at INFO level", NonPositiveTransmissionWarning,
                      stacklevel=3)
    else:
        _log.info("gpureg: %s", msg)
