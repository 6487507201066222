"""Which layout an input has, found from the files' contents (not their names), and what ``gpureg info`` shows
(:func:`describe_input`; the CLI formats it).

Layouts tried, in this order, on each file's first bytes and, for HDF5, its groups:

- Data Exchange HDF5 (``/exchange``; :mod:`.dataexchange`), one file or one per energy;
- NSLS-II FXI 18-ID HDF5 (``/img_tomo`` + ``/X_eng``; :mod:`.fxi`), one file per energy;
- NeXus NXtomo HDF5 (an ``NXentry`` with ``image_key``; :mod:`.nexus`);
- Zeiss/Xradia OLE2 files ``.txrm``/``.xrm``/``.txm`` (:mod:`.xradia_series`);
- TIFF series (:mod:`.stacks`), energies from the names or ``energies.txt``.
"""

from __future__ import annotations

import glob as _glob
from pathlib import Path

import numpy as np

from .base import InputReader, is_uri, open_group
from .dataexchange import DataExchangeFile
from .files import InputError
from .stacks import FileStack, TiffStack
from .xradia import OLE_MAGIC

__all__ = ["LAYOUTS", "describe_input", "open_detected", "sniff"]

LAYOUTS = ("Data Exchange", "NSLS-II FXI 18-ID", "NeXus NXtomo", "Zeiss/Xradia", "TIFF series")

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_SKIP_SUFFIXES = (".txt", ".json", ".log", ".md", ".csv", ".partial", ".lock", ".npy", ".png", ".pdf")


def sniff(path) -> str | None:
    """``"hdf5"``, ``"ole"``, ``"tiff"`` or None, from a file's first bytes (HDF5 also at its 512-byte offsets)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if head == OLE_MAGIC:
                return "ole"
            if head[:4] in _TIFF_MAGIC:
                return "tiff"
            offset = 0
            while head:
                if head == _HDF5_MAGIC:
                    return "hdf5"
                offset = 512 if offset == 0 else offset * 2
                fh.seek(offset)
                head = fh.read(8)
    except OSError:
        return None
    return None


def open_detected(path) -> InputReader:
    """Open ``path`` (file, folder or glob) with the reader its contents call for (see the module docstring).

    Raises
    ------
    InputError
        One line naming the file and, when no layout matches, each layout tried and what it lacked.
    """
    text = str(path)
    if is_uri(text):
        return _open_tiled(text)
    if any(ch in text for ch in "*?["):
        entries = sorted(Path(f) for f in _glob.glob(text))
        if not entries:
            raise InputError(f"{text}: no file matches this pattern")
        return _open_many(text, entries, entries[0].parent)
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file or folder not found")
    if p.is_dir():
        return _open_many(str(p), sorted(p.iterdir()), p)
    kind = sniff(p)
    if kind == "ole":
        from .xradia_series import XradiaSeries

        return XradiaSeries(str(p), [p])
    if kind == "hdf5":
        return _open_hdf5(str(p), [p])
    if kind == "tiff":
        raise InputError(f"{p}: a single TIFF holds one energy; give the folder of per-energy TIFF files")
    raise InputError(f"{p}: not an HDF5 file, OLE2 compound file or TIFF: no known layout (tried {_lacks(p)})")


def describe_input(path) -> dict:
    """What :func:`gpureg.io.open_input` (through :func:`open_detected`) finds in ``path``: layout, shapes, energies, angles, units, guesses.

    Returns
    -------
    dict
        ``path``, ``layout``, ``kind``, ``n_energy``, ``energies_ev`` (list), ``shape`` (one energy's
        projections or volume), ``recon_shape``, ``angles`` (``n``, ``first``, ``last``, ``step``,
        ``units``: degrees; or None), ``flat_frames``, ``dark_frames`` (of the first energy; projections
        only), ``pixel_size_nm``, ``guessed`` (list of sentences).
    """
    with open_detected(path) as r:
        theta = None
        if r.theta is not None and r.theta.size:
            th = np.asarray(r.theta, dtype=np.float64)
            step = float(np.median(np.diff(th))) if th.size > 1 else 0.0
            theta = {"n": int(th.size), "first": float(th[0]), "last": float(th[-1]), "step": step,
                     "units": "degrees"}
        out = {"path": str(r.path), "layout": r.layout or type(r).__name__, "kind": r.kind,
               "n_energy": r.n_energy, "energies_ev": [float(e) for e in r.energies],
               "shape": [int(n) for n in r.shape], "recon_shape": [int(n) for n in r.recon_shape], "angles": theta,
               "flat_frames": None, "dark_frames": None,
               "pixel_size_nm": None if r.pixel_size_nm is None else float(r.pixel_size_nm),
               "guessed": list(r.guessed)}
        if r.kind == "projections":
            out["flat_frames"] = int(r.flat(0).shape[0])
            out["dark_frames"] = int(r.dark(0).shape[0])
    return out


def _open_many(label, entries, folder):
    files = [f for f in entries if f.is_file() and not f.name.startswith(".")
             and f.suffix.lower() not in _SKIP_SUFFIXES]
    kinds = {f: sniff(f) for f in files}
    ole = [f for f in files if kinds[f] == "ole"]
    for d in (e for e in entries if e.is_dir()):  # per-energy folders of .xrm files
        ole += [f for f in sorted(d.iterdir()) if f.is_file() and sniff(f) == "ole"]
    hdf = [f for f in files if kinds[f] == "hdf5"]
    if ole and hdf:
        raise InputError(f"{label}: holds both HDF5 ({hdf[0].name}) and Zeiss/Xradia OLE ({ole[0].name}) files; "
                         "give one kind")
    if ole:
        from .xradia_series import XradiaSeries

        return XradiaSeries(label, ole)
    if hdf:
        return _open_hdf5(label, hdf)
    if any(kinds[f] == "tiff" for f in files) or any(e.is_dir() for e in entries):
        return TiffStack(label, entries, Path(folder))
    raise InputError(f"{label}: no HDF5 (Data Exchange, NSLS-II FXI 18-ID, NeXus NXtomo), OLE2 (Zeiss/Xradia) "
                     f"or TIFF files among its {len(files)} file(s); those are all the layouts tried")


def _open_hdf5(label, files):
    layouts = {f: _hdf5_layout(f) for f in files}
    first = files[0]
    found = layouts[first]
    if found is None:
        from .results.read import is_result

        if is_result(first):
            raise InputError(f"{first}: a result of gpureg (registration and maps), not projections or volumes to "
                             "process; give the scan it was made from")
        raise InputError(f"{first}: HDF5 of no known layout: tried {_lacks(first)}")
    other = next((f for f in files if layouts[f] != found), None)
    if other is not None:
        raise InputError(f"{other}: layout {layouts[other] or 'unknown'} differs from {first.name}'s ({found})")
    if found == "Data Exchange":
        reader = DataExchangeFile(first) if len(files) == 1 else FileStack(label, files)
        reader.layout = "Data Exchange"
        px = reader.attrs.get("voxel_size_nm", reader.attrs.get("pixel_size_nm"))
        reader.pixel_size_nm = float(px) if px is not None and np.isfinite(float(px)) else None
        if reader.pixel_size_nm is None:
            reader.guessed = ("no voxel_size_nm root attribute: pixel size unknown",)
        return reader
    if found == "NSLS-II FXI 18-ID":
        from .fxi import FxiSeries

        return FxiSeries(label, files)
    from .nexus import NexusTomo

    return NexusTomo(label, files)


def _hdf5_layout(path):
    from .fxi import is_fxi
    from .nexus import nxtomo_entries

    try:
        with open_group(path) as h5:
            if "exchange" in h5:
                return "Data Exchange"
            if is_fxi(h5):
                return "NSLS-II FXI 18-ID"
            if nxtomo_entries(h5):
                return "NeXus NXtomo"
    except OSError as exc:
        raise InputError(f"{path}: cannot open as HDF5 ({exc})") from None
    return None


def _open_tiled(uri):
    """A Tiled node: a Bluesky run, one served file (a container in a known layout), or a folder of them."""
    from .tiled import TiledFile, connect, describe_node, family, is_bluesky_run, normalize_uri

    uri = normalize_uri(uri).rstrip("/")
    node = connect(uri)
    if is_bluesky_run(node):
        from .tiled_run import BlueskyRun

        return BlueskyRun(node, uri)
    if family(node) == "container":
        whole = TiledFile(node, uri)
        if _hdf5_layout(whole) is not None:
            return _open_hdf5(uri, [whole])
        files = [TiledFile(child, f"{uri}/{k}") for k, child in node.items() if family(child) == "container"]
        files = [f for f in files if _hdf5_layout(f) is not None]
        if files:
            return _open_hdf5(uri, files)
    raise InputError(f"{uri}: holds {describe_node(node, uri)}; expected a tomography container: Data Exchange "
                     "(exchange/data or exchange/recon), NSLS-II FXI 18-ID (img_tomo, X_eng), NeXus NXtomo (an "
                     "NXentry with image_key), a container of such files, or a Bluesky run (TiledWriter)")


def _lacks(path) -> str:
    """'layout (what it lacked); ...' for every layout, for one file."""
    kind = sniff(path)
    if kind != "hdf5":
        hdf = [f"{name} (not HDF5)" for name in LAYOUTS[:3]]
        ole = "Zeiss/Xradia (not an OLE2 compound file)" if kind != "ole" else "Zeiss/Xradia (unreadable)"
        tif = "TIFF series (not a TIFF)" if kind != "tiff" else "TIFF series (a single TIFF)"
        return "; ".join(hdf + [ole, tif])
    import h5py

    from .fxi import FXI_REQUIRED

    with h5py.File(path, "r") as h5:
        fxi = next((n for n in FXI_REQUIRED if n not in h5), None)
        return "; ".join([
            "Data Exchange (group /exchange not found)",
            f"NSLS-II FXI 18-ID (no /{fxi})" if fxi else "NSLS-II FXI 18-ID (incomplete)",
            "NeXus NXtomo (no NXentry with instrument/detector/data and image_key)",
            "Zeiss/Xradia (an HDF5 file, not OLE2)",
            "TIFF series (an HDF5 file, not TIFF)",
        ])
