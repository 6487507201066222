"""The result file: the one module that knows its layout (DESIGN.md "Files").

One HDF5 file per run::

    /energy (n_energy,) eV                      attrs: gpureg_version, device, parameters (JSON),
    /recon, /aligned (n_energy, Z, Y, X) f4            input, input_checksum, complete,
    /registration/matrix (n_energy, 4, 4)              reference_index, convention
    /registration/mse_before, mse_after, done (n_energy,)
    /timings/<stage> (n_energy,) s
    /xanes/edge_energy, edge_jump, white_line, mask, labels (Z, Y, X) [+ roi_* from `gpureg xanes`]
    [with --references: /xanes/fractions (n_refs, Z, Y, X), r_factor, lcf_residual, lcf_offset, reference_spectra;
     with --clusters: /xanes/clusters (Z, Y, X), cluster_centroids (k, n_energy), cluster_counts]
    /truth/...                                  simulated inputs
    per-particle runs: /registration/particle_labels, particle_matrix, particle_mse_global,
                       particle_mse; /aligned_global; /xanes_global/edge_energy, mask
    deformable runs: /registration/bspline_coefficients (n_energy, 3, cz, cy, cx; attr spacing),
                     bspline_min_jacobian, bspline_mse_affine (MSE of the affine alone; mse_after: deformed)

Beside ``RESULT.h5``: ``RESULT.h5.partial`` (the run being written, resumable),
``RESULT.h5.watch/`` (watch mode's per-energy state) and ``RESULT_report/``.
``gpureg xanes`` writes ``/energy`` and the same ``/xanes`` group (plus
``roi_*`` and attributes) through :func:`write_xanes`.

Writers: :class:`ResultStore` (a run), :func:`write_xanes` (the ``/xanes``
group, for the pipeline and ``gpureg xanes``), :func:`write_xanes_file`.
Readers: :func:`read_result` (registration summary), :class:`ResultFile`
(lazy access for figures and reports).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.backend import to_host
from .files import InputError, atomic_path

__all__ = ["partial_path", "read_result", "report_dir_for", "ResultFile", "ResultStore", "ResultSummary", "stack_names",
           "STAGES", "watch_dir", "write_chemistry", "write_xanes", "write_xanes_file"]

_log = logging.getLogger("gpureg")

STAGES = ("load", "register", "apply", "write")
XANES_MAPS = ("edge_energy", "edge_jump", "white_line", "mask")


def partial_path(output) -> Path:
    """``RESULT.h5.partial``: the run being written (renamed onto ``RESULT.h5`` when complete)."""
    output = Path(output)
    return output.with_name(output.name + ".partial")


def watch_dir(output) -> Path:
    """``RESULT.h5.watch/``: watch mode's per-energy state."""
    output = Path(output)
    return output.with_name(output.name + ".watch")


def report_dir_for(output) -> Path:
    """Report folder of a result file: ``RESULT_report/`` beside it."""
    output = Path(output)
    return output.with_name(output.stem + "_report")


class ResultStore:
    """The ``.partial`` result file of a run: preallocated per-energy datasets and ``done`` flags."""

    def __init__(self, h5, energies, ref):
        self.h5, self.energies, self.ref = h5, energies, ref
        self.done = h5["registration/done"][...].astype(bool)

    @classmethod
    def open(cls, path, reader, energies, ref, parameters: dict, checksum, *, fresh):
        """Open (resume) or create ``path``.

        An existing file is resumed only when its input checksum, ``parameters``
        (JSON) and volume shape match; otherwise :class:`InputError`.
        """
        import h5py

        from ..core.version import __version__

        shape = tuple(int(n) for n in reader.recon_shape)
        params = json.dumps(parameters)
        path = Path(path)
        if path.exists() and not fresh:
            try:
                h5 = h5py.File(path, "r+")
            except OSError as exc:
                _log.warning("gpureg: %s is unreadable (%s); starting over", path, exc)
            else:
                same = (h5.attrs.get("input_checksum") == checksum and h5.attrs.get("parameters") == params
                        and h5["aligned"].shape[1:] == shape)
                if same:
                    return cls(h5, energies, ref)
                h5.close()
                raise InputError(f"{path}: an interrupted run with a different input or parameters is here; "
                                 "rerun with the same ones, or pass --overwrite to start over")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        h5 = h5py.File(path, "w")
        n = len(energies)
        chunks = (1, min(16, shape[0]), shape[1], shape[2])
        h5.attrs.update({"gpureg_version": __version__, "device": parameters.get("device", ""), "parameters": params,
                         "input": str(reader.path), "input_checksum": checksum, "complete": False,
                         "convention": "registration/matrix: moving_from_reference, voxel indices (z, y, x)"})
        h5["energy"] = energies
        h5["energy"].attrs["units"] = "eV"
        h5.attrs["reference_index"] = ref
        for name in ("recon", "aligned"):
            h5.create_dataset(name, shape=(n, *shape), dtype="f4", chunks=chunks)
        h5["registration/matrix"] = np.tile(np.eye(4), (n, 1, 1))
        for name in ("mse_before", "mse_after"):
            h5[f"registration/{name}"] = np.full(n, np.nan)
        h5["registration/done"] = np.zeros(n, dtype=bool)
        for stage in STAGES:
            h5[f"timings/{stage}"] = np.zeros(n)
            h5[f"timings/{stage}"].attrs["units"] = "s"
        truth = reader.truth()
        if truth:
            from .dataexchange import write_group

            write_group(h5.create_group("truth"), truth)
        h5.flush()
        return cls(h5, energies, ref)

    def recon(self, i):
        return self.h5["recon"][i]

    def matrix(self, i):
        return self.h5["registration/matrix"][i]

    def stack(self, name: str = "aligned"):
        """The ``(n_energy, Z, Y, X)`` dataset ``aligned`` or ``aligned_global`` (read lazily)."""
        return self.h5[name]

    def write_energy(self, i, recon, aligned, matrix, before, after, timings):
        t0 = time.perf_counter()
        self.h5["recon"][i] = recon
        self.h5["aligned"][i] = aligned
        self.h5["registration/matrix"][i] = matrix
        self.h5["registration/mse_before"][i] = before
        self.h5["registration/mse_after"][i] = after
        for stage, secs in timings.items():
            self.h5[f"timings/{stage}"][i] = secs
        self.h5.flush()  # data first, then the flag that says it is complete
        self.h5["timings/write"][i] = time.perf_counter() - t0
        self.h5["registration/done"][i] = True
        self.h5.flush()
        self.done[i] = True

    def write_xanes(self, maps, labels, *, group: str = "xanes", chemistry=None):
        """The ``/xanes`` (or ``/xanes_global``) group, see :func:`write_xanes`."""
        write_xanes(self.h5, maps, labels, group=group, chemistry=chemistry)

    # --- per-particle runs ---------------------------------------------------------------
    def particle_labels(self, make_labels):
        """Per-particle labels, created once (``make_labels()``) and kept for a resumed run.

        A new file also gets ``particle_matrix`` (n_energy, n_labels + 1, 4, 4),
        ``particle_mse_global``/``particle_mse`` (n_energy, n_labels + 1) and
        ``/aligned_global`` (the reference's row filled).
        """
        h5 = self.h5
        if "registration/particle_labels" not in h5:
            labels = np.asarray(make_labels(), dtype=np.int32)
            n, k = len(self.energies), int(labels.max())
            h5["registration/particle_labels"] = labels
            h5["registration/particle_matrix"] = np.tile(np.eye(4), (n, k + 1, 1, 1))
            for name in ("particle_mse_global", "particle_mse"):
                h5[f"registration/{name}"] = np.full((n, k + 1), np.nan)
                h5[f"registration/{name}"][self.ref] = 0.0
            h5.create_dataset("aligned_global", shape=h5["aligned"].shape, dtype="f4", chunks=h5["aligned"].chunks)
            h5["aligned_global"][self.ref] = self.recon(self.ref)
            h5.flush()
        return h5["registration/particle_labels"][...]

    def write_particles(self, i, matrices, mse_global, mse_particle):
        reg = self.h5["registration"]
        reg["particle_matrix"][i] = matrices
        reg["particle_mse_global"][i], reg["particle_mse"][i] = mse_global, mse_particle

    def write_aligned_global(self, i, volume):
        self.h5["aligned_global"][i] = volume

    # --- deformable runs -------------------------------------------------------------------
    def write_bspline(self, i, coefficients, spacing: float, min_jacobian: float, mse: float):
        """B-spline coefficients of energy ``i`` (``/registration/bspline_*``, created on first use).

        ``bspline_coefficients`` (n_energy, 3, cz, cy, cx) float32, fine voxels,
        attribute ``spacing`` (voxels); the reference's row is zero (identity).
        The dense field is not stored: rebuild it with
        :func:`gpureg.register.deformation_field` (coefficients, ``registration/matrix``).
        """
        h5, c = self.h5, np.asarray(coefficients, dtype=np.float32)
        if "registration/bspline_coefficients" not in h5:
            n = len(self.energies)
            h5.create_dataset("registration/bspline_coefficients", shape=(n, *c.shape), dtype="f4",
                              chunks=(1, *c.shape), fillvalue=0.0)
            h5["registration/bspline_coefficients"].attrs.update(
                {"spacing": float(spacing), "convention": "q(p) = A p + t + u(p), u the cubic B-spline of these "
                 "coefficients (fine voxels, (z, y, x)); control point j at (j - 1) * spacing"})
            h5["registration/bspline_min_jacobian"] = np.ones(n)
            h5["registration/bspline_mse_affine"] = np.full(n, np.nan)
        h5["registration/bspline_coefficients"][i] = c
        h5["registration/bspline_min_jacobian"][i] = min_jacobian
        h5["registration/bspline_mse_affine"][i] = mse

    def finish(self):
        self.h5.attrs["complete"] = True
        self.close()

    def close(self):
        with contextlib.suppress(Exception):
            self.h5.close()


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
    (JSON names), ``r_factor``, ``lcf_residual`` (RMS), ``lcf_offset`` (Z, Y, X),
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


def write_xanes_file(path, energies, maps, labels, *, roi=None, attrs=None, chemistry=None) -> Path:
    """A new HDF5 file (atomically) with ``/energy`` (eV) and the ``/xanes`` group (``gpureg xanes``)."""
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as out:
            out.create_dataset("energy", data=np.asarray(energies, dtype=np.float64)).attrs["units"] = "eV"
            write_xanes(out, maps, labels, roi=roi, attrs=attrs, chemistry=chemistry)
    return Path(path)


@dataclass
class ResultSummary:
    """Registration part of a finished result file."""

    energies: np.ndarray
    reference_index: int
    matrices: np.ndarray
    mse_before: np.ndarray
    mse_after: np.ndarray
    timings: dict = field(default_factory=dict)  # stage -> (n_energy,) seconds
    attrs: dict = field(default_factory=dict)    # file attributes, ``parameters`` decoded from JSON


def read_result(path) -> ResultSummary:
    """Energies, matrices, MSEs, timings and attributes of a (finished or partial) result file."""
    with ResultFile(path) as r:
        h5 = r.h5
        return ResultSummary(energies=h5["energy"][...], reference_index=int(h5.attrs["reference_index"]),
                             matrices=h5["registration/matrix"][...], mse_before=h5["registration/mse_before"][...],
                             mse_after=h5["registration/mse_after"][...],
                             timings={k: h5[f"timings/{k}"][...] for k in h5.get("timings", {})}, attrs=r.attrs())


class ResultFile:
    """Read access to a result file (pipeline, ``gpureg xanes`` or Data Exchange), for figures and reports.

    Use as a context manager; every accessor returns ``None`` when the file
    lacks the data. Stacks (``aligned``, ``recon``) are returned as lazy
    datasets so that callers read one slice or one energy at a time.
    """

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: file not found")
        if not h5py.is_hdf5(self.path):
            raise InputError(f"{self.path}: not an HDF5 file")
        self.h5 = h5py.File(self.path, "r")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.h5.close()

    def attrs(self) -> dict:
        out = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.h5.attrs.items()}
        if "parameters" in out:
            out["parameters"] = json.loads(out["parameters"])
        return out

    def energies(self):
        """``(n_energy,)`` float64 eV, in file order (``/energy`` or ``/exchange/energy``)."""
        for name in ("energy", "exchange/energy"):
            if name in self.h5:
                return np.asarray(self.h5[name][()], dtype=np.float64).ravel()
        return None

    def reference_index(self):
        for attrs in (self.h5.attrs, self.h5["registration"].attrs if "registration" in self.h5 else {}):
            if "reference_index" in attrs:
                return int(attrs["reference_index"])
        return None

    def mse(self):
        """``(mse_before, mse_after)`` per energy, or ``None``."""
        reg = self.h5.get("registration")
        if reg is None or "mse_before" not in reg or "mse_after" not in reg:
            return None
        return reg["mse_before"][()], reg["mse_after"][()]

    def stack(self, name: str = "aligned"):
        """Lazy ``(n_energy, Z, Y, X)`` dataset ``aligned``, ``aligned_global`` or ``recon``, or ``None``."""
        ds = self.h5.get(name)
        return ds if ds is not None and ds.ndim == 4 else None

    def xanes(self, group: str = "xanes", *, maps_only: bool = False):
        """The ``/xanes`` group as a dict of arrays (``edge_energy``, ``mask``, ``labels``, ``roi_*``...), or ``None``.

        ``maps_only`` skips the per-particle spectra. Attributes come under ``"attrs"``.
        """
        g = self.h5.get(group)
        if g is None or "edge_energy" not in g:
            return None
        out = {k: g[k][()] for k in g if not (maps_only and k.startswith("roi_"))}
        out["attrs"] = dict(g.attrs)
        return out

    def chemistry(self, group: str = "xanes"):
        """Reference fractions and clusters of ``/xanes`` (see :func:`write_chemistry`), or ``None`` without them.

        Dict with, when present, ``fractions``, ``r_factor``, ``reference_names``, ``clusters``,
        ``cluster_centroids``, ``labels`` (particles) and ``energies``.
        """
        g = self.h5.get(group)
        if g is None or not ("fractions" in g or "clusters" in g):
            return None
        out = {k: g[k][()] for k in ("fractions", "r_factor", "clusters", "cluster_centroids", "labels") if k in g}
        if "fractions" in g:
            out["reference_names"] = json.loads(g["fractions"].attrs.get("references", "[]"))
        out["energies"] = np.sort(self.energies())   # the order of cluster_centroids
        return out

    def deformation(self):
        """``{"coefficients", "spacing", "matrices", "min_jacobian", "mse_affine"}`` of a deformable run, or None."""
        h5 = self.h5
        if "registration/bspline_coefficients" not in h5:
            return None
        ds = h5["registration/bspline_coefficients"]
        return {"coefficients": ds, "spacing": float(ds.attrs["spacing"]),
                "matrices": h5["registration/matrix"][...],
                "min_jacobian": h5["registration/bspline_min_jacobian"][...],
                "mse_affine": h5["registration/bspline_mse_affine"][...]}

    def particles(self):
        """Per-particle registration results, or ``None`` for other runs.

        Dict with ``energies``, ``mse_global``, ``mse_particle`` (n_energy, n_labels + 1),
        ``maps`` (``"global alignment"`` / ``"per-particle alignment"`` -> edge energy with
        NaN outside the mask) and ``truth`` (simulated edge energy, or ``None``).
        """
        h5 = self.h5
        if "registration/particle_mse" not in h5:
            return None
        maps = {name: np.where(h5[f"{grp}/mask"][...].astype(bool), h5[f"{grp}/edge_energy"][...], np.nan)
                for name, grp in (("global alignment", "xanes_global"), ("per-particle alignment", "xanes"))
                if f"{grp}/edge_energy" in h5}
        return {"energies": h5["energy"][...], "mse_global": h5["registration/particle_mse_global"][...],
                "mse_particle": h5["registration/particle_mse"][...], "maps": maps,
                "truth": h5["truth/edge_energy"][...] if "truth/edge_energy" in h5 else None}


def stack_names(h5, path, dataset=None, energy_dataset=None):
    """Names of the aligned stack and its energies in an open file: ``/aligned`` + ``/energy`` (a result),
    ``/exchange/recon`` + ``/exchange/energy`` (Data Exchange), or the given ones; :class:`InputError` if absent.
    """
    if dataset is None:
        for cand, en in (("aligned", "energy"), ("exchange/recon", "exchange/energy")):
            if cand in h5:
                dataset, energy_dataset = cand, energy_dataset or en
                break
        else:
            raise InputError(f"{path}: no /aligned or /exchange/recon dataset (name one with --dataset)")
    if dataset not in h5:
        raise InputError(f"{path}: dataset {dataset!r} not found")
    if energy_dataset is None:
        energy_dataset = "energy" if "energy" in h5 else "exchange/energy"
    if energy_dataset not in h5:
        raise InputError(f"{path}: energy dataset {energy_dataset!r} not found (name one with --energy-dataset)")
    return dataset, energy_dataset
