"""Reading a result: :func:`read_result` (registration summary), :class:`ResultFile` (lazy access), :func:`stack_names`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import InputError
from .compression import describe_filter, register_filters
from .store import GREY_STACKS, XANES_SKIPPED

__all__ = ["describe_result", "is_result", "read_result", "ResultFile", "ResultSummary", "stack_names"]


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
    excluded: dict = field(default_factory=dict)  # energy (eV) -> reason, energies left out
    xanes_skipped: str | None = None  # why the result has no edge maps (root attribute ``xanes_skipped``), or None




def read_result(path) -> ResultSummary:
    """Energies, matrices, MSEs, timings and attributes of a (finished or partial) result file."""
    with ResultFile(path) as r:
        h5 = r.h5
        return ResultSummary(energies=h5["energy"][...], reference_index=int(h5.attrs["reference_index"]),
                             matrices=h5["registration/matrix"][...], mse_before=h5["registration/mse_before"][...],
                             mse_after=h5["registration/mse_after"][...],
                             timings={k: h5[f"timings/{k}"][...] for k in h5.get("timings", {})}, attrs=r.attrs(),
                             excluded=r.excluded(), xanes_skipped=r.xanes_skipped())


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
        register_filters()  # stacks written with an hdf5plugin codec
        self.h5 = h5py.File(self.path, "r")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.h5.close()

    def repairs(self) -> dict:
        """Detector repairs per energy (eV -> invalid/outlier pixels, projections), energies with any; ``{}``."""
        ds = self.h5.get("quality/repaired_pixels")
        if ds is None:
            return {}
        details = json.loads(ds.attrs.get("details", "{}"))
        return {float(e): d for e, d in details.items()
                if d.get("invalid_pixels") or d.get("outlier_pixels") or d.get("projections")}

    def attrs(self) -> dict:
        out = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.h5.attrs.items()}
        for k, v in out.items():  # JSON attributes: parameters, skipped_inputs, input_files, repairs...
            if isinstance(v, str) and v[:1] in "[{":
                try:
                    out[k] = json.loads(v)
                except ValueError:
                    pass
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

    def excluded(self) -> dict:
        """Energies left out by ``--skip-bad-energies``: ``{energy_ev: reason}`` (empty when none)."""
        ds = self.h5.get("registration/excluded")
        if ds is None:
            return {}
        return {float(k): v for k, v in json.loads(ds.attrs.get("reasons", "{}")).items()}

    def voxel_size_nm(self):
        """Voxel size (nm) from the input, or ``None``."""
        v = self.h5.attrs.get("voxel_size_nm")
        return float(v) if v is not None and np.isfinite(v) and v > 0 else None

    def is_result(self) -> bool:
        """True when the file holds an aligned stack or an edge-energy map (a pipeline or ``gpureg xanes`` result)."""
        return self.stack("aligned") is not None or self.maps() is not None

    def has_registration(self) -> bool:
        """True for a pipeline result (``/registration/matrix``), False for ``gpureg xanes`` or Data Exchange files."""
        return "registration/matrix" in self.h5

    def xanes_skipped(self) -> str | None:
        """Why a run wrote no edge maps (``/xanes``): the one-line reason (the energy grid cannot give them), or
        ``None`` when it did not skip them."""
        v = self.h5.attrs.get(XANES_SKIPPED)
        return None if v is None else (v.decode() if isinstance(v, bytes) else str(v))

    def maps(self, group: str = "xanes"):
        """Lazy 3D datasets of ``/xanes``: ``edge_energy`` and, when present, ``edge_energy_sigma``, ``mask``,
        ``labels``, ``clusters`` (``(Z, Y, X)``, the shape of ``edge_energy``) and ``fractions``
        (``(n_refs, Z, Y, X)``); ``None`` without an edge-energy map. Each dataset's ``name`` is its path."""
        g = self.h5.get(group)
        if g is None or "edge_energy" not in g or g["edge_energy"].ndim != 3:
            return None
        shape = g["edge_energy"].shape
        out = {k: g[k] for k in ("edge_energy", "edge_energy_sigma", "mask", "labels", "clusters")
               if k in g and g[k].shape == shape}
        if "fractions" in g and g["fractions"].ndim == 4 and g["fractions"].shape[1:] == shape:
            out["fractions"] = g["fractions"]
        return out

    def fit_ranges(self, group: str = "xanes"):
        """``(pre, post)`` eV ranges the edge maps were normalised with, or ``None`` when not recorded."""
        g = self.h5.get(group)
        if g is None or "pre_ev" not in g.attrs or "post_ev" not in g.attrs:
            return None
        return tuple(float(v) for v in g.attrs["pre_ev"]), tuple(float(v) for v in g.attrs["post_ev"])

    def common_e0(self, group: str = "xanes"):
        """The common E0 (eV) the maps were normalised with (``e0_common_ev``, or ``e0_start_ev`` of
        ``gpureg xanes``), or ``None`` when not recorded."""
        g = self.h5.get(group)
        if g is None:
            return None
        for key in ("e0_common_ev", "e0_start_ev"):
            if key in g.attrs:
                return float(g.attrs[key])
        return None

    def reference_names(self, n: int, group: str = "xanes") -> list:
        """Names of the ``n`` fitted references (``"0"``, ``"1"``... when the file does not name them)."""
        g = self.h5.get(group)
        names = None
        if g is not None:
            names = g["fractions"].attrs.get("references") if "fractions" in g else None  # write_chemistry
            if names is None:
                names = g.attrs.get("references")
            if names is None and "references" in g:
                names = g["references"].attrs.get("names")
        if isinstance(names, (str, bytes)):
            try:
                names = json.loads(names)
            except ValueError:
                names = None
        if names is None or len(names) != n:
            return [str(k) for k in range(n)]
        return [v.decode() if isinstance(v, bytes) else str(v) for v in names]

    def reference_spectra(self, group: str = "xanes"):
        """``(n_refs, n_energy)`` fitted reference spectra in file energy order, or ``None``.

        ``reference_spectra`` (``(n_energy, n_refs)`` on ``/energy``, :func:`write_chemistry`) or the older
        ``references`` (``(n_refs, n_energy)``).
        """
        g = self.h5.get(group)
        if g is None:
            return None
        if "reference_spectra" in g:
            return np.asarray(g["reference_spectra"][()], dtype=np.float64).T
        if "references" in g:
            return np.asarray(g["references"][()], dtype=np.float64)
        return None

    def stack(self, name: str = "aligned"):
        """Lazy ``(n_energy, Z, Y, X)`` dataset ``aligned``, ``aligned_global`` or ``recon``, or ``None``."""
        ds = self.h5.get(name)
        return ds if ds is not None and ds.ndim == 4 else None

    def storage(self) -> dict:
        """How ``recon`` and ``aligned`` are stored: ``{name: {"compression", "store_dtype", "storage_error"}}``
        (the attributes present), for the stacks present."""
        return {name: {k: str(self.h5[name].attrs[k]) for k in ("compression", "store_dtype", "storage_error")
                       if k in self.h5[name].attrs} for name in GREY_STACKS if self.stack(name) is not None}

    def write_timing(self) -> dict:
        """The background writer's totals (attributes ``*_s`` of ``/timings/write``), empty when not recorded."""
        ds = self.h5.get("timings/write")
        return {} if ds is None else {k: float(v) for k, v in ds.attrs.items() if k.endswith("_s")}

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

    def uncertainty(self, group: str = "xanes"):
        """``{"edge_energy_sigma", "mask", "spectral_denoise"}`` of ``/xanes`` (each None when absent), or None
        when the group holds neither the sigma map nor the spectral-denoise record."""
        g = self.h5.get(group)
        if g is None or not ("edge_energy_sigma" in g or "spectral_denoise" in g.attrs):
            return None
        sd = g.attrs.get("spectral_denoise")
        return {"edge_energy_sigma": g["edge_energy_sigma"][()] if "edge_energy_sigma" in g else None,
                "mask": g["mask"][()].astype(bool) if "mask" in g else None,
                "spectral_denoise": json.loads(sd) if sd is not None else None}

    def deformation(self):
        """``{"coefficients", "spacing", "matrices", "min_jacobian", "mse_affine", "base"}`` of a deformable run, or None.

        ``base``: ``"affine"``, or ``"piecewise"`` (the B-spline refines the per-particle alignment).
        """
        h5 = self.h5
        if "registration/bspline_coefficients" not in h5:
            return None
        ds = h5["registration/bspline_coefficients"]
        return {"coefficients": ds, "spacing": float(ds.attrs["spacing"]),
                "matrices": h5["registration/matrix"][...],
                "min_jacobian": h5["registration/bspline_min_jacobian"][...],
                "mse_affine": h5["registration/bspline_mse_affine"][...],
                "base": str(ds.attrs.get("base", "affine"))}

    def alignment(self):
        """Projection alignment of a run with ``--align-projections``, or ``None``.

        Dict with ``energies``, ``shifts`` and ``estimated`` (n_energy, n_angle, 2),
        ``iterations``, ``error_before``, ``error_after``, ``seconds``, ``applied``,
        ``status`` (list of str), ``reasons`` ({energy: reason}), ``theta`` (n_angle,) deg
        and ``truth`` (simulated shifts, or ``None``).
        """
        g = self.h5.get("alignment")
        if g is None or "projection_shifts" not in g:
            return None
        out = {k: g[k][()] for k in ("theta", "iterations", "error_before", "error_after", "seconds", "applied")}
        out.update(energies=self.energies(), shifts=g["projection_shifts"][()], estimated=g["estimated_shifts"][()],
                   status=[s.decode() for s in g["status"][()]], reasons=json.loads(g["status"].attrs["reasons"]),
                   truth=self.h5["truth/projection_shifts"][()] if "truth/projection_shifts" in self.h5 else None)
        return out

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
            raise InputError(f"{path}: no /aligned or /exchange/recon dataset (name one with dataset=)")
    if dataset not in h5:
        raise InputError(f"{path}: dataset {dataset!r} not found")
    if energy_dataset is None:
        energy_dataset = "energy" if "energy" in h5 else "exchange/energy"
    if energy_dataset not in h5:
        raise InputError(f"{path}: energy dataset {energy_dataset!r} not found (name one with energy_dataset=)")
    return dataset, energy_dataset


def is_result(path) -> bool:
    """Whether ``path`` is a result of gpureg (a run's, or ``gpureg xanes``'s), not an input it wrote.

    Inputs (``gpureg simulate``'s projections, ``gpureg recon``'s volumes) are Data Exchange files with
    ``/exchange``, gpureg_version attribute or not.
    """
    import h5py

    try:
        if not Path(path).is_file() or not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as h5:
            return "exchange" not in h5 and "energy" in h5 and ("registration" in h5 or "xanes" in h5)
    except OSError:
        return False


def describe_result(path) -> dict:
    """What ``gpureg info RESULT.h5`` shows: energies, shape, completeness, and how each stack is stored."""
    with ResultFile(path) as r:
        h5, attrs = r.h5, r.attrs()
        e = r.energies()
        stacks = {}
        for name in ("recon", "aligned", "aligned_global"):
            ds = h5.get(name)
            if ds is not None and ds.ndim == 4:
                stacks[name] = {"shape": [int(n) for n in ds.shape], "dtype": str(ds.dtype),
                                "filter": describe_filter(ds), "stored_mb": ds.id.get_storage_size() / 1e6,
                                "storage_error": str(ds.attrs.get("storage_error", "exact"))}
        return {"path": str(r.path), "gpureg_version": str(attrs.get("gpureg_version", "unknown")),
                "complete": bool(attrs.get("complete", "xanes" in h5)),
                "n_energy": 0 if e is None else int(e.size),
                "energies_ev": [] if e is None else [float(x) for x in e],
                "voxel_size_nm": r.voxel_size_nm(), "stacks": stacks,
                "maps": sorted(k for k in h5.get("xanes", {}) if h5["xanes"][k].ndim == 3),
                "xanes_skipped": r.xanes_skipped(),
                "dropped": json.loads(attrs.get("dropped", "[]"))}
