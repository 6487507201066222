"""Register a series of energies to one reference: :func:`register_series` and the order it uses.

The reference is the highest energy by default; the other energies are
registered in order of distance from it (:func:`registration_order`), each
warm-started from its nearest registered neighbour (:func:`warm_start`) and
each registered **to the reference** (no chaining drift). The reference is
prepared once. The pipeline, watch mode and the Dask workers use the same
helpers.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import numpy as np

from ..core.backend import (
    resolve_device,
)
from ..core.errors import ParameterError
from .affine import RegistrationResult, register_prepared
from .prepare import PREP_KEYWORDS, Prep, foreground_fraction, prep_from, prepare_volume

__all__ = ["register_series", "SeriesResult"]

_log = logging.getLogger("gpureg")


@dataclass
class SeriesResult:
    """Registration of every energy of a series to one reference energy."""

    energies: np.ndarray
    reference_index: int
    results: list  # RegistrationResult per energy, in input order

    @property
    def matrices(self) -> np.ndarray:
        """(n_energy, 4, 4) ``moving_from_reference`` per energy."""
        return np.stack([r.matrix for r in self.results])

    @property
    def mse_before(self) -> np.ndarray:
        return np.array([r.mse_before for r in self.results])

    @property
    def mse_after(self) -> np.ndarray:
        return np.array([r.mse_after for r in self.results])


def register_series(volumes, energies, reference="highest", *, prep: Prep | None = None, device: str = "auto",
                    progress=None, **options) -> SeriesResult:
    """Register every energy of a series to the reference energy.

    Energies are taken in order of distance from the reference; each is
    registered **to the reference** (no chaining), warm-started from the result
    of the nearest energy already registered.

    Parameters
    ----------
    volumes : sequence of (Z, Y, X) arrays, or (n_energy, Z, Y, X) array
        One volume per energy (an h5py dataset works: volumes are read one at a time).
    energies : (n_energy,) array_like
        Energies in eV.
    reference : "highest", "lowest" or float
        Reference energy (a float must be one of ``energies``).
    prep : Prep, optional
        How the volumes are prepared (default ``Prep()``: binarized; see
        :func:`register_affine`). With ``binarize``, every energy whose Otsu
        foreground fraction differs from the reference's by more than 5 % is
        thresholded to keep the reference's (:class:`Prep` ``fraction``).
    device : {"auto", "cpu", "gpu"}
        Where to compute.
    progress : callable, optional
        Called as ``progress(index, result)`` after each energy.
    **options
        Passed to :func:`register_prepared` (``model``, ``min_size``,
        ``max_iter``, ``tol``, ``solver``); the old ``binarize``, ``denoise``,
        ``smooth``, ``ramp`` still build ``prep`` (:class:`DeprecationWarning`).

    Returns
    -------
    SeriesResult
    """
    energies = np.asarray(energies, dtype=np.float64)
    if energies.ndim != 1 or len(energies) != len(volumes):
        raise ValueError(f"need one energy per volume: {len(volumes)} volumes, energies of shape {energies.shape}")
    ref = reference_index(energies, reference)
    dev = resolve_device(device)
    prep = prep_from(prep, {k: options.pop(k) for k in PREP_KEYWORDS if k in options}, "register_series")
    order = registration_order(energies, ref)
    # On the GPU only the reference, the current and the next volume are on the device: the next
    # one is read and copied host->device on a side stream (core.prefetch.HostToDevicePrefetcher) while the
    # current one registers.
    fetch = None
    if dev == "gpu":
        from ..core.prefetch import HostToDevicePrefetcher

        fetch = HostToDevicePrefetcher(volumes)
        fetch.submit(ref)
    try:
        source = fetch.take(ref) if fetch else volumes[ref]
        if fetch and len(order) > 1:
            fetch.submit(order[1])
        if prep.binarize:
            prep = dataclasses.replace(prep, fraction=foreground_fraction(source, denoise=prep.denoise))
        f = prepare_volume(source, dev, prep, name=f"volume {ref} (reference)")
        del source
        results = [None] * len(energies)
        t0 = time.perf_counter()
        results[ref] = RegistrationResult(np.eye(4), 0.0, 0.0, [], 0.0, dev, True)
        done = [ref]
        for n, i in enumerate(order[1:], start=1):
            source = fetch.take(i) if fetch else volumes[i]
            if fetch and n + 1 < len(order):
                fetch.submit(order[n + 1])
            m = prepare_volume(source, dev, prep, name=f"volume {i}")
            del source
            init = warm_start(((energies[j], None if j == ref else results[j].matrix) for j in done), energies[i])
            results[i] = register_prepared(f, m, init=init, **options)
            del m
            done.append(i)
            if progress is not None:
                progress(i, results[i])
    finally:
        if fetch is not None:
            fetch.close()
    _log.info("registered %d energies in %.2f s", len(energies) - 1, time.perf_counter() - t0)
    return SeriesResult(energies=energies, reference_index=ref, results=results)


def reference_index(energies, reference="highest") -> int:
    """Index of the reference energy (``"highest"``, ``"lowest"`` or an energy in eV)."""
    energies = np.asarray(energies, dtype=np.float64)
    if energies.size == 0:
        raise ValueError("no energies given")
    if isinstance(reference, str):
        if reference == "highest":
            return int(np.argmax(energies))
        if reference == "lowest":
            return int(np.argmin(energies))
        try:
            reference = float(reference)
        except ValueError:
            raise ParameterError(f"reference must be 'highest', 'lowest' or an energy in eV, "
                                 f"got {reference!r}") from None
    k = int(np.argmin(np.abs(energies - float(reference))))
    if abs(energies[k] - float(reference)) > 1e-3:
        raise ParameterError(f"reference energy {reference} eV is not one of the energies "
                         f"({energies.min():g}..{energies.max():g} eV, {energies.size} values)")
    return k


def warm_start(done, energy):
    """Starting matrix for ``energy``: that of the nearest already-registered energy.

    ``done`` is an iterable of ``(energy, matrix)`` pairs, with ``matrix=None``
    for the reference (which means a centre-of-mass start). Ties go to the
    first pair in ``done``'s order.
    """
    return min(done, key=lambda pair: abs(pair[0] - energy))[1]


def registration_order(energies, ref: int) -> list:
    """Indices sorted by distance in energy from the reference (reference first)."""
    energies = np.asarray(energies, dtype=np.float64)
    return sorted(range(len(energies)), key=lambda i: (abs(energies[i] - energies[ref]), i))
