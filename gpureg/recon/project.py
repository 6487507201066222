"""Forward projection (the exact counterpart of :func:`gpureg.recon.reconstruct_fbp`) and rotation-centre finding.

Geometry as in :mod:`gpureg.recon.fbp`: projections ``(n_angle, nz, nx)``,
detector rows along the volume's ``z``, ASTRA's 2D parallel geometry per
slice (radians inside ASTRA, degrees everywhere else). A volume
forward-projected here and reconstructed by FBP lands on the same voxel grid
(the synthetic experiment relies on it). :class:`Astra` creates every ASTRA
object and always frees it.
"""

from __future__ import annotations

import logging

import numpy as np

from ..core.backend import HARDWARE, array_device, cupy_or_none, to_host
from ..core.errors import InputError

__all__ = ["estimate_center", "forward_project", "set_astra_gpu"]

_log = logging.getLogger("gpureg")


def forward_project(volume, theta_deg, *, projector: str = "strip", device: str = "cpu"):
    """Parallel-beam projections of a volume (ASTRA 2D, slice by slice).

    Parameters
    ----------
    volume : (nz, ny, nx) ndarray
        Attenuation per voxel; ``ny`` must equal ``nx`` (square slices). NumPy or CuPy.
    theta_deg : (n_angle,) array_like
        Angles in degrees.
    projector : str
        ASTRA CPU projector: ``"strip"`` (area-weighted, default), ``"line"`` or ``"linear"``.
    device : str
        ``"cpu"`` (default), or ``"gpu"``: ASTRA's 2D CUDA forward projector (``FP_CUDA``)
        in the same 2D geometry, so no orientation calibration is needed (``projector`` is
        then ignored). Resolve ``"auto"`` first with :func:`~gpureg.recon.fbp_device`.

    Returns
    -------
    (n_angle, nz, nx) ndarray of float32
        Line integrals in the geometry that :func:`reconstruct_fbp` inverts; on the
        device when the input was a CuPy array.
    """
    if device not in HARDWARE:
        raise ValueError(f"device must be one of {HARDWARE} (resolve 'auto' with fbp_device), got {device!r}")
    on_device = array_device(volume) == "gpu"
    vol = np.asarray(to_host(volume), dtype=np.float32)
    if vol.ndim != 3 or vol.shape[1] != vol.shape[2]:
        raise ValueError(f"volume must be (nz, n, n) with square slices, got shape {vol.shape}")
    if projector not in ("strip", "line", "linear"):
        raise ValueError(f"projector must be 'strip', 'line' or 'linear', got {projector!r}")
    theta = np.deg2rad(np.asarray(theta_deg, dtype=np.float64).ravel())
    gpu = device == "gpu"
    nz, n, _ = vol.shape
    out = np.empty((theta.size, nz, n), dtype=np.float32)
    with Astra() as a:
        vg = a.astra.create_vol_geom(n, n)
        pg = a.astra.create_proj_geom("parallel", 1.0, n, theta)
        pid = a.projector("cuda" if gpu else projector, pg, vg)
        vid = a.data2d("-vol", vg)
        sid = a.data2d("-sino", pg)
        aid = a.algorithm({"type": "FP_CUDA" if gpu else "FP", "ProjectorId": pid, "ProjectionDataId": sid,
                           "VolumeDataId": vid})
        for z in range(nz):
            a.astra.data2d.store(vid, vol[z])
            a.astra.algorithm.run(aid)
            out[:, z, :] = a.astra.data2d.get_shared(sid)
    return cupy_or_none().asarray(out) if on_device else out


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
        raise InputError("cannot estimate the rotation centre: fewer than 3 projections with signal")
    com = (w[ok] * np.arange(nx)).sum(axis=1) / mass[ok]
    t = np.deg2rad(theta[ok])
    design = np.stack([np.ones_like(t), np.cos(t), np.sin(t)], axis=1)
    coef, *_ = np.linalg.lstsq(design, com, rcond=None)
    return float(coef[0])


# --------------------------------------------------------------------------- ASTRA


_astra_gpu = [None]  # what this process last gave astra.set_gpu_index


def set_astra_gpu(index: int) -> None:
    """Run ASTRA's CUDA algorithms on device ``index`` (``astra.set_gpu_index``, called when it changes).

    A process-wide setting: without it ASTRA uses GPU 0 whatever device CuPy's arrays are
    on, so on a multi-GPU node every worker would reconstruct on GPU 0.
    """
    import astra

    if _astra_gpu[0] != int(index):
        astra.set_gpu_index(int(index))
        _astra_gpu[0] = int(index)


class Astra:
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
