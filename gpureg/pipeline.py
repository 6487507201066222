"""The pipeline: projections -> FBP -> binarize -> register -> align -> XANES -> report.

Energies stream one at a time: the reference is reconstructed first, then the
others in order of distance from it; while one registers, the next is read
and reconstructed in a worker thread. Everything is written to
``OUTPUT.partial`` as it completes (flushed per energy, with a ``done`` flag),
so rerunning the same command after an interruption resumes where it stopped
and gives the same result; the finished file is renamed onto ``OUTPUT``
(atomic) and never overwritten without ``overwrite=True``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backend import resolve_device, to_host
from .io import InputError
from .register import prepare_volume, reference_index, register_prepared, registration_order, warm_start

__all__ = ["PipelineResult", "STAGES", "file_checksum", "reference_prep", "report_dir_for", "run", "write_report"]

STAGES = ("load", "register", "apply", "write")

_log = logging.getLogger("gpureg")


@dataclass
class PipelineResult:
    """What a finished run produced."""

    output: Path
    report_dir: Path | None
    energies: np.ndarray
    reference_index: int
    matrices: np.ndarray
    mse_before: np.ndarray
    mse_after: np.ndarray
    timings: dict = field(default_factory=dict)  # stage -> (n_energy,) seconds
    resumed: int = 0  # energies taken from an interrupted run
    figures: list = field(default_factory=list)


def run(input, output, *, device: str = "auto", reference="highest", binarize: bool = True,
        denoise: str | None = None, model: str = "affine", center: float | None = None, filter: str = "ram-lak",
        xanes_method: str = "half", overwrite: bool = False, report: bool = True, progress=None,
        scheduler: str | None = None, matrices=None, per_particle: bool = False) -> PipelineResult:
    """Run the whole pipeline on one measurement.

    Parameters
    ----------
    input : str or Path
        Data Exchange HDF5 with projections (``/exchange/data`` ...) or
        reconstructions (``/exchange/recon``), or a folder of per-energy files
        (anything :func:`gpureg.io.open_input` reads).
    output : str or Path
        Result HDF5 (layout in DESIGN.md). Its folder must exist and be writable.
    device : {"auto", "cpu", "gpu"}
        Registration/resampling/XANES device (FBP uses ASTRA-CUDA when present).
    reference : "highest", "lowest" or float
        Reference energy (eV).
    binarize : bool
        Register Otsu-binarized tomograms (the reference method); False: grey levels.
    denoise : {None, "median", "gaussian"}
        Filter applied before binarization/registration.
    model : {"affine", "translation"}
        Registration model.
    center : float, optional
        Rotation-axis detector column for FBP (default: ASTRA's detector middle).
    filter : str
        FBP filter (see :data:`gpureg.recon.FILTERS`).
    xanes_method : {"half", "derivative"}
        Edge-energy definition (0.5 crossing or max of dmu/dE).
    overwrite : bool
        Replace a finished ``output`` (and discard a partial one).
    report : bool
        Also write the report folder (figures, summary.json, report.md).
    progress : callable, optional
        Called after each energy as ``progress(event)`` with a dict (``index``,
        ``energy``, ``done``, ``total``, ``mse_before``, ``mse_after``, ``seconds``).
        An exception raised here interrupts the run like a crash would.
    scheduler : str, optional
        Dask distributed scheduler address: registers energies in parallel on
        its workers (needs the ``dask`` extra).
    matrices : (n_energy, 4, 4) array_like, optional
        Known ``moving_from_reference`` transforms: no registration, they are
        applied as given (``gpureg watch`` uses this after re-referencing).
    per_particle : bool
        After each energy's global registration, register every particle of
        the reference on its own (:func:`gpureg.register_particles`) and
        resample piecewise into ``/aligned``; ``/aligned_global``,
        ``/registration/particle_*`` and ``/xanes_global`` keep the comparison.
        Not with ``scheduler`` or ``matrices``.

    Returns
    -------
    PipelineResult
    """
    from .io import open_input

    output = Path(output)
    dev = resolve_device(device)
    _check_output(output, overwrite)
    params = {"device": dev, "reference": reference, "binarize": binarize, "denoise": denoise, "model": model,
              "center": center, "filter": filter, "xanes_method": xanes_method,
              "matrices": None if matrices is None else np.asarray(matrices, dtype=np.float64).round(12).tolist(),
              "per_particle": bool(per_particle)}
    if per_particle and (scheduler or matrices is not None):
        raise ValueError("per_particle registration runs on one machine and registers: not with scheduler or matrices")
    checksum = file_checksum(input)
    with open_input(input) as reader:
        energies = np.asarray(reader.energies, dtype=np.float64)
        ref = reference_index(energies, reference)
        work = output.with_name(output.name + ".partial")
        store = _ResultStore.open(work, reader, energies, ref, params, checksum, fresh=overwrite)
        try:
            resumed = int(store.done.sum())
            if resumed:
                _log.warning("gpureg: resuming %s: %d of %d energies already done", work, resumed, len(energies))
            loader = _Loader(reader, center=center, filter=filter, device=dev)
            if scheduler:
                from .distributed import register_energies_dask

                register_energies_dask(scheduler, store, loader, ref, params, progress)
            else:
                _register_all(store, loader, ref, params, progress)
            _xanes(store, ref, params)
            if per_particle:
                _per_particle_xanes(store, params)
            store.finish()
        except BaseException:
            store.close()
            raise
    os.replace(work, output)
    result = _result_from_file(output, resumed)
    if report:
        result.report_dir = report_dir_for(output)
        result.figures = write_report(output, result.report_dir)
    return result


def report_dir_for(output) -> Path:
    """Report folder of a result file: ``RESULT_report/`` beside it."""
    output = Path(output)
    return output.with_name(output.stem + "_report")


def write_report(result_h5, outdir) -> list:
    """Figures (PNG), ``summary.json`` and ``report.md`` for a finished result file."""
    from . import __version__
    from .io import atomic_path
    from .plots import plot_result

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    figures = [Path(p) for p in plot_result(result_h5, outdir)]
    pp_figures, pp_summary, pp_lines = _per_particle_report(result_h5, outdir)  # nothing unless per_particle
    figures += pp_figures
    res = _result_from_file(result_h5, 0)
    import h5py

    with h5py.File(result_h5, "r") as h5:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
        xanes = {}
        if "xanes/edge_energy" in h5:
            e0 = h5["xanes/edge_energy"][...]
            labels = h5["xanes/labels"][...]
            mask = h5["xanes/mask"][...].astype(bool)
            for lab in np.unique(labels[labels > 0]):
                sel = (labels == lab) & mask & np.isfinite(e0)
                if sel.any():
                    xanes[f"particle {int(lab)}"] = {"voxels": int(sel.sum()), "edge_energy_median_ev": float(np.median(e0[sel])),
                                                     "edge_energy_iqr_ev": float(np.subtract(*np.percentile(e0[sel], [75, 25])))}
    summary = {
        "gpureg_version": __version__, "input": attrs.get("input"), "input_checksum": attrs.get("input_checksum"),
        "device": attrs.get("device"), "parameters": json.loads(attrs.get("parameters", "{}")),
        "reference_energy_ev": float(res.energies[res.reference_index]),
        "energies_ev": res.energies.tolist(), "mse_before": res.mse_before.tolist(), "mse_after": res.mse_after.tolist(),
        "matrices": res.matrices.tolist(), "timings_s": {k: v.tolist() for k, v in res.timings.items()},
        "total_s": {k: float(np.sum(v)) for k, v in res.timings.items()}, "particles": xanes,
        "figures": [p.name for p in figures],
    }
    summary.update(pp_summary)
    with atomic_path(outdir / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    lines = [f"# gpureg report: {Path(result_h5).name}", "",
             f"- input: `{summary['input']}` (checksum {summary['input_checksum']})",
             f"- device: {summary['device']}; reference energy {summary['reference_energy_ev']:.1f} eV; "
             f"{len(res.energies)} energies",
             f"- MSE before -> after registration (median over energies): {np.median(res.mse_before):.4g} -> "
             f"{np.median(res.mse_after):.4g}",
             "- time per stage (s, all energies): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["total_s"].items()),
             ""]
    for name, st in xanes.items():
        lines.append(f"- {name}: {st['voxels']} voxels, edge energy median {st['edge_energy_median_ev']:.2f} eV "
                     f"(IQR {st['edge_energy_iqr_ev']:.2f} eV)")
    lines += pp_lines
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    lines += ["", "Numbers: [summary.json](summary.json)", ""]
    with atomic_path(outdir / "report.md") as tmp:
        Path(tmp).write_text("\n".join(lines))
    return figures


def file_checksum(path) -> str:
    """BLAKE2b of a file's bytes (of every file, in name order, for a folder)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    h = hashlib.blake2b(digest_size=16)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 23), b""):
                h.update(block)
    return h.hexdigest()


# --- internals ---------------------------------------------------------------------------

class _Loader:
    """Reads/reconstructs one energy; a worker thread prefetches the next one."""

    def __init__(self, reader, *, center, filter, device):
        self.reader, self.center, self.filter, self.device = reader, center, filter, device

    def __call__(self, i):
        from .recon import reconstruct_energy

        t0 = time.perf_counter()
        vol = to_host(reconstruct_energy(self.reader, i, center=self.center, filter=self.filter, device=self.device))
        vol = np.ascontiguousarray(vol, dtype=np.float32)
        if not np.isfinite(vol).all():
            raise InputError(f"{self.reader.path}: energy {i} ({self.reader.energies[i]:g} eV) reconstructs to "
                             "NaN/inf values; check data, flat and dark fields")
        return vol, time.perf_counter() - t0


def _register_all(store, loader, ref, params, progress):
    dev = params["device"]
    energies = store.energies
    if not store.done[ref]:
        vol, t_load = loader(ref)
        store.write_energy(ref, vol, vol, np.eye(4), 0.0, 0.0, {"load": t_load})
        _notify(progress, store, ref, 0.0, 0.0, t_load)
    prep = reference_prep(store.recon(ref), params)
    fixed = prepare_volume(store.recon(ref), dev, name=f"reference energy {energies[ref]:g} eV", **prep)
    particles = _PerParticle(store, ref, params) if params.get("per_particle") else None
    pending = [i for i in registration_order(energies, ref) if not store.done[i]]
    with cf.ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(loader, pending[0]) if pending else None
        for k, i in enumerate(pending):
            vol, t_load = nxt.result()
            nxt = pool.submit(loader, pending[k + 1]) if k + 1 < len(pending) else None
            t0 = time.perf_counter()
            moving = prepare_volume(vol, dev, name=f"energy {energies[i]:g} eV", **prep)
            if params["matrices"] is None:
                res = register_prepared(fixed, moving, init=_warm_start(store, i, ref), model=params["model"])
            else:
                res = score_matrix(fixed, moving, params["matrices"][i])
            if particles is not None:
                particles.register(i, fixed, moving, res)
            t1 = time.perf_counter()
            aligned = to_host(_apply(vol, res.matrix, dev)) if particles is None else particles.apply(i, vol)
            t2 = time.perf_counter()
            store.write_energy(i, vol, aligned, res.matrix, res.mse_before, res.mse_after,
                               {"load": t_load, "register": t1 - t0, "apply": t2 - t1})
            _notify(progress, store, i, res.mse_before, res.mse_after, time.perf_counter() - t0 + t_load)


def reference_prep(reference, params) -> dict:
    """:func:`prepare_volume` options for every energy of a series with this reference volume."""
    from .register import foreground_fraction

    prep = {"binarize": params["binarize"], "denoise": params["denoise"]}
    if params["binarize"]:
        prep["fraction"] = foreground_fraction(reference, denoise=params["denoise"])
    return prep


def score_matrix(fixed, moving, matrix):
    """A :class:`RegistrationResult` for a given matrix (MSE at identity and at ``matrix``)."""
    from .metric import mse_terms
    from .register import RegistrationResult

    m = np.asarray(matrix, dtype=np.float64)
    before = mse_terms(fixed, moving, np.eye(4), hessian=False).mse
    return RegistrationResult(m, before, mse_terms(fixed, moving, m, hessian=False).mse, [], 0.0, "given", True)


def _warm_start(store, i, ref):
    # Done energies in index order, so a resumed run picks the same neighbour as an uninterrupted one.
    done = [j for j in np.flatnonzero(store.done) if j != i]
    return warm_start(((store.energies[j], None if j == ref else store.matrix(j)) for j in done), store.energies[i])


def _apply(volume, matrix, device):
    from .transform import apply_affine

    return apply_affine(volume, matrix, device=device)


def _notify(progress, store, i, before, after, seconds):
    if progress is not None:
        progress({"index": int(i), "energy": float(store.energies[i]), "done": int(store.done.sum()),
                  "total": len(store.energies), "mse_before": float(before), "mse_after": float(after),
                  "seconds": float(seconds)})


def _xanes(store, ref, params):
    from .segment import binarize
    from .xanes import edge_energy_map, particle_labels

    maps = edge_energy_map(store.h5["aligned"], store.energies, device=params["device"],
                           method=params["xanes_method"])
    ref_mask = to_host(binarize(store.recon(ref), denoise=params["denoise"])) > 0.5
    labels, _ = particle_labels(ref_mask)
    store.write_xanes(maps, labels)


def _check_output(output, overwrite):
    if output.suffix.lower() not in (".h5", ".hdf5", ".hdf", ".nxs"):
        raise InputError(f"{output}: output must be an HDF5 file name (.h5, .hdf5)")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{output}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{output}: output folder {folder} is not writable")
    if output.exists() and not overwrite:
        raise InputError(f"{output}: exists (a finished run); pass --overwrite to replace it")


class _ResultStore:
    """The ``.partial`` result file: preallocated per-energy datasets and ``done`` flags."""

    def __init__(self, h5, energies, ref):
        self.h5, self.energies, self.ref = h5, energies, ref
        self.done = h5["registration/done"][...].astype(bool)

    @classmethod
    def open(cls, path, reader, energies, ref, params, checksum, *, fresh):
        import h5py

        from . import __version__

        shape = tuple(int(n) for n in reader.recon_shape)
        if path.exists() and not fresh:
            try:
                h5 = h5py.File(path, "r+")
            except OSError as exc:
                _log.warning("gpureg: %s is unreadable (%s); starting over", path, exc)
            else:
                same = (h5.attrs.get("input_checksum") == checksum and h5.attrs.get("parameters") == json.dumps(params)
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
        h5.attrs.update({"gpureg_version": __version__, "device": params["device"], "parameters": json.dumps(params),
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
            from .io import _write_group

            _write_group(h5.create_group("truth"), truth)
        h5.flush()
        return cls(h5, energies, ref)

    def recon(self, i):
        return self.h5["recon"][i]

    def matrix(self, i):
        return self.h5["registration/matrix"][i]

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

    def write_xanes(self, maps, labels):
        grp = self.h5.require_group("xanes")
        for key in ("edge_energy", "edge_jump", "white_line", "mask"):
            if key in grp:
                del grp[key]
            grp[key] = np.asarray(maps[key])
        if "labels" in grp:
            del grp["labels"]
        grp["labels"] = labels.astype(np.int32)
        grp["edge_energy"].attrs["units"] = "eV"

    def finish(self):
        self.h5.attrs["complete"] = True
        self.close()

    def close(self):
        with contextlib.suppress(Exception):
            self.h5.close()


def _result_from_file(path, resumed):
    import h5py

    with h5py.File(path, "r") as h5:
        return PipelineResult(
            output=Path(path), report_dir=None, energies=h5["energy"][...], reference_index=int(h5.attrs["reference_index"]),
            matrices=h5["registration/matrix"][...], mse_before=h5["registration/mse_before"][...],
            mse_after=h5["registration/mse_after"][...], timings={k: h5[f"timings/{k}"][...] for k in h5["timings"]},
            resumed=resumed)


# --- per-particle registration (run(per_particle=True), issue 8) -------------------------

class _PerParticle:
    """Per-particle registration of each energy after its global one.

    Labels are the connected components of the binarized reference, computed
    once and kept in the result file (``/registration/particle_labels``), so a
    resumed run uses the same ones. Per energy it stores
    ``/registration/particle_matrix`` (n_energy, n_labels + 1, 4, 4) (row 0:
    the global transform, for the background), ``particle_mse_global`` and
    ``particle_mse`` (n_energy, n_labels + 1) (column 0: the whole grid), and
    ``/aligned_global`` (the global alignment, for comparison); ``/aligned``
    holds the piecewise alignment.
    """

    def __init__(self, store, ref, params):
        from .segment import binarize
        from .xanes import particle_labels

        self.store, self.device, self.result = store, params["device"], None
        h5 = store.h5
        if "registration/particle_labels" not in h5:
            labels, _ = particle_labels(to_host(binarize(store.recon(ref), denoise=params["denoise"])) > 0.5)
            labels = np.asarray(to_host(labels), dtype=np.int32)
            n, k = len(store.energies), int(labels.max())
            h5["registration/particle_labels"] = labels
            h5["registration/particle_matrix"] = np.tile(np.eye(4), (n, k + 1, 1, 1))
            for name in ("particle_mse_global", "particle_mse"):
                h5[f"registration/{name}"] = np.full((n, k + 1), np.nan)
                h5[f"registration/{name}"][ref] = 0.0
            h5.create_dataset("aligned_global", shape=h5["aligned"].shape, dtype="f4", chunks=h5["aligned"].chunks)
            h5["aligned_global"][ref] = store.recon(ref)
            h5.flush()
        self.labels = h5["registration/particle_labels"][...]
        self.n_labels = int(self.labels.max())

    def register(self, i, fixed, moving, global_result):
        """Particles of energy ``i`` from its (prepared) volume and global result; rows ``i`` written."""
        from .particles import register_particles

        if self.n_labels == 0:
            _log.warning("gpureg: --per-particle: the reference has no particle of >= 64 voxels; global only")
        self.result = register_particles(fixed, moving, self.labels, prepared=True, global_result=global_result,
                                         device=self.device)
        reg = self.store.h5["registration"]
        reg["particle_matrix"][i] = self.result.stack(self.n_labels)
        reg["particle_mse_global"][i], reg["particle_mse"][i] = self.result.mse_arrays(self.n_labels)

    def apply(self, i, volume):
        """Piecewise-aligned grey volume of energy ``i`` (host); the global alignment goes to ``/aligned_global``."""
        from .particles import apply_piecewise

        self.store.h5["aligned_global"][i] = to_host(_apply(volume, self.result.matrices[0], self.device))
        return to_host(apply_piecewise(volume, self.result.matrices, self.result.regions, device=self.device))


def _per_particle_xanes(store, params):
    """Edge-energy maps of the global alignment too (``/xanes_global``), for the side-by-side figure."""
    from .xanes import edge_energy_map

    maps = edge_energy_map(store.h5["aligned_global"], store.energies, device=params["device"],
                           method=params["xanes_method"])
    grp = store.h5.require_group("xanes_global")
    for key in ("edge_energy", "mask"):
        if key in grp:
            del grp[key]
        grp[key] = np.asarray(to_host(maps[key]))
    grp["edge_energy"].attrs["units"] = "eV"


def _per_particle_report(result_h5, outdir):
    """Figures, summary entries and report lines of a per-particle run (nothing for other runs).

    ``particle_mse_per_energy.png``: residual MSE of each particle per energy
    after the global and after the per-particle registration.
    ``edge_energy_global_vs_particles.png``: the edge-energy slice from the
    global alignment beside the one from the per-particle alignment (and the
    ground truth for simulated data), one colour scale.
    """
    import h5py

    with h5py.File(result_h5, "r") as h5:
        if "registration/particle_mse" not in h5:
            return [], {}, []
        energies = h5["energy"][...]
        mse_g, mse_p = h5["registration/particle_mse_global"][...], h5["registration/particle_mse"][...]
        maps = {name: np.where(h5[f"{grp}/mask"][...].astype(bool), h5[f"{grp}/edge_energy"][...], np.nan)
                for name, grp in (("global alignment", "xanes_global"), ("per-particle alignment", "xanes"))
                if f"{grp}/edge_energy" in h5}
        truth = h5["truth/edge_energy"][...] if "truth/edge_energy" in h5 else None
    if truth is not None and truth.shape == next(iter(maps.values()), truth).shape:
        maps["ground truth"] = truth
    else:
        truth = None
    outdir = Path(outdir)
    figures = [_particle_mse_figure(energies, mse_g, mse_p, outdir / "particle_mse_per_energy.png")]
    if len(maps) >= 2:
        figures.append(_edge_maps_figure(maps, outdir / "edge_energy_global_vs_particles.png"))
    ratio = np.nanmedian(mse_g[:, 1:] / np.where(mse_p[:, 1:] > 0, mse_p[:, 1:], np.nan), axis=0) \
        if mse_g.shape[1] > 1 else np.array([])
    summary = {"per_particle": {"particles": int(mse_g.shape[1] - 1), "mse_global": mse_g.tolist(),
                                "mse_particle": mse_p.tolist(),
                                "median_mse_ratio_global_over_particle": [float(r) for r in ratio]}}
    lines = ["- per-particle registration: residual MSE inside each particle, global / per-particle (median over "
             "energies): " + ", ".join(f"particle {k + 1} x{r:.2f}" for k, r in enumerate(ratio))]
    if truth is not None:
        err = {}
        for name in ("global alignment", "per-particle alignment"):
            if name in maps:
                d = np.abs(maps[name] - truth)
                err[name] = float(np.nanmedian(d)) if np.isfinite(d).any() else float("nan")
        summary["per_particle"]["edge_energy_abs_error_median_ev"] = err
        lines.append("- edge energy vs ground truth, median |error|: "
                     + ", ".join(f"{k} {v:.2f} eV" for k, v in err.items()))
    return figures, summary, lines


def _particle_mse_figure(energies, mse_g, mse_p, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import atomic_path

    fig = Figure(figsize=(6.4, 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    order = np.argsort(energies)
    colours = ["0.3", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for k in range(mse_g.shape[1]):
        name, c = ("whole grid" if k == 0 else f"particle {k}"), colours[k % len(colours)]
        for y, style, what in ((mse_g, "--", "global"), (mse_p, "-", "per-particle")):
            v = y[order, k].copy()
            v[~(v > 0)] = np.nan
            ax.plot(energies[order], v, style, color=c, marker="o" if style == "-" else None, ms=3, lw=1.2,
                    label=f"{name}, {what}")
    if np.isfinite(np.where(mse_g > 0, mse_g, np.nan)).any():
        ax.set_yscale("log")
    ax.set_xlabel("Energy (eV)")
    ax.set_ylabel("Residual MSE (registration inputs)")
    ax.set_title("Residual inside each particle: global vs per-particle registration", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def _edge_maps_figure(maps, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .io import atomic_path

    first = next(iter(maps.values()))
    z = int(np.argmax(np.isfinite(first).sum(axis=(1, 2))))
    vals = np.concatenate([m[z][np.isfinite(m[z])] for m in maps.values()])
    lo, hi = (np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0))
    fig = Figure(figsize=(4.2 * len(maps) + 1.0, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(maps))
    for ax, (name, m) in zip(axes, maps.items()):
        ax.set_facecolor("0.15")
        im = ax.imshow(m[z], cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x (voxel)")
    axes[0].set_ylabel("y (voxel)")
    fig.colorbar(im, ax=list(axes), shrink=0.85).set_label("Edge energy (eV)")
    fig.suptitle(f"Edge energy, z = {z}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
