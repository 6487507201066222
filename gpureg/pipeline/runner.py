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
import glob
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..core import signals
from ..core.backend import to_host
from ..core.config import submit
from ..core.errors import ParameterError
from ..core.transform import apply_affine
from ..core.version import __version__
from ..io.base import is_uri
from ..io.files import BadEnergyError, InputError
from ..io.lock import OutputLock
from ..io.results import (
    DiskFullError,
    ResultStore,
    disk_full,
    drop_datasets,
    is_no_space,
    lock_path,
    log_path,
    partial_path,
    read_result,
    report_dir_for,
)
from ..register.affine import register_prepared
from ..register.prepare import prepare_reference, prepare_volume
from ..register.series import reference_index, registration_order
from .deform import DeformableStep
from .maps import map_run, no_maps_message
from .options import KEEPABLE, Devices, RunOptions, resolve_devices
from .particles import PerParticle
from .report import PipelineResult, write_report
from .series_pass import smooth_series_pass
from .steps import Loader, RunLog, check_output, handle_bad_energy, notify, score_matrix, stored_warm_start
from .writer import BackgroundWriter

__all__ = ["file_checksum", "run"]

_log = logging.getLogger("gpureg")


def run(input, output, options: RunOptions | None = None, *, overwrite: bool = False, progress=None,
        matrices=None, devices: Devices | None = None, alignments=None, provenance: dict | None = None,
        **settings) -> PipelineResult:
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
    alignments : list, optional
        Per energy (in the input's order), a projection alignment already done, to store in
        ``/alignment`` (``gpureg watch --align-projections``: its energies were aligned as they
        arrived): objects with :class:`~gpureg.recon.AlignmentResult`'s attributes and ``theta``, or None.
    provenance : dict, optional
        Root attributes of the result that describe where its input came from
        (watch: the inbox folder as ``input``, ``skipped_inputs``); dicts and lists as JSON.
    **settings
        Shorthand for ``RunOptions(...)`` fields when ``options`` is not given:
        ``device``, ``reference``, ``prep``, ``model``,
        ``center``, ``filter``, ``edge``, ``per_particle``, ``deformable``, ``spacing``, ``regularization``,
        ``allow_folding``, ``report``, ``scheduler``, ``references``, ``clusters``, ``align_projections``.

    Returns
    -------
    PipelineResult
    """
    from ..io.readers import open_input

    options = _options(options, settings)
    output = Path(output)
    if options.per_particle and matrices is not None:
        raise ParameterError("per_particle registration runs on one machine and registers: not with scheduler or matrices")
    check_output(output, overwrite, inputs=(input,))
    matrices = None if matrices is None else np.asarray(matrices, dtype=np.float64).round(12).tolist()
    with OutputLock(output, lock_path(output)):
        devices = resolve_devices(options.device) if devices is None else devices
        with open_input(input) as reader:
            energies = np.asarray(reader.energies, dtype=np.float64)
            _check_input(reader, energies, options, output)  # before anything is created
            if options.references:  # bad reference files fail now, not after registration
                from ..xanes.lcf import prepare_references

                prepare_references(options.references, np.sort(energies), column=options.reference_column)
            ref = reference_index(energies, options.reference)
            checksum = reader_fingerprint(reader) if is_uri(str(input)) else file_checksum(input)
            work = partial_path(output)
            with RunLog(log_path(output)), _disk_errors(output, reader):
                _log.info("gpureg %s: %s -> %s; devices: registration on %s, FBP on %s", __version__, reader.path,
                          output, devices.registration, devices.fbp)
                method = CHECKSUM_FILE if Path(input).is_file() else CHECKSUM_FILES
                resumed = _compute(reader, work, energies, ref, options, devices, matrices, checksum, overwrite,
                                   progress, alignments, {"input_checksum_method": method, **(provenance or {})})
                if options.report:
                    # Before the final rename: a finished RESULT.h5 always has its report.
                    report = report_dir_for(output)
                    figures = write_report(work, report, name=output.name)
                signals.check()
                dropped = [k for k in KEEPABLE if k not in options.keep]
                if dropped:  # a copy of the file without them: it needs the space of the copy
                    _check_disk(work, work.stat().st_size)
                drop_datasets(work, dropped)
                os.replace(work, os.path.realpath(output) if output.is_symlink() else output)
                _log.info("gpureg: finished %s%s", output, f" (without {', '.join(dropped)})" if dropped else "")
                summary = read_result(output)
                if summary.xanes_skipped:
                    _log.warning("%s", no_maps_message(output, summary.xanes_skipped, options,
                                                       len(summary.energies) - len(summary.excluded)))
    result = PipelineResult(**vars(summary), output=output, resumed=resumed)
    if options.report:
        result.report_dir, result.figures = report, figures
    return result


CHECKSUM_FILE = "b2sum: BLAKE2b-512 of the file's bytes"
CHECKSUM_FILES = "BLAKE2b-512 over the relative name and the bytes of every file, in name order"


def file_checksum(path) -> str:
    """BLAKE2b-512 of a file's bytes, as ``b2sum FILE`` prints it (the name does not count: a byte-identical
    copy has the same checksum); for a folder or a glob pattern, over each file's relative name and bytes."""
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
    h = hashlib.blake2b()  # 64-byte digest: b2sum's default
    single = len(files) == 1 and not path.is_dir() and not any(ch in text for ch in "*?[")
    for f in files:
        if not single:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 23), b""):
                h.update(block)
    return h.hexdigest()


def reader_fingerprint(reader) -> str:
    """BLAKE2b of what a reader presents (source, energies, angles, shape): the checksum of a served input."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(reader.path).encode())
    h.update(repr(tuple(reader.shape)).encode())
    for a in (reader.energies, reader.theta):
        if a is not None:
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()


# --- internals ---------------------------------------------------------------------------

def _check_input(reader, energies, options, output):
    """Everything that can be checked before a file is created: energy count, resources."""
    from ..core.resources import check_fits, format_bytes
    from ..io.base import check_angles, check_energy_range
    from ..io.results.space import RESERVE_BYTES
    from ..xanes.spectra import MIN_ENERGIES

    if energies.size < 2:
        raise InputError(f"{reader.path}: has {energies.size} energy; registration needs at least 2")
    if energies.size < MIN_ENERGIES and (options.references or options.clusters):
        # Refused before any work; without them the run registers and writes no maps (maps.map_run says why).
        raise ParameterError(f"{reader.path}: has {energies.size} energies; reference fits and clusters "
                             f"(references=, clusters=) need at least {MIN_ENERGIES}: leave them out to register only")
    if options.align_projections and reader.kind != "projections":
        raise InputError(f"{reader.path}: holds reconstructions; align_projections=True needs projections")
    if isinstance(options.denoise_spectra, int) and options.denoise_spectra >= energies.size:
        raise ParameterError(f"denoise_spectra={options.denoise_spectra}: more components than {reader.path}'s "
                             f"{energies.size} energies allow (at most {energies.size - 1})")
    check_energy_range(energies, str(reader.path))
    if reader.kind == "projections":
        check_angles(reader.theta, reader.shape[-1], f"{reader.path}", allow_limited=options.allow_limited_angles)
    vol = 4.0 * np.prod(reader.recon_shape)
    proj = 4.0 * np.prod(reader.shape) if reader.kind == "projections" else 0.0
    # Host: reference (raw, prepared), current + next (raw, prepared, aligned), projections; XANES slabs.
    memory = 8 * vol + 2 * proj + 2 * energies.size * vol * min(16, reader.recon_shape[0]) / reader.recon_shape[0]
    # Disk: /recon and /aligned of every energy (gzip usually saves 2-3x: refused only when a third of the
    # uncompressed size does not fit) + maps + the reserve; the run checks again before every energy, at the
    # size the energies written so far took.
    folder = output.parent if str(output.parent) else Path(".")
    upper = 2 * energies.size * vol + 8 * vol + RESERVE_BYTES
    free = shutil.disk_usage(folder).free
    if upper > free:
        _log.warning("gpureg: %s: the result may not fit in %s (%s free, up to %s uncompressed); checked again "
                     "after every energy", output, folder, format_bytes(free), format_bytes(upper))
    disk = (2 * energies.size * vol) / 3 + 8 * vol + RESERVE_BYTES
    check_fits(f"{reader.path} ({energies.size} energies of {'x'.join(map(str, reader.recon_shape))} voxels)",
               memory=memory, disk=disk, folder=folder, gpu_memory=6 * vol,
               device=resolve_devices(options.device).registration if options.device.value == "gpu" else "cpu")


def _compute(reader, work, energies, ref, options, devices, matrices, checksum, overwrite, progress,
             alignments=None, provenance=None) -> int:
    """Fill ``work`` (the ``.partial`` file): every energy, then the maps; returns the energies resumed."""
    if alignments is not None and len(alignments) != len(energies):
        raise ValueError(f"alignments must have one entry per energy ({len(energies)}), got {len(alignments)}")
    store = ResultStore.open(work, reader, energies, ref, options.parameters(devices, matrices), checksum,
                             fresh=overwrite, attrs=provenance, compression=options.compression,
                             store_dtype=options.store_dtype)
    try:
        resumed = int(store.done.sum())
        if resumed:
            _log.warning("gpureg: resuming %s: %d of %d energies already done", work, resumed, len(energies))
        loader = Loader.for_run(reader, options, devices)
        if not store.done[ref]:
            try:
                vol, t_load = loader(ref)
            except BadEnergyError as exc:
                raise InputError(f"{exc} (the reference energy: choose another reference=)") from None
            _write_alignment(store, loader, ref, reader)
            store.write_energy(ref, vol, vol, np.eye(4), 0.0, 0.0, {"load": t_load})
            notify(progress, store, ref, 0.0, 0.0, t_load, {"load": t_load})
        if not options.align_projections and reader.kind == "projections" and not resumed:
            _hint_wobble(reader, ref)
        reference = prepare_reference(store.recon(ref), devices.registration, options.prep,
                                      name=f"reference energy {energies[ref]:g} eV")
        if options.scheduler:
            from .distributed import register_energies_dask

            register_energies_dask(options.scheduler, store, reader.path, reference, options, devices, progress)
        else:
            _register_all(store, loader, reference, options, devices, matrices, progress)
        for i, done in enumerate(alignments or ()):  # aligned before this run (watch)
            if done is not None:
                store.write_alignment(i, done, done.theta)
        if options.series_window and (matrices is None or options.deformable):
            smooth_series_pass(store, options, devices, reference, smooth_affine=matrices is None)
        map_run(store, reference, options, devices)  # or, when the energies cannot give maps, why not
        signals.check()
    except BaseException:
        store.abandon()
        raise
    store.finish()  # complete=True, closed and read back; a failure raises and the file is not renamed
    return resumed


def _check_disk(path, needed):
    free = shutil.disk_usage(Path(path).parent).free
    if needed > free:
        raise disk_full(Path(path).parent, needed)


@contextlib.contextmanager
def _disk_errors(output, reader):
    """A write that fails for lack of space (the report, the final copy) becomes the one-line disk-full error."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as exc:
        if not is_no_space(exc):
            raise
        work = partial_path(output)
        raise disk_full(output.parent if str(output.parent) else Path("."),
                        work.stat().st_size if work.exists() else 0) from None


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
    # With series smoothing every energy's own particle fit is kept (min_gain 1): the robust smoothing along
    # the series, not a per-energy threshold, rejects the bad ones (issue 27: 48^3, 3 seeds, map median
    # 0.122-0.150 eV with min_gain 1, 0.131-0.150 with 1.3), and particles down to 512 voxels (a sphere of
    # radius 5) take their own rigid motion: the smoothing averages the noise of a small particle's fit over the
    # window (issue 27, 48^3: a 777-voxel particle below the former 1000, seed 1, transform error 0.36 -> 0.07
    # voxel; seed 2 map median 0.175 -> 0.172 eV).
    smoothed = bool(options.series_window)
    particles = PerParticle(store, reference, dev, min_gain=1.0 if smoothed else 1.3,
                            min_voxels=512 if smoothed else 1000) if options.per_particle else None
    # Given matrices (watch: its re-referenced fits) are the affine the B-spline refines
    deform = DeformableStep(store, options, dev) if options.deformable else None
    pending = [i for i in registration_order(energies, ref) if not store.done[i]]
    timings = {}

    def written(i, seconds):  # in the writer thread, once energy i is on disk and flagged done
        t = timings.pop(i)
        notify(progress, store, i, *t["mse"], t["seconds"], {**t["stages"], "write": seconds})

    with _reading_ahead() as pool, BackgroundWriter(store, after=written) as writer:
        # the loader thread runs in the caller's gpureg.config context (contextvars are not inherited by threads)
        nxt = submit(pool, loader, pending[0]) if pending else None
        for k, i in enumerate(pending):
            signals.check()  # a signal Python swallowed (raised inside a destructor) stops the run here
            fut = nxt
            nxt = submit(pool, loader, pending[k + 1]) if k + 1 < len(pending) else None
            try:
                vol, t_load = fut.result()
            except BadEnergyError as exc:
                if not options.skip_bad_energies and nxt is not None:
                    nxt.cancel()
                handle_bad_energy(store, i, exc, options, progress)
                continue
            t0 = time.perf_counter()
            moving = prepare_volume(vol, dev, prep, name=f"energy {energies[i]:g} eV")
            if matrices is None:
                res = register_prepared(fixed, moving, init=stored_warm_start(store, i, ref, writer.pending),
                                        model=options.model.value)
            else:
                res = score_matrix(fixed, moving, matrices[i])
            if particles is not None:
                particles.register(i, fixed, moving, res)
            mse_after = res.mse_after if deform is None else deform.register(
                i, fixed, moving, res, particles=None if particles is None else particles.result).mse_after
            t1 = time.perf_counter()
            if deform is not None:
                if particles is not None:
                    particles.write_global(i, vol)
                aligned = deform.apply(vol)
            elif particles is None:
                aligned = to_host(apply_affine(vol, res.matrix, device=dev))
            else:
                aligned = particles.apply(i, vol)
            t2 = time.perf_counter()
            _write_alignment(store, loader, i, loader.reader)
            stages = {"load": t_load, "register": t1 - t0, "apply": t2 - t1}
            timings[i] = {"mse": (res.mse_before, mse_after), "seconds": t2 - t0 + t_load, "stages": stages}
            writer.submit(i, vol, aligned, res.matrix, res.mse_before, mse_after, stages)


def _hint_wobble(reader, ref):
    """Warn when the reference energy's projections wobble and ``--align-projections`` is off (cheap: centres
    of mass, no reconstruction)."""
    from ..recon.align import input_wobble

    w = input_wobble(reader, ref)
    if w["suggest"]:
        _log.warning("gpureg: the projections at %g eV wobble (centre-of-mass residuals %.2f px rows, %.2f px "
                     "columns RMS); --align-projections would remove it", w["energy"], w["row_rms"], w["column_rms"])


def _write_alignment(store, loader, i, reader):
    """Record energy ``i``'s projection alignment and pixel repairs (before its ``done`` flag is written)."""
    res = loader.alignments.pop(i, None)
    if res is not None:
        store.write_alignment(i, res, reader.theta)
    rep = loader.repairs.pop(i, None)
    if rep is not None:
        store.write_repair(i, rep.to_dict())


@contextlib.contextmanager
def _reading_ahead():
    """One worker thread that reads the next energy; on an error (a signal) the queued read is cancelled and
    not waited for."""
    pool = cf.ThreadPoolExecutor(max_workers=1)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
