"""Energies on a Dask distributed cluster (one worker per GPU with dask-cuda).

Given the reference, energies are independent: each worker opens the input
itself, reconstructs one energy, registers it to the (scattered) reference and
resamples it; the client writes results into the resumable result file as
they complete. Workers start from the centre-of-mass initialisation (no warm
start from a neighbour, which would serialise the energies).
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["register_energies_dask"]

def register_energies_dask(scheduler: str, store, loader, ref: int, params: dict, progress=None) -> None:
    """Register every pending energy of ``store`` on the cluster at ``scheduler``.

    Parameters
    ----------
    scheduler : str
        Address of a running ``dask.distributed`` scheduler (``tcp://host:8786``).
    store : gpureg.pipeline._ResultStore
        Open result file; its ``done`` flags say what is pending.
    loader : gpureg.pipeline._Loader
        Gives the input path and reconstruction options.
    ref : int
        Reference energy index.
    params : dict
        Pipeline parameters (device, binarize, denoise, model).
    progress : callable, optional
        As in :func:`gpureg.pipeline.run`.
    """
    try:
        from dask.distributed import Client, as_completed
    except ImportError as exc:
        raise RuntimeError("--scheduler needs Dask: pip install 'gpureg[dask]'") from exc
    from ..core.backend import to_host
    from ..register.prepare import prepare_volume
    from .runner import _notify, reference_prep

    if not store.done[ref]:
        vol, t_load = loader(ref)
        store.write_energy(ref, vol, vol, np.eye(4), 0.0, 0.0, {"load": t_load})
    try:
        client = Client(scheduler, timeout="20s")
    except OSError as exc:
        raise RuntimeError(f"cannot reach the Dask scheduler at {scheduler!r} ({exc})") from None
    try:
        # The reference is prepared once here (binarized, smoothed) and shipped to every worker.
        prep = reference_prep(store.recon(ref), params)
        fixed = client.scatter(to_host(prepare_volume(store.recon(ref), params["device"], name="reference", **prep)),
                               broadcast=True)
        opts = {"center": loader.center, "filter": loader.filter, "device": params["device"], "prep": prep,
                "model": params["model"]}
        pending = [i for i in range(len(store.energies)) if not store.done[i]]
        futures = [client.submit(_register_one, str(loader.reader.path), i, fixed, opts, pure=False) for i in pending]
        for fut in as_completed(futures):
            i, vol, aligned, res, timings = fut.result()
            store.write_energy(i, vol, aligned, res.matrix, res.mse_before, res.mse_after, timings)
            _notify(progress, store, i, res.mse_before, res.mse_after, sum(timings.values()))
    finally:
        client.close()


def _register_one(path, i, fixed_prepared, opts):
    """Worker task: reconstruct energy ``i`` of ``path``, register it to the reference, resample it."""
    from ..core.backend import to_device, to_host
    from ..core.transform import apply_affine
    from ..io.readers import open_input
    from ..register.affine import register_prepared
    from ..register.prepare import prepare_volume
    from .runner import _Loader

    with open_input(path) as reader:
        vol, t_load = _Loader(reader, center=opts["center"], filter=opts["filter"], device=opts["device"])(i)
    t0 = time.perf_counter()
    fixed = to_device(fixed_prepared, opts["device"])
    moving = prepare_volume(vol, opts["device"], name=f"energy index {i}", **opts["prep"])
    res = register_prepared(fixed, moving, model=opts["model"])
    t1 = time.perf_counter()
    aligned = to_host(apply_affine(vol, res.matrix, device=opts["device"]))
    return i, vol, aligned, res, {"load": t_load, "register": t1 - t0, "apply": time.perf_counter() - t1}
