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
  (or ``angles.txt``, degrees) marks projections, its absence volumes; when
  the names carry no energy, ``energies.txt`` lists them (eV, one per line,
  in natural file-name order);
- NSLS-II FXI 18-ID per-energy files (:mod:`gpureg.io.fxi`);
- NeXus NXtomo files (:mod:`gpureg.io.nexus`);
- Zeiss/Xradia ``.txrm``/``.xrm``/``.txm`` files (:mod:`gpureg.io.xradia`).

The layout is found from the files' contents (:mod:`gpureg.io.detect`); every
reader also gives ``pixel_size_nm``, ``layout`` and ``guessed``.
Readers present energies in ascending order whatever the file order.
Malformed inputs raise :class:`~gpureg.core.errors.InputError` with one line naming the
file and the dataset.
"""

from __future__ import annotations

import logging

from .base import InputReader
from .detect import open_detected
from .files import InputError

__all__ = ["open_input"]

_log = logging.getLogger("gpureg")


def open_input(path, *, kind: str | None = None) -> InputReader:
    """Open projections or reconstructed volumes, read-only and lazily.

    Parameters
    ----------
    path : str or Path
        A file, a folder of per-energy files, or a glob pattern
        (``"scan/*_eV.h5"``) selecting such files, in any layout of
        :mod:`gpureg.io.detect` (Data Exchange, FXI, NXtomo, Zeiss/Xradia, TIFF).
    kind : {"projections", "recon"}, optional
        Require this kind of input (error otherwise).

    Returns
    -------
    InputReader
        A context manager with ``path``, ``energies`` ``(n_energy,)`` float64 eV
        (ascending), ``theta`` ``(n_angle,)`` degrees or None, ``kind``,
        ``n_energy``, ``shape`` (one energy's projections ``(n_angle, ny, nx)``
        or volume ``(nz, ny, nx)``), ``recon_shape`` (``(ny, nx, nx)`` for
        projections), ``attrs``, ``pixel_size_nm`` (nm or None), ``layout`` and
        ``guessed`` (what had to be assumed); methods ``projections(i)``, ``flat(i)``,
        ``dark(i=None)``, ``recon(i)``, ``truth()`` and ``close()``.

    Raises
    ------
    InputError
        One line naming the file and dataset that is missing or malformed.
    """
    if kind is not None and kind not in ("projections", "recon"):
        raise ValueError(f"kind must be 'projections', 'recon' or None, got {kind!r}")
    reader = open_detected(path)
    if kind is not None and reader.kind != kind:
        reader.close()
        raise InputError(f"{reader.path}: holds {reader.kind}, but {kind} were required")
    return reader

