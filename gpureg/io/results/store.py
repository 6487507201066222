"""Writing a result: :class:`ResultStore` (a run's ``.partial`` file), the ``/xanes`` group, ``--no-keep``."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from ...core.backend import to_host
from ..files import InputError, atomic_path
from .compression import DEFAULT_COMPRESSION, dataset_filter, register_filters
from .nexus import NEXUS_ENTRY, annotate_stack, check_storable, stack_dtype, write_nexus_views

__all__ = ["drop_datasets", "GREY_STACKS", "ResultStore", "STACKS", "STAGES", "write_chemistry", "write_result_file", "write_xanes"]

_log = logging.getLogger("gpureg")

STAGES = ("load", "register", "apply", "write")
GREY_STACKS = ("recon", "aligned")  # the per-energy grey stacks of a result (what --keep chooses among)
XANES_MAPS = ("edge_energy", "edge_jump", "white_line", "mask")
ALIGNMENT_CONVENTION = ("measured(r, c) = ideal(r - dr, c - dc) for (dr, dc) = projection_shifts[e, k]; "
                        "aligned = measured(r + dr, c + dc); no part a + b cos + c sin in columns, zero mean rows")


class ResultStore:
    """The ``.partial`` result file of a run: preallocated per-energy datasets and ``done`` flags."""

    def __init__(self, h5, energies, ref):
        self.h5, self.energies, self.ref = h5, energies, ref
        self.done = h5["registration/done"][...].astype(bool)
        ex = h5.get("registration/excluded")
        self.excluded = np.zeros(len(energies), bool) if ex is None else ex[...].astype(bool)

    @classmethod
    def open(cls, path, reader, energies, ref, parameters: dict, checksum, *, fresh,
             compression: str = DEFAULT_COMPRESSION, store_dtype: str = "float32"):
        """Open (resume) or create ``path``.

        An existing file is resumed only when its input checksum, ``parameters``
        (JSON) and volume shape match; otherwise :class:`InputError`. ``compression``
        (:func:`~gpureg.io.results.parse_compression`) and ``store_dtype`` (``float32``, or
        ``float16``: lossy, see :data:`STORE_DTYPES`) apply to the ``/recon`` and ``/aligned``
        stacks of a new file; a resumed file keeps those it was created with.
        """
        import h5py

        register_filters()  # the stacks of a resumed file may need them

        from ...core.version import __version__

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
                                 "rerun with the same ones, or pass overwrite=True to start over")
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
        if getattr(reader, "pixel_size_nm", None):
            h5.attrs["voxel_size_nm"] = float(reader.pixel_size_nm)
        dtype = stack_dtype(store_dtype)
        for name in GREY_STACKS:
            ds = h5.create_dataset(name, shape=(n, *shape), dtype=dtype, chunks=chunks,
                                   **dataset_filter(compression))
            annotate_stack(ds, compression, store_dtype)
        h5["registration/matrix"] = np.tile(np.eye(4), (n, 1, 1))
        for name in ("mse_before", "mse_after"):
            h5[f"registration/{name}"] = np.full(n, np.nan)
        h5["registration/done"] = np.zeros(n, dtype=bool)
        h5["registration/excluded"] = np.zeros(n, dtype=bool)
        h5["registration/excluded"].attrs["reasons"] = "{}"
        for stage in STAGES:
            h5[f"timings/{stage}"] = np.zeros(n)
            h5[f"timings/{stage}"].attrs["units"] = "s"
        truth = reader.truth()
        if truth:
            from ..dataexchange import write_group

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

    def has_stack(self, name: str) -> bool:
        """Whether the file holds the stack ``name`` (``aligned_global`` only in some runs)."""
        return name in self.h5

    def write_energy(self, i, recon, aligned, matrix, before, after, timings):
        t0 = time.perf_counter()
        for name, volume in (("recon", recon), ("aligned", aligned)):
            check_storable(self.h5[name], volume, f"{name} at {self.energies[i]:g} eV")
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

    def record_writer(self, *, busy: float, waited: float):
        """Say on ``/timings/write`` that energies were written in the background (this run's totals, s)."""
        attrs = self.h5["timings/write"].attrs
        attrs["overlap"] = ("written by a background thread while the next energy was computed: per-energy "
                            "write times overlap the other stages; write_wait_s is what writing added")
        attrs["write_busy_s"] = attrs.get("write_busy_s", 0.0) + float(busy)
        attrs["write_wait_s"] = attrs.get("write_wait_s", 0.0) + float(waited)
        self.h5.flush()

    def exclude(self, i, reason: str):
        """Leave energy ``i`` out (``--skip-bad-energies``): flagged done and excluded, ``reason`` recorded."""
        ds = self.h5["registration/excluded"]
        reasons = json.loads(ds.attrs.get("reasons", "{}"))
        reasons[f"{self.energies[i]:g}"] = reason
        ds[i] = True
        ds.attrs["reasons"] = json.dumps(reasons)
        self.h5["registration/done"][i] = True
        self.h5.flush()
        self.excluded[i] = self.done[i] = True

    def used(self) -> np.ndarray:
        """Indices of the energies not excluded."""
        return np.flatnonzero(~self.excluded)

    def volumes(self, name: str = "aligned", indices=None) -> list:
        """Lazy per-energy views of a stack (``view[z0:z1]`` reads one slab), for ``indices`` (default: all used)."""
        ds = self.h5[name]
        return [_EnergyView(ds, int(i)) for i in (self.used() if indices is None else indices)]

    def write_xanes(self, maps, labels, *, group: str = "xanes", chemistry=None, attrs=None):
        """The ``/xanes`` (or ``/xanes_global``) group, see :func:`write_xanes`."""
        write_xanes(self.h5, maps, labels, group=group, chemistry=chemistry, attrs=attrs)

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
            self.ensure_aligned_global()
        return h5["registration/particle_labels"][...]

    def ensure_aligned_global(self):
        """Create ``/aligned_global`` (the affine-only alignment of a per-particle or deformable run) once."""
        h5 = self.h5
        if "aligned_global" not in h5:
            aligned = h5["aligned"]
            spec, kind = aligned.attrs.get("compression", "none"), aligned.attrs.get("store_dtype", "float32")
            ds = h5.create_dataset("aligned_global", shape=aligned.shape, dtype=aligned.dtype, chunks=aligned.chunks,
                                   **dataset_filter(spec))
            annotate_stack(ds, spec, kind)
            h5["aligned_global"][self.ref] = self.recon(self.ref)
            h5.flush()

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

    # --- projection alignment (--align-projections) --------------------------------------
    def write_alignment(self, i, result, theta):
        """Projection alignment of energy ``i`` (:class:`gpureg.recon.AlignmentResult`), ``/alignment/*``.

        Created on first use: ``projection_shifts`` (n_energy, n_angle, 2) float64
        (applied ``(row, column)`` shifts, pixels; NaN for energies not aligned),
        ``estimated_shifts`` (the estimate, also when not applied), ``iterations``,
        ``error_before``/``error_after`` (relative reprojection error), ``applied``,
        ``status`` (``aligned``, ``unchanged`` or ``fallback``; reasons in its attribute, JSON)
        and ``theta`` (n_angle,) degrees.
        """
        h5, n = self.h5, len(self.energies)
        shifts = np.asarray(result.shifts, dtype=np.float64)
        if "alignment/projection_shifts" not in h5:
            g = h5.require_group("alignment")
            for name in ("projection_shifts", "estimated_shifts"):
                g.create_dataset(name, shape=(n, *shifts.shape), dtype="f8", fillvalue=np.nan)
            g["projection_shifts"].attrs.update({"units": "pixel", "convention": ALIGNMENT_CONVENTION})
            g["theta"] = np.asarray(theta, dtype=np.float64)
            g["theta"].attrs["units"] = "deg"
            g["iterations"] = np.zeros(n, dtype=np.int32)
            for name in ("error_before", "error_after", "seconds"):
                g[name] = np.full(n, np.nan)
            g["applied"] = np.zeros(n, dtype=bool)
            g.create_dataset("status", shape=(n,), dtype="S12", fillvalue=b"")
            g["status"].attrs["reasons"] = "{}"
        g = h5["alignment"]
        g["projection_shifts"][i] = shifts
        g["estimated_shifts"][i] = np.asarray(result.estimated, dtype=np.float64)
        g["iterations"][i] = int(result.iterations)
        g["error_before"][i], g["error_after"][i] = result.error_before, result.error_after
        g["seconds"][i] = result.seconds
        g["applied"][i] = bool(result.applied)
        g["status"][i] = result.status.encode()
        if result.reason:
            reasons = json.loads(g["status"].attrs["reasons"])
            reasons[f"{self.energies[i]:g}"] = result.reason
            g["status"].attrs["reasons"] = json.dumps(reasons)

    # --- series smoothing (issue 27) --------------------------------------------------------
    def raw_fits(self) -> dict:
        """The per-energy fits before series smoothing, by name: ``matrix`` and, when the run has them,
        ``particle_matrix`` and ``bspline_coefficients``.

        Copied once to ``registration/<name>_raw``; the smoothing pass then rewrites ``registration/<name>``
        (what was applied), so a pass interrupted half-way starts again from the same fits.
        """
        h5, out = self.h5, {}
        for name in ("matrix", "particle_matrix", "bspline_coefficients"):
            if f"registration/{name}" not in h5:
                continue
            if f"registration/{name}_raw" not in h5:
                h5.copy(h5[f"registration/{name}"], f"registration/{name}_raw")
                h5[f"registration/{name}_raw"].attrs["meaning"] = "per-energy fit before series smoothing"
            out[name] = h5[f"registration/{name}_raw"][...]
        if "bspline_coefficients" in out:
            out["bspline_spacing"] = float(h5["registration/bspline_coefficients"].attrs["spacing"])
        h5.flush()
        return out

    def write_smoothed(self, i, aligned, matrix, *, particle_matrices=None, coefficients=None, min_jacobian=None,
                       aligned_global=None):
        """Energy ``i`` after series smoothing: the transforms applied and the volumes resampled with them."""
        h5 = self.h5
        check_storable(h5["aligned"], aligned, f"aligned at {self.energies[i]:g} eV")
        h5["aligned"][i] = aligned
        h5["registration/matrix"][i] = matrix
        if particle_matrices is not None:
            h5["registration/particle_matrix"][i] = particle_matrices
        if coefficients is not None:
            h5["registration/bspline_coefficients"][i] = coefficients
            h5["registration/bspline_min_jacobian"][i] = min_jacobian
        if aligned_global is not None:
            h5["aligned_global"][i] = aligned_global
        h5.flush()

    def mark_series(self, window: int):
        """Record that every energy's transform is the series-smoothed one (``window`` energies each side)."""
        self.h5["registration/matrix"].attrs["series_window"] = int(window)
        self.h5.flush()

    def finish(self):
        write_nexus_views(self.h5)
        self.h5.attrs["complete"] = True
        self.close()

    def close(self):
        with contextlib.suppress(Exception):
            self.h5.close()


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


# --- internals ---------------------------------------------------------------------------

class _EnergyView:
    """One energy of a ``(n_energy, Z, Y, X)`` dataset, read slab by slab (``view[z0:z1]``)."""

    def __init__(self, ds, i):
        self.ds, self.i, self.shape = ds, i, tuple(ds.shape[1:])

    def __getitem__(self, key):
        return self.ds[(self.i,) + (key if isinstance(key, tuple) else (key,))]
