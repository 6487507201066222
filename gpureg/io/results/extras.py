"""The optional parts of a run's result, written by :class:`~gpureg.io.results.ResultStore`: per-particle
transforms, B-spline coefficients, projection alignment (a mixin: the store's safe ``_put``/``_sync``)."""

from __future__ import annotations

import json

import numpy as np

from .compression import dataset_filter
from .nexus import annotate_stack, check_storable
from .space import digest

__all__ = ["ALIGNMENT_CONVENTION", "RunExtras"]

REPAIR_METHOD = ("dead/NaN pixels and outliers (> max(10 sigma, 0.1) from the median of both the 3x3 neighbours and "
                 "the adjacent angles) replaced by the median of their valid neighbours; projections whose total "
                 "attenuation departs from their neighbours' (or > 5 % repaired) replaced by the mean of the two "
                 "adjacent ones (gpureg.recon.repair)")
ALIGNMENT_CONVENTION = ("measured(r, c) = ideal(r - dr, c - dc) for (dr, dc) = projection_shifts[e, k]; "
                        "aligned = measured(r + dr, c + dc); no part a + b cos + c sin in columns, zero mean rows")


class RunExtras:
    """Writers of the optional groups; mixed into :class:`~gpureg.io.results.ResultStore`."""

    # --- detector repairs (projections) ----------------------------------------------------
    def write_repair(self, i, info: dict):
        """What was repaired in energy ``i``'s projections before FBP (:class:`gpureg.recon.repair.Repair`).

        ``/quality/repaired_pixels`` (n_energy,) int64 (dead/NaN + outlier pixels),
        ``/quality/repaired_projections`` (n_energy,) int32 (projections replaced by
        their neighbours' mean), and per energy the details (JSON attribute ``details``
        of ``repaired_pixels``: invalid and outlier pixel counts, projection indices,
        threshold). Created on first use.
        """
        h5, n = self.h5, len(self.energies)
        if "quality/repaired_pixels" not in h5:
            g = h5.require_group("quality")
            g.create_dataset("repaired_pixels", data=np.zeros(n, dtype=np.int64))
            g.create_dataset("repaired_projections", data=np.zeros(n, dtype=np.int32))
            g["repaired_pixels"].attrs.update({"details": "{}", "method": REPAIR_METHOD})
        self._put("quality/repaired_pixels", i, int(info["invalid_pixels"] + info["outlier_pixels"]))
        self._put("quality/repaired_projections", i, len(info["projections"]))
        with self._lock:
            ds = self._d("quality/repaired_pixels")
            details = json.loads(ds.attrs["details"])
            details[f"{self.energies[i]:g}"] = info
            ds.attrs["details"] = json.dumps(details)

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
            self._put("aligned_global", self.ref, self.recon(self.ref))
            self._sync()

    def write_particles(self, i, matrices, mse_global, mse_particle):
        self._put("registration/particle_matrix", i, matrices)
        self._put("registration/particle_mse_global", i, mse_global)
        self._put("registration/particle_mse", i, mse_particle)

    def write_aligned_global(self, i, volume):
        self._put("aligned_global", i, volume)

    # --- deformable runs -------------------------------------------------------------------
    def write_bspline(self, i, coefficients, spacing: float, min_jacobian: float, mse: float, *, base: str = "affine"):
        """B-spline coefficients of energy ``i`` (``/registration/bspline_*``, created on first use).

        ``bspline_coefficients`` (n_energy, 3, cz, cy, cx) float32, fine voxels,
        attribute ``spacing`` (voxels); the reference's row is zero (identity).
        The dense field is not stored: rebuild it with
        :func:`gpureg.register.deformation_field` (coefficients, ``registration/matrix``).
        ``base`` (attribute): ``"affine"``, or ``"piecewise"`` when the B-spline refines the per-particle
        alignment (``q(p) = P(p + u(p))``, :func:`gpureg.pipeline.deform.composed_displacement`).
        """
        h5, c = self.h5, np.asarray(coefficients, dtype=np.float32)
        if "registration/bspline_coefficients" not in h5:
            n = len(self.energies)
            h5.create_dataset("registration/bspline_coefficients", shape=(n, *c.shape), dtype="f4",
                              chunks=(1, *c.shape), fillvalue=0.0)
            h5["registration/bspline_coefficients"].attrs.update(
                {"spacing": float(spacing), "convention": "q(p) = A p + t + u(p), u the cubic B-spline of these "
                 "coefficients (fine voxels, (z, y, x)); control point j at (j - 1) * spacing", "base": str(base)})
            if base == "piecewise":
                h5["registration/bspline_coefficients"].attrs["convention"] = (
                    "q(p) = P(p + u(p)), P the per-particle affine (registration/particle_matrix) of the region of "
                    "p + u(p), u the cubic B-spline of these coefficients (fine voxels, (z, y, x)); control point "
                    "j at (j - 1) * spacing")
            h5["registration/bspline_min_jacobian"] = np.ones(n)
            h5["registration/bspline_mse_affine"] = np.full(n, np.nan)
        self._put("registration/bspline_coefficients", i, c)
        self._put("registration/bspline_min_jacobian", i, min_jacobian)
        self._put("registration/bspline_mse_affine", i, mse)

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
        self._put("alignment/projection_shifts", i, shifts)
        self._put("alignment/estimated_shifts", i, np.asarray(result.estimated, dtype=np.float64))
        self._put("alignment/iterations", i, int(result.iterations))
        self._put("alignment/error_before", i, result.error_before)
        self._put("alignment/error_after", i, result.error_after)
        self._put("alignment/seconds", i, result.seconds)
        self._put("alignment/applied", i, bool(result.applied))
        self._put("alignment/status", i, result.status.encode())
        if result.reason:
            g = h5["alignment"]
            reasons = json.loads(g["status"].attrs["reasons"])
            reasons[f"{self.energies[i]:g}"] = result.reason
            g["status"].attrs["reasons"] = json.dumps(reasons)

    # --- series smoothing (issue 27) --------------------------------------------------------
    def raw_fits(self) -> dict:
        """The per-energy fits before series smoothing, by name: ``matrix`` and, when the run has them,
        ``particle_matrix`` and ``bspline_coefficients``; and their registration residuals, ``mse_after``
        (the last stage's), ``particle_mse`` and ``bspline_mse_affine`` (the affine's in a deformable run).

        Copied once to ``registration/<name>_raw``; the smoothing pass then rewrites ``registration/<name>``
        (what was applied), so a pass interrupted half-way starts again from the same fits.
        """
        h5, out = self.h5, {}
        with self._lock:
            for name in ("matrix", "particle_matrix", "bspline_coefficients"):
                if f"registration/{name}" not in h5:
                    continue
                if f"registration/{name}_raw" not in h5:
                    h5.copy(h5[f"registration/{name}"], f"registration/{name}_raw")
                    h5[f"registration/{name}_raw"].attrs["meaning"] = "per-energy fit before series smoothing"
                out[name] = h5[f"registration/{name}_raw"][...]
            for name in ("mse_after", "particle_mse", "bspline_mse_affine"):
                if f"registration/{name}" in h5:
                    out[name] = h5[f"registration/{name}"][...]
            if "bspline_coefficients" in out:
                out["bspline_spacing"] = float(h5["registration/bspline_coefficients"].attrs["spacing"])
            self._sync()
        return out

    def write_smoothed(self, i, aligned, matrix, *, particle_matrices=None, coefficients=None, min_jacobian=None,
                       aligned_global=None):
        """Energy ``i`` after series smoothing: the transforms applied and the volumes resampled with them
        (its digest follows, so that a resumed run still finds the energy intact)."""
        with self._lock:
            check_storable(self._d("aligned"), aligned, f"aligned at {self.energies[i]:g} eV")
            stored = np.ascontiguousarray(aligned, self._d("aligned").dtype)
            self._put("aligned", i, stored)
            self._put("registration/matrix", i, matrix)
            if particle_matrices is not None:
                self._put("registration/particle_matrix", i, particle_matrices)
            if coefficients is not None:
                self._put("registration/bspline_coefficients", i, coefficients)
                self._put("registration/bspline_min_jacobian", i, min_jacobian)
            if aligned_global is not None:
                self._put("aligned_global", i, aligned_global)
            if "registration/digest" in self.h5:
                self._put("registration/digest", i, digest(self._d("recon")[i], stored).encode())
            self._sync()

    def mark_series(self, window: int):
        """Record that every energy's transform is the series-smoothed one (``window`` energies each side)."""
        with self._lock:
            self._d("registration/matrix").attrs["series_window"] = int(window)
            self._sync()
