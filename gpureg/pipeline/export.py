"""Export a result to OME-Zarr (NGFF 0.4, multiscale) for napari, neuroglancer and other Zarr viewers.

Layout of ``OUT.zarr`` (Zarr format 2, the one NGFF 0.4 readers expect)::

    OUT.zarr/                 the aligned stack: image (energy, z, y, x), levels 0..L (2x block means in space)
    OUT.zarr/labels/particles the particle labels (NGFF labels image), when the result has them
    OUT.zarr/maps/<name>      each 3D map (edge_energy, edge_jump, white_line, edge_energy_sigma...): an image

The spatial scale is the voxel size in micrometres when the result records it (voxels otherwise);
``energy`` is a custom axis (NGFF allows one besides time/space), so napari shows it as a slider.
Written into a temporary folder beside ``OUT.zarr`` and renamed when complete.
"""

from __future__ import annotations

import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np

from ..core.errors import OutputError
from ..io.files import InputError
from ..io.results import ResultFile

__all__ = ["export_zarr"]

_MIN_SIDE = 16  # the coarsest level is the last one whose every spatial side is at least this


def export_zarr(result, out, *, overwrite: bool = False, chunk: int = 64) -> Path:
    """Write the aligned stack, labels and maps of ``result`` as OME-Zarr ``out``; returns ``out``.

    Parameters
    ----------
    result : path
        A finished result file (``gpureg run``/``watch``).
    out : path
        The ``.zarr`` folder to write.
    overwrite : bool
        Replace an existing ``out``; without it an existing ``out`` is an error.
    chunk : int
        Spatial chunk side (voxels).
    """
    try:
        import zarr
    except ImportError:
        raise InputError("OME-Zarr export needs the zarr package: pip install 'gpureg[zarr]'") from None
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists; pass overwrite=True to replace it")
    if out.exists() and not _is_zarr(out):  # a mistyped name must never delete a folder of other data
        raise OutputError(f"{out}: exists and is not a Zarr folder (no .zgroup, .zattrs or zarr.json); "
                          "not replaced, even with overwrite=True")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: folder not found")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with ResultFile(result) as r:
            stack = r.stack("aligned")
            if stack is None:
                raise InputError(f"{result}: has no /aligned stack to export (was it left out with keep=?)")
            voxel_um = (r.voxel_size_nm() or 1000.0) / 1000.0
            unit = "micrometer" if r.voxel_size_nm() else None
            root = zarr.open_group(str(tmp), mode="w", zarr_format=2)
            _write_image(root, stack, ("energy", "z", "y", "x"), voxel_um, unit, chunk, name="aligned")
            maps = r.xanes(maps_only=True) or {}
            labels = maps.get("labels")
            if labels is not None and np.asarray(labels).ndim == 3:
                lab = root.require_group("labels")
                lab.attrs["labels"] = ["particles"]
                g = lab.require_group("particles")
                _write_image(g, np.asarray(labels, dtype=np.int32), ("z", "y", "x"), voxel_um, unit, chunk,
                             name="particles", labels=True)
                g.attrs["image-label"] = {"version": "0.4", "source": {"image": "../../"}}
            mg = root.require_group("maps")
            for name, value in maps.items():
                a = np.asarray(value) if not isinstance(value, dict) else None
                if name in ("labels", "mask") or a is None or a.ndim != 3 or a.dtype.kind != "f":
                    continue
                _write_image(mg.require_group(name), a.astype(np.float32), ("z", "y", "x"), voxel_um, unit, chunk,
                             name=name)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _is_zarr(path: Path) -> bool:
    """Whether ``path`` is a Zarr folder (group or array metadata at its top, Zarr format 2 or 3)."""
    return path.is_dir() and any((path / name).is_file() for name in (".zgroup", ".zattrs", ".zarray", "zarr.json"))


def _write_image(group, source, axes, voxel_um, unit, chunk, *, name, labels=False):
    """One NGFF multiscale image in ``group``: levels ``0..L`` written one energy (or volume) at a time."""
    shape = tuple(int(n) for n in source.shape)
    lead = len(shape) - 3  # 1 for (energy, z, y, x)
    levels = [shape]
    while min(levels[-1][lead:]) // 2 >= _MIN_SIDE:
        levels.append(levels[-1][:lead] + tuple(n // 2 for n in levels[-1][lead:]))
    dtype = np.int32 if labels else np.float32
    arrays = [group.create_array(str(k), shape=s, dtype=dtype,
                                 chunks=(1,) * lead + tuple(min(chunk, n) for n in s[lead:]),
                                 fill_value=0 if labels else np.nan)
              for k, s in enumerate(levels)]
    for index in np.ndindex(*shape[:lead]):
        vol = np.asarray(source[index], dtype=dtype)
        for k, arr in enumerate(arrays):
            if k:
                vol = _downsample(vol, labels)
            arr[index] = vol
    datasets = []
    for k in range(len(levels)):
        scale = [1.0] * lead + [voxel_um * 2 ** k] * 3
        datasets.append({"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    axes_meta = []
    for a in axes:
        entry = {"name": a, "type": "space" if a in ("z", "y", "x") else a}
        if unit and a in ("z", "y", "x"):
            entry["unit"] = unit
        axes_meta.append(entry)
    group.attrs["multiscales"] = [{"version": "0.4", "name": name, "axes": axes_meta, "datasets": datasets,
                                   "type": "mode" if labels else "mean"}]


def _downsample(vol, labels):
    """Halve each spatial side: 2x2x2 block means (float, NaN-aware) or every second voxel (labels)."""
    z, y, x = (n // 2 * 2 for n in vol.shape)
    if labels:
        return np.ascontiguousarray(vol[:z:2, :y:2, :x:2])
    blocks = vol[:z, :y, :x].reshape(z // 2, 2, y // 2, 2, x // 2, 2)
    with warnings.catch_warnings():  # a block of NaN only (outside the mask of a map) stays NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(blocks, axis=(1, 3, 5)).astype(np.float32)
