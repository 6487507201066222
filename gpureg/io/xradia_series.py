"""A series of Zeiss/Xradia files as one lazy :class:`~gpureg.io.InputReader` (stream layout: :mod:`.xradia`).

- ``.txrm``: one tomogram (all angles of one energy) per file, its open beam in
  ``ReferenceData/Image``; a series is a folder or glob of per-energy files.
- ``.xrm``: one projection per file; files are grouped by energy (a folder of
  them, per-energy sub-folders, or a glob) and sorted by angle within an energy.
- ``.txm``: one reconstructed volume (one image per slice) per energy.

Open-beam frames: the data file's ``ReferenceData/Image``; otherwise Xradia
files named ``*ref*``, ``*flat*``, ``*white*`` or ``*bkg*`` at the same energy
(or without one: shared). No dark frames (zero dark counts).
Energy of a file: ``ImageInfo/Energy``, else the ``Energy`` motor in
``PositionInfo``, else an ``...eV`` in the file name, else in its folder's name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import InputReader, energy_from_name
from .files import InputError
from .xradia import XradiaFile

__all__ = ["XradiaSeries"]

_FLAT_WORDS = ("ref", "flat", "white", "bkg")


class XradiaSeries(InputReader):
    """Per-energy Zeiss/Xradia files (``.txrm``/``.xrm`` projections or ``.txm`` volumes)."""

    def __init__(self, label, files):
        self.path = Path(label)
        self.attrs = {}
        guessed = []
        data, flats, darks = [], {}, []
        for f in files:
            xf = XradiaFile(f)
            if xf.energy is None and energy_from_name(xf.path.parent) is not None:
                xf.energy, xf.energy_source = energy_from_name(xf.path.parent), "folder name"
            name = xf.path.stem.lower()
            if "dark" in name:
                darks.append(xf)
            elif any(w in name for w in _FLAT_WORDS):
                flats.setdefault(_key(xf.energy), []).append(xf)
            else:
                data.append(xf)
        if not data:
            raise InputError(f"{label}: Zeiss/Xradia files found, but only open-beam/dark ones (named *ref*, *flat*, "
                             f"*white*, *bkg*, *dark*)")
        if darks:
            guessed.append(f"{len(darks)} Xradia file(s) named '*dark*' ignored: Xradia images carry no dark; "
                           "dark counts taken as 0")
        for xf in data:
            if xf.energy is None:
                raise InputError(f"{xf.path}: no energy: ImageInfo/Energy is empty, PositionInfo has no 'Energy' "
                                 f"motor, and neither the file nor its folder name holds one (e.g. '_6552.5eV')")
        sources = sorted({xf.energy_source for xf in data} - {"ImageInfo/Energy"})
        if sources:
            guessed.append(f"energies read from {' and '.join(sources)} (ImageInfo/Energy empty)")
        self.kind = _kind(data, label, guessed)
        self._groups = _group(data, label)  # [(energy, [(XradiaFile, image index)])], ascending energy
        self.energies = np.array([e for e, _ in self._groups], dtype=np.float64)
        first = data[0]
        self.layout = "Zeiss/Xradia " + "/".join(sorted({xf.path.suffix.lower() or "(no suffix)" for xf in data}))
        self.pixel_size_nm = first.pixel_size_nm
        if first.magnification is not None:
            self.attrs["xray_magnification"] = first.magnification
        if self.pixel_size_nm is None:
            guessed.append("ImageInfo/PixelSize absent or 0: pixel size unknown")
        self.shape = (len(self._groups[0][1]), first.height, first.width)
        for e, items in self._groups:
            xf = items[0][0]
            if (len(items), xf.height, xf.width) != self.shape:
                raise InputError(f"{xf.path}: {len(items)} images of {xf.height} x {xf.width} at {e:g} eV, but "
                                 f"{first.path} has {self.shape[0]} of {self.shape[1]} x {self.shape[2]} "
                                 f"(ImageInfo/ImagesTaken, ImageWidth, ImageHeight)")
        self.theta = None
        self._flats = []
        if self.kind == "projections":
            self.theta = self._angles(guessed)
            self._flats = [self._flat_source(e, items, flats) for e, items in self._groups]
            guessed.append("no dark frames in Xradia files: dark counts taken as 0")
        self.guessed = tuple(guessed)

    def _angles(self, guessed):
        per = []
        for e, items in self._groups:
            if any(xf.angles is None for xf, _ in items):
                xf = next(xf for xf, _ in items if xf.angles is None)
                raise InputError(f"{xf.path}: stream ImageInfo/Angles not found (projection angles in degrees)")
            per.append(np.array([xf.angles[m] for xf, m in items]))
        spread = max(float(np.max(np.abs(a - per[0]))) for a in per)
        if spread > 0.5:
            k = int(np.argmax([np.max(np.abs(a - per[0])) for a in per]))
            raise InputError(f"{self._groups[k][1][0][0].path}: ImageInfo/Angles differ from those at "
                             f"{self.energies[0]:g} eV by up to {spread:.3g} degrees")
        if spread > 1e-3:
            guessed.append(f"angles differ between energies by up to {spread:.3g} degrees: using their mean")
        return np.mean(per, axis=0)

    def _flat_source(self, e, items, flats):
        with_ref = next((xf for xf, _ in items if xf.has_reference), None)
        if with_ref is not None:
            return ("reference", with_ref)
        files = flats.get(_key(e)) or flats.get(None)
        if not files:
            raise InputError(f"{items[0][0].path}: no open-beam image at {e:g} eV: no ReferenceData/Image stream "
                             f"and no Xradia file named '*ref*'/'*flat*'/'*white*'/'*bkg*' at this energy")
        return ("files", files)

    def projections(self, i):
        if self.kind != "projections":
            return super().projections(i)
        return self._read(self._groups[self._index(i)][1])

    def flat(self, i):
        if self.kind != "projections":
            return super().flat(i)
        how, src = self._flats[self._index(i)]
        if how == "reference":
            return src.reference()
        return np.concatenate([xf.reference() if xf.has_reference else xf.images() for xf in src])

    def dark(self, i=None):
        if self.kind != "projections":
            return super().dark(i)
        return np.zeros((1,) + self.shape[1:], dtype=np.float32)

    def recon(self, i):
        if self.kind != "recon":
            return super().recon(i)
        return self._read(self._groups[self._index(i)][1])

    @staticmethod
    def _read(items):
        out, k = [], 0
        while k < len(items):  # one open per file for its consecutive images
            xf = items[k][0]
            j = k
            while j < len(items) and items[j][0] is xf:
                j += 1
            out.append(xf.images([m for _, m in items[k:j]]))
            k = j
        return np.concatenate(out)


def _key(e):
    return None if e is None else round(float(e), 2)


def _kind(data, label, guessed):
    """'recon' for .txm volumes (AcquisitionMode != 0 or the suffix), else 'projections'."""
    kinds = set()
    for xf in data:
        if xf.acquisition_mode is not None and xf.n_images > 1:
            kinds.add("projections" if xf.acquisition_mode == 0 else "recon")
        else:
            kinds.add("recon" if xf.path.suffix.lower() == ".txm" else "projections")
            if xf.path.suffix.lower() == ".txm" and xf.acquisition_mode is None:
                guessed.append("no ImageInfo/AcquisitionMode: .txm read as reconstructed slices (by its suffix)")
    if len(kinds) > 1:
        raise InputError(f"{label}: mixes Xradia projections (.txrm/.xrm) and reconstructions (.txm)")
    return kinds.pop()


def _group(data, label):
    singles = [xf for xf in data if xf.n_images == 1]
    if singles and len(singles) != len(data):
        raise InputError(f"{label}: mixes one-image (.xrm) and multi-image (.txrm/.txm) Xradia files")
    groups = {}
    if singles:  # .xrm: one projection per file, grouped by energy, sorted by angle
        for xf in singles:
            groups.setdefault(_key(xf.energy), []).append(xf)
        out = []
        for key in sorted(groups):
            files = groups[key]
            angle = [np.inf if xf.angles is None else xf.angles[0] for xf in files]
            files = [files[k] for k in np.argsort(angle, kind="stable")]
            out.append((float(np.mean([xf.energy for xf in files])), [(xf, 0) for xf in files]))
        return out
    for xf in data:  # .txrm/.txm: one energy per file
        key = _key(xf.energy)
        if key in groups:
            raise InputError(f"{xf.path}: energy {xf.energy:g} eV repeats that of {groups[key].path}")
        groups[key] = xf
    return [(groups[k].energy, [(groups[k], m) for m in range(groups[k].n_images)]) for k in sorted(groups)]
