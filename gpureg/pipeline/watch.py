"""Live processing during a beamtime: energies are processed as their files appear.

The acquisition writes one file per energy into a folder. Each new file is
reconstructed and registered at once to the **first** energy that arrived
(the provisional reference), warm-started from the nearest energy already
done, and its latency (file seen -> registered) is reported. When the series
ends (``expect`` files, a ``DONE`` file in the folder, or ``idle_timeout``
seconds without a new file), every transform is re-referenced to the highest
energy by one composition, ``moving_i_from_highest = moving_i_from_first @
inv(moving_highest_from_first)`` (no re-registration), and the usual result
file and report are written by :func:`gpureg.pipeline.run`.

Per-energy results are kept in ``OUTPUT.watch/`` (atomic ``.npz`` files), so
a watcher restarted after a crash skips what it already did.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..core import signals
from ..core.errors import ParameterError
from ..io.files import InputError, atomic_path
from ..io.lock import OutputLock
from ..io.readers import open_input
from ..io.results import lock_path, watch_dir
from ..register.affine import register_prepared
from ..register.prepare import prepare_reference, prepare_volume
from ..register.series import warm_start
from .options import RunOptions, resolve_devices
from .runner import run
from .steps import Loader, check_output

__all__ = ["WatchState", "finish_watch", "is_temporary", "provisional_reference", "register_arrival", "rereference",
           "watch_folder", "watch_options"]

_log = logging.getLogger("gpureg")
_ALIGNMENT_SCALARS = ("iterations", "error_before", "error_after", "seconds", "applied", "status", "reason")
_RETRY_S = 30.0  # an unreadable file that does not change is tried again after this long


def rereference(matrices, energies, reference="highest") -> np.ndarray:
    """Re-express ``moving_i_from_provisional`` transforms relative to another energy.

    Parameters
    ----------
    matrices : (n, 4, 4) array_like
        ``moving_i_from_provisional`` for every energy (identity for the provisional one).
    energies : (n,) array_like
        Energies (eV).
    reference : "highest", "lowest" or float
        The new reference energy.

    Returns
    -------
    (n, 4, 4) ndarray
        ``moving_i_from_reference = matrices[i] @ inv(matrices[ref])``.
    """
    from ..core.transform import invert
    from ..register.series import reference_index

    m = np.asarray(matrices, dtype=np.float64)
    ref = reference_index(energies, reference)
    back = invert(m[ref])
    return np.stack([mi @ back for mi in m])


class WatchState:
    """What a watcher has done so far, persisted in ``OUTPUT.watch/``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.entries = {}  # source file name -> dict(energy, matrix, latency, npz)
        self.pixel_size_nm = None
        index = self.folder / "index.json"
        if index.exists():
            self.entries = {k: {**v, "matrix": np.asarray(v["matrix"])} for k, v in json.loads(index.read_text()).items()}
            self.pixel_size_nm = next((v["pixel_size_nm"] for v in self.entries.values() if v.get("pixel_size_nm")),
                                      None)

    @property
    def provisional(self):
        return next((k for k, v in self.entries.items() if v["provisional"]), None)

    def add(self, source, energy, recon, matrix, latency, provisional, alignment=None):
        """Record one energy; ``alignment``: its :class:`~gpureg.recon.AlignmentResult` (``--align-projections``)
        and ``theta`` as ``(result, theta_deg)``, kept for the result's ``/alignment``."""
        npz = self.folder / f"energy_{len(self.entries):04d}.npz"
        arrays = {"recon": recon}
        if alignment is not None:
            res, theta = alignment
            arrays.update(shifts=res.shifts, estimated=res.estimated, theta=np.asarray(theta, dtype=np.float64))
        with atomic_path(npz) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        self.entries[source] = {"energy": float(energy), "matrix": np.asarray(matrix), "latency": float(latency),
                                "npz": npz.name, "provisional": bool(provisional), "pixel_size_nm": self.pixel_size_nm}
        if alignment is not None:
            self.entries[source]["alignment"] = {k: getattr(res, k) for k in _ALIGNMENT_SCALARS}
        doc = {k: {**v, "matrix": v["matrix"].tolist()} for k, v in self.entries.items()}
        with atomic_path(self.folder / "index.json") as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=1))

    def recon(self, source):
        with np.load(self.folder / self.entries[source]["npz"]) as z:
            return z["recon"]

    def alignment(self, source):
        """The projection alignment recorded for ``source`` (attributes as :class:`~gpureg.recon.AlignmentResult`
        plus ``theta``), or None."""
        fields = self.entries[source].get("alignment")
        if fields is None:
            return None
        with np.load(self.folder / self.entries[source]["npz"]) as z:
            return SimpleNamespace(**fields, shifts=z["shifts"], estimated=z["estimated"], theta=z["theta"])


def watch_folder(directory, output, options: RunOptions | None = None, *, pattern: str = "*.h5",
                 expect: int | None = None, idle_timeout: float | None = None, poll: float = 0.5, settle: float = 1.0,
                 sentinel: str = "DONE", overwrite: bool = False, on_energy=None, keep_work: bool = False,
                 **settings):
    """Process per-energy files as they appear in ``directory``; finish with a full result.

    Parameters
    ----------
    directory : str or Path
        Folder the acquisition writes into (one file per energy; a file is taken
        once its size and time stamp have not changed for ``settle`` seconds and
        it opens as a complete one-energy file).
    output : str or Path
        Result HDF5 written at the end (as by ``gpureg run``).
    options : RunOptions, optional
        The same settings as :func:`gpureg.pipeline.run` (``reference`` is the
        final reference; while watching, energies register to the first one).
    pattern : str
        Glob of the energy files. Hidden and temporary names (``.*``, ``~*``,
        ``*.tmp``, ``*.part``: a writer's file before its final rename) are ignored.
    expect : int, optional
        Stop after this many energies.
    idle_timeout : float, optional
        Stop after this many seconds without a new energy.
    poll : float
        Seconds between folder scans.
    settle : float
        Seconds a file must stay unchanged before it is read.
    sentinel : str
        A file of this name in the folder ends the series once every settled file was tried.
    overwrite : bool
        Replace a finished ``output`` and forget an earlier watch's state (``OUTPUT.watch/``).
    on_energy : callable, optional
        Called as ``on_energy(event)`` after each energy with ``energy``, ``source``,
        ``latency_s`` (file seen -> registered), ``mse_before``, ``mse_after``, ``count``.
    keep_work : bool
        Keep ``OUTPUT.watch/`` (per-energy volumes) after the result is complete; removed by default.
    **settings
        Shorthand for ``RunOptions(...)`` fields when ``options`` is not given.

    Returns
    -------
    gpureg.pipeline.PipelineResult

    Notes
    -----
    A file that cannot be read or registered (a stray file, one still being
    written, another layout or detector size) is skipped with a warning naming
    it and why, and tried again when it changes (or every 30 s); so is a second
    file of an energy already done. Files still skipped at the end are listed
    in the result (``skipped_inputs`` attribute, JSON) and its report. The watch ends only on
    ``expect``, the ``sentinel`` file or ``idle_timeout`` (logged), or on
    ``KeyboardInterrupt`` (SIGINT): what was done stays in ``OUTPUT.watch/`` and
    the same command resumes it.
    """
    options = watch_options(options, settings, "watch_folder")
    directory, output = Path(directory), Path(output)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a folder")
    if expect is None and idle_timeout is None and sentinel is None:
        raise ParameterError("watch needs a way to end: expect, idle_timeout or sentinel")
    for name, value in (("poll", poll), ("settle", settle)):
        if not value >= 0:
            raise ParameterError(f"watch: {name} must be >= 0 seconds, got {value!r}")
    check_output(output, overwrite, inputs=(directory,))
    with OutputLock(output, lock_path(output)):
        if overwrite and watch_dir(output).exists():
            shutil.rmtree(watch_dir(output))
        devices = resolve_devices(options.device)
        state = WatchState(watch_dir(output))
        try:
            skipped = _watch_loop(directory, state, options, devices, pattern, expect, idle_timeout, poll, settle,
                                  sentinel, on_energy)
        except KeyboardInterrupt:
            _log.warning("gpureg: watch interrupted with %d energies done (kept in %s); run the same command again "
                         "to resume", len(state.entries), state.folder)
            raise
        result = finish_watch(directory, output, state, options, devices, overwrite, skipped=skipped)
        if not keep_work:
            shutil.rmtree(state.folder, ignore_errors=True)  # the result is complete: the work folder is not needed
        return result


def watch(*args, **kwargs):
    """Deprecated name of :func:`watch_folder` (it hid this module, ``gpureg.pipeline.watch``)."""
    warnings.warn("gpureg.pipeline.watch.watch is renamed gpureg.pipeline.watch_folder; the old name goes in the "
                  "next release", DeprecationWarning, stacklevel=2)
    return watch_folder(*args, **kwargs)


def is_temporary(name: str) -> bool:
    """Hidden or temporary file names a writer uses before its final rename (``.*``, ``~*``, ``*.tmp``, ``*.part``)."""
    low = name.lower()
    return name.startswith((".", "~")) or low.endswith((".tmp", ".part", ".partial", "~"))


def watch_options(options, settings, caller) -> RunOptions:
    """The :class:`RunOptions` of a watch: ``options``, or ``RunOptions(**settings)``; what a watch cannot do refused."""
    if options is None:
        options = RunOptions().replace(**settings)
    elif settings:
        raise TypeError(f"{caller}: give either options or keyword settings, not both ({sorted(settings)})")
    if options.scheduler or options.per_particle:
        raise ParameterError("watch registers on this machine as energies arrive: not with a scheduler or "
                             "per_particle")
    return options


def register_arrival(state, source, energy, vol, reference, options, device, seen_at, alignment=None):
    """Register one newly arrived energy to the provisional reference and record it in ``state``.

    The first energy becomes the provisional reference (identity); later ones are
    warm-started from the nearest energy done.

    Parameters
    ----------
    state : WatchState
    source : str
        Name of the energy's source (file name, or run and energy).
    energy : float
        eV.
    vol : (nz, ny, nx) ndarray
        The reconstructed volume.
    reference : PreparedReference or None
        The provisional reference (None: this energy becomes it).
    options : RunOptions
    device : str
        Registration device.
    seen_at : float
        ``time.monotonic()`` when the energy was first seen (for the latency).

    Returns
    -------
    reference, event
        The provisional reference (new or unchanged) and the ``on_energy`` event dict
        (``energy``, ``source``, ``latency_s``, ``mse_before``, ``mse_after``, ``count``).
    """
    if reference is None:
        matrix, before, after, provisional = np.eye(4), 0.0, 0.0, True
        reference = prepare_reference(vol, device, options.prep, name=f"{source} (provisional reference)")
    else:
        moving = prepare_volume(vol, device, reference.prep, name=source)
        init = warm_start(((v["energy"], None if v["provisional"] else v["matrix"])
                           for v in state.entries.values()), energy)
        res = register_prepared(reference.volume, moving, model=options.model.value, init=init)
        matrix, before, after, provisional = res.matrix, res.mse_before, res.mse_after, False
    latency = time.monotonic() - seen_at
    state.add(source, energy, vol, matrix, latency, provisional, alignment=alignment)
    return reference, {"energy": energy, "source": source, "latency_s": latency, "mse_before": before,
                       "mse_after": after, "count": len(state.entries)}


def provisional_reference(state, options, device):
    """The prepared provisional reference of a resumed watch (None before the first energy)."""
    if state.provisional is None:
        return None
    return prepare_reference(state.recon(state.provisional), device, options.prep, name="provisional reference")


def finish_watch(source, output, state, options, devices, overwrite, skipped=None):
    """Re-reference every transform to the final reference and write the result by :func:`gpureg.pipeline.run`.

    The result names ``source`` as its input, lists the energies' files (``input_files``) and the files left
    out with why (``skipped_inputs``, a dict), and keeps the voxel size of the energy files.
    """
    from ..io.dataexchange import write_dataexchange

    if len(state.entries) < 2:
        raise InputError(f"{source}: watch ended with {len(state.entries)} energies; need at least 2")
    sources = sorted(state.entries, key=lambda k: state.entries[k]["energy"])
    energies = np.array([state.entries[k]["energy"] for k in sources])
    final = rereference([state.entries[k]["matrix"] for k in sources], energies, options.reference)
    stack = state.folder / "recon.h5"  # rewritten when a resumed watch has other energies than the last one
    if not stack.exists() or not np.array_equal(_stack_energies(stack), energies):
        attrs = {"source": str(source)}
        if state.pixel_size_nm:
            attrs["voxel_size_nm"] = state.pixel_size_nm
        write_dataexchange(stack, recon=(state.recon(k) for k in sources), energy=energies, attrs=attrs)
    skipped = dict(skipped or {})
    provenance = {"input": str(source), "input_files": sources, "skipped_inputs": skipped}
    if skipped:
        _log.warning("gpureg: watch: %d file(s) left out: %s (recorded in the result)", len(skipped),
                     "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    # The stack holds the (aligned) reconstructions: nothing left to align; what alignment found is stored.
    alignments = [state.alignment(k) for k in sources]
    return run(stack, output, options.replace(align_projections=False), overwrite=overwrite, matrices=final,
               devices=devices, alignments=alignments if any(a is not None for a in alignments) else None,
               provenance=provenance)


# --- internals ---------------------------------------------------------------------------

class _Candidates:
    """Files of the folder that may be energies: settled (unchanged for ``settle`` s), not yet done, not given up."""

    def __init__(self, directory, pattern, sentinel, settle):
        self.directory, self.pattern, self.sentinel, self.settle = directory, pattern, sentinel, settle
        self.stamp = {}    # name -> ((size, mtime), first time seen with that stamp)
        self.failed = {}   # name -> ((size, mtime), time of the last try)

    def scan(self, done):
        """``(ready, waiting)``: names to try now; names not yet settled (or new)."""
        now, ready, waiting = time.monotonic(), [], []
        for path in sorted(self.directory.glob(self.pattern)):
            name = path.name
            if name in done or name == self.sentinel or is_temporary(name) or not path.is_file():
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            key = (st.st_size, st.st_mtime_ns)
            if self.stamp.get(name, (None,))[0] != key:
                self.stamp[name] = (key, now)
            if now - self.stamp[name][1] < self.settle:
                waiting.append(name)
                continue
            fail = self.failed.get(name)
            if fail is not None and fail[0] == key and now - fail[1] < _RETRY_S:
                continue  # tried and failed: again when it changes, or after a while
            ready.append(name)
        return ready, waiting

    def fail(self, name, reason):
        if name not in self.failed:
            _log.warning("gpureg: watch: skipping %s for now (%s); it is tried again when it changes", name, reason)
        self.failed[name] = (self.stamp[name][0], time.monotonic(), reason)

    def skipped(self) -> dict:
        """Files given up on at the end, with why (recorded in the result)."""
        return {name: f[2] for name, f in sorted(self.failed.items())}


def _watch_loop(directory, state, options, devices, pattern, expect, idle_timeout, poll, settle, sentinel, on_energy):
    dev = devices.registration
    reference = provisional_reference(state, options, dev)
    files = _Candidates(directory, pattern, sentinel, settle)
    energies_done = {round(v["energy"], 6): k for k, v in state.entries.items()}
    seen_at, last_new = {}, time.monotonic()
    while True:
        ready, waiting = files.scan(state.entries)
        for name in waiting + ready:
            seen_at.setdefault(name, time.monotonic())
        for name in ready:
            path = directory / name
            try:
                with open_input(path) as reader:
                    if reader.n_energy != 1:
                        raise InputError(f"holds {reader.n_energy} energies, watch expects one per file")
                    energy = float(reader.energies[0])
                    if round(energy, 6) in energies_done:
                        raise InputError(f"energy {energy:g} eV is already done from {energies_done[round(energy, 6)]}")
                    if state.pixel_size_nm is None and reader.pixel_size_nm:
                        state.pixel_size_nm = float(reader.pixel_size_nm)
                    loader = Loader.for_run(reader, options, devices)
                    vol, _ = loader(0)
                    aligned = loader.alignments.pop(0, None)
                    alignment = None if aligned is None else (aligned, reader.theta)
                if reference is not None and vol.shape != reference.volume.shape:
                    raise InputError(f"its volume is {' x '.join(map(str, vol.shape))} voxels, the first "
                                     f"energy's {' x '.join(map(str, reference.volume.shape))} (another detector "
                                     "size or binning)")
                reference, event = register_arrival(state, name, energy, vol, reference, options, dev,
                                                    seen_at[name], alignment=alignment)
            except (OSError, ValueError, KeyError) as exc:  # InputError is a ValueError
                files.fail(name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                continue
            energies_done[round(energy, 6)] = name
            files.failed.pop(name, None)
            last_new = time.monotonic()
            if on_energy is not None:
                on_energy(event)
        if expect is not None and len(state.entries) >= expect:
            _log.warning("gpureg: watch: %d energies, as expected; finishing", len(state.entries))
            return files.skipped()
        if sentinel and (directory / sentinel).exists() and not waiting and not ready:
            _log.warning("gpureg: watch: %s found; finishing with %d energies", sentinel, len(state.entries))
            return files.skipped()
        if idle_timeout is not None and time.monotonic() - last_new > idle_timeout:
            _log.warning("gpureg: watch: no new energy for %g s; finishing with %d energies", idle_timeout,
                         len(state.entries))
            return files.skipped()
        signals.check()
        time.sleep(poll)


def _stack_energies(path):
    try:
        with open_input(path) as reader:
            return np.sort(reader.energies)
    except (OSError, InputError):
        return None
