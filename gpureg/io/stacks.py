"""Readers of per-energy files: a folder (or glob) of HDF5 files, or of TIFF files or sub-folders.

The energy of each file comes from its ``/exchange/energy`` or from its name
(``..._6552.5eV.tif``); files are presented in ascending energy. TIFF folders
take ``*flat*``/``*white*`` open-beam and ``*dark*`` frames, and a
``theta.txt`` (degrees) when they hold projections (see :func:`gpureg.io.open_input`).
When the names carry no energy, ``energies.txt`` lists them (eV, one per line,
in natural file-name order), and as many flat files without an energy are
matched to them in the same order (one such file: shared).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .base import InputReader, energy_from_name, source_path
from .dataexchange import DataExchangeFile
from .files import InputError

__all__ = ["TIFF_SUFFIXES", "FileStack", "TiffStack"]

TIFF_SUFFIXES = (".tif", ".tiff")


class FileStack(InputReader):
    """A folder of per-energy Data Exchange HDF5 files (one energy each)."""

    def __init__(self, label, files):
        self.path = source_path(label)
        self._files = []
        try:
            for f in files:
                self._files.append(DataExchangeFile(f, single_energy=True))
            self._validate()
        except BaseException:
            self.close()
            raise

    def _validate(self):
        first = self._files[0]
        self.kind, self.shape, self.attrs = first.kind, first.shape, first.attrs
        for r in self._files[1:]:
            if r.kind != first.kind:
                raise InputError(f"{r.path}: holds {r.kind} but {first.path} holds {first.kind}")
            if r.shape != first.shape:
                raise InputError(f"{r.path}: /exchange/{'data' if r.kind == 'projections' else 'recon'} has shape "
                                 f"{r.shape}, but {first.path} has {first.shape}")
            if first.theta is not None and (r.theta is None or r.theta.shape != first.theta.shape
                                            or not np.allclose(r.theta, first.theta, atol=1e-3)):
                raise InputError(f"{r.path}: /exchange/theta differs from the one in {first.path}")
        energies = np.array([r.energies[0] for r in self._files])
        self._files = [self._files[k] for k in np.argsort(energies, kind="stable")]
        self.energies = np.sort(energies)
        dup = np.flatnonzero(np.diff(self.energies) <= 0)
        if dup.size:
            raise InputError(f"{self._files[dup[0] + 1].path}: /exchange/energy {self.energies[dup[0]]} eV "
                             f"repeats that of {self._files[dup[0]].path}")
        self.theta = first.theta

    def projections(self, i):
        return self._files[self._index(i)].projections(0)

    def flat(self, i):
        return self._files[self._index(i)].flat(0)

    def dark(self, i=None):
        return self._files[0 if i is None else self._index(i)].dark(0)

    def recon(self, i):
        return self._files[self._index(i)].recon(0)

    def close(self):
        for r in getattr(self, "_files", []):
            r.close()


class TiffStack(InputReader):
    """Per-energy TIFF files (multi-page) or per-energy folders of single-page TIFFs."""

    def __init__(self, label, entries, folder):
        self.path = Path(label)
        self.attrs = {}
        self.layout = "TIFF series"
        theta_file = next((folder / n for n in ("theta.txt", "angles.txt") if (folder / n).is_file()), None)
        listed = energy_list(folder)
        data, flats, darks, unnamed = {}, {}, [], []
        for entry in entries:
            name = entry.name.lower()
            if entry.is_dir():
                if any(f.suffix.lower() in TIFF_SUFFIXES for f in entry.iterdir()):
                    e = energy_from_name(entry)
                    if e is not None:
                        _add_energy(data, e, entry)
                    elif listed is not None:
                        unnamed.append(entry)
                continue
            if entry.suffix.lower() not in TIFF_SUFFIXES:
                continue
            e = energy_from_name(entry)
            if "dark" in name:
                darks.append(entry)
            elif "flat" in name or "white" in name:
                flats.setdefault(e, []).append(entry)
            elif e is None:
                if listed is None:
                    raise InputError(f"{entry}: cannot read the energy from the file name (expected e.g. "
                                     f"'sample_6552.5eV.tif') and {folder / 'energies.txt'} does not exist")
                unnamed.append(entry)
            else:
                _add_energy(data, e, entry)
        if unnamed:
            if len(listed) != len(unnamed):
                raise InputError(f"{folder / 'energies.txt'}: {len(listed)} energies for {len(unnamed)} TIFF "
                                 f"files or folders without an energy in the name")
            for e, entry in zip(listed, sorted(unnamed, key=natural_key)):
                _add_energy(data, float(e), entry)
            self.guessed = (f"energies of {len(unnamed)} TIFF files from energies.txt, in natural file-name order",)
            shared = sorted(flats.get(None, []), key=natural_key)
            if len(shared) == len(listed) > 1:  # one flat file per listed energy, in the same order
                del flats[None]
                for e, entry in zip(listed, shared):
                    flats.setdefault(float(e), []).append(entry)
        if not data:
            raise InputError(f"{label}: no per-energy TIFF files (names with an energy, e.g. 'sample_6552.5eV.tif')")
        self.energies = np.array(sorted(data), dtype=np.float64)
        self._items = [data[e] for e in self.energies]
        self.kind = "projections" if theta_file is not None else "recon"
        if self.kind == "recon" and flats:
            raise InputError(f"{folder}: flat-field TIFFs found but no theta.txt (projection angles in degrees)")
        self.shape = _tiff_shape(self._items[0])
        for item in self._items[1:]:
            if _tiff_shape(item) != self.shape:
                raise InputError(f"{item}: shape {_tiff_shape(item)} differs from {self._items[0]} {self.shape}")
        self.theta = None
        self._flats, self._darks = flats, darks
        if self.kind == "projections":
            try:
                self.theta = np.loadtxt(theta_file, dtype=np.float64).reshape(-1)
            except ValueError as exc:
                raise InputError(f"{theta_file}: not a list of angles in degrees ({exc})") from None
            if self.theta.size != self.shape[0] or not np.all(np.isfinite(self.theta)):
                raise InputError(f"{theta_file}: {self.theta.size} angles but {self._items[0]} has {self.shape[0]} "
                                 f"projections")
            if not flats:
                raise InputError(f"{folder}: no flat-field TIFF (a file named '*flat*' or '*white*')")
            missing = [e for e in self.energies if e not in flats and None not in flats]
            if missing:
                raise InputError(f"{folder}: no flat-field TIFF for {missing[0]} eV (and no shared one)")

    def projections(self, i):
        if self.kind != "projections":
            return super().projections(i)
        return _read_tiff(self._items[self._index(i)], self.shape)

    def flat(self, i):
        if self.kind != "projections":
            return super().flat(i)
        e = self.energies[self._index(i)]
        files = self._flats.get(e, self._flats.get(None))
        return np.concatenate([_read_tiff(f, (None,) + self.shape[1:]) for f in files])

    def dark(self, i=None):
        if self.kind != "projections":
            return super().dark(i)
        if not self._darks:
            return np.zeros((1,) + self.shape[1:], dtype=np.float32)
        return np.concatenate([_read_tiff(f, (None,) + self.shape[1:]) for f in self._darks])

    def recon(self, i):
        if self.kind != "recon":
            return super().recon(i)
        return _read_tiff(self._items[self._index(i)], self.shape)


def energy_list(folder):
    """Energies (eV) listed one per line in ``folder/energies.txt``, or None when there is no such file."""
    f = Path(folder) / "energies.txt"
    if not f.is_file():
        return None
    try:
        e = np.loadtxt(f, dtype=np.float64, ndmin=1, comments="#")
    except ValueError as exc:
        raise InputError(f"{f}: not one energy (eV) per line ({exc})") from None
    if e.ndim != 1 or e.size < 1 or not np.all(np.isfinite(e)) or np.any(e <= 0):
        raise InputError(f"{f}: expected one positive energy in eV per line, got {e.size} values")
    if np.max(e) < 200.0:
        raise InputError(f"{f}: energies below 200 look like keV; write them in eV")
    return e


def natural_key(p):
    """Sort key that orders 'scan_2' before 'scan_10'."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(p).name)]


def _add_energy(data, e, entry):
    if e in data:
        raise InputError(f"{entry}: energy {e} eV repeats that of {data[e]}")
    data[e] = entry


def _tiff_shape(item):
    import tifffile

    try:
        if item.is_dir():
            files = sorted(f for f in item.iterdir() if f.suffix.lower() in TIFF_SUFFIXES)
            with tifffile.TiffFile(files[0]) as tf:
                page = tf.series[0].shape[-2:]
            return (len(files), *page)
        with tifffile.TiffFile(item) as tf:
            shape = tf.series[0].shape
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as exc:
        raise InputError(f"{item}: not a readable TIFF ({exc})") from None
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) != 3:
        raise InputError(f"{item}: expected 2D pages, got TIFF series shape {shape}")
    return tuple(int(n) for n in shape)


def _read_tiff(item, shape):
    import tifffile

    try:
        if item.is_dir():
            files = sorted(f for f in item.iterdir() if f.suffix.lower() in TIFF_SUFFIXES)
            a = np.stack([tifffile.imread(f) for f in files])
        else:
            a = tifffile.imread(item)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise InputError(f"{item}: not a readable TIFF ({exc})") from None
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or tuple(a.shape[1:]) != tuple(shape[1:]) or (shape[0] is not None and a.shape[0] != shape[0]):
        raise InputError(f"{item}: TIFF shape {a.shape} does not match the expected {shape}")
    return a
