"""Per-energy steps shared by :func:`~gpureg.pipeline.run`, :func:`~gpureg.pipeline.watch` and the Dask workers."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..core.backend import to_host
from ..io.files import InputError

__all__ = ["check_output", "Loader", "notify", "score_matrix", "stored_warm_start"]


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
    """

    def __init__(self, reader, *, center, filter, device):
        self.reader, self.center, self.filter, self.device = reader, center, getattr(filter, "value", filter), device

    @classmethod
    def for_run(cls, reader, options, devices) -> Loader:
        return cls(reader, center=options.center, filter=options.filter, device=devices.fbp)

    def __call__(self, i):
        """``(volume, seconds)`` of energy ``i``."""
        from ..recon.fbp import reconstruct_energy

        t0 = time.perf_counter()
        vol = to_host(reconstruct_energy(self.reader, i, center=self.center, filter=self.filter, device=self.device))
        vol = np.ascontiguousarray(vol, dtype=np.float32)
        if not np.isfinite(vol).all():
            raise InputError(f"{self.reader.path}: energy {i} ({self.reader.energies[i]:g} eV) reconstructs to "
                             "NaN/inf values; check data, flat and dark fields")
        return vol, time.perf_counter() - t0


def notify(progress, store, i, before, after, seconds):
    """Call ``progress(event)`` (when given) for energy ``i`` of ``store`` (see :func:`gpureg.pipeline.run`)."""
    if progress is not None:
        progress({"index": int(i), "energy": float(store.energies[i]), "done": int(store.done.sum()),
                  "total": len(store.energies), "mse_before": float(before), "mse_after": float(after),
                  "seconds": float(seconds)})


def score_matrix(fixed, moving, matrix):
    """A :class:`~gpureg.register.RegistrationResult` for a given matrix (MSE at identity and at ``matrix``)."""
    from ..core.metric import mse_terms
    from ..register.affine import RegistrationResult

    m = np.asarray(matrix, dtype=np.float64)
    before = mse_terms(fixed, moving, np.eye(4), hessian=False).mse
    return RegistrationResult(m, before, mse_terms(fixed, moving, m, hessian=False).mse, [], 0.0, "given", True)


def stored_warm_start(store, i, ref):
    """Start matrix for energy ``i``: the nearest energy already in ``store`` (centre of mass for the reference)."""
    from ..register.series import warm_start

    # Done energies in index order, so a resumed run picks the same neighbour as an uninterrupted one.
    done = [j for j in np.flatnonzero(store.done) if j != i]
    return warm_start(((store.energies[j], None if j == ref else store.matrix(j)) for j in done), store.energies[i])


def check_output(output, overwrite):
    """Refuse an output that is not an ``.h5`` name, is in a missing/unwritable folder, or exists (without overwrite)."""
    output = Path(output)
    if output.suffix.lower() not in (".h5", ".hdf5", ".hdf", ".nxs"):
        raise InputError(f"{output}: output must be an HDF5 file name (.h5, .hdf5)")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{output}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{output}: output folder {folder} is not writable")
    if output.exists() and not overwrite:
        raise InputError(f"{output}: exists (a finished run); pass --overwrite to replace it")
