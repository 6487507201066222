"""Per-energy steps shared by :func:`~gpureg.pipeline.run`, :func:`~gpureg.pipeline.watch` and the Dask workers."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..core import signals
from ..core.backend import to_host
from ..core.errors import OutputError
from ..io.files import BadEnergyError, InputError, check_file_target, check_not_input
from ..io.results import is_result

__all__ = ["check_output", "energy_line", "handle_bad_energy", "Loader", "notify", "RunLog", "score_matrix", "stored_warm_start"]

_log = logging.getLogger("gpureg")


class Loader:
    """Reads/reconstructs one energy of an open input as a host float32 volume.

    Parameters
    ----------
    reader : gpureg.io.InputReader
        Open input.
    center, filter
        FBP settings (:class:`~gpureg.pipeline.options.RunOptions` ``center``/``filter``).
    device : {"cpu", "gpu"}
        FBP device: :class:`~gpureg.pipeline.options.Devices` ``fbp`` (ASTRA-CUDA), never the
        registration device.
    align : bool
        Align the projections first (:func:`gpureg.recon.align_energy`); the
        :class:`~gpureg.recon.AlignmentResult` of energy ``i`` waits in ``alignments[i]``. Every
        energy starts from its own projections' centres of mass, not from the reference energy's
        reconstruction (``align_projections(reference=...)``): measured in ``bench/align.py``, that
        start saved no time (64^3: 2 -> 3 iterations, 128^3: 5 -> 3, CPU time within 15 %) and no accuracy.
    """

    def __init__(self, reader, *, center, filter, device, align=False):
        self.reader, self.center, self.filter, self.device = reader, center, getattr(filter, "value", filter), device
        self.align, self.alignments = bool(align), {}
        self.repairs = {}  # energy index -> gpureg.recon.repair.Repair, until the run records it

    @classmethod
    def for_run(cls, reader, options, devices) -> Loader:
        return cls(reader, center=options.center, filter=options.filter, device=devices.fbp,
                   align=options.align_projections)

    def __call__(self, i):
        """``(volume, seconds)`` of energy ``i``."""
        from ..recon.fbp import reconstruct_energy

        t0 = time.perf_counter()
        if self.align:
            from ..recon.align import align_energy

            res = align_energy(self.reader, i, center=self.center, filter=self.filter, device=self.device,
                               repairs=self.repairs)
            self.alignments[i] = res
            vol = to_host(res.volume)
        else:
            vol = to_host(reconstruct_energy(self.reader, i, center=self.center, filter=self.filter,
                                             device=self.device, repairs=self.repairs))
        vol = np.ascontiguousarray(vol, dtype=np.float32)
        if not np.isfinite(vol).all():
            energy = float(self.reader.energies[i])
            raise BadEnergyError(f"{self.reader.path}: energy {energy:g} eV reconstructs to NaN/inf values; check "
                                 "data, flat and dark fields", energy=energy, reason="reconstructs to NaN/inf")
        return vol, time.perf_counter() - t0


def notify(progress, store, i, before, after, seconds, timings=None, excluded=None):
    """Call ``progress(event)`` (when given) for energy ``i`` of ``store`` (see :func:`gpureg.pipeline.run`).

    Also logs the plain per-energy line (:func:`energy_line`) at INFO level (``RESULT.log``).
    """
    event = {"index": int(i), "energy": float(store.energies[i]), "done": int(store.done.sum()),
             "total": len(store.energies), "mse_before": float(before), "mse_after": float(after),
             "seconds": float(seconds), "timings": dict(timings or {}), "excluded": excluded}
    _log.info("%s", energy_line(event))
    if progress is not None:
        progress(event)
    signals.check()  # a signal Python swallowed (raised inside a destructor) stops the run here


def handle_bad_energy(store, i, exc, options, progress):
    """A bad energy: stop (default) or leave it out (``skip_bad_energies``), recorded and warned."""
    if not options.skip_bad_energies:
        raise InputError(f"{exc}; pass skip_bad_energies=True to leave it out") from None
    _log.warning("gpureg: leaving out %g eV: %s", exc.energy, exc.reason)
    store.exclude(i, exc.reason)
    notify(progress, store, i, np.nan, np.nan, 0.0, excluded=exc.reason)


def energy_line(event) -> str:
    """One plain progress line of a per-energy event: energy, stage times, MSE ratio (or why it was left out)."""
    head = f"[{event['done']}/{event['total']}] {event['energy']:.1f} eV"
    if event.get("excluded"):
        return f"{head}: left out ({event['excluded']})"
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in event.get("timings", {}).items())
    before, after = event["mse_before"], event["mse_after"]
    if before > 0:
        ratio = f"MSE {before:.3g} -> {after:.3g} (x{before / after:.1f} lower)" if after > 0 else \
            f"MSE {before:.3g} -> {after:.3g}"
    else:
        ratio = "reference"
    stages = stages or f"{event['seconds']:.2f} s"
    return f"{head}: {stages}; {ratio}"


def score_matrix(fixed, moving, matrix):
    """A :class:`~gpureg.register.RegistrationResult` for a given matrix (MSE at identity and at ``matrix``)."""
    from ..core.metric import mse_terms
    from ..register.affine import RegistrationResult

    m = np.asarray(matrix, dtype=np.float64)
    before = mse_terms(fixed, moving, np.eye(4), hessian=False).mse
    return RegistrationResult(m, before, mse_terms(fixed, moving, m, hessian=False).mse, [], 0.0, "given", True)


def stored_warm_start(store, i, ref, pending=None):
    """Start matrix for energy ``i``: the nearest energy already registered (centre of mass for the reference).

    ``pending`` (index -> matrix) holds energies registered but still queued for writing
    (:class:`gpureg.pipeline.writer.BackgroundWriter`): they count as done, so the start is the one a
    synchronous run would take.
    """
    from ..register.series import warm_start

    pending = dict(pending or {})
    # Done energies in index order, so a resumed run picks the same neighbour as an uninterrupted one.
    done = sorted({int(j) for j in np.flatnonzero(store.done)} | set(pending) - {i})
    return warm_start(((store.energies[j], None if j == ref else pending[j] if j in pending else store.matrix(j))
                       for j in done), store.energies[i])


def check_output(output, overwrite, inputs=()):
    """Refuse an output that is a folder, is not an ``.h5`` name, is in a missing/unwritable folder, is one of
    ``inputs`` (even with overwrite), or exists (without overwrite; with it, when it is not a gpureg result)."""
    output = Path(output)
    if output.is_dir():
        check_file_target(output)  # "is an existing folder": refused even with overwrite
    if output.suffix.lower() not in (".h5", ".hdf5", ".hdf", ".nxs"):
        raise InputError(f"{output}: output must be an HDF5 file name (.h5, .hdf5)")
    check_file_target(output)
    check_not_input(output, *inputs)
    if output.exists() and not overwrite:
        raise OutputError(f"{output}: exists (a finished run); pass overwrite=True to replace it")
    if output.exists() and not is_result(output):  # a scan or other data: a mistyped name must not destroy it
        raise OutputError(f"{output}: exists and is not a gpureg result; not replaced, even with overwrite=True")


class RunLog:
    """``RESULT.log``: the ``gpureg`` log of a run (appended), with the per-energy lines whatever ``-v`` says.

    While active, the ``gpureg`` logger passes INFO records; they reach the log
    file, and the terminal only when it was already set to show them (``-v``).
    """

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self):
        logger = logging.getLogger("gpureg")
        self.handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.old_level = logger.level
        quiet = logger.getEffectiveLevel() > logging.INFO
        self.filters = []
        if quiet:  # keep INFO off the other handlers (stderr), as before
            for h in logging.getLogger().handlers + logger.handlers:
                f = _AtLeast(logging.WARNING)
                h.addFilter(f)
                self.filters.append((h, f))
            logger.setLevel(logging.INFO)
        logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger("gpureg")
        if exc[0] is not None and exc[1] is not None:  # into the log file only: the CLI prints the error once
            why = str(exc[1]).splitlines()[0] if str(exc[1]) else exc[0].__name__
            if isinstance(exc[1], KeyboardInterrupt):
                why = f"interrupted ({why})" if str(exc[1]) else "interrupted (Ctrl-C)"
            self.handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "gpureg: stopped: %s",
                                                  (why,), None))
        logger.removeHandler(self.handler)
        self.handler.close()
        for h, f in self.filters:
            h.removeFilter(f)
        logger.setLevel(self.old_level)
        return False


class _AtLeast(logging.Filter):
    def __init__(self, level):
        super().__init__()
        self.level = level

    def filter(self, record):
        return record.levelno >= self.level or not record.name.startswith("gpureg")
