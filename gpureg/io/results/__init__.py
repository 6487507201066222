"""The result file: the one package that knows its layout (DESIGN.md "Files").

One HDF5 file per run::

    /energy (n_energy,) eV                      attrs: gpureg_version, device, parameters (JSON),
    /recon, /aligned (n_energy, Z, Y, X) f4            input, input_checksum, complete,
    /registration/matrix (n_energy, 4, 4)              reference_index, convention
    /registration/mse_before, mse_after, done (n_energy,)
    /timings/<stage> (n_energy,) s
    /xanes/edge_energy, edge_jump, white_line, mask, labels (Z, Y, X) [+ roi_* from `gpureg xanes`]
    [with --references: /xanes/fractions (n_refs, Z, Y, X), r_factor, lcf_residual, lcf_offset, reference_spectra;
     with --clusters: /xanes/clusters (Z, Y, X), cluster_centroids (k, n_energy), cluster_counts]
    /truth/...                                  simulated inputs
    per-particle runs: /registration/particle_labels, particle_matrix, particle_mse_global,
                       particle_mse; /aligned_global; /xanes_global/edge_energy, mask
    --align-projections runs: /alignment/projection_shifts, estimated_shifts (n_energy, n_angle, 2) px,
                     iterations, error_before, error_after, seconds, applied, status (n_energy,)
    deformable runs: /registration/bspline_coefficients (n_energy, 3, cz, cy, cx; attr spacing),
                     bspline_min_jacobian, bspline_mse_affine (MSE of the affine alone; mse_after: deformed)

When the energies cannot give an edge map (fewer than 5 usable, or none between the pre- and post-edge fit
ranges: :class:`~gpureg.core.EnergyGridError`), a run's result has no ``/xanes`` (nor ``/xanes_global``) group
and the root attribute ``xanes_skipped`` holds the one-line reason (:meth:`ResultFile.xanes_skipped`); everything
else is written as usual.
Attributes also hold ``voxel_size_nm`` (when the input says), and
``/registration/excluded`` (n_energy,) flags energies left out by
``--skip-bad-energies`` (reasons in its ``reasons`` attribute, JSON).
``/recon`` and ``/aligned`` are chunked per energy slab and compressed with a fast hdf5plugin codec
(Blosc2 Zstandard level 1 + shuffle by default, ``compression``/``store_dtype`` attributes say how; files of
earlier versions are gzip level 1); ``--no-keep`` drops them from the finished file (``dropped`` attribute).
``/entry`` (NeXus ``NXentry``, the root's ``default``) holds ``NXdata`` views (soft links, with energy and
physical axes) of the stacks and maps, for h5web, silx and Tiled.

Beside ``RESULT.h5``: ``RESULT.h5.partial`` (the run being written, resumable),
``RESULT.h5.watch/`` (watch mode's per-energy state), ``RESULT.h5.lock`` (held
while a run writes), ``RESULT.log`` (the run's log) and ``RESULT_report/``.
``gpureg xanes`` (:func:`gpureg.pipeline.files.map_xanes_file`) writes ``/energy`` and the same ``/xanes``
group (plus ``roi_*`` and attributes) through :func:`write_result_file`.

Writers: :class:`ResultStore` (a run), :func:`write_xanes` (the ``/xanes``
group, for the pipeline and ``gpureg xanes``), :func:`write_result_file` (a whole result in one go).
Readers: :func:`read_result` (registration summary), :class:`ResultFile`
(lazy access for figures and reports).
"""

from __future__ import annotations

from pathlib import Path

from .compression import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    dataset_filter,
    describe_filter,
    parse_compression,
    register_filters,
)
from .read import ResultFile, ResultSummary, describe_result, is_result, read_result, stack_names
from .space import DiskFullError, disk_full, is_no_space
from .store import GREY_STACKS, STAGES, XANES_SKIPPED, ResultStore
from .write import STACKS, drop_datasets, write_chemistry, write_result_file, write_xanes

register_filters()  # every gpureg process that touches results reads the hdf5plugin codecs, h5py included

__all__ = ["COMPRESSIONS", "dataset_filter", "DEFAULT_COMPRESSION", "describe_filter", "describe_result", "disk_full",
           "DiskFullError", "drop_datasets", "GREY_STACKS", "is_no_space", "is_result", "parse_compression",
           "lock_path", "log_path", "partial_path", "read_result", "report_dir_for", "ResultFile",
           "ResultStore", "ResultSummary", "stack_names", "STACKS", "STAGES", "watch_dir", "write_chemistry",
           "write_result_file", "write_xanes", "XANES_SKIPPED"]


def partial_path(output) -> Path:
    """``RESULT.h5.partial``: the run being written (renamed onto ``RESULT.h5`` when complete)."""
    output = Path(output)
    return output.with_name(output.name + ".partial")


def watch_dir(output) -> Path:
    """``RESULT.h5.watch/``: watch mode's per-energy state."""
    output = Path(output)
    return output.with_name(output.name + ".watch")


def lock_path(output) -> Path:
    """``RESULT.h5.lock``: the lock file held while a run writes ``RESULT.h5`` (:class:`gpureg.io.lock.OutputLock`)."""
    output = Path(output)
    return output.with_name(output.name + ".lock")


def log_path(output) -> Path:
    """``RESULT.log``: the log of the runs that wrote ``RESULT.h5``."""
    return Path(output).with_suffix(".log")


def report_dir_for(output) -> Path:
    """Report folder of a result file: ``RESULT_report/`` beside it."""
    output = Path(output)
    return output.with_name(output.stem + "_report")
