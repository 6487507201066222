"""What other tools see in a result file: NeXus ``NXdata`` views with physical axes, and the stacks' storage.

The result file's own layout (``/aligned``, ``/xanes/edge_energy``, ...) stays as it is; beside it,
``/entry`` (``NXentry``, the root's ``default``) holds ``NXdata`` groups whose ``data`` is a soft link to a
stack or map and whose axes are ``energy`` (eV) and ``z``, ``y``, ``x`` (um when the voxel size is known,
voxel indices otherwise). h5web, silx and Tiled then show the aligned stack with its energy axis and the
edge-energy map with its scale. Soft links cost nothing, survive ``--no-keep`` rewrites (the views of
dropped stacks are rebuilt without them) and are not copied as data.
"""

from __future__ import annotations

import numpy as np

from ...core.errors import ParameterError

__all__ = ["annotate_stack", "NEXUS_ENTRY", "STORE_DTYPES", "check_storable", "stack_dtype", "write_nexus_views"]

NEXUS_ENTRY = "entry"
# --store-dtype: float32 (exact) or float16 (half the size; relative error <= 2**-11, absolute <= 2**-25
# below float16's normal range, values beyond +-65504 refused).
STORE_DTYPES = {"float32": "exact",
                "float16": "lossy: |stored - x| <= 2**-11 |x| (normal range), <= 2**-25 (|x| < 6.1e-5)"}
_F16_MAX = float(np.finfo(np.float16).max)
# NXdata view name -> (dataset path, axis names of its dimensions)
_VIEWS = {"aligned": ("aligned", ("energy", "z", "y", "x")),
          "recon": ("recon", ("energy", "z", "y", "x")),
          "edge_energy": ("xanes/edge_energy", ("z", "y", "x")),
          "edge_energy_sigma": ("xanes/edge_energy_sigma", ("z", "y", "x")),
          "edge_jump": ("xanes/edge_jump", ("z", "y", "x"))}


def stack_dtype(store_dtype: str) -> np.dtype:
    """NumPy dtype of ``--store-dtype`` (``float32`` or ``float16``); ``ValueError`` otherwise."""
    if str(store_dtype) not in STORE_DTYPES:
        raise ParameterError(f"store_dtype must be one of {', '.join(STORE_DTYPES)}, got {store_dtype!r}")
    return np.dtype(str(store_dtype))


def annotate_stack(ds, compression: str, store_dtype: str) -> None:
    """Record how a stack is stored (codec, dtype and its error bound, the plugin a plain reader needs)."""
    ds.attrs["compression"] = str(compression)
    ds.attrs["store_dtype"] = str(store_dtype)
    ds.attrs["storage_error"] = STORE_DTYPES[str(store_dtype)]
    if not str(compression).startswith(("none", "gzip")):
        ds.attrs["reading"] = ("compressed with an hdf5plugin filter: in Python, `import hdf5plugin` before "
                               "reading (pip install hdf5plugin); h5web, silx and Fiji's HDF5 plugins read it")


def check_storable(ds, volume, name: str) -> None:
    """Refuse a volume that a float16 stack cannot hold (a value beyond +-65504 would become inf)."""
    if ds.dtype == np.float16:
        peak = float(np.nanmax(np.abs(volume))) if np.size(volume) else 0.0
        if peak > _F16_MAX:
            raise ValueError(f"{name}: a value of {peak:g} does not fit the float16 stack (|x| <= {_F16_MAX:g}); "
                             "store float32 instead")


def write_nexus_views(h5) -> None:
    """(Re)write ``/entry`` with one ``NXdata`` view of each stack and map present in the open file ``h5``."""
    import h5py

    if NEXUS_ENTRY in h5:
        del h5[NEXUS_ENTRY]
    present = {view: (path, axes) for view, (path, axes) in _VIEWS.items() if path in h5}
    if not present:
        return
    entry = h5.create_group(NEXUS_ENTRY)
    entry.attrs["NX_class"] = "NXentry"
    h5.attrs["NX_class"] = "NXroot"
    h5.attrs["default"] = NEXUS_ENTRY
    entry.attrs["default"] = "edge_energy" if "edge_energy" in present else next(iter(present))
    voxel_nm = h5.attrs.get("voxel_size_nm")
    scale, unit = (float(voxel_nm) / 1000.0, "um") if voxel_nm and np.isfinite(voxel_nm) and voxel_nm > 0 \
        else (1.0, "voxel")
    for view, (path, axes) in present.items():
        ds = h5[path]
        g = entry.create_group(view)
        g.attrs.update({"NX_class": "NXdata", "signal": "data", "axes": list(axes)})
        g["data"] = h5py.SoftLink(f"/{path}")
        for k, axis in enumerate(axes):
            n = ds.shape[k]
            if axis == "energy" and "energy" in h5 and h5["energy"].shape == (n,):
                g["energy"] = h5py.SoftLink("/energy")
            else:
                g.create_dataset(axis, data=np.arange(n, dtype=np.float64) * scale).attrs["units"] = unit
            g.attrs[f"{axis}_indices"] = k
        g["data"].attrs.get("units")  # resolves the link: a view never points at nothing
