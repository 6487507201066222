"""NeXus NXtomo files (ESRF, Diamond, ...): frames tagged by ``image_key``.

Per the NXtomo application definition, each ``NXentry`` (``definition =
"NXtomo"``) holds ``instrument/detector/data (n_frame, ny, nx)``,
``instrument/detector/image_key (n_frame,)`` (0 projection, 1 flat, 2 dark,
3 invalid) and ``sample/rotation_angle (n_frame,)`` (``units`` degrees or rad);
the ``data`` NXdata group may link them instead. Energy, per frame or one value
per entry: ``beam/incident_energy`` (NXbeam; nxtomomill's place) or
``instrument/monochromator/energy``, ``units`` keV or eV. Pixel size:
``sample/x_pixel_size`` (at the sample), else ``instrument/detector/x_pixel_size``.

A multi-energy scan is one entry with per-frame energies, or one entry per
energy (in one file or several).
"""

from __future__ import annotations

import numpy as np

from .base import DEGREES, RADIANS, InputReader, open_group, source_path
from .files import InputError

__all__ = ["NexusTomo", "nxtomo_entries"]

_DATA = ("instrument/detector/data", "data/data")
_KEY = ("instrument/detector/image_key", "data/image_key")
_ANGLE = ("sample/rotation_angle", "data/rotation_angle")
_ENERGY = ("beam/incident_energy", "instrument/monochromator/energy")
_PIXEL = ("sample/x_pixel_size", "instrument/detector/x_pixel_size")
_LENGTH_NM = {"m": 1e9, "mm": 1e6, "um": 1e3, "micron": 1e3, "µm": 1e3, "nm": 1.0}


def nxtomo_entries(h5) -> list:
    """Names of the root groups of an open HDF5 file that are NXtomo entries (with frames and image_key)."""
    out = []
    for name, obj in h5.items():
        if not hasattr(obj, "keys") or _text(obj.attrs.get("NX_class", "")) != "NXentry":
            continue
        if _first(obj, _KEY) is not None and _first(obj, _DATA) is not None:
            out.append(name)
    return out


class NexusTomo(InputReader):
    """NXtomo entries of one or more files, grouped by energy."""

    def __init__(self, label, files):
        self.path = source_path(label)
        self.layout = "NeXus NXtomo"
        self.kind = "projections"
        self.attrs = {}
        guessed = []
        groups = {}  # energy key -> dict(file, data, proj, flat, dark, angle, where)
        for f in files:
            try:
                h5 = open_group(f)
            except OSError as exc:
                raise InputError(f"{f}: cannot open as HDF5 ({exc})") from None
            with h5:
                names = nxtomo_entries(h5)
                if not names:
                    raise InputError(f"{f}: no NXentry with instrument/detector/data and image_key (NXtomo)")
                for name in names:
                    for key, g in _entry_groups(source_path(f), h5[name], name, guessed).items():
                        if key in groups:
                            raise InputError(f"{g['where']}: energy {key:g} eV repeats that of {groups[key]['where']}")
                        groups[key] = g
                if self.pixel_size_nm is None:
                    self.pixel_size_nm = _pixel_size(h5[names[0]], f"{f}:/{names[0]}", guessed)
        self._groups = [groups[k] for k in sorted(groups)]
        self.energies = np.array([g["energy"] for g in self._groups], dtype=np.float64)
        first = self._groups[0]
        self.shape = (len(first["proj"]), *first["frame"])
        self.theta = first["angle"]
        for g in self._groups[1:]:
            if (len(g["proj"]), *g["frame"]) != self.shape:
                raise InputError(f"{g['where']}: {len(g['proj'])} projections of {g['frame']} at {g['energy']:g} eV, "
                                 f"but {self.shape[0]} of {self.shape[1:]} at {first['energy']:g} eV (image_key 0)")
            spread = float(np.max(np.abs(g["angle"] - self.theta)))
            if spread > 0.5:
                raise InputError(f"{g['where']}: rotation_angle at {g['energy']:g} eV differs from that at "
                                 f"{first['energy']:g} eV by up to {spread:.3g} degrees")
        if self.pixel_size_nm is None:
            guessed.append("no sample/x_pixel_size or instrument/detector/x_pixel_size: pixel size unknown")
        self.guessed = tuple(dict.fromkeys(guessed))

    def _read(self, i, what):
        g = self._groups[self._index(i)]
        idx = g[what]
        if not len(idx):
            return np.zeros((1,) + self.shape[1:], dtype=np.float32)
        with open_group(g["file"]) as h5:
            return np.asarray(h5[g["data"]][idx], dtype=np.float32)

    def projections(self, i):
        return self._read(i, "proj")

    def flat(self, i):
        return self._read(i, "flat")

    def dark(self, i=None):
        return self._read(0 if i is None else i, "dark")


def _entry_groups(path, entry, name, guessed):
    where = f"{path}:/{name}"
    data_name = _first(entry, _DATA)
    data = entry[data_name]
    if data.ndim != 3 or min(data.shape) < 1:
        raise InputError(f"{where}/{data_name}: expected (n_frame, ny, nx) frames, got shape {data.shape}")
    n = data.shape[0]
    key = np.asarray(entry[_first(entry, _KEY)][()]).reshape(-1).astype(np.int64)
    if key.size != n:
        raise InputError(f"{where}/{_first(entry, _KEY)}: {key.size} values for {n} frames in {data_name}")
    angle_name = _first(entry, _ANGLE)
    if angle_name is None:
        raise InputError(f"{where}: sample/rotation_angle not found (NXtomo)")
    angle = _angles(entry[angle_name], f"{where}/{angle_name}", n)
    energy = _energies(entry, where, n, guessed)
    darks = np.flatnonzero(key == 2)
    out = {}
    ekey = np.round(energy, 2)
    for e in np.unique(ekey[key == 0]):
        proj = np.flatnonzero((key == 0) & (ekey == e))
        flat = np.flatnonzero((key == 1) & (ekey == e))
        if not flat.size:
            raise InputError(f"{where}: no flat frame (image_key 1) at {e:g} eV")
        dark = np.flatnonzero((key == 2) & (ekey == e))
        out[float(e)] = {"file": path, "data": f"{name}/{data_name}", "where": where, "energy": float(e),
                         "proj": proj, "flat": flat, "dark": dark if dark.size else darks,
                         "angle": angle[proj], "frame": tuple(int(s) for s in data.shape[1:])}
    if not out:
        raise InputError(f"{where}/{_first(entry, _KEY)}: no projection frame (image_key 0)")
    if not darks.size:
        guessed.append("no dark frame (image_key 2): dark counts taken as 0")
    return out


def _angles(ds, where, n):
    a = np.asarray(ds[()], dtype=np.float64).reshape(-1)
    if a.size != n or not np.all(np.isfinite(a)):
        raise InputError(f"{where}: {a.size} finite values expected {n} (one per frame)")
    units = _text(ds.attrs.get("units", "degree")).lower()
    if units in RADIANS:
        return np.rad2deg(a)
    if units not in ("", *DEGREES):
        raise InputError(f"{where}: units {units!r} not understood (expected 'degree' or 'rad')")
    return a


def _energies(entry, where, n, guessed):
    name = _first(entry, _ENERGY)
    if name is None:
        raise InputError(f"{where}: no energy: neither beam/incident_energy nor instrument/monochromator/energy")
    ds = entry[name]
    e = np.asarray(ds[()], dtype=np.float64).reshape(-1)
    if e.size == 1:
        e = np.repeat(e, n)
    if e.size != n or not np.all(np.isfinite(e)) or np.any(e <= 0):
        raise InputError(f"{where}/{name}: expected one positive energy or one per frame ({n}), got {e.size} values")
    units = _text(ds.attrs.get("units", "")).lower()
    if units == "kev":
        return e * 1000.0
    if units == "ev":
        return e
    if units:
        raise InputError(f"{where}/{name}: units {units!r} not understood (expected 'keV' or 'eV')")
    if np.max(e) < 200.0:
        guessed.append(f"{name} has no units and values below 200: read as keV")
        return e * 1000.0
    guessed.append(f"{name} has no units: read as eV")
    return e


def _pixel_size(entry, where, guessed):
    name = _first(entry, _PIXEL)
    if name is None:
        return None
    v = float(np.asarray(entry[name][()], dtype=np.float64).reshape(-1)[0])
    units = _text(entry[name].attrs.get("units", "m")).lower()
    if units not in _LENGTH_NM:
        raise InputError(f"{where}/{name}: units {units!r} not understood (expected m, mm, um or nm)")
    if name.startswith("instrument"):
        guessed.append("pixel size is the detector's (instrument/detector/x_pixel_size), not at the sample")
    return v * _LENGTH_NM[units] if v > 0 else None


def _first(group, names):
    return next((n for n in names if n in group), None)


def _text(v):
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray) and v.size == 1:
        return _text(v.reshape(-1)[0])
    return str(v)
