"""NSLS-II FXI (18-ID) tomography files: one ``fly_scan_id_N.h5`` per energy.

Layout (as FXI's bluesky export writes it): ``/img_tomo (n_angle, ny, nx)``
counts, ``/img_bkg (n_flat, ny, nx)`` open beam, ``/img_dark (n_dark, ny, nx)``,
``/angle (n_angle,)`` degrees, ``/X_eng`` scalar keV, ``/Pixel Size`` (a string
such as ``"21.3nm"``, or a number in nm), ``/Magnification``.
"""

from __future__ import annotations

import re

import numpy as np

from .base import InputReader, open_group, source_path
from .files import InputError

__all__ = ["FXI_REQUIRED", "FxiSeries", "is_fxi"]

FXI_REQUIRED = ("img_tomo", "img_bkg", "angle", "X_eng")


def is_fxi(h5) -> bool:
    """True when an open HDF5 file has FXI's ``/img_tomo`` and ``/X_eng``."""
    return "img_tomo" in h5 and "X_eng" in h5


class FxiSeries(InputReader):
    """Per-energy FXI 18-ID files (each read lazily: one energy at a time)."""

    def __init__(self, label, files):
        self.path = source_path(label)
        self.layout = "NSLS-II FXI 18-ID"
        self.attrs = {}
        guessed = []
        items = []
        for f in files:
            try:
                with open_group(f) as h5:
                    items.append(_metadata(source_path(f), h5, guessed))
            except OSError as exc:
                raise InputError(f"{f}: cannot open as HDF5 ({exc})") from None
        items.sort(key=lambda it: it["energy"])
        self._items = items
        self.energies = np.array([it["energy"] for it in items], dtype=np.float64)
        dup = np.flatnonzero(np.diff(self.energies) <= 0)
        if dup.size:
            raise InputError(f"{items[dup[0] + 1]['path']}: /X_eng {self.energies[dup[0]]:g} eV repeats that of "
                             f"{items[dup[0]]['path']}")
        first = items[0]
        self.kind, self.shape, self.theta = "projections", first["shape"], first["angle"]
        for it in items[1:]:
            if it["shape"] != self.shape:
                raise InputError(f"{it['path']}: /img_tomo has shape {it['shape']}, but {first['path']} has "
                                 f"{self.shape}")
            spread = float(np.max(np.abs(it["angle"] - self.theta)))
            if spread > 0.5:
                raise InputError(f"{it['path']}: /angle differs from that of {first['path']} by up to "
                                 f"{spread:.3g} degrees")
            if spread > 1e-3:
                guessed.append(f"{it['path'].name}: /angle differs from the first energy's by up to {spread:.3g} "
                               "degrees; the first energy's angles are used")
        self.pixel_size_nm = first["pixel_size_nm"]
        if first["magnification"] is not None:
            self.attrs["magnification"] = first["magnification"]
        if self.pixel_size_nm is None:
            guessed.append("no /Pixel Size: pixel size unknown")
        self.guessed = tuple(dict.fromkeys(guessed))

    def _read(self, i, name):
        it = self._items[self._index(i)]
        with open_group(it["path"]) as h5:
            if name not in h5:
                return np.zeros((1,) + self.shape[1:], dtype=np.float32)
            return np.asarray(h5[name][()], dtype=np.float32)

    def projections(self, i):
        return self._read(i, "img_tomo")

    def flat(self, i):
        return self._read(i, "img_bkg")

    def dark(self, i=None):
        return self._read(0 if i is None else i, "img_dark")


def _metadata(path, h5, guessed):
    missing = [n for n in FXI_REQUIRED if n not in h5]
    if missing:
        raise InputError(f"{path}: dataset /{missing[0]} not found (expected the FXI 18-ID layout)")
    tomo = h5["img_tomo"]
    if getattr(tomo, "ndim", 0) != 3 or min(tomo.shape) < 1:
        raise InputError(f"{path}: /img_tomo: expected (n_angle, ny, nx), got shape {getattr(tomo, 'shape', None)}")
    shape = tuple(int(n) for n in tomo.shape)
    for name in ("img_bkg", "img_dark"):
        if name in h5:
            ds = h5[name]
            if ds.ndim == 2:
                ok = tuple(ds.shape) == shape[1:]
            else:
                ok = ds.ndim == 3 and tuple(ds.shape[1:]) == shape[1:] and ds.shape[0] >= 1
            if not ok:
                raise InputError(f"{path}: /{name}: expected (n, {shape[1]}, {shape[2]}) frames, got shape {ds.shape}")
        elif name == "img_dark":
            guessed.append("no /img_dark: dark counts taken as 0")
    angle = np.asarray(h5["angle"][()], dtype=np.float64).reshape(-1)
    if angle.size != shape[0] or not np.all(np.isfinite(angle)):
        raise InputError(f"{path}: /angle has {angle.size} values but /img_tomo has {shape[0]} projections")
    eng = np.asarray(h5["X_eng"][()], dtype=np.float64).reshape(-1)
    if eng.size != 1 or not np.isfinite(eng[0]) or eng[0] <= 0:
        raise InputError(f"{path}: /X_eng: expected one energy in keV, got {eng.tolist()}")
    energy = float(eng[0]) * 1000.0
    if eng[0] > 200.0:
        energy = float(eng[0])
        guessed.append("/X_eng above 200: read as eV, not keV")
    mag = float(np.asarray(h5["Magnification"][()]).reshape(-1)[0]) if "Magnification" in h5 else None
    return {"path": path, "shape": shape, "angle": angle, "energy": energy,
            "pixel_size_nm": _pixel_size(h5, path), "magnification": mag}


def _pixel_size(h5, path):
    if "Pixel Size" not in h5:
        return None
    v = h5["Pixel Size"][()]
    if isinstance(v, np.ndarray) and v.size == 1:  # a scalar served by Tiled comes as one element
        v = v.reshape(-1)[0]
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    if isinstance(v, str):
        m = re.match(r"\s*([0-9.eE+-]+)\s*(nm|um|µm)?", v)
        if m is None:
            raise InputError(f"{path}: /Pixel Size {v!r}: expected a number of nm (e.g. '21.3nm')")
        return float(m.group(1)) * (1000.0 if m.group(2) in ("um", "µm") else 1.0)
    return float(np.asarray(v).reshape(-1)[0])
