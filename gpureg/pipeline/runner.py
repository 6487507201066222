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
import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from ..core.backend import resolve_device, to_host
from ..core.transform import apply_affine
from ..io.files import InputError
from ..io.results import ResultStore
from ..register.affine import register_prepared
from ..register.prepare import prepare_volume
from ..register.series import reference_index, registration_order, warm_start
from .particles import PerParticle, per_particle_xanes
from .report import PipelineResult, read_result, report_dir_for, write_report

__all__ = ["file_checksum", "reference_prep", "run"]

_log = logging.getLogger("gpureg")


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
    from ..io.readers import open_input

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
        store = ResultStore.open(work, reader, energies, ref, params, checksum, fresh=overwrite)
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
                per_particle_xanes(store, params)
            store.finish()
        except BaseException:
            store.close()
            raise
    os.replace(work, output)
    result = read_result(output, resumed)
    if report:
        result.report_dir = report_dir_for(output)
        result.figures = write_report(output, result.report_dir)
    return result


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
        from ..recon.fbp import reconstruct_energy

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
    particles = PerParticle(store, ref, params) if params.get("per_particle") else None
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
            aligned = to_host(apply_affine(vol, res.matrix, device=dev)) if particles is None else particles.apply(i, vol)
            t2 = time.perf_counter()
            store.write_energy(i, vol, aligned, res.matrix, res.mse_before, res.mse_after,
                               {"load": t_load, "register": t1 - t0, "apply": t2 - t1})
            _notify(progress, store, i, res.mse_before, res.mse_after, time.perf_counter() - t0 + t_load)


def reference_prep(reference, params) -> dict:
    """:func:`prepare_volume` options for every energy of a series with this reference volume."""
    from ..register.prepare import foreground_fraction

    prep = {"binarize": params["binarize"], "denoise": params["denoise"]}
    if params["binarize"]:
        prep["fraction"] = foreground_fraction(reference, denoise=params["denoise"])
    return prep


def score_matrix(fixed, moving, matrix):
    """A :class:`RegistrationResult` for a given matrix (MSE at identity and at ``matrix``)."""
    from ..core.metric import mse_terms
    from ..register.affine import RegistrationResult

    m = np.asarray(matrix, dtype=np.float64)
    before = mse_terms(fixed, moving, np.eye(4), hessian=False).mse
    return RegistrationResult(m, before, mse_terms(fixed, moving, m, hessian=False).mse, [], 0.0, "given", True)


def _warm_start(store, i, ref):
    # Done energies in index order, so a resumed run picks the same neighbour as an uninterrupted one.
    done = [j for j in np.flatnonzero(store.done) if j != i]
    return warm_start(((store.energies[j], None if j == ref else store.matrix(j)) for j in done), store.energies[i])


def _notify(progress, store, i, before, after, seconds):
    if progress is not None:
        progress({"index": int(i), "energy": float(store.energies[i]), "done": int(store.done.sum()),
                  "total": len(store.energies), "mse_before": float(before), "mse_after": float(after),
                  "seconds": float(seconds)})


def _xanes(store, ref, params):
    from ..core.segment import binarize, particle_labels
    from ..xanes.stack import edge_energy_map

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
