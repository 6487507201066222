"""The Data Exchange HDF5 layout: :func:`write_dataexchange` and its reader.

Layout (DESIGN.md "Files"): ``/exchange/data (n_energy, n_angle, ny, nx)``,
``/exchange/data_white``, ``/exchange/data_dark``, ``/exchange/theta`` (deg),
``/exchange/energy`` (eV) or ``/exchange/recon (n_energy, nz, ny, nx)``, and
an optional ``/truth`` group (simulated inputs). The writer streams one
energy at a time and writes atomically; the reader presents the energies in
ascending order whatever the order in the file.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path

import numpy as np

from ..core.energies import check_energies
from .base import (
    InputReader,
    attr_value,
    check_numeric,
    dataset,
    energies_ev,
    energy_from_name,
    read_attrs,
    theta_deg,
)
from .files import InputError, atomic_path

__all__ = ["write_dataexchange"]

_log = logging.getLogger("gpureg")


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
    check_energies(e, "energy")
    n_e = e.size
    if data is not None:
        if data_white is None or theta is None:
            raise ValueError("data_white and theta are required with data")
    th = None if theta is None else np.asarray(theta, dtype=np.float64).reshape(-1)
    if th is not None and not np.all(np.isfinite(th)):
        raise ValueError("theta contains NaN or inf")
    from ..core.version import __version__

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["creator"] = "gpureg"
            h5.attrs["gpureg_version"] = __version__
            h5.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            for k, v in (attrs or {}).items():
                h5.attrs[k] = attr_value(v)
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
                write_group(h5.create_group("truth"), truth)
    return path


class DataExchangeFile(InputReader):
    """One Data Exchange HDF5 file (all energies, or one energy of a per-energy set)."""

    def __init__(self, path, *, single_energy: bool = False):
        import h5py

        if hasattr(path, "open_group"):  # a Tiled container standing for the file
            self.path, self._h5 = path, path.open_group()
            self._validate(single_energy)
            return
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
        self.attrs = read_attrs(h5.attrs)
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
            energies = energies_ev(ex["energy"], where)
        elif mono in h5 and hasattr(h5[mono], "shape"):  # Data Exchange's instrument record
            energies = energies_ev(h5[mono], where, "/" + mono)
        elif single_energy and energy_from_name(where) is not None:  # per-energy file named '..._6552eV.h5'
            energies = np.array([energy_from_name(where)])
        else:
            raise InputError(f"{where}: dataset /exchange/energy not found")
        n_e = energies.size
        ds = dataset(ex, name, where)
        check_numeric(ds, f"{where}: /exchange/{name}")
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
            self.theta = theta_deg(ex["theta"], where)
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
            self.theta = theta_deg(ex["theta"], where)

    def _frames(self, ex, name, n_e):
        ds = dataset(ex, name, self.path)
        check_numeric(ds, f"{self.path}: /exchange/{name}")
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
        h5, self._h5 = getattr(self, "_h5", None), None
        if h5 is not None:
            h5.close()


def write_group(group, items):
    for k, v in items.items():
        if isinstance(v, dict):
            write_group(group.create_group(k), v)
        elif isinstance(v, str):
            group.attrs[k] = v
        else:
            a = np.asarray(v)  # dtype kept: float64 matrices stay exact
            kw = {"chunks": (1,) * (a.ndim - 3) + a.shape[-3:]} if a.ndim == 4 and min(a.shape) > 0 else {}
            group.create_dataset(k, data=a, **kw)


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
