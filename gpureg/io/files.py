"""File helpers: volumes and matrices (.npy or HDF5), atomic writes, the :class:`InputError` of bad inputs.

:func:`atomic_path` yields a temporary name beside the target and renames it
onto the target only when the block completes, so a reader never sees a
half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..core.errors import InputError, OutputError

__all__ = ["atomic_path", "BadEnergyError", "check_file_target", "check_new_output", "check_not_input", "check_suffix",
           "default_file_mode", "HDF5_SUFFIXES",
           "InputError",
           "load_volume", "save_matrix", "save_volume"]

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".cxi")
_UMASK_LOCK = threading.Lock()


class BadEnergyError(InputError):
    """One energy of an input cannot give a valid volume (all NaN, zero flat field...).

    Attributes
    ----------
    energy : float
        The energy (eV).
    reason : str
        What is wrong, in a few words.
    """

    def __init__(self, message, *, energy=float("nan"), reason=""):  # defaults: unpickling (Dask workers)
        super().__init__(message)
        self.energy, self.reason = float(energy), str(reason)


def check_suffix(path, allowed, what: str) -> Path:
    """Refuse a file name whose suffix is not one of ``allowed`` (one line naming the file and the choices)."""
    path = Path(path)
    if path.suffix.lower() not in allowed:
        raise InputError(f"{path}: {what} must be a {' / '.join(allowed)} file name, got suffix "
                         f"{path.suffix or '(none)'!r}")
    return path


def check_file_target(path) -> Path:
    """Refuse to write a file at ``path`` when it is a folder, or its folder is missing or unwritable.

    Called before any work, so that a command does not compute for nothing.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"{path}: is an existing folder; give a file name (e.g. {path / 'result.h5'})")
    if not folder.is_dir():
        raise OutputError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"{path}: output folder {folder} is not writable")
    return path


def check_not_input(output, *inputs) -> None:
    """Refuse an ``output`` that is one of the ``inputs``: the same file (inode), also through symlinks or hard links.

    Inputs may be files, folders (each file in them counts) or glob patterns; ``None`` entries are skipped.
    """
    output = Path(output)
    try:
        out = os.stat(output)
    except OSError:
        return  # a file that does not exist yet is no input
    for item in inputs:
        if item is None:
            continue
        text = str(item)
        if any(ch in text for ch in "*?["):
            import glob

            candidates = [Path(f) for f in glob.glob(text)]
        elif Path(item).is_dir():
            candidates = [p for p in Path(item).rglob("*") if p.is_file()]
        else:
            candidates = [Path(item)]
        for cand in candidates:
            try:
                st = os.stat(cand)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
                same = "" if cand == output else f" ({output} and {cand} are the same file)"
                raise OutputError(f"{output}: is the input{same}; writing it would destroy the input, give another "
                                 "output name")


def check_new_output(path, *, inputs=(), overwrite: bool = False) -> Path:
    """Refuse to write ``path`` when it is one of ``inputs``, or exists and ``overwrite`` is false.

    Also the checks of :func:`check_file_target` (not a folder, its folder exists and is writable).
    """
    path = check_file_target(path)
    check_not_input(path, *inputs)
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists; pass overwrite=True to replace it")
    return path


def default_file_mode() -> int:
    """Permission bits a new file gets under the current umask (``0o666 & ~umask``: 0o644 under umask 022)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def load_volume(path, dataset: str | None = None, *, finite: bool = False) -> np.ndarray:
    """Read one 3D volume from ``.npy`` or HDF5 (read-only).

    Parameters
    ----------
    path : str or Path
        ``.npy`` file, or HDF5 file (``.h5``, ``.hdf5``, ``.hdf``, ``.nxs``).
    dataset : str, optional
        HDF5 dataset path; default: the only 3D dataset in the file, or
        ``/exchange/recon`` / ``/aligned`` when present.
    finite : bool
        Refuse a volume holding NaN or inf (:class:`InputError` naming the file and how many).

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
        return _check_finite(_check_3d(np.asarray(vol), f"{path}"), f"{path}", finite)
    import h5py

    if not h5py.is_hdf5(path):
        raise InputError(f"{path}: not an HDF5 or .npy file")
    with h5py.File(path, "r") as h5:
        name = dataset or _default_dataset(h5, path)
        if name not in h5:
            raise InputError(f"{path}: dataset {name!r} not found")
        return _check_finite(_check_3d(np.asarray(h5[name]), f"{path}:{name}"), f"{path}:{name}", finite)


def save_volume(path, volume, *, dataset: str = "volume", attrs: dict | None = None) -> Path:
    """Write a volume atomically to ``.npy`` or HDF5 (by suffix; any other suffix is an :class:`InputError`)."""
    path = check_suffix(path, (".npy",) + HDF5_SUFFIXES, "a volume file")
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
    """Write a 4x4 matrix atomically as JSON (``.json``) or HDF5 (dataset ``matrix``); other suffixes are refused."""
    path = check_suffix(path, (".json",) + HDF5_SUFFIXES, "a matrix file")
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

    The folder must exist and be writable, and ``path`` must not be a folder
    (clear error otherwise). The file gets the mode any new file gets under the
    umask (not ``tempfile``'s 0600), so colleagues can read it. On any
    exception the temporary file is removed and ``path`` is left untouched.
    """
    path = check_file_target(path)
    if path.is_symlink():  # write through the link to its target (the link stays a link)
        path = Path(os.path.realpath(path))
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; the file gets the umask's usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _default_dataset(h5, path):
    for name in ("exchange/recon", "aligned", "volume"):
        if name in h5 and h5[name].ndim == 3:
            return name
    found = []
    h5.visititems(lambda n, obj: found.append(n) if getattr(obj, "ndim", 0) == 3 else None)
    if len(found) == 1:
        return found[0]
    raise InputError(f"{path}: {'no' if not found else 'several'} 3D datasets found; name one with dataset= "
                     f"(3D datasets: {found})")


def _check_3d(vol, where):
    if vol.ndim != 3:
        raise InputError(f"{where}: expected a 3D (Z, Y, X) volume, got shape {vol.shape}")
    return vol


def _check_finite(vol, where, finite):
    if finite and vol.dtype.kind == "f":
        bad = int(vol.size - np.count_nonzero(np.isfinite(vol)))
        if bad:
            raise InputError(f"{where}: {bad} of {vol.size} voxels are NaN or inf (a volume to register must be finite)")
    return vol
