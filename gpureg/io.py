"""File input/output: volumes (.npy, HDF5), atomic writes, Data Exchange layout.

Inputs (read-only, lazy: one energy at a time)
----------------------------------------------
:func:`open_input` opens any of

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
Malformed inputs raise :class:`InputError` with one line naming the file and
the dataset.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob as _glob
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "InputError",
    "InputReader",
    "atomic_path",
    "load_volume",
    "open_input",
    "save_matrix",
    "save_volume",
    "write_dataexchange",
]

_log = logging.getLogger("gpureg")

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".cxi")
TIFF_SUFFIXES = (".tif", ".tiff")


class InputError(ValueError):
    """A file, dataset or option is not what was expected (message names it)."""


def load_volume(path, dataset: str | None = None) -> np.ndarray:
    """Read one 3D volume from ``.npy`` or HDF5 (read-only).

    Parameters
    ----------
    path : str or Path
        ``.npy`` file, or HDF5 file (``.h5``, ``.hdf5``, ``.hdf``, ``.nxs``).
    dataset : str, optional
        HDF5 dataset path; default: the only 3D dataset in the file, or
        ``/exchange/recon`` / ``/aligned`` when present.

    Returns
    -------
    (Z, Y, X) ndarray
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.suffix.lower() == ".npy":
        try:
            vol = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise InputError(f"{path}: not a valid .npy file ({exc})") from None
        return _check_3d(np.asarray(vol), f"{path}")
    import h5py

    if not h5py.is_hdf5(path):
        raise InputError(f"{path}: not an HDF5 or .npy file")
    with h5py.File(path, "r") as h5:
        name = dataset or _default_dataset(h5, path)
        if name not in h5:
            raise InputError(f"{path}: dataset {name!r} not found")
        return _check_3d(np.asarray(h5[name]), f"{path}:{name}")


def save_volume(path, volume, *, dataset: str = "volume", attrs: dict | None = None) -> Path:
    """Write a volume atomically to ``.npy`` or HDF5 (by suffix)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".npy":
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(volume))
        else:
            import h5py

            with h5py.File(tmp, "w") as h5:
                ds = h5.create_dataset(dataset, data=np.asarray(volume))
                for k, v in (attrs or {}).items():
                    ds.attrs[k] = v
    return path


def save_matrix(path, matrix, *, attrs: dict | None = None) -> Path:
    """Write a 4x4 matrix atomically as JSON (``.json``) or HDF5 (dataset ``matrix``)."""
    path = Path(path)
    matrix = np.asarray(matrix, dtype=np.float64)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".json":
            doc = {"matrix": matrix.tolist(), "convention": "moving_from_reference, voxel indices (z, y, x)"}
            doc.update(attrs or {})
            Path(tmp).write_text(json.dumps(doc, indent=2))
        else:
            import h5py

            with h5py.File(tmp, "w") as h5:
                ds = h5.create_dataset("matrix", data=matrix)
                ds.attrs["convention"] = "moving_from_reference, voxel indices (z, y, x)"
                for k, v in (attrs or {}).items():
                    ds.attrs[k] = v
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The folder must exist and be writable (clear error otherwise). On any
    exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: output folder {folder} is not writable")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def open_input(path, *, kind: str | None = None) -> "InputReader":
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
            reader = _DataExchangeFile(p)
    if kind is not None and reader.kind != kind:
        reader.close()
        raise InputError(f"{reader.path}: holds {reader.kind}, but {kind} were required")
    return reader


def write_dataexchange(path, *, data=None, data_white=None, data_dark=None, theta=None, energy, truth=None,
                       attrs=None, recon=None) -> Path:
    """Write a Data Exchange HDF5 file atomically (temporary file, then rename).

    Parameters
    ----------
    path : str or Path
        Output file; its folder must exist and be writable. An existing file
        is replaced only when the write completes.
    data : (n_energy, n_angle, ny, nx) array_like, or iterable of (n_angle, ny, nx)
        Raw projection counts (dtype kept; float64 stored as float32). An
        iterable (e.g. a generator) is written one energy at a time.
    data_white : (n_energy, n_flat, ny, nx) or (n_flat, ny, nx) array_like
        Open-beam frames (required with ``data``).
    data_dark : (n_dark, ny, nx) or (n_energy, n_dark, ny, nx) array_like, optional
        Dark frames.
    theta : (n_angle,) array_like
        Angles in degrees (required with ``data``; optional with ``recon``).
    energy : (n_energy,) array_like
        Energies in eV, strictly monotonic.
    truth : dict, optional
        Written to ``/truth``: arrays as datasets, strings as attributes,
        nested dicts as groups.
    attrs : dict, optional
        Root attributes (provenance); dicts and lists are stored as JSON.
    recon : (n_energy, nz, ny, nx) array_like, or iterable of (nz, ny, nx)
        Reconstructed volumes instead of ``data`` (stored as float32).

    Returns
    -------
    Path
        ``path``.
    """
    import h5py

    path = Path(path)
    if (data is None) == (recon is None):
        raise ValueError("give exactly one of data (projections) or recon (volumes)")
    e = np.asarray(energy, dtype=np.float64).reshape(-1)
    _check_energies(e, "energy")
    n_e = e.size
    if data is not None:
        if data_white is None or theta is None:
            raise ValueError("data_white and theta are required with data")
    th = None if theta is None else np.asarray(theta, dtype=np.float64).reshape(-1)
    if th is not None and not np.all(np.isfinite(th)):
        raise ValueError("theta contains NaN or inf")
    from . import __version__

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["creator"] = "gpureg"
            h5.attrs["gpureg_version"] = __version__
            h5.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            for k, v in (attrs or {}).items():
                h5.attrs[k] = _attr_value(v)
            h5.create_dataset("implements", data="exchange")
            ex = h5.create_group("exchange")
            name = "data" if data is not None else "recon"
            frame = _write_stack(ex, name, data if data is not None else recon, n_e,
                                 dtype=None if data is not None else np.float32)
            if data is not None:
                if th.size != frame[0]:
                    raise ValueError(f"theta has {th.size} angles but data has {frame[0]} projections per energy")
                white = _check_frames(np.asarray(data_white), "data_white", n_e, frame[1:])
                ex.create_dataset("data_white", data=white, chunks=(1,) * (white.ndim - 2) + white.shape[-2:])
                if data_dark is not None:
                    dark = _check_frames(np.asarray(data_dark), "data_dark", n_e, frame[1:])
                    ex.create_dataset("data_dark", data=dark, chunks=(1,) * (dark.ndim - 2) + dark.shape[-2:])
            if th is not None:
                ds = ex.create_dataset("theta", data=th)
                ds.attrs["units"] = "degrees"
            ds = ex.create_dataset("energy", data=e)
            ds.attrs["units"] = "eV"
            if truth:
                _write_group(h5.create_group("truth"), truth)
    return path


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
    """

    path: Path
    energies: np.ndarray
    theta: np.ndarray | None
    kind: str
    shape: tuple
    attrs: dict

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


class _DataExchangeFile(InputReader):
    """One Data Exchange HDF5 file (all energies, or one energy of a per-energy set)."""

    def __init__(self, path, *, single_energy: bool = False):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: file not found")
        if not h5py.is_hdf5(self.path):
            raise InputError(f"{self.path}: not an HDF5 file")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(f"{self.path}: cannot open as HDF5 ({exc})") from None
        try:
            self._validate(single_energy)
        except BaseException:
            self._h5.close()
            raise

    def _validate(self, single_energy):
        h5, where = self._h5, self.path
        self.attrs = _read_attrs(h5.attrs)
        if "exchange" not in h5:
            raise InputError(f"{where}: group /exchange not found (expected the Data Exchange layout)")
        ex = h5["exchange"]
        if "data" in ex:
            self.kind, name = "projections", "data"
        elif "recon" in ex:
            self.kind, name = "recon", "recon"
        else:
            raise InputError(f"{where}: dataset /exchange/data (projections) or /exchange/recon (volumes) not found")
        mono = "measurement/instrument/monochromator/energy"
        if "energy" in ex:
            energies = _energies_ev(ex["energy"], where)
        elif mono in h5 and hasattr(h5[mono], "shape"):  # Data Exchange's instrument record
            energies = _energies_ev(h5[mono], where, "/" + mono)
        elif single_energy and _energy_from_name(where) is not None:  # per-energy file named '..._6552eV.h5'
            energies = np.array([_energy_from_name(where)])
        else:
            raise InputError(f"{where}: dataset /exchange/energy not found")
        n_e = energies.size
        ds = _dataset(ex, name, where)
        _check_numeric(ds, f"{where}: /exchange/{name}")
        axes = "(n_energy, n_angle, ny, nx)" if name == "data" else "(n_energy, nz, ny, nx)"
        if ds.ndim == 3 and n_e == 1:
            self._stacked = False
        elif ds.ndim == 4:
            self._stacked = True
            if ds.shape[0] != n_e:
                raise InputError(f"{where}: /exchange/energy has {n_e} energies but /exchange/{name} has "
                                 f"{ds.shape[0]} (shape {ds.shape})")
        else:
            raise InputError(f"{where}: /exchange/{name}: expected 4 axes {axes}, got shape {ds.shape}")
        if single_energy and n_e != 1:
            raise InputError(f"{where}: /exchange/energy: expected one energy per file, got {n_e}")
        self._data = ds
        self.shape = tuple(int(n) for n in ds.shape[-3:])
        if min(self.shape) < 1:
            raise InputError(f"{where}: /exchange/{name} is empty (shape {ds.shape})")
        self._order = np.argsort(energies, kind="stable")
        self.energies = energies[self._order]
        self.theta = None
        self._white = self._dark = None
        if self.kind == "projections":
            if "theta" not in ex:
                raise InputError(f"{where}: dataset /exchange/theta not found")
            self.theta = _theta_deg(ex["theta"], where)
            if self.theta.size != self.shape[0]:
                raise InputError(f"{where}: /exchange/theta has {self.theta.size} angles but /exchange/data has "
                                 f"{self.shape[0]} projections per energy")
            if "data_white" not in ex:
                raise InputError(f"{where}: dataset /exchange/data_white (flat fields) not found")
            self._white = self._frames(ex, "data_white", n_e)
            if "data_dark" in ex:
                self._dark = self._frames(ex, "data_dark", n_e)
            else:
                _log.warning("gpureg: %s has no /exchange/data_dark; using zero dark counts", where)
        elif "theta" in ex:
            self.theta = _theta_deg(ex["theta"], where)

    def _frames(self, ex, name, n_e):
        ds = _dataset(ex, name, self.path)
        _check_numeric(ds, f"{self.path}: /exchange/{name}")
        ny, nx = self.shape[1:]
        ok = ds.ndim in (3, 4) and tuple(ds.shape[-2:]) == (ny, nx) and ds.shape[-3] >= 1
        if ds.ndim == 4 and ds.shape[0] != n_e:
            ok = False
        if not ok:
            raise InputError(f"{self.path}: /exchange/{name}: expected (n, {ny}, {nx}) or ({n_e}, n, {ny}, {nx}) "
                             f"frames, got shape {ds.shape}")
        return ds

    def _pick(self, ds, i, stacked):
        return np.asarray(ds[self._order[i]] if stacked else ds[()], dtype=np.float32)

    def projections(self, i):
        if self.kind != "projections":
            return super().projections(i)
        return self._pick(self._data, self._index(i), self._stacked)

    def flat(self, i):
        if self.kind != "projections":
            return super().flat(i)
        return self._pick(self._white, self._index(i), self._white.ndim == 4)

    def dark(self, i=None):
        if self.kind != "projections":
            return super().dark(i)
        ny, nx = self.shape[1:]
        if self._dark is None:
            return np.zeros((1, ny, nx), dtype=np.float32)
        if self._dark.ndim == 4:
            return self._pick(self._dark, 0 if i is None else self._index(i), True)
        return np.asarray(self._dark[()], dtype=np.float32)

    def recon(self, i):
        if self.kind != "recon":
            return super().recon(i)
        return self._pick(self._data, self._index(i), self._stacked)

    def truth(self):
        if "truth" not in self._h5:
            return None
        out = {}

        def visit(name, obj):
            if hasattr(obj, "shape"):
                out[name] = obj[()]

        self._h5["truth"].visititems(visit)
        for k, v in self._h5["truth"].attrs.items():
            out.setdefault(k, v.decode() if isinstance(v, bytes) else v)
        return out

    def close(self):
        h5 = getattr(self, "_h5", None)
        if h5 is not None and h5.id.valid:
            h5.close()


class _FileStack(InputReader):
    """A folder of per-energy Data Exchange HDF5 files (one energy each)."""

    def __init__(self, label, files):
        self.path = Path(label)
        self._files = []
        try:
            for f in files:
                self._files.append(_DataExchangeFile(f, single_energy=True))
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


class _TiffStack(InputReader):
    """Per-energy TIFF files (multi-page) or per-energy folders of single-page TIFFs."""

    def __init__(self, label, entries, folder):
        self.path = Path(label)
        self.attrs = {}
        theta_file = next((folder / n for n in ("theta.txt", "angles.txt") if (folder / n).is_file()), None)
        data, flats, darks = {}, {}, []
        for entry in entries:
            name = entry.name.lower()
            if entry.is_dir():
                if any(f.suffix.lower() in TIFF_SUFFIXES for f in entry.iterdir()):
                    e = _energy_from_name(entry)
                    if e is not None:
                        _add_energy(data, e, entry)
                continue
            if entry.suffix.lower() not in TIFF_SUFFIXES:
                continue
            e = _energy_from_name(entry)
            if "dark" in name:
                darks.append(entry)
            elif "flat" in name or "white" in name:
                flats.setdefault(e, []).append(entry)
            elif e is None:
                raise InputError(f"{entry}: cannot read the energy from the file name (expected e.g. "
                                 f"'sample_6552.5eV.tif')")
            else:
                _add_energy(data, e, entry)
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


def _open_many(label, entries, folder):
    hdf = [f for f in entries if f.is_file() and f.suffix.lower() in HDF5_SUFFIXES]
    if hdf:
        if len(hdf) == 1:
            return _DataExchangeFile(hdf[0])
        return _FileStack(label, hdf)
    if any(f.suffix.lower() in TIFF_SUFFIXES or f.is_dir() for f in entries):
        return _TiffStack(label, entries, Path(folder))
    raise InputError(f"{label}: no HDF5 ({', '.join(HDF5_SUFFIXES)}) or TIFF files found")


def _dataset(group, name, where):
    obj = group[name]
    if not hasattr(obj, "shape"):
        raise InputError(f"{where}: /exchange/{name} is a group, expected a dataset")
    return obj


def _check_numeric(ds, where):
    dt = ds.dtype
    if dt == np.bool_ or not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        raise InputError(f"{where}: expected integer or float values, got dtype {dt}")


def _energies_ev(ds, where, name="/exchange/energy"):
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
        _check_energies(e, name)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None
    return e


def _check_energies(e, name):
    if e.size < 1:
        raise ValueError(f"{name}: no energies")
    if not np.all(np.isfinite(e)):
        raise ValueError(f"{name}: contains NaN or inf")
    d = np.diff(e)
    if d.size and not (np.all(d > 0) or np.all(d < 0)):
        k = int(np.flatnonzero(d <= 0)[0] if d[0] > 0 else np.flatnonzero(d >= 0)[0])
        raise ValueError(f"{name}: energies must be strictly monotonic, but entry {k + 1} ({e[k + 1]} eV) follows "
                         f"{e[k]} eV")


def _theta_deg(ds, where):
    try:
        th = np.asarray(ds[()], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{where}: /exchange/theta: expected numbers, got dtype {ds.dtype}") from None
    if not np.all(np.isfinite(th)):
        raise InputError(f"{where}: /exchange/theta contains NaN or inf")
    units = _attr_text(ds.attrs.get("units", "")).lower()
    if units in ("rad", "radian", "radians"):
        return np.rad2deg(th)
    if units in ("", "deg", "degree", "degrees"):
        if units == "" and th.size > 1 and np.abs(th).max() <= 2 * np.pi + 1e-6 and np.ptp(th) >= 3.0:
            _log.warning("gpureg: %s: /exchange/theta has no units and spans %.2f; reading it as radians",
                         where, np.ptp(th))
            return np.rad2deg(th)
        return th
    raise InputError(f"{where}: /exchange/theta: units {units!r} not understood (expected 'degrees' or 'rad')")


def _attr_text(v):
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.ndarray) and v.size == 1:
        return _attr_text(v.reshape(-1)[0])
    return str(v)


def _read_attrs(attrs):
    out = {}
    for k, v in attrs.items():
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        if isinstance(v, str) and v[:1] in "[{":
            with contextlib.suppress(ValueError):
                v = json.loads(v)
        out[k] = v
    return out


def _attr_value(v):
    if isinstance(v, (dict, list, tuple)) or v is None:
        return json.dumps(v, default=_json_default)
    if isinstance(v, Path):
        return str(v)
    return v


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    return str(o)


def _write_stack(group, name, source, n_e, *, dtype=None):
    """Write ``source`` (4D array or iterable of 3D arrays) as ``name``, one energy at a time."""
    ds = None
    count = 0
    items = (source[i] for i in range(len(source))) if getattr(source, "ndim", None) == 4 else source
    for item in items:
        a = np.asarray(item)
        if a.ndim != 3:
            raise ValueError(f"{name}: each energy must be 3D, got shape {a.shape} for energy {count}")
        if count >= n_e:
            raise ValueError(f"{name}: more than {n_e} energies given (one per entry of energy)")
        if ds is None:
            dt = dtype or (np.float32 if a.dtype == np.float64 else a.dtype)
            if not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
                raise ValueError(f"{name}: expected integer or float values, got dtype {a.dtype}")
            ds = group.create_dataset(name, shape=(n_e, *a.shape), dtype=dt, chunks=(1, 1, *a.shape[1:]))
            ds.attrs["axes"] = "energy:theta:y:x" if name == "data" else "energy:z:y:x"
        elif a.shape != ds.shape[1:]:
            raise ValueError(f"{name}: energy {count} has shape {a.shape}, expected {ds.shape[1:]}")
        ds[count] = a.astype(ds.dtype, copy=False)
        count += 1
    if count != n_e:
        raise ValueError(f"{name}: {count} energies given but energy has {n_e} entries")
    return ds.shape[1:]


def _check_frames(a, name, n_e, frame):
    ny, nx = frame
    ok = a.ndim in (3, 4) and a.shape[-2:] == (ny, nx) and a.shape[-3] >= 1 and (a.ndim == 3 or a.shape[0] == n_e)
    if not ok:
        raise ValueError(f"{name}: expected (n, {ny}, {nx}) or ({n_e}, n, {ny}, {nx}), got shape {a.shape}")
    return a.astype(np.float32) if a.dtype == np.float64 else a


def _write_group(group, items):
    for k, v in items.items():
        if isinstance(v, dict):
            _write_group(group.create_group(k), v)
        elif isinstance(v, str):
            group.attrs[k] = v
        else:
            a = np.asarray(v)  # dtype kept: float64 matrices stay exact
            kw = {"chunks": (1,) * (a.ndim - 3) + a.shape[-3:]} if a.ndim == 4 and min(a.shape) > 0 else {}
            group.create_dataset(k, data=a, **kw)


_ENERGY_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(k?ev)(?![a-z])", re.IGNORECASE)


def _energy_from_name(p):
    m = _ENERGY_RE.search(p.stem if p.is_file() else p.name)
    if m is None:
        return None
    e = float(m.group(1))
    return e * 1000.0 if m.group(2).lower() == "kev" else e


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

def _default_dataset(h5, path):
    for name in ("exchange/recon", "aligned", "volume"):
        if name in h5 and h5[name].ndim == 3:
            return name
    found = []
    h5.visititems(lambda n, obj: found.append(n) if getattr(obj, "ndim", 0) == 3 else None)
    if len(found) == 1:
        return found[0]
    raise InputError(f"{path}: {'no' if not found else 'several'} 3D datasets found; name one with --dataset "
                     f"(3D datasets: {found})")


def _check_3d(vol, where):
    if vol.ndim != 3:
        raise InputError(f"{where}: expected a 3D (Z, Y, X) volume, got shape {vol.shape}")
    return vol
