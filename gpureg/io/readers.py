""":func:`open_input`: one entry point for every input, read lazily (one energy at a time).

It opens any of

- one Data Exchange HDF5 file: ``/exchange/data (n_energy, n_angle, ny, nx)``
  raw counts, ``/exchange/data_white (n_energy, n_flat, ny, nx)`` or
  ``(n_flat, ny, nx)``, ``/exchange/data_dark (n_dark, ny, nx)`` (optional,
  zero when absent) or ``(n_energy, n_dark, ny, nx)``, ``/exchange/theta``
  (degrees; ``units="rad"`` is converted), ``/exchange/energy`` (eV;
  ``units="keV"`` is converted); or reconstructed volumes
  ``/exchange/recon (n_energy, nz, ny, nx)``; an optional ``/truth`` group;
- a folder (or glob) of per-energy HDF5 files of the same layout without the
  energy axis (``/exchange/energy`` one value);
- a folder (or glob) of per-energy TIFF files (multi-page: one page per
  projection, or per slice of a volume) or per-energy sub-folders of
  single-page TIFFs; the energy is read from the name (``..._6552.5eV.tif``);
  files named ``*flat*``/``*white*`` are open-beam frames (per energy when the
  name holds an energy, else shared), ``*dark*`` dark frames; a ``theta.txt``
  (or ``angles.txt``, degrees) marks projections, its absence volumes.

Readers present energies in ascending order whatever the file order.
Malformed inputs raise :class:`~gpureg.io.InputError` with one line naming the
file and the dataset.
"""

from __future__ import annotations

import glob as _glob
import logging
from pathlib import Path

from .base import InputReader
from .dataexchange import DataExchangeFile
from .files import HDF5_SUFFIXES, InputError
from .stacks import TIFF_SUFFIXES, FileStack, TiffStack

__all__ = ["open_input"]

_log = logging.getLogger("gpureg")


def open_input(path, *, kind: str | None = None) -> InputReader:
    """Open projections or reconstructed volumes, read-only and lazily.

    Parameters
    ----------
    path : str or Path
        A Data Exchange HDF5 file, a folder of per-energy HDF5 or TIFF files,
        or a glob pattern (``"scan/*_eV.h5"``) selecting such files.
    kind : {"projections", "recon"}, optional
        Require this kind of input (error otherwise).

    Returns
    -------
    InputReader
        A context manager with ``path``, ``energies`` ``(n_energy,)`` float64 eV
        (ascending), ``theta`` ``(n_angle,)`` degrees or None, ``kind``,
        ``n_energy``, ``shape`` (one energy's projections ``(n_angle, ny, nx)``
        or volume ``(nz, ny, nx)``), ``recon_shape`` (``(ny, nx, nx)`` for
        projections) and ``attrs``; methods ``projections(i)``, ``flat(i)``,
        ``dark(i=None)``, ``recon(i)``, ``truth()`` and ``close()``.

    Raises
    ------
    InputError
        One line naming the file and dataset that is missing or malformed.
    """
    if kind is not None and kind not in ("projections", "recon"):
        raise ValueError(f"kind must be 'projections', 'recon' or None, got {kind!r}")
    text = str(path)
    if any(ch in text for ch in "*?["):
        files = sorted(Path(f) for f in _glob.glob(text))
        if not files:
            raise InputError(f"{text}: no file matches this pattern")
        reader = _open_many(text, files, folder=files[0].parent)
    else:
        p = Path(path)
        if not p.exists():
            raise InputError(f"{p}: file or folder not found")
        if p.is_dir():
            reader = _open_many(str(p), sorted(p.iterdir()), folder=p)
        elif p.suffix.lower() in TIFF_SUFFIXES:
            raise InputError(f"{p}: a single TIFF holds one energy; give the folder of per-energy TIFF files")
        else:
            reader = DataExchangeFile(p)
    if kind is not None and reader.kind != kind:
        reader.close()
        raise InputError(f"{reader.path}: holds {reader.kind}, but {kind} were required")
    return reader


def _open_many(label, entries, folder):
    hdf = [f for f in entries if f.is_file() and f.suffix.lower() in HDF5_SUFFIXES]
    if hdf:
        if len(hdf) == 1:
            return DataExchangeFile(hdf[0])
        return FileStack(label, hdf)
    if any(f.suffix.lower() in TIFF_SUFFIXES or f.is_dir() for f in entries):
        return TiffStack(label, entries, Path(folder))
    raise InputError(f"{label}: no HDF5 ({', '.join(HDF5_SUFFIXES)}) or TIFF files found")
