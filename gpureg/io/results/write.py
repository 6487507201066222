"""Writing the ``/xanes`` group (pipeline and ``gpureg xanes``), whole result files (:func:`write_result_file`), and ``--no-keep``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...core.backend import to_host
from ..files import atomic_path
from .compression import register_filters
from .nexus import NEXUS_ENTRY, write_nexus_views

__all__ = ["drop_datasets", "STACKS", "write_chemistry", "write_result_file", "write_xanes"]


def drop_datasets(path, names) -> None:
    """Rewrite the result file ``path`` without the top-level datasets ``names`` (``--no-keep``); atomic.

    HDF5 does not give back the space of a deleted dataset, so the other
    objects are copied into a new file, which replaces ``path``.
    """
    import h5py

    names = [n for n in names if n]
    if not names:
        return
    path = Path(path)
    register_filters()
    with atomic_path(path) as tmp:
        with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
            dst.attrs.update(src.attrs)
            for key in src:
                if key not in names and key != NEXUS_ENTRY:
                    src.copy(src[key], dst, name=key)
            dst.attrs["dropped"] = json.dumps(sorted(names))
            write_nexus_views(dst)  # without the views of what was dropped


def write_xanes(parent, maps, labels=None, *, roi=None, attrs=None, group: str = "xanes", chemistry=None):
    """Write the ``/xanes`` group (replacing an earlier one) under an open HDF5 file or group.

    Parameters
    ----------
    parent : h5py.File or h5py.Group
    maps : dict of (Z, Y, X) ndarray
        From :func:`gpureg.xanes.edge_energy_map`: ``edge_energy`` (eV),
        ``edge_jump`` (input units), ``white_line`` (eV), ``mask`` and, for
        ``method="both"``, ``e0_derivative`` (eV). All are written, chunked per z-plane.
    labels : (Z, Y, X) ndarray of int, optional
        Particle labels (0 background), written as int32.
    roi : dict, optional
        Per-particle spectra (:func:`gpureg.xanes.roi_spectra`): ``region``,
        ``count``, ``mean``, ``std``, ``norm``, ``edge_energy`` become ``roi_label``, ``roi_count``...
    attrs : dict, optional
        Attributes of the group (method, fit ranges, source...).
    group : str
        ``"xanes"`` or ``"xanes_global"`` (per-particle runs).
    chemistry : dict, optional
        From :func:`gpureg.xanes.chemistry_map`, see :func:`write_chemistry`.
    """
    if group in parent:
        del parent[group]
    g = parent.create_group(group)
    for key, value in maps.items():
        a = np.asarray(to_host(value))
        d = g.create_dataset(key, data=a, chunks=(1,) + a.shape[1:] if a.ndim == 3 and a.size else None)
        if key != "mask":
            d.attrs["units"] = "input units" if key == "edge_jump" else "eV"
    if labels is not None:
        a = np.asarray(labels, dtype=np.int32)
        g.create_dataset("labels", data=a, chunks=(1,) + a.shape[1:] if a.ndim == 3 and a.size else None)
    if roi is not None:
        for key, name in (("region", "roi_label"), ("count", "roi_count"), ("mean", "roi_mean"), ("std", "roi_std"),
                          ("norm", "roi_norm"), ("edge_energy", "roi_edge_energy")):
            g.create_dataset(name, data=roi[key])
    if attrs:
        g.attrs.update(attrs)
    if chemistry is not None:
        write_chemistry(g, chemistry)
    return g


def write_chemistry(g, chem):
    """Reference fractions and clusters (:func:`gpureg.xanes.chemistry_map`) into an open ``/xanes`` group.

    Datasets: ``fractions`` (n_refs, Z, Y, X) with attribute ``references``
    (JSON names), ``fractions_stderr`` (standard errors, same shape), ``r_factor``, ``lcf_residual`` (RMS), ``lcf_offset`` (Z, Y, X),
    ``reference_spectra`` (n_energy, n_refs, normalised on ``/energy``);
    ``clusters`` (Z, Y, X) int32 (1..k, 0 not clustered), ``cluster_centroids``
    (k, n_energy), ``cluster_counts`` (k,). Float maps are NaN outside the analysed voxels.
    """
    def put(name, value, dtype=None):
        a = np.asarray(to_host(value), dtype=dtype)
        chunks = (1,) * (a.ndim - 2) + a.shape[-2:] if a.ndim >= 3 and a.size else None
        if name in g:
            del g[name]
        return g.create_dataset(name, data=a, chunks=chunks)

    if "fractions" in chem:
        d = put("fractions", chem["fractions"], np.float32)
        d.attrs["references"] = json.dumps(list(chem["reference_names"]))
        if "fractions_stderr" in chem:
            put("fractions_stderr", chem["fractions_stderr"], np.float32)
        put("r_factor", chem["r_factor"], np.float32)
        put("lcf_residual", chem["residual"], np.float32)
        if "offset" in chem:
            put("lcf_offset", chem["offset"], np.float32)
        put("reference_spectra", chem["references"], np.float64).attrs["references"] = \
            json.dumps(list(chem["reference_names"]))
    if "clusters" in chem:
        put("clusters", chem["clusters"], np.int32)
        put("cluster_centroids", chem["centroids"], np.float64)
        put("cluster_counts", chem["cluster_counts"], np.int64)


STACKS = ("aligned", "recon", "aligned_global")


def write_result_file(path, energies, *, stacks=None, mse=None, maps=None, labels=None, roi=None, chemistry=None,
                      xanes_attrs=None, attrs=None) -> Path:
    """A result file written in one go, atomically (``gpureg xanes``, and results made outside a run).

    Parameters
    ----------
    path : str or Path
    energies : (n_energy,) array_like
        ``/energy`` (eV), in the order of the stacks.
    stacks : dict, optional
        ``(n_energy, Z, Y, X)`` arrays named among :data:`STACKS` (``aligned``, ``recon``, ``aligned_global``).
    mse : (before, after), optional
        ``/registration/mse_before``, ``mse_after`` (n_energy,).
    maps, labels, roi, chemistry, xanes_attrs
        The ``/xanes`` group (:func:`write_xanes`; ``xanes_attrs`` are its attributes), when ``maps`` is given.
    attrs : dict, optional
        Root attributes (``voxel_size_nm``...).

    Returns
    -------
    Path
    """
    import h5py

    unknown = set(stacks or ()) - set(STACKS)
    if unknown:
        raise ValueError(f"stacks must be named among {STACKS}, got {sorted(unknown)}")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as out:
            out.create_dataset("energy", data=np.asarray(energies, dtype=np.float64)).attrs["units"] = "eV"
            for name, stack in (stacks or {}).items():
                a = np.asarray(to_host(stack), dtype=np.float32)
                out.create_dataset(name, data=a, chunks=(1, *a.shape[1:]) if a.ndim == 4 and a.size else None)
            if mse is not None:
                for name, values in zip(("mse_before", "mse_after"), mse):
                    out[f"registration/{name}"] = np.asarray(values, dtype=np.float64)
            if maps is not None:
                write_xanes(out, maps, labels, roi=roi, attrs=xanes_attrs, chemistry=chemistry)
            out.attrs.update(attrs or {})
            write_nexus_views(out)  # after the attributes: its axes use voxel_size_nm
    return Path(path)
