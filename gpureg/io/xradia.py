"""Zeiss/Xradia TXM files (``.txrm``, ``.xrm``, ``.txm``): OLE2 compound files read with ``olefile``.

Stream names and types follow the public readers: dxchange's ``read_txrm`` /
``read_xrm`` / ``read_ole_metadata`` and CIL's ``ZEISSDataReader`` (with
txrm2tiff's ``PositionInfo`` decoding). All little-endian:

==============================  =========================================================
``ImageInfo/ImagesTaken``       uint32: images written (``NoOfImages``: images planned)
``ImageInfo/ImageWidth``        uint32: columns (``ImageHeight``: rows)
``ImageInfo/DataType``          uint32: 5 uint16, 10 float32
``ImageInfo/Angles``            float32 per image, degrees
``ImageInfo/Energy``            float32 per image, eV (all zero or empty in some files)
``ImageInfo/PixelSize``         float32, micrometres at the sample (voxel size in a .txm)
``ImageInfo/XrayMagnification`` float32
``ImageInfo/AcquisitionMode``   int32: 0 projections (CIL), otherwise image slices
``ImageData{n}/Image{m}``       image ``m`` (1-based), rows x columns, 100 images per
                                ``ImageData`` storage: ``n = ceil(m / 100)``
``ReferenceData/Image``         the open-beam (reference) image, type ``ReferenceData/DataType``
``PositionInfo/AxisNames``      NUL-separated motor names; ``AxisUnits`` likewise;
``PositionInfo/MotorPositions`` float32, every axis for image 1, then image 2, ...
==============================  =========================================================

Xradia files hold no dark frames: readers use zero dark counts and say so.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .base import energy_from_name
from .files import InputError

__all__ = ["OLE_MAGIC", "XRADIA_SUFFIXES", "XradiaFile", "image_stream", "is_ole"]

_log = logging.getLogger("gpureg")

OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
"""The first 8 bytes of every OLE2 compound file."""

XRADIA_SUFFIXES = (".txrm", ".xrm", ".txm")

_DATA_TYPES = {5: np.dtype("<u2"), 10: np.dtype("<f4")}
_REQUIRED = ("ImageInfo/ImageWidth", "ImageInfo/ImageHeight", "ImageInfo/DataType")


def is_ole(path) -> bool:
    """True when ``path`` is a file starting with the OLE2 compound-file signature."""
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == OLE_MAGIC
    except OSError:
        return False


class XradiaFile:
    """Metadata of one Xradia OLE file, and its images on demand (the file is reopened per read).

    Attributes
    ----------
    path : Path
    n_images : int
        ``ImageInfo/ImagesTaken`` (else ``NoOfImages``).
    height, width : int
    dtype : numpy.dtype
    angles : (n_images,) ndarray of float64 or None
        Degrees.
    energy : float or None
        eV (mean over the images); None when no source gives one.
    energy_source : str
        Where the energy came from (``"ImageInfo/Energy"``, ``"PositionInfo"``, ``"file name"``).
    pixel_size_nm : float or None
    magnification : float or None
    acquisition_mode : int or None
    has_reference : bool
    """

    def __init__(self, path):
        self.path = Path(path)
        if not is_ole(self.path):
            raise InputError(f"{self.path}: not an OLE compound file (Zeiss/Xradia .txrm/.xrm/.txm)")
        with self._open() as ole:
            missing = [s for s in _REQUIRED if not ole.exists(s)]
            if missing:
                raise InputError(f"{self.path}: OLE file without stream {missing[0]}: not a Zeiss/Xradia TXM file")
            self._read_metadata(ole)

    def _open(self):
        import olefile

        try:
            return olefile.OleFileIO(str(self.path))
        except (OSError, ValueError) as exc:  # olefile raises OSError subclasses for corrupt files
            raise InputError(f"{self.path}: unreadable OLE compound file ({exc})") from None

    def _read_metadata(self, ole):
        self.width = int(self._values(ole, "ImageInfo/ImageWidth", "<u4", 1)[0])
        self.height = int(self._values(ole, "ImageInfo/ImageHeight", "<u4", 1)[0])
        code = int(self._values(ole, "ImageInfo/DataType", "<u4", 1)[0])
        if code not in _DATA_TYPES:
            raise InputError(f"{self.path}: ImageInfo/DataType is {code}; expected 5 (uint16) or 10 (float32)")
        self.dtype = _DATA_TYPES[code]
        if self.width < 1 or self.height < 1:
            raise InputError(f"{self.path}: ImageInfo/ImageWidth x ImageHeight is {self.width} x {self.height}")
        planned = self._optional(ole, "ImageInfo/NoOfImages", "<u4")
        taken = self._optional(ole, "ImageInfo/ImagesTaken", "<u4")
        if taken is not None and taken.size:
            self.n_images = int(taken[0])
            if planned is not None and planned.size and int(planned[0]) > self.n_images:
                _log.warning("gpureg: %s: ImageInfo/ImagesTaken %d of NoOfImages %d (an interrupted scan)",
                             self.path, self.n_images, int(planned[0]))
        elif planned is not None and planned.size:
            self.n_images = int(planned[0])
        else:
            raise InputError(f"{self.path}: stream ImageInfo/ImagesTaken (or NoOfImages) not found")
        if self.n_images < 1:
            raise InputError(f"{self.path}: ImageInfo/ImagesTaken is {self.n_images}: no images")
        for m in (1, self.n_images):
            if not ole.exists(image_stream(m)):
                raise InputError(f"{self.path}: ImageInfo/ImagesTaken says {self.n_images} images but stream "
                                 f"{image_stream(m)} is missing")
        angles = self._optional(ole, "ImageInfo/Angles", "<f4")
        if angles is not None and angles.size < self.n_images:
            raise InputError(f"{self.path}: ImageInfo/Angles has {angles.size} values for {self.n_images} images")
        self.angles = None if angles is None else angles[: self.n_images].astype(np.float64)
        px = self._optional(ole, "ImageInfo/PixelSize", "<f4")
        self.pixel_size_nm = float(px[0]) * 1000.0 if px is not None and px.size and px[0] > 0 else None
        mag = self._optional(ole, "ImageInfo/XrayMagnification", "<f4")
        self.magnification = float(mag[0]) if mag is not None and mag.size else None
        mode = self._optional(ole, "ImageInfo/AcquisitionMode", "<i4")
        self.acquisition_mode = int(mode[0]) if mode is not None and mode.size else None
        self.has_reference = ole.exists("ReferenceData/Image")
        ref_code = self._optional(ole, "ReferenceData/DataType", "<u4")
        self._ref_dtype = _DATA_TYPES.get(int(ref_code[0]), None) if ref_code is not None and ref_code.size else None
        self.energy, self.energy_source = self._energy(ole)

    def _energy(self, ole):
        e = self._optional(ole, "ImageInfo/Energy", "<f4")
        if e is not None and e.size:
            e = e[: self.n_images].astype(np.float64)
            if np.all(np.isfinite(e)) and np.all(e > 0):
                return self._one_energy(e, "ImageInfo/Energy"), "ImageInfo/Energy"
        e = self._motor(ole, "Energy")
        if e is not None:
            return self._one_energy(e, "PositionInfo/MotorPositions"), "PositionInfo"
        e = energy_from_name(self.path)
        return (e, "file name") if e is not None else (None, "")

    def _one_energy(self, e, stream):
        if np.ptp(e) > 0.5:
            raise InputError(f"{self.path}: {stream} spans {e.min():g}..{e.max():g} eV; expected one energy per "
                             f"file (give a folder of per-energy files)")
        return float(np.mean(e))

    def _motor(self, ole, name):
        """Per-image positions of motor ``name`` (eV for 'Energy'), or None."""
        if not (ole.exists("PositionInfo/AxisNames") and ole.exists("PositionInfo/MotorPositions")):
            return None
        names = _strings(ole.openstream("PositionInfo/AxisNames").read())
        units = _strings(ole.openstream("PositionInfo/AxisUnits").read()) if ole.exists("PositionInfo/AxisUnits") \
            else []
        if name not in names:
            return None
        k, n_axes = names.index(name), len(names)
        pos = self._values(ole, "PositionInfo/MotorPositions", "<f4")
        if pos.size < n_axes:
            raise InputError(f"{self.path}: PositionInfo/MotorPositions has {pos.size} values for {n_axes} axes")
        v = pos[k::n_axes].astype(np.float64)[: self.n_images]
        if k < len(units) and units[k].strip().lower() == "kev":
            v = v * 1000.0
        return v if v.size and np.all(np.isfinite(v)) and np.all(v > 0) else None

    def _values(self, ole, name, dtype, count=None):
        if not ole.exists(name):
            raise InputError(f"{self.path}: stream {name} not found")
        raw = ole.openstream(name).read()
        dt = np.dtype(dtype)
        n = len(raw) // dt.itemsize
        if count is not None and n < count:
            raise InputError(f"{self.path}: stream {name} has {len(raw)} bytes; expected {count} x {dt.name}")
        return np.frombuffer(raw[: n * dt.itemsize], dtype=dt)

    def _optional(self, ole, name, dtype):
        return self._values(ole, name, dtype) if ole.exists(name) else None

    @property
    def shape(self) -> tuple:
        """``(n_images, height, width)``."""
        return (self.n_images, self.height, self.width)

    def images(self, index=None) -> np.ndarray:
        """Images ``index`` (0-based, default all) as ``(n, height, width)`` float32."""
        index = range(self.n_images) if index is None else index
        with self._open() as ole:
            return np.stack([self._image(ole, image_stream(m + 1), self.dtype) for m in index])

    def reference(self) -> np.ndarray:
        """``ReferenceData/Image`` as ``(1, height, width)`` float32."""
        with self._open() as ole:
            if not ole.exists("ReferenceData/Image"):
                raise InputError(f"{self.path}: stream ReferenceData/Image (the open-beam image) not found")
            return self._image(ole, "ReferenceData/Image", self._ref_dtype or self.dtype)[None]

    def _image(self, ole, name, dtype):
        if not ole.exists(name):
            raise InputError(f"{self.path}: stream {name} not found")
        raw = ole.openstream(name).read()
        need = self.height * self.width * dtype.itemsize
        if len(raw) < need:
            raise InputError(f"{self.path}: stream {name} has {len(raw)} bytes; expected {need} "
                             f"({self.height} x {self.width} x {dtype.name})")
        return np.frombuffer(raw[:need], dtype=dtype).reshape(self.height, self.width).astype(np.float32)


def image_stream(m: int) -> str:
    """Stream name of image ``m`` (1-based): ``ImageData{ceil(m/100)}/Image{m}``."""
    return f"ImageData{math.ceil(m / 100)}/Image{m}"


def _strings(raw: bytes) -> list:
    return [s.strip() for s in raw.decode("latin-1").split("\x00") if s.strip()]
