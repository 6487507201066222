"""The energy axis: :func:`check_energies`, the one rule set of the readers, the writer and the XANES analysis."""

from __future__ import annotations

import numpy as np

from .backend import to_host
from .errors import InputError

__all__ = ["check_energies"]


def check_energies(energies, name="energies", *, increasing=False, min_count=1) -> np.ndarray:
    """Check an energy axis: the one rule set of the readers, the writer and the XANES analysis.

    Rules: a 1D array of at least ``min_count`` finite numbers, no energy
    repeated; in ascending order when ``increasing`` (an array of spectra
    follows the axis: the XANES analysis), else in any order (a scan may be
    stored in acquisition order; the readers and
    :func:`gpureg.xanes.edge_energy_map` sort it).

    Parameters
    ----------
    energies : (n_energy,) array_like
        eV (NumPy or CuPy).
    name : str
        What the messages call the axis (a dataset or argument name).
    increasing : bool
        Require strictly increasing energies.
    min_count : int
        Fewest energies accepted.

    Returns
    -------
    (n_energy,) ndarray of float64
        The energies, on the host, in the given order.

    Raises
    ------
    InputError
        (a ``ValueError``) One line naming ``name`` and what is wrong.
    """
    e = np.asarray(to_host(energies), dtype=np.float64)
    if e.ndim != 1:
        raise InputError(f"{name} must be a 1D array of eV, got shape {e.shape}")
    if e.size == 0:
        raise InputError(f"{name}: no energies")
    if e.size < min_count:
        raise InputError(f"{name}: need at least {min_count} energies, got {e.size}")
    if not np.all(np.isfinite(e)):
        raise InputError(f"{name}: contains NaN or inf")
    srt = np.sort(e)
    if np.any(np.diff(srt) == 0):
        raise InputError(f"{name}: repeated energies {np.unique(srt[1:][np.diff(srt) == 0]).tolist()} eV")
    if increasing and not np.all(np.diff(e) > 0):
        k = int(np.flatnonzero(np.diff(e) <= 0)[0])
        raise InputError(f"{name} must be strictly increasing (sort the spectra with them); entry {k + 1} "
                         f"({e[k + 1]:g} eV) follows {e[k]:g} eV")
    return e
