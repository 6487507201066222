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
import time
from pathlib import Path

import numpy as np

from ..core.backend import to_host
from ..io.files import InputError, atomic_path
from ..io.results import watch_dir
from ..register.affine import register_prepared
from ..register.prepare import prepare_reference, prepare_volume
from ..register.series import warm_start
from .options import RunOptions, resolve_devices
from .runner import run
from .steps import Loader, check_output

__all__ = ["rereference", "watch", "WatchState"]

_log = logging.getLogger("gpureg")


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
        index = self.folder / "index.json"
        if index.exists():
            self.entries = {k: {**v, "matrix": np.asarray(v["matrix"])} for k, v in json.loads(index.read_text()).items()}

    @property
    def provisional(self):
        return next((k for k, v in self.entries.items() if v["provisional"]), None)

    def add(self, source, energy, recon, matrix, latency, provisional):
        npz = self.folder / f"energy_{len(self.entries):04d}.npz"
        with atomic_path(npz) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, recon=recon)
        self.entries[source] = {"energy": float(energy), "matrix": np.asarray(matrix), "latency": float(latency),
                                "npz": npz.name, "provisional": bool(provisional)}
        doc = {k: {**v, "matrix": v["matrix"].tolist()} for k, v in self.entries.items()}
        with atomic_path(self.folder / "index.json") as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=1))

    def recon(self, source):
        with np.load(self.folder / self.entries[source]["npz"]) as z:
            return z["recon"]


def watch(directory, output, options: RunOptions | None = None, *, pattern: str = "*.h5", expect: int | None = None,
          idle_timeout: float | None = None, poll: float = 0.5, sentinel: str = "DONE", overwrite: bool = False,
          on_energy=None, **settings):
    """Process per-energy files as they appear in ``directory``; finish with a full result.

    Parameters
    ----------
    directory : str or Path
        Folder the acquisition writes into (one file per energy; a file is taken
        once it opens as a complete Data Exchange file).
    output : str or Path
        Result HDF5 written at the end (as by ``gpureg run``).
    options : RunOptions, optional
        The same settings as :func:`gpureg.pipeline.run` (``reference`` is the
        final reference; while watching, energies register to the first one).
    pattern : str
        Glob of the energy files.
    expect : int, optional
        Stop after this many energies.
    idle_timeout : float, optional
        Stop after this many seconds without a new file.
    poll : float
        Seconds between folder scans.
    sentinel : str
        A file of this name in the folder ends the series once all files are done.
    overwrite : bool
        Replace a finished ``output``.
    on_energy : callable, optional
        Called as ``on_energy(event)`` after each energy with ``energy``, ``source``,
        ``latency_s`` (file seen -> registered), ``mse_before``, ``mse_after``, ``count``.
    **settings
        Shorthand for ``RunOptions(...)`` fields when ``options`` is not given.

    Returns
    -------
    gpureg.pipeline.PipelineResult
    """
    from ..io.dataexchange import write_dataexchange
    from ..io.readers import open_input

    if options is None:
        options = RunOptions().replace(**settings)
    elif settings:
        raise TypeError(f"watch: give either options or keyword settings, not both ({sorted(settings)})")
    if options.scheduler or options.per_particle:
        raise ValueError("watch registers on this machine as files arrive: not with a scheduler or per_particle")
    directory, output = Path(directory), Path(output)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a folder")
    if expect is None and idle_timeout is None and sentinel is None:
        raise ValueError("watch needs a way to end: expect, idle_timeout or sentinel")
    check_output(output, overwrite)
    devices = resolve_devices(options.device)
    dev = devices.registration
    state = WatchState(watch_dir(output))
    reference = None
    if state.provisional is not None:
        reference = prepare_reference(state.recon(state.provisional), dev, options.prep, name="provisional reference")
    seen_at, last_new = {}, time.monotonic()
    while True:
        fresh = [p for p in sorted(directory.glob(pattern)) if p.name not in state.entries]
        for path in fresh:
            seen_at.setdefault(path.name, time.monotonic())
            try:
                with open_input(path) as reader:
                    if reader.n_energy != 1:
                        raise InputError(f"{path}: watch expects one energy per file, found {reader.n_energy}")
                    energy = float(reader.energies[0])
                    vol, _ = Loader.for_run(reader, options, devices)(0)
            except (OSError, InputError) as exc:
                if time.monotonic() - seen_at[path.name] > max(30.0, 20 * poll):
                    raise InputError(f"{path}: still unreadable after {time.monotonic() - seen_at[path.name]:.0f} s "
                                     f"({exc})") from None
                continue  # probably still being written: try again at the next scan
            if reference is None:
                matrix, before, after, provisional = np.eye(4), 0.0, 0.0, True
                reference = prepare_reference(vol, dev, options.prep, name=f"{path.name} (provisional reference)")
            else:
                moving = prepare_volume(vol, dev, reference.prep, name=path.name)
                init = warm_start(((v["energy"], None if v["provisional"] else v["matrix"])
                                   for v in state.entries.values()), energy)
                res = register_prepared(reference.volume, moving, model=options.model.value, init=init)
                matrix, before, after, provisional = res.matrix, res.mse_before, res.mse_after, False
            latency = time.monotonic() - seen_at[path.name]
            state.add(path.name, energy, vol, matrix, latency, provisional)
            last_new = time.monotonic()
            if on_energy is not None:
                on_energy({"energy": energy, "source": path.name, "latency_s": latency, "mse_before": before,
                           "mse_after": after, "count": len(state.entries)})
        pending = [p for p in directory.glob(pattern) if p.name not in state.entries]
        if expect is not None and len(state.entries) >= expect:
            break
        if sentinel and (directory / sentinel).exists() and not pending:
            break
        if idle_timeout is not None and time.monotonic() - last_new > idle_timeout:
            break
        time.sleep(poll)
    if len(state.entries) < 2:
        raise InputError(f"{directory}: watch ended with {len(state.entries)} energy file(s); need at least 2")
    sources = sorted(state.entries, key=lambda k: state.entries[k]["energy"])
    energies = np.array([state.entries[k]["energy"] for k in sources])
    if np.any(np.diff(energies) <= 0):
        raise InputError(f"{directory}: two files have the same energy ({energies.tolist()})")
    final = rereference([state.entries[k]["matrix"] for k in sources], energies, options.reference)
    stack = state.folder / "recon.h5"
    if not stack.exists():
        write_dataexchange(stack, recon=(state.recon(k) for k in sources), energy=energies,
                           attrs={"source": str(directory)})
    return run(stack, output, options, overwrite=overwrite, matrices=final, devices=devices)
