"""Figures a beamline scientist reads: edge-energy maps, spectra, registration checks.

One function per figure. Each takes arrays (NumPy or CuPy; copied to the host)
and an output ``path``, writes a PNG with matplotlib's Agg canvas (no pyplot,
no display needed) atomically, and returns the ``Path``. Images are shown
with ``origin="upper"`` and axis labels in voxel indices; colour maps carry
a colour bar with units. Figure size is ``figsize`` inches at ``dpi`` (no
tight cropping), so a figure's pixel size is known in advance.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .common import DPI
from .maps import edge_energy_3d, edge_energy_slice, orthogonal_slices
from .plots import canny_overlay, edge_distributions, mse_per_energy, roi_spectra, squared_difference

__all__ = ["plot_result"]

_log = logging.getLogger("gpureg")

def plot_result(result_h5, outdir, *, z: int | None = None, dpi: int = DPI) -> list:
    """Every figure a result file has the data for, written as PNGs into ``outdir``.

    Reads (each optional; figures whose datasets are absent are skipped):
    ``/energy`` (or ``/exchange/energy``); ``/xanes/edge_energy``, ``mask``,
    ``labels``, ``roi_*`` (from ``gpureg xanes``; without them the particle
    spectra are computed from ``/aligned`` and ``/xanes/labels``, reading
    one energy volume at a time); ``/registration/mse_before``
    and ``mse_after``; ``/aligned`` and ``/recon`` (n_energy, Z, Y, X), of
    which only single slices are read.

    Figures: ``edge_energy_slice.png``, ``edge_energy_orthogonal.png``,
    ``edge_energy_3d.png``, ``edge_distributions.png``, ``roi_spectra.png``,
    ``mse_per_energy.png``, ``canny_overlay.png`` and
    ``squared_difference.png`` (the energy registered worst before
    registration, or the lowest, against the reference: the highest energy,
    or ``/registration`` attribute ``reference_index``).

    Parameters
    ----------
    result_h5 : str or Path
        Pipeline output or ``gpureg xanes`` output.
    outdir : str or Path
        Created when missing.
    z : int, optional
        z-slice for the 2D figures (default: the middle, or the plane with the
        most valid edge-energy voxels).
    dpi : int
        Resolution of every figure (sizes are fixed in inches).

    Returns
    -------
    list of Path
        The figures written, in the order above.
    """
    from .. import xanes as xn
    from ..io.files import InputError
    from ..io.results import ResultFile
    from ..xanes.stack import Reordered

    src, out = Path(result_h5), Path(outdir)
    paths = []
    with ResultFile(src) as rf:
        out.mkdir(parents=True, exist_ok=True)
        energy = rf.energies()
        voxel_nm = rf.voxel_size_nm()
        params = rf.attrs().get("parameters", {})
        binarized = params.get("prep", {}).get("binarize") is not False
        g = rf.xanes()
        aligned = rf.stack("aligned")
        if g is not None:
            em = np.asarray(g["edge_energy"], dtype=np.float64)
            mask = np.asarray(g["mask"], dtype=bool) if "mask" in g else None
            if mask is not None and mask.shape != em.shape:
                raise InputError(f"{src}: /xanes/mask {mask.shape} does not match /xanes/edge_energy {em.shape}")
            vis = em if mask is None else np.where(mask, em, np.nan)
            labels = np.asarray(g["labels"]) if "labels" in g else None
            if np.isfinite(vis).any():
                paths.append(edge_energy_slice(vis, out / "edge_energy_slice.png", dpi=dpi, index=z, voxel_nm=voxel_nm))
                paths.append(orthogonal_slices(vis, out / "edge_energy_orthogonal.png", dpi=dpi, voxel_nm=voxel_nm,
                                               center=_particle_centres(vis, labels)))
                if vis.ndim == 3:
                    paths.append(edge_energy_3d(vis, out / "edge_energy_3d.png", dpi=dpi, voxel_nm=voxel_nm))
                if labels is not None and int(np.max(labels, initial=0)) > 0:
                    try:
                        dist = xn.edge_distribution(vis, labels)
                    except ValueError as exc:
                        _log.warning("plot_result: no edge-energy distributions (%s)", exc)
                    else:
                        paths.append(edge_distributions(dist, out / "edge_distributions.png", dpi=dpi))
            else:
                _log.warning("plot_result: %s:/xanes/edge_energy has no valid voxel; edge-energy figures skipped", src)
            if "roi_mean" in g and energy is not None and g["roi_mean"].shape[-1] == energy.size:
                roi = {"energy": np.sort(energy), "mean": g["roi_mean"], "std": g["roi_std"],
                       "names": [f"particle {int(k)}" for k in g["roi_label"]]}
                if "roi_norm" in g:
                    roi["norm"] = g["roi_norm"]
                if "roi_edge_energy" in g:
                    roi["edge_energy"] = g["roi_edge_energy"]
                paths.append(roi_spectra(roi, out / "roi_spectra.png", dpi=dpi))
            elif (labels is not None and aligned is not None and energy is not None
                  and aligned.shape[0] == energy.size and aligned.shape[1:] == labels.shape):
                if labels.max(initial=0) > 0 and np.unique(energy).size == energy.size:
                    order = np.argsort(energy, kind="stable")     # spectra are read one energy volume at a time
                    roi = xn.roi_spectra(Reordered(aligned, order), energy[order], labels)
                    paths.append(roi_spectra(roi, out / "roi_spectra.png", dpi=dpi))
        mse = rf.mse()
        before = None
        if mse is not None:
            before, after = mse
            e = energy if energy is not None and energy.size == np.size(before) else np.arange(np.size(before))
            compared = "binarized, smoothed volumes" if binarized else "grey values"
            paths.append(mse_per_energy(e, before, after, out / "mse_per_energy.png", dpi=dpi, compared=compared))
        if aligned is not None:
            n_e, nz = aligned.shape[0], aligned.shape[1]
            ref = rf.reference_index()
            if ref is None:
                ref = int(np.argmax(energy)) if energy is not None and energy.size == n_e else n_e - 1
            if before is not None and np.size(before) == n_e and np.isfinite(before).any():
                k = int(np.nanargmax(np.where(np.arange(n_e) == ref, -np.inf, before)))
            else:
                k = int(np.argmin(energy)) if energy is not None and energy.size == n_e else 0
            zi = nz // 2 if z is None else int(z)
            if not 0 <= zi < nz:
                raise InputError(f"{src}: z={zi} is outside the /aligned stack (0..{nz - 1})")
            if n_e > 1 and k != ref:
                ref_sl, ali_sl = aligned[ref, zi], aligned[k, zi]
                if energy is not None and energy.size == n_e:
                    tag = f"E = {energy[k]:.1f} eV vs reference {energy[ref]:.1f} eV"
                else:
                    tag = f"energy {k} vs reference {ref}"
                paths.append(canny_overlay(ref_sl, ali_sl, out / "canny_overlay.png", dpi=dpi,
                                           title=f"Canny edges, z = {zi}: {tag}"))
                recon = rf.stack("recon")
                if recon is not None and recon.shape == aligned.shape:
                    before_sl = recon[k, zi]
                    units = "a.u."
                    if binarized:  # what was registered: energies either side of the edge differ in grey level
                        ref_sl, before_sl, ali_sl = (_otsu(a) for a in (ref_sl, before_sl, ali_sl))
                        tag, units = f"{tag}, Otsu-binarized as registered", "mask"
                    paths.append(squared_difference(ref_sl, before_sl, ali_sl, out / "squared_difference.png",
                                                    dpi=dpi, title=f"z = {zi}: {tag}", units=units))
    if not paths:
        raise InputError(f"{src}: nothing to plot (no /xanes, /registration/mse_* or /aligned datasets)")
    return paths


def _otsu(image):
    from ..core.segment import otsu_threshold

    a = np.asarray(image, dtype=np.float32)
    return (a > otsu_threshold(a)).astype(np.float32)


def _particle_centres(vis, labels, most: int = 4):
    """Centres (z, y, x) of the largest labelled particles with valid voxels (at most ``most``), or None."""
    if labels is None or vis.ndim != 3 or labels.shape != vis.shape:
        return None
    ids, counts = np.unique(labels[(labels > 0) & np.isfinite(vis)], return_counts=True)
    if ids.size == 0:
        return None
    keep = ids[np.argsort(-counts, kind="stable")[:most]]
    return [np.argwhere((labels == k) & np.isfinite(vis)).mean(axis=0) for k in sorted(keep)]
