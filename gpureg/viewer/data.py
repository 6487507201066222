"""What the viewer shows of a result file: lazy layer data and one voxel's spectrum.

No napari or Qt here: :func:`result_layers` turns a gpureg result (pipeline
output or ``gpureg xanes`` output) into napari "layer data tuples"
``(data, kwargs, layer_type)``, the form napari readers return, and
:func:`voxel_spectrum` reads the spectrum of one voxel. Both are plain
functions on an open :class:`h5py.File`, so they are tested without a display.

Laziness
--------
Stacks are never read whole. Each dataset is wrapped as a dask array with one
dask chunk per ``(energy, z)`` plane, so drawing a 2D slice reads one plane
(HDF5 itself reads the covering storage chunk); contrast limits come from at
most :data:`SAMPLE_PLANES` planes. Opening a ``(n_energy, Z, Y, X)`` result
and drawing it reads far less than one energy's volume.

Convention
----------
Layers are ``(energy, z, y, x)`` stacks and ``(z, y, x)`` maps, as in the file.
Energies are shown in increasing order (the stack is reindexed lazily when the
file's order differs). The physical scale is the voxel size in micrometres
(file attribute ``voxel_size_nm``; see :func:`voxel_size_um`), else 1 voxel.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..core.errors import ParameterError

__all__ = ["SAMPLE_PLANES", "STACKS", "open_file", "registration_mse", "result_layers", "voxel_size_um", "voxel_spectrum"]

_log = logging.getLogger("gpureg")

SAMPLE_PLANES = 8
STACKS = (("aligned", "aligned", True), ("recon", "recon", False), ("aligned_global", "aligned (global)", False))
"""``(dataset, layer name, visible)`` of the energy stacks the viewer shows when present."""

_VOXEL_ATTR = "voxel_size_nm"


def open_file(path):
    """Open a gpureg result read-only, with a one-line error when it is not one.

    Parameters
    ----------
    path : str or Path
        HDF5 file holding ``/aligned`` (pipeline) or ``/xanes/edge_energy``
        (``gpureg xanes``).

    Returns
    -------
    gpureg.io.results.ResultFile
        Open (the owner of the result layout); the caller, or the viewer that
        holds its layers, closes it.
    """
    from ..io.files import InputError
    from ..io.results import ResultFile

    result = ResultFile(path)
    if not result.is_result():
        result.close()
        raise InputError(f"{result.path}: not a gpureg result (expected /aligned or /xanes/edge_energy)")
    return result


def voxel_size_um(result) -> float | None:
    """Voxel size in micrometres, or None when the result does not record it.

    Looked up as attribute ``voxel_size_nm`` of the root, of ``/aligned``, then
    of the input file named by the root attribute ``input`` (the pipeline
    keeps the simulated/Data Exchange input's attributes there).
    """
    h5 = result.h5
    for obj in (h5, result.stack("aligned")):
        if obj is not None and _VOXEL_ATTR in obj.attrs:
            return _micrometres(obj.attrs[_VOXEL_ATTR], result.path)
    src = result.attrs().get("input")
    if isinstance(src, str) and src:
        import h5py

        p = Path(src)
        if not p.is_absolute():
            p = result.path.parent / p
        try:
            if p.is_file() and h5py.is_hdf5(p):
                with h5py.File(p, "r") as f:
                    if _VOXEL_ATTR in f.attrs:
                        return _micrometres(f.attrs[_VOXEL_ATTR], p)
        except (OSError, ValueError) as exc:  # unreadable input: no scale, not an error
            _log.info("viewer: no voxel size from %s (%s)", p, exc)
    return None


def result_layers(result) -> list:
    """napari layer data tuples for every map and stack the result holds.

    Parameters
    ----------
    result : gpureg.io.results.ResultFile
        Open result (see :func:`open_file`); it must stay open while the
        layers are shown (their data are dask arrays reading from it).

    Returns
    -------
    list of (data, dict, str)
        In drawing order: energy stacks (``aligned``; ``recon`` and
        ``aligned (global)`` hidden), ``edge energy (eV)``, ``edge energy
        sigma (eV)`` (hidden; when the result has it), ``labels``,
        ``clusters`` and one ``fraction <reference>`` per fitted reference.
        Every layer's ``metadata`` holds ``gpureg_result`` (the path) and
        ``energy`` (eV, display order).
    """
    energy, order = _energies(result)
    vox = voxel_size_um(result)
    s = 1.0 if vox is None else vox
    u = "pixel" if vox is None else "um"
    meta = {"gpureg_result": str(result.path), "energy": energy, "voxel_size_um": vox}
    out = []
    for name, label, visible in STACKS:
        ds = result.stack(name)
        if ds is None:
            continue
        if energy is not None and ds.shape[0] != energy.size:
            _log.warning("viewer: /%s has %d energies but /energy has %d; skipped", name, ds.shape[0], energy.size)
            continue
        data = _lazy(ds, planes=2)
        if order is not None:
            data = data[order]
        ref = ds.shape[0] - 1 if order is None else int(order[-1])
        clim = _limits(ds, (1.0, 99.5), ref)
        kw = {"name": label, "scale": (1.0, s, s, s), "units": ("pixel", u, u, u), "colormap": "gray",
              "visible": visible,
              "axis_labels": ("energy", "z", "y", "x"), "metadata": dict(meta, dataset=name)}
        if clim is not None:
            kw["contrast_limits"] = clim
        out.append((data, kw, "image"))
    g = result.maps()  # lazy datasets (ResultFile.xanes reads them whole)
    if g is not None:
        em = g["edge_energy"]
        mask = g.get("mask")
        data = _lazy(em, planes=1)
        if mask is not None:
            data = _masked(data, _lazy(mask, planes=1))
        clim = _limits(em, (2.0, 98.0), mask=mask)
        kw = {"name": "edge energy (eV)", "scale": (s, s, s), "units": (u, u, u), "colormap": "viridis", "opacity": 0.7,
              "blending": "translucent", "axis_labels": ("z", "y", "x"), "metadata": dict(meta, dataset=_path(em))}
        if clim is not None:
            kw["contrast_limits"] = clim
        out.append((data, kw, "image"))
        if "edge_energy_sigma" in g:
            sg = g["edge_energy_sigma"]
            slim = _limits(sg, (2.0, 98.0), mask=mask)
            kw = {"name": "edge energy sigma (eV)", "scale": (s, s, s), "units": (u, u, u), "colormap": "inferno",
                  "opacity": 0.7, "blending": "translucent", "visible": False, "axis_labels": ("z", "y", "x"),
                  "metadata": dict(meta, dataset=_path(sg))}
            if slim is not None:
                kw["contrast_limits"] = slim
            out.append((_lazy(sg, planes=1), kw, "image"))
        for key, label, visible in (("labels", "labels", False), ("clusters", "clusters", False)):
            if key in g:
                out.append((_lazy(g[key], planes=1), {"name": label, "scale": (s, s, s), "units": (u, u, u), "opacity": 0.5,
                                                        "visible": visible, "axis_labels": ("z", "y", "x"),
                                                        "metadata": dict(meta, dataset=_path(g[key]))}, "labels"))
        if "fractions" in g:
            fr = g["fractions"]
            names = result.reference_names(fr.shape[0])
            lazy = _lazy(fr, planes=2)
            for k, nm in enumerate(names):
                out.append((lazy[k], {"name": f"fraction {nm}", "scale": (s, s, s), "units": (u, u, u), "colormap": "magma",
                                      "contrast_limits": (0.0, 1.0), "visible": False, "blending": "additive",
                                      "axis_labels": ("z", "y", "x"),
                                      "metadata": dict(meta, dataset=_path(fr), reference=k)}, "image"))
    return out


def voxel_spectrum(result, index) -> dict:
    """The spectrum of one voxel and the registration quality per energy.

    Parameters
    ----------
    result : gpureg.io.results.ResultFile
        Open result with ``/aligned`` (or ``/recon``) and ``/energy``.
    index : (int, int, int)
        Voxel ``(z, y, x)`` in the reference grid.

    Returns
    -------
    dict
        ``energy`` (n,) eV increasing; ``mu`` (n,) the aligned values;
        ``norm`` (n,) normalised like :func:`gpureg.xanes.normalize` (fit
        ranges from ``/xanes`` attributes ``pre_ev``/``post_ev`` when present;
        NaN when the voxel has no edge jump); ``edge_energy`` (float, NaN when
        masked or absent); ``fit`` (n,) sum of fitted reference spectra
        weighted by ``/xanes/fractions`` or None; ``components`` {name: (n,)};
        ``mse_before``/``mse_after`` (n,) or None; ``index``.
    """
    from ..io.files import InputError
    from ..io.results import GREY_STACKS
    from ..xanes.edge import normalize

    name = next((n for n in reversed(GREY_STACKS) if result.stack(n) is not None), None)  # aligned, else recon
    if name is None:
        raise InputError(f"{result.path}: no /aligned or /recon stack to read a spectrum from")
    ds = result.stack(name)
    z, y, x = (round(float(v)) for v in index)
    if not all(0 <= v < n for v, n in zip((z, y, x), ds.shape[1:])):
        raise ParameterError(f"voxel {(z, y, x)} is outside the {ds.shape[1:]} volume of {result.path}:/{name}")
    energy, order = _energies(result)
    if energy is None:
        energy, order = np.arange(ds.shape[0], dtype=np.float64), None
    idx = slice(None) if order is None else order
    mu = np.asarray(ds[:, z, y, x], dtype=np.float64)[idx]
    out = {"index": (z, y, x), "energy": energy, "mu": mu, "norm": np.full(mu.shape, np.nan), "edge_energy": np.nan,
           "fit": None, "components": {}, "mse_before": None, "mse_after": None, "dataset": name}
    ranges = result.fit_ranges()
    pre, post = ranges if ranges is not None else (None, None)
    if np.isfinite(mu).all() and energy.size >= 4 and np.all(np.diff(energy) > 0):
        try:
            out["norm"] = np.asarray(normalize(mu[:, None].astype(np.float32), energy, pre=pre, post=post,
                                               e0=result.common_e0()), dtype=np.float64)[:, 0]
        except ValueError as exc:  # e.g. fit ranges outside this grid
            _log.info("viewer: spectrum at %s not normalised (%s)", (z, y, x), exc)
    g = result.maps()
    if g is not None and g["edge_energy"].shape == ds.shape[1:]:
        e0 = float(g["edge_energy"][z, y, x])
        if "mask" in g and not bool(g["mask"][z, y, x]):
            e0 = np.nan
        out["edge_energy"] = e0
    refs = result.reference_spectra()
    if g is not None and "fractions" in g and refs is not None:
        fr = g["fractions"]
        if refs.ndim == 2 and refs.shape == (fr.shape[0], energy.size) and fr.shape[1:] == ds.shape[1:]:
            w = np.asarray(fr[:, z, y, x], dtype=np.float64)
            refs = refs[:, idx]
            comps = {nm: w[k] * refs[k] for k, nm in enumerate(result.reference_names(fr.shape[0]))}
            out["components"] = comps
            out["fit"] = np.sum(list(comps.values()), axis=0)
    mse = registration_mse(result)
    if mse is not None and mse["mse_before"].size == ds.shape[0]:
        out["mse_before"], out["mse_after"] = mse["mse_before"], mse["mse_after"]
    return out


def registration_mse(result) -> dict | None:
    """``energy``, ``mse_before``, ``mse_after`` (n,) in increasing energy order, or None when absent."""
    mse = result.mse()
    if mse is None:
        return None
    before, after = (np.asarray(m, dtype=np.float64).ravel() for m in mse)
    energy, order = _energies(result)
    if before.size != after.size or (energy is not None and energy.size != before.size):
        return None
    if energy is None:
        energy = np.arange(before.size, dtype=np.float64)
    if order is not None:
        before, after = before[order], after[order]
    return {"energy": energy, "mse_before": before, "mse_after": after}


# --------------------------------------------------------------------------- helpers

def _energies(result):
    """(energy in increasing order, file index of each, or None when the file is already sorted)."""
    e = result.energies()
    if e is None:
        return None, None
    order = np.argsort(e, kind="stable")
    if np.array_equal(order, np.arange(e.size)):
        return e, None
    return e[order], order


def _lazy(ds, *, planes):
    """A dask array over an h5py dataset, one dask chunk per plane of the ``planes`` leading axes."""
    import dask.array as da

    chunks = tuple(1 if i < planes else n for i, n in enumerate(ds.shape))
    # h5py serialises its own calls, so dask's threads need no extra lock
    return da.from_array(ds, chunks=chunks, name=False, lock=False, asarray=True, fancy=False)


def _masked(data, mask):
    import dask.array as da

    return da.where(mask, data, np.float32(np.nan)).astype(data.dtype)


def _limits(ds, percentiles, energy_index=None, *, mask=None):
    """Contrast limits from at most SAMPLE_PLANES evenly spaced z planes (of one energy for stacks)."""
    nz = ds.shape[-3]
    zs = np.unique(np.linspace(0, nz - 1, min(SAMPLE_PLANES, nz)).round().astype(int))
    vals = []
    for z in zs:
        plane = np.asarray(ds[energy_index, z] if energy_index is not None else ds[z], dtype=np.float64)
        if mask is not None:
            plane = plane[np.asarray(mask[z], dtype=bool)]
        vals.append(plane[np.isfinite(plane)].ravel())
    v = np.concatenate(vals) if vals else np.empty(0)
    if v.size == 0:
        return None
    lo, hi = np.percentile(v, percentiles)
    if not hi > lo:
        hi = lo + (abs(lo) * 1e-3 or 1.0)
    return float(lo), float(hi)


def _path(ds) -> str:
    """A dataset's path in its file, without the leading ``/`` (the layer metadata's ``dataset``)."""
    return ds.name.lstrip("/")


def _micrometres(v, where):
    """nm attribute -> um; None (with a warning) unless it is one positive number."""
    a = np.asarray(v, dtype=np.float64).ravel()
    if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0) or np.ptp(a) > 1e-6 * a.max():
        _log.warning("viewer: %s attribute %s=%r is not one positive size; showing voxel units", where, _VOXEL_ATTR, v)
        return None
    return float(a[0]) / 1000.0
