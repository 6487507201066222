"""Energies on a Dask distributed cluster (one worker per GPU with dask-cuda).

Given the reference, energies are independent: each worker opens the input
itself, reconstructs one energy, registers it to the (scattered) reference and
resamples it; the client writes results into the resumable result file as
they complete. Workers start from the centre-of-mass initialisation (no warm
start from a neighbour, which would serialise the energies). With
``deformable`` each worker also refines its affine with the B-spline and
resamples through it; the client checks folding and stores the coefficients
(the series smoothing then runs on the client as in a local run).
"""

from __future__ import annotations

import time

import numpy as np

from ..core.config import config
from ..core.errors import DependencyError
from ..io.files import BadEnergyError
from .steps import Loader, handle_bad_energy, notify

__all__ = ["register_energies_dask", "register_one"]


def register_energies_dask(scheduler: str, store, input_path, reference, options, devices, progress=None) -> None:
    """Register every pending energy of ``store`` on the cluster at ``scheduler``.

    Parameters
    ----------
    scheduler : str
        Address of a running ``dask.distributed`` scheduler (``tcp://host:8786``).
    store : gpureg.io.results.ResultStore
        Open result file (the reference energy already written); its ``done`` flags say what is pending.
    input_path : str or Path
        The input; each worker opens it itself.
    reference : gpureg.register.prepare.PreparedReference
        The reference prepared once by the client; its volume (host copy) and
        ``prep`` are shipped to every worker.
    options : RunOptions
        The run's settings (pickled to the workers unchanged).
    devices : Devices
        Resolved by the client (workers are expected to have the same hardware).
    progress : callable, optional
        As in :func:`gpureg.pipeline.run`.
    """
    try:
        from dask.distributed import Client, as_completed
    except ImportError as exc:
        raise DependencyError("scheduler= needs Dask: pip install 'gpureg[dask]'") from exc
    from ..core.backend import to_host

    try:
        client = Client(scheduler, timeout="20s")
    except OSError as exc:
        raise DependencyError(f"cannot reach the Dask scheduler at {scheduler!r} ({exc})") from None
    try:
        fixed = client.scatter(to_host(reference.volume), broadcast=True)
        pending = [i for i in range(len(store.energies)) if not store.done[i]]
        settings = config.get()  # the workers run under the client's gpureg.config
        futures = [client.submit(register_one, str(input_path), i, fixed, reference.prep, options, devices, settings,
                                 pure=False) for i in pending]
        for fut in as_completed(futures):
            try:
                i, vol, aligned, res, timings = fut.result()
            except BadEnergyError as exc:
                handle_bad_energy(store, int(np.argmin(np.abs(store.energies - exc.energy))), exc, options, progress)
                continue
            if options.deformable:  # a DeformableResult without its dense field
                from .deform import check_folding

                check_folding(store, i, res.min_jacobian, options)
                store.write_bspline(i, res.coefficients, res.spacing, res.min_jacobian, res.mse_affine)
            store.write_energy(i, vol, aligned, res.matrix, res.mse_before, res.mse_after, timings)
            notify(progress, store, i, res.mse_before, res.mse_after, sum(timings.values()), timings)
    finally:
        client.close()


def register_one(path, i, fixed_prepared, prep, options, devices, settings=None):
    """Worker task: reconstruct energy ``i`` of ``path``, register it to the prepared reference, resample it.

    ``settings`` (:class:`gpureg.core.config.Settings`, the client's) is the
    ``gpureg.config`` the task runs under (default: the worker's own).
    Returns ``(i, volume, aligned, result, timings)`` (host arrays); ``result`` is a RegistrationResult, or with
    ``options.deformable`` a :class:`~gpureg.register.DeformableResult` whose dense ``displacement`` is dropped
    (None: the client stores the coefficients).
    """
    with config(settings):
        return _register_one(path, i, fixed_prepared, prep, options, devices)


def _register_one(path, i, fixed_prepared, prep, options, devices):
    from ..core.backend import to_device, to_host
    from ..core.transform import apply_affine
    from ..io.readers import open_input
    from ..register.affine import register_prepared
    from ..register.prepare import prepare_volume

    with open_input(path) as reader:
        vol, t_load = Loader.for_run(reader, options, devices)(i)
    t0 = time.perf_counter()
    fixed = to_device(fixed_prepared, devices.registration)
    moving = prepare_volume(vol, devices.registration, prep, name=f"energy index {i}")
    res = register_prepared(fixed, moving, model=options.model.value)
    if options.deformable:
        from .deform import register_bspline

        res = register_bspline(fixed, moving, res.matrix, options)
    t1 = time.perf_counter()
    if options.deformable:
        from ..register.deformable import apply_deformation

        aligned = to_host(apply_deformation(vol, res, device=devices.registration))
        res.displacement = None
    else:
        aligned = to_host(apply_affine(vol, res.matrix, device=devices.registration))
    return i, vol, aligned, res, {"load": t_load, "register": t1 - t0, "apply": time.perf_counter() - t1}
