"""What every input reader shares: the :class:`InputReader` interface, the energy-axis check, HDF5 helpers.

Energy axes are checked by :func:`gpureg.core.energies.check_energies`. The helpers read energies and
angles with their units (keV and radians are converted), decode attributes
(JSON values included) and take an energy from a file name
(``..._6552.5eV.tif``). Malformed inputs raise :class:`InputError` with one
line naming the file and the dataset.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import numpy as np

from ..core.energies import check_energies
from .files import InputError

__all__ = ["DEGREES", "InputReader", "RADIANS"]

RADIANS = ("rad", "radian", "radians")  # units labels of angles read as radians
DEGREES = ("deg", "degree", "degrees")  # ... and as degrees

_log = logging.getLogger("gpureg")
_MIN_TOMO_ANGLES = 10  # fewer projections than this: too few to judge the angular range
_URI_RE = re.compile(r"^(tiled\+)?https?://", re.IGNORECASE)
_ENERGY_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(k?ev)(?![a-z])", re.IGNORECASE)


class InputReader:
    """Read-only, lazy access to the energies of one input (see :func:`open_input`).

    Attributes
    ----------
    path : Path
    energies : (n_energy,) ndarray of float64
        eV, ascending.
    theta : (n_angle,) ndarray of float64 or None
        Degrees.
    kind : str
        ``"projections"`` or ``"recon"``.
    shape : tuple of 3 int
        One energy's ``(n_angle, ny, nx)`` projections or ``(nz, ny, nx)`` volume.
    attrs : dict
        Root attributes of the (first) file.
    pixel_size_nm : float or None
        Pixel (projections) or voxel (volumes) size at the sample, nm; None when the files do not say.
    layout : str
        The file layout found (e.g. ``"Data Exchange"``, ``"Zeiss/Xradia .txrm"``).
    guessed : tuple of str
        What the reader had to assume (one sentence each), for ``gpureg info``.
    """

    path: Path
    energies: np.ndarray
    theta: np.ndarray | None
    kind: str
    shape: tuple
    attrs: dict
    pixel_size_nm: float | None = None
    layout: str = ""
    guessed: tuple = ()

    @property
    def n_energy(self) -> int:
        """Number of energies."""
        return int(self.energies.size)

    @property
    def recon_shape(self) -> tuple:
        """Shape ``(nz, ny, nx)`` of one reconstructed energy (``(ny, nx, nx)`` for projections)."""
        if self.kind == "recon":
            return tuple(self.shape)
        return (self.shape[1], self.shape[2], self.shape[2])

    def projections(self, i: int) -> np.ndarray:
        """Raw counts of energy ``i``: ``(n_angle, ny, nx)`` float32."""
        raise InputError(f"{self.path}: holds reconstructed volumes, not projections")

    def flat(self, i: int) -> np.ndarray:
        """Open-beam frames for energy ``i``: ``(n_flat, ny, nx)`` float32."""
        raise InputError(f"{self.path}: holds reconstructed volumes, not projections (no flat fields)")

    def dark(self, i: int | None = None) -> np.ndarray:
        """Dark frames ``(n_dark, ny, nx)`` float32 (of energy ``i`` when stored per energy; zeros when absent)."""
        raise InputError(f"{self.path}: holds reconstructed volumes, not projections (no dark fields)")

    def recon(self, i: int) -> np.ndarray:
        """Reconstructed volume of energy ``i``: ``(nz, ny, nx)`` float32."""
        raise InputError(f"{self.path}: holds projections, not reconstructed volumes; reconstruct them first")

    def truth(self) -> dict | None:
        """The ``/truth`` group (synthetic data) as a dict of arrays, or None."""
        return None

    def close(self) -> None:
        """Release open files (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __repr__(self):
        return (f"<{type(self).__name__} {self.path} kind={self.kind} n_energy={self.n_energy} "
                f"shape={self.shape} energies={self.energies.min():.1f}..{self.energies.max():.1f} eV>")

    def _index(self, i) -> int:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"energy index must be an int, got {type(i).__name__}")
        if not 0 <= int(i) < self.n_energy:
            raise IndexError(f"{self.path}: energy index {i} out of range 0..{self.n_energy - 1}")
        return int(i)


def is_uri(path) -> bool:
    """True for a Tiled URI (``http(s)://...`` or ``tiled+http(s)://...``) rather than a file path."""
    return isinstance(path, str) and _URI_RE.match(path) is not None


def source_path(source):
    """What a reader calls its input: a Path, or (a Tiled URI or :class:`~gpureg.io.tiled.TiledFile`) as given."""
    if hasattr(source, "open_group") or is_uri(source):
        return source
    return Path(source)


def open_group(source):
    """The root group of an input file: ``h5py.File(source, "r")``, or a Tiled container's group view."""
    if hasattr(source, "open_group"):
        return source.open_group()
    import h5py

    return h5py.File(source, "r")


def dataset(group, name, where):
    obj = group[name]
    if not hasattr(obj, "shape"):
        raise InputError(f"{where}: /exchange/{name} is a group, expected a dataset")
    return obj


def check_numeric(ds, where):
    dt = ds.dtype
    if dt == np.bool_ or not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        raise InputError(f"{where}: expected integer or float values, got dtype {dt}")


def energies_ev(ds, where, name="/exchange/energy"):
    try:
        e = np.asarray(ds[()], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {name}: expected numbers, got dtype {ds.dtype}") from None
    units = _attr_text(ds.attrs.get("units", "")).lower()
    if units == "kev":
        e = e * 1000.0
    elif units not in ("", "ev"):
        raise InputError(f"{where}: {name}: units {units!r} not understood (expected 'eV' or 'keV')")
    elif units == "" and e.size and np.nanmax(np.abs(e)) < 200.0:
        _log.warning("gpureg: %s: %s has no units and values below 200; reading them as keV", where, name)
        e = e * 1000.0
    try:
        check_energies(e, name)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None
    check_energy_range(e, f"{where}: {name}", units or "no units")
    return e


ENERGY_RANGE_EV = (100.0, 100_000.0)  # soft to hard X-rays: anything outside is a unit mistake


def check_energy_range(energies, where: str, label: str = "eV") -> None:
    """Refuse energies (eV after unit conversion) outside 100 eV - 100 keV, naming ``where`` and its ``label``."""
    e = np.asarray(energies, dtype=np.float64)
    lo, hi = ENERGY_RANGE_EV
    if e.size and (e.min() < lo or e.max() > hi):
        hint = ("; these look like keV: set the units attribute to 'keV'" if e.max() < lo and e.min() > 0.1 else
                "; these look like meV or a count, not energies" if e.min() > hi else "")
        raise InputError(f"{where}: energies {e.min():g}..{e.max():g} eV (units: {label}) are outside "
                         f"{lo:g} eV - {hi / 1000:g} keV{hint}")


def check_angles(theta_deg, width: int, where: str, *, allow_limited: bool = False) -> None:
    """Refuse a projection set that cannot give a tomogram: too few angles or under 180 degrees (parallel beam).

    Too few: fewer than ``max(8, width / 4)`` angles, a sixth of the Nyquist count
    (pi / 2 x detector width) below which streaks dominate the reconstruction.
    Range: the angles and one step must cover at least 170 degrees (a missing
    wedge over 10 degrees). ``allow_limited`` turns both into a warning.
    """
    th = np.sort(np.asarray(theta_deg, dtype=np.float64).reshape(-1))
    need = max(8, int(np.ceil(width / 4)))
    steps = np.diff(th)
    cover = float(th[-1] - th[0] + (np.median(steps) if steps.size else 0.0)) if th.size else 0.0
    problems = []
    if th.size < need:
        problems.append(f"{th.size} projection angle{'s' if th.size != 1 else ''} for a {width}-pixel-wide "
                        f"detector (at least {need} needed)")
    if cover < 170.0:
        problems.append(f"the angles cover {cover:.0f} degrees (parallel beam needs 180)")
    if not problems:
        return
    text = f"{where}: {' and '.join(problems)}"
    if allow_limited:
        _log.warning("gpureg: %s; continuing (--allow-limited-angles): expect streaks and a missing wedge", text)
        return
    raise InputError(f"{text}; pass allow_limited_angles=True to reconstruct anyway")


def theta_deg(ds, where):
    try:
        th = np.asarray(ds[()], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{where}: /exchange/theta: expected numbers, got dtype {ds.dtype}") from None
    if not np.all(np.isfinite(th)):
        raise InputError(f"{where}: /exchange/theta contains NaN or inf")
    units = _attr_text(ds.attrs.get("units", "")).lower()
    span = float(np.ptp(th)) if th.size else 0.0
    if th.size >= 2 and span == 0:
        raise InputError(f"{where}: /exchange/theta: all {th.size} angles are {th[0]:g}: not a tomographic scan "
                         "(the rotation angles were not recorded?)")
    if units in RADIANS:
        if span > 2 * np.pi + 1e-3:
            raise InputError(f"{where}: /exchange/theta is labelled {units!r} but spans {span:.4g} over {th.size} "
                             f"projections (more than 2 pi): these look like degrees; set its units to 'degrees'")
        return np.rad2deg(th)
    if units != "" and units in DEGREES and th.size >= _MIN_TOMO_ANGLES and span <= 2 * np.pi + 1e-6:
        raise InputError(f"{where}: /exchange/theta is labelled {units!r} but spans only {span:.4g} over {th.size} "
                         f"projections (a tomogram needs about 180 degrees): these look like radians "
                         f"({np.rad2deg(span):.1f} degrees); set its units to 'rad'")
    if units in ("", *DEGREES):
        if units == "" and th.size > 1 and np.abs(th).max() <= 2 * np.pi + 1e-6 and np.ptp(th) >= 3.0:
            _log.warning("gpureg: %s: /exchange/theta has no units and spans %.2f; reading it as radians",
                         where, np.ptp(th))
            return np.rad2deg(th)
        return th
    raise InputError(f"{where}: /exchange/theta: units {units!r} not understood (expected 'degrees' or 'rad')")


def read_attrs(attrs):
    out = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        if isinstance(v, str) and v[:1] in "[{":
            with contextlib.suppress(ValueError):
                v = json.loads(v)
        out[k] = v
    return out


def attr_value(v):
    if isinstance(v, (dict, list, tuple)) or v is None:
        return json.dumps(v, default=json_default)
    if isinstance(v, Path):
        return str(v)
    return v


def json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    return str(o)


def energy_from_name(p):
    m = _ENERGY_RE.search(p.stem if p.is_file() else p.name)
    if m is None:
        return None
    e = float(m.group(1))
    return e * 1000.0 if m.group(2).lower() == "kev" else e


def _attr_text(v):
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray) and v.size == 1:
        return _attr_text(v.reshape(-1)[0])
    return str(v)
