"""File-in, file-out workflows of single stages: ``gpureg recon`` (:func:`reconstruct_file`) and ``gpureg xanes``
(:func:`map_xanes_file`).

The algorithm layers (``recon``, ``xanes``) work on arrays; these functions open the inputs, stream them through
one stage and write the output file (through :mod:`gpureg.io`, the owner of the file layouts).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..core.energies import check_energies
from ..core.errors import InputError, OutputError, ParameterError
from ..core.segment import particle_labels
from ..core.version import __version__
from ..io.dataexchange import write_dataexchange
from ..io.files import check_new_output
from ..io.readers import open_input
from ..io.results import is_result, stack_names, write_result_file
from ..recon.fbp import FILTERS, reconstruct_fbp
from ..recon.flatfield import flatfield_correct
from ..register import Prep, prepare_reference
from ..xanes.regions import roi_spectra
from ..xanes.spectra import MIN_ENERGIES
from ..xanes.stack import Reordered, edge_energy_map
from ..xanes.uncertainty import PSF_VOXELS
from .maps import xanes_attrs

_log = logging.getLogger("gpureg")

__all__ = ["map_xanes_file", "reconstruct_file"]


def reconstruct_file(input_path, output_path, *, center=None, filter: str = "ram-lak", device: str = "auto",
                     progress=None, allow_limited_angles: bool = False) -> Path:
    """Reconstruct every energy of an input and write a Data Exchange recon file.

    Parameters
    ----------
    input_path : str or Path
        Anything :func:`gpureg.io.open_input` reads.
    output_path : str or Path
        HDF5 file written atomically: ``/exchange/recon (n_energy, nz, ny, nx)``,
        ``/exchange/energy``, ``/exchange/theta`` and the input's ``/truth`` group
        when present; one energy in memory at a time.
    center, filter, device
        As in :func:`gpureg.recon.reconstruct_fbp`.
    progress : callable, optional
        Called as ``progress(i, n_energy, energy_ev)`` after each energy.
    allow_limited_angles : bool
        Warn instead of refusing too few angles or under 180 degrees (:func:`gpureg.io.base.check_angles`).

    Returns
    -------
    Path
        ``output_path``.

    Notes
    -----
    Dead, hot and NaN detector pixels and outlier projections are repaired
    before FBP (:func:`gpureg.recon.repair.repair_projections`); an output that
    is the input is refused.
    """
    from ..io.base import check_angles
    from ..io.files import check_not_input
    from ..recon.repair import repair_projections

    if not isinstance(filter, str) or filter.lower() not in FILTERS:
        raise ParameterError(f"filter must be one of {FILTERS}, got {filter!r}")
    with open_input(input_path) as reader:
        check_not_input(output_path, input_path)
        if reader.kind == "projections":
            check_angles(reader.theta, reader.shape[-1], str(reader.path), allow_limited=allow_limited_angles)
        energies = reader.energies
        counts = []

        def volumes():
            for i in range(reader.n_energy):
                if reader.kind == "recon":
                    vol = reader.recon(i)
                else:
                    p, rep = repair_projections(flatfield_correct(reader.projections(i), reader.flat(i),
                                                                  reader.dark(i), warn=False))
                    counts.append(rep.pixels)
                    vol = reconstruct_fbp(p, reader.theta, center=center, filter=filter, device=device)
                yield vol
                if progress is not None:
                    progress(i, reader.n_energy, float(energies[i]))

        attrs = {"source": str(reader.path), "source_kind": reader.kind, "gpureg_version": __version__,
                 "recon_parameters": {"center": center, "filter": filter, "device": device}}
        if reader.pixel_size_nm:
            attrs["voxel_size_nm"] = float(reader.pixel_size_nm)  # read back by every gpureg reader
        write_dataexchange(output_path, recon=volumes(), energy=energies, theta=reader.theta,
                           truth=reader.truth(), attrs=attrs)
    if sum(counts):
        _log.warning("gpureg: %d dead, hot or NaN detector pixels repaired in total (median of their neighbours)",
                     sum(counts))
    return Path(output_path)



def sample_mask(reference) -> np.ndarray:
    """Where there is sample: the Otsu mask of the reference volume, as ``gpureg run`` masks its maps.

    The mask :func:`~gpureg.register.prepare.prepare_reference` computes with the default
    :class:`~gpureg.register.Prep` (the same denoising, the same threshold); all False, with a warning, when the
    volume has no foreground.
    """
    finite = np.where(np.isfinite(reference), reference, np.nanmin(reference) if np.isfinite(reference).any() else 0.0)
    try:
        return prepare_reference(finite, "cpu", Prep()).mask
    except InputError as exc:
        _log.warning("map_xanes_file: no sample mask (%s)", exc)
        return np.zeros(reference.shape, bool)


def map_xanes_file(aligned_path, out_path, *, dataset: str | None = None, energy_dataset: str | None = None,
                method: str = "half", min_jump: float | None = None, min_voxels: int = 64, slab: int = 16,
                device: str = "auto", smooth: float = 1.0, pre=None, post=None, overwrite: bool = False,
                references=None, clusters: int | None = None, denoise=None, column: str | None = None,
                psf: float = PSF_VOXELS) -> dict:
    """Edge-energy maps, particle labels and particle spectra of an aligned stack, written to HDF5.

    Reads ``/aligned`` + ``/energy`` (pipeline output) or ``/exchange/recon`` +
    ``/exchange/energy`` (Data Exchange) slab by slab, and writes a new file
    atomically with ``/energy`` and the group ``/xanes``: ``edge_energy``,
    ``edge_jump``, ``white_line``, ``mask`` (Z, Y, X), ``labels`` (int32,
    connected components of the sample mask (:func:`sample_mask`: the Otsu mask of the highest-energy
    volume, which also bounds the maps, as in ``gpureg run``), at
    least ``min_voxels``), and the per-particle spectra ``roi_label``,
    ``roi_count``, ``roi_mean``, ``roi_std``, ``roi_norm``, ``roi_edge_energy``.
    Attributes of ``/xanes`` record the method, fit ranges, threshold and source.

    Parameters
    ----------
    aligned_path, out_path : str or Path
        Input HDF5 and output HDF5 (must differ; an existing output is only
        replaced with ``overwrite=True``).
    dataset, energy_dataset : str, optional
        Override the stack / energy dataset names.
    method, min_jump, smooth, pre, post, slab, device, psf
        See :func:`edge_energy_map` (``psf``: recorded as the attribute ``psf_voxels``).
    min_voxels : int
        Smallest particle kept in ``labels``.

    references : sequence of paths, optional
        Reference spectra: per-voxel fractions (``/xanes/fractions``, ``r_factor``...),
        see :func:`gpureg.xanes.chemistry_map`; fitted in the edge-map mask.
    clusters : int, optional
        k-means clusters of the normalised spectra (``/xanes/clusters``, ``cluster_centroids``).
    denoise : {"auto", None} or int
        Spectral denoising before the maps and fits (:mod:`gpureg.xanes.denoise`).
    column : str, optional
        ``mu`` column of the reference files.

    Returns
    -------
    dict
        Summary: ``voxels``, ``valid``, ``particles``, ``edge_energy_median``,
        ``pre``, ``post``, ``min_jump``, ``out``.
    """
    import h5py


    src, dst = Path(aligned_path), Path(out_path)
    if not src.exists():
        raise InputError(f"{src}: file not found")
    if not h5py.is_hdf5(src):
        raise InputError(f"{src}: not an HDF5 file")
    check_new_output(dst, inputs=(src,), overwrite=overwrite)  # also a hard link of the input
    if dst.exists() and not is_result(dst):  # a scan or other data: a mistyped name must not destroy it
        raise OutputError(f"{dst}: exists and is not a gpureg result; not replaced, even with overwrite=True")
    with h5py.File(src, "r") as h5:
        name, ename = stack_names(h5, src, dataset, energy_dataset)
        ds = h5[name]
        E_in = check_energies(h5[ename][()], f"{src}:{ename}", min_count=MIN_ENERGIES)
        if ds.ndim != 4 or ds.shape[0] != E_in.size:
            raise InputError(f"{src}:{name}: expected an (n_energy={E_in.size}, Z, Y, X) stack, got shape {ds.shape}")
        if references:             # bad reference files fail before the maps are computed
            from ..xanes.lcf import prepare_references

            prepare_references(references, np.sort(E_in), column=column)
        order = np.argsort(E_in, kind="stable")
        E_sorted = E_in[order]
        ref_mask = sample_mask(np.asarray(ds[int(np.argmax(E_in))], dtype=np.float32))
        rng = {}
        maps = edge_energy_map(ds, E_in, slab=slab, device=device, min_jump=min_jump, pre=pre, post=post,
                               method=method, smooth=smooth, info=rng, denoise=denoise, mask=ref_mask, psf=psf)
        labels, n = particle_labels(ref_mask, min_voxels=min_voxels)
        roi = roi_spectra(Reordered(ds, order), E_sorted, labels, pre=rng["pre"], post=rng["post"]) if n else None
        chem = None
        if references or clusters:
            from ..xanes.chemmap import chemistry_map

            chem = chemistry_map(ds, E_in, references=references or None, k=clusters, mask=maps["mask"], slab=slab,
                                 device=device, e0=rng["e0"], column=column,
                                 denoise=rng["basis"] if rng["denoise"] is not None else None)
    valid = maps["mask"]
    summary = {"voxels": int(valid.size), "valid": int(valid.sum()), "particles": n, "pre": rng["pre"],
               "post": rng["post"],
               "edge_energy_median": float(np.nanmedian(maps["edge_energy"])) if valid.any() else float("nan"),
               "min_jump": rng["min_jump"], "out": str(dst)}
    attrs = {"method": method, "smooth_ev": float(smooth), "n_particles": n, "source": str(src),
             "source_dataset": name, "gpureg_version": __version__, "min_voxels": int(min_voxels),
             "device": rng["device"], "min_jump": rng["min_jump"], "e0_start_ev": rng["e0"],
             "min_jump_rule": "auto" if min_jump is None else "given", "pre_ev": rng["pre"], "post_ev": rng["post"],
             "range_rule": rng["rule"]}
    # the PSF and the spectral basis recorded as a run records them (its own E0 and range names stay)
    attrs.update({k: v for k, v in xanes_attrs(rng).items() if k in ("psf_voxels", "spectral_denoise")})
    if chem is not None and "fractions" in chem:
        summary["fraction_medians"] = {nm: float(np.nanmedian(chem["fractions"][j]))
                                       for j, nm in enumerate(chem["reference_names"])}
    if chem is not None and "clusters" in chem:
        summary["cluster_counts"] = [int(c) for c in chem["cluster_counts"]]
    root = {"input": str(src), "gpureg_version": __version__, "parameters": json.dumps(
        {"dataset": name, "edge": method, "min_jump": min_jump, "min_voxels": int(min_voxels), "slab": int(slab),
         "device": device, "references": list(references or ()), "clusters": clusters}, default=str)}
    with h5py.File(src, "r") as h5:
        for key in ("voxel_size_nm", "input_checksum"):
            if key in h5.attrs:
                root[f"source_{key}" if key == "input_checksum" else key] = h5.attrs[key]
    write_result_file(dst, E_sorted, maps=maps, labels=labels, roi=roi, xanes_attrs=attrs, chemistry=chem, attrs=root)
    return summary
