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
import glob
import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from ..core.backend import to_host
from ..core.transform import apply_affine
from ..io.files import InputError
from ..io.results import ResultStore, partial_path, read_result, report_dir_for
from ..register.affine import register_prepared
from ..register.prepare import prepare_reference, prepare_volume
from ..register.series import reference_index, registration_order
from .options import Devices, RunOptions, resolve_devices
from .deform import DeformableStep
from .particles import PerParticle, per_particle_xanes
from .report import PipelineResult, write_report
from .steps import Loader, check_output, notify, score_matrix, stored_warm_start

__all__ = ["file_checksum", "run"]

_log = logging.getLogger("gpureg")


def run(input, output, options: RunOptions | None = None, *, overwrite: bool = False, progress=None,
        matrices=None, devices: Devices | None = None, **settings) -> PipelineResult:
    """Run the whole pipeline on one measurement.

    Parameters
    ----------
    input : str or Path
        Data Exchange HDF5 with projections (``/exchange/data`` ...) or
        reconstructions (``/exchange/recon``), or a folder of per-energy files
        (anything :func:`gpureg.io.open_input` reads).
    output : str or Path
        Result HDF5 (layout in :mod:`gpureg.io.results`). Its folder must exist and be writable.
    options : RunOptions, optional
        Every setting (device, reference, preparation, model, FBP centre/filter,
        edge method, per-particle, report, scheduler); default ``RunOptions()``.
    overwrite : bool
        Replace a finished ``output`` (and discard a partial one).
    progress : callable, optional
        Called after each energy as ``progress(event)`` with a dict (``index``,
        ``energy``, ``done``, ``total``, ``mse_before``, ``mse_after``, ``seconds``).
        An exception raised here interrupts the run like a crash would.
    matrices : (n_energy, 4, 4) array_like, optional
        Known ``moving_from_reference`` transforms: no registration, they are
        applied as given (``gpureg watch`` uses this after re-referencing).
    devices : Devices, optional
        Devices already resolved for this run (watch passes its own); default
        ``resolve_devices(options.device)``.
    **settings
        Shorthand for ``RunOptions(...)`` fields when ``options`` is not given:
        ``device``, ``reference``, ``binarize``, ``denoise``, ``smooth``, ``model``,
        ``center``, ``filter``, ``edge``, ``per_particle``, ``deformable``, ``spacing``, ``regularization``,
        ``allow_folding``, ``report``, ``scheduler``, ``references``, ``clusters``.

    Returns
    -------
    PipelineResult
    """
    from ..io.readers import open_input

    options = _options(options, settings)
    output = Path(output)
    if options.deformable and matrices is not None:
        raise ValueError("deformable registration registers every energy: not with given matrices")
    if options.per_particle and matrices is not None:
        raise ValueError("per_particle registration runs on one machine and registers: not with scheduler or matrices")
    devices = resolve_devices(options.device) if devices is None else devices
    check_output(output, overwrite)
    matrices = None if matrices is None else np.asarray(matrices, dtype=np.float64).round(12).tolist()
    checksum = file_checksum(input)
    with open_input(input) as reader:
        energies = np.asarray(reader.energies, dtype=np.float64)
        ref = reference_index(energies, options.reference)
        if options.references:     # bad reference files fail now, not after registration
            from ..xanes.lcf import prepare_references

            prepare_references(options.references, np.sort(energies))
        work = partial_path(output)
        store = ResultStore.open(work, reader, energies, ref, options.parameters(devices, matrices), checksum,
                                 fresh=overwrite)
        try:
            resumed = int(store.done.sum())
            if resumed:
                _log.warning("gpureg: resuming %s: %d of %d energies already done", work, resumed, len(energies))
            loader = Loader.for_run(reader, options, devices)
            if not store.done[ref]:
                vol, t_load = loader(ref)
                store.write_energy(ref, vol, vol, np.eye(4), 0.0, 0.0, {"load": t_load})
                notify(progress, store, ref, 0.0, 0.0, t_load)
            reference = prepare_reference(store.recon(ref), devices.registration, options.prep,
                                          name=f"reference energy {energies[ref]:g} eV")
            if options.scheduler:
                from .distributed import register_energies_dask

                register_energies_dask(options.scheduler, store, reader.path, reference, options, devices, progress)
            else:
                _register_all(store, loader, reference, options, devices, matrices, progress)
            _xanes(store, reference, options, devices)
            if options.per_particle:
                per_particle_xanes(store, options, devices)
            store.finish()
        except BaseException:
            store.close()
            raise
    os.replace(work, output)
    summary = read_result(output)
    result = PipelineResult(output=output, report_dir=None, energies=summary.energies,
                            reference_index=summary.reference_index, matrices=summary.matrices,
                            mse_before=summary.mse_before, mse_after=summary.mse_after, timings=summary.timings,
                            resumed=resumed)
    if options.report:
        result.report_dir = report_dir_for(output)
        result.figures = write_report(output, result.report_dir)
    return result


def file_checksum(path) -> str:
    """BLAKE2b of a file's bytes (of every file, in name order, for a folder or a glob pattern)."""
    text = str(path)
    path = Path(path)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(text) if Path(f).is_file())
        if not files:
            raise InputError(f"{text}: no file matches this pattern")
    elif not path.exists():
        raise InputError(f"{path}: file not found")
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 23), b""):
                h.update(block)
    return h.hexdigest()


# --- internals ---------------------------------------------------------------------------

def _options(options, settings):
    if options is None:
        return RunOptions().replace(**settings)
    if settings:
        raise TypeError(f"run: give either options or keyword settings, not both ({sorted(settings)})")
    if not isinstance(options, RunOptions):
        raise TypeError(f"options must be a gpureg.pipeline.RunOptions, got {type(options).__name__}")
    return options


def _register_all(store, loader, reference, options, devices, matrices, progress):
    dev = devices.registration
    energies, ref = store.energies, store.ref
    fixed, prep = reference.volume, reference.prep
    particles = PerParticle(store, reference, dev) if options.per_particle else None
    deform = DeformableStep(store, options, dev) if options.deformable and matrices is None else None
    pending = [i for i in registration_order(energies, ref) if not store.done[i]]
    with cf.ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(loader, pending[0]) if pending else None
        for k, i in enumerate(pending):
            vol, t_load = nxt.result()
            nxt = pool.submit(loader, pending[k + 1]) if k + 1 < len(pending) else None
            t0 = time.perf_counter()
            moving = prepare_volume(vol, dev, prep, name=f"energy {energies[i]:g} eV")
            if matrices is None:
                res = register_prepared(fixed, moving, init=stored_warm_start(store, i, ref),
                                        model=options.model.value)
            else:
                res = score_matrix(fixed, moving, matrices[i])
            if particles is not None:
                particles.register(i, fixed, moving, res)
            mse_after = res.mse_after if deform is None else deform.register(i, fixed, moving, res).mse_after
            t1 = time.perf_counter()
            if deform is not None:
                aligned = deform.apply(vol)
            elif particles is None:
                aligned = to_host(apply_affine(vol, res.matrix, device=dev))
            else:
                aligned = particles.apply(i, vol)
            t2 = time.perf_counter()
            store.write_energy(i, vol, aligned, res.matrix, res.mse_before, mse_after,
                               {"load": t_load, "register": t1 - t0, "apply": t2 - t1})
            notify(progress, store, i, res.mse_before, mse_after, time.perf_counter() - t0 + t_load)


def _xanes(store, reference, options, devices):
    from ..core.segment import particle_labels
    from ..xanes.stack import edge_energy_map

    maps = edge_energy_map(store.stack("aligned"), store.energies, device=devices.registration,
                           method=options.edge.value)
    labels, _ = particle_labels(reference.mask)
    chem = None
    if options.references or options.clusters:
        from ..xanes.chemmap import chemistry_map

        chem = chemistry_map(store.stack("aligned"), store.energies, references=options.references or None,
                             k=options.clusters, mask=maps["mask"], device=devices.registration)
    store.write_xanes(maps, to_host(labels), chemistry=chem)
