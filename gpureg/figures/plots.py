"""Figures a beamline scientist reads: edge-energy maps, spectra, registration checks.

One function per figure. Each takes arrays (NumPy or CuPy; copied to the host)
and an output ``path``, writes a PNG with matplotlib's Agg canvas (no pyplot,
no display needed) atomically, and returns the ``Path``. Images are shown
with ``origin="upper"`` and axis labels in voxel indices; colour maps carry
a colour bar with units.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..core.backend import to_host
from .common import (
    DPI,
    add_colorbar,
    as_slice2d,
    as_vector,
    median_mse_ratio,
    new_figure,
    robust_limits,
    save_figure,
    series_colours,
    unit_range,
)

__all__ = ["canny_overlay", "edge_distributions", "mse_per_energy", "roi_spectra", "squared_difference"]

_log = logging.getLogger("gpureg")


def canny_overlay(reference_slice, aligned_slice, path, *, sigma: float = 2.0, title: str | None = None,
                  units: str = "a.u.", figsize=(6.4, 5.6), dpi: int = DPI) -> Path:
    """Canny edges of a reference slice and an aligned slice drawn over the reference.

    Reference edges are magenta, aligned edges green, and pixels where both
    agree yellow: a well-aligned pair shows mostly yellow contours. The title
    reports the fraction of aligned edge pixels within one pixel of a
    reference edge (1.0: every aligned edge lies on a reference edge).

    Parameters
    ----------
    reference_slice, aligned_slice : (H, W) ndarray
        Same shape; grey values (any scale, each rescaled to its 1-99 %
        percentiles before edge detection). NaN is treated as the minimum.
    path : str or Path
        Output PNG.
    sigma : float
        Gaussian width (pixels) of :func:`skimage.feature.canny`.
    title : str, optional
        Figure title (the agreement statistic is added below it).
    units : str
        Units of the grey values, for the colour bar.
    figsize : (float, float)
        Inches; the PNG is ``figsize * dpi`` pixels.
    dpi : int
        Dots per inch.

    Returns
    -------
    Path
        ``path``.
    """
    from scipy import ndimage
    from skimage.feature import canny

    ref = as_slice2d(reference_slice, "reference_slice")
    ali = as_slice2d(aligned_slice, "aligned_slice")
    if ref.shape != ali.shape:
        raise ValueError(f"canny_overlay: reference_slice and aligned_slice must have the same shape, "
                         f"got {ref.shape} and {ali.shape}")
    if sigma <= 0:
        raise ValueError(f"canny_overlay: sigma must be > 0, got {sigma}")
    e_ref = canny(unit_range(ref), sigma=sigma)
    e_ali = canny(unit_range(ali), sigma=sigma)
    near = ndimage.binary_dilation(e_ref, structure=np.ones((3, 3), bool))
    agree = float((e_ali & near).sum() / max(int(e_ali.sum()), 1))
    overlay = np.zeros(ref.shape + (4,), dtype=np.float32)
    overlay[e_ref] = (1.0, 0.0, 1.0, 1.0)
    overlay[e_ali] = (0.0, 1.0, 0.0, 1.0)
    overlay[e_ref & e_ali] = (1.0, 1.0, 0.0, 1.0)

    fig, ax = new_figure(figsize, dpi)
    lo, hi = robust_limits(ref)
    im = ax.imshow(np.nan_to_num(ref, nan=lo), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.imshow(overlay, interpolation="nearest")
    add_colorbar(fig, ax, im, f"reference grey value ({units})")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=(1, 0, 1), label="reference edges"), Patch(color=(0, 1, 0), label="aligned edges"),
                       Patch(color=(1, 1, 0), label="both")],
              loc="lower right", fontsize=7, framealpha=0.8)
    ax.set_xlabel("x (voxel)")
    ax.set_ylabel("y (voxel)")
    stat = f"{100 * agree:.0f}% of aligned edges within 1 px of reference"
    ax.set_title(f"{title}\n{stat}" if title else f"Canny edges: {stat}", fontsize=10 if title else None)
    return save_figure(fig, path, dpi)


def mse_per_energy(energies, mse_before, mse_after, path, *, title: str | None = None, log: bool = True,
                   compared: str = "grey values", figsize=(6.4, 4.0), dpi: int = DPI) -> Path:
    """MSE between each energy's volume and the reference, before and after registration.

    Parameters
    ----------
    energies : (n_energy,) array_like
        eV.
    mse_before, mse_after : (n_energy,) array_like
        Mean squared error against the reference (the reference itself is 0;
        zeros and NaNs are left out of a logarithmic axis).
    path : str or Path
        Output PNG.
    title : str, optional
        Figure title.
    log : bool
        Logarithmic MSE axis.
    compared : str
        What the MSE compared (axis label): ``"binarized volumes"`` or ``"grey values"``.
    figsize, dpi
        See :func:`canny_overlay`.

    Returns
    -------
    Path
    """
    e = as_vector(energies, "energies")
    before = as_vector(mse_before, "mse_before")
    after = as_vector(mse_after, "mse_after")
    if not (e.size == before.size == after.size):
        raise ValueError(f"mse_per_energy: energies, mse_before and mse_after must have the same length, "
                         f"got {e.size}, {before.size}, {after.size}")
    if e.size == 0:
        raise ValueError("mse_per_energy: no energies to plot")
    fig, ax = new_figure(figsize, dpi)
    order = np.argsort(e)
    for y, label, style in ((before, "before registration", dict(color="tab:red", marker="o")),
                            (after, "after registration", dict(color="tab:blue", marker="s"))):
        y = y[order].copy()
        if log:
            y[~(y > 0)] = np.nan
        ax.plot(e[order], y, ms=4, lw=1.2, label=label, **style)
    if log and np.isfinite(np.where(np.concatenate([before, after]) > 0, 1.0, np.nan)).any():
        ax.set_yscale("log")
    ax.set_xlabel("Energy (eV)")
    ax.set_ylabel(f"MSE vs reference ({compared})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ratio = median_mse_ratio(before, after)
    gain = f"\nmedian over energies of MSE before/after: x{ratio:.3g}" if np.isfinite(ratio) else ""
    ax.set_title(title or f"Registration quality per energy{gain}", fontsize=10)
    return save_figure(fig, path, dpi)


def squared_difference(reference_slice, before_slice, after_slice, path, *, vmax: float | None = None,
                       title: str | None = None, units: str = "a.u.", figsize=(10.0, 4.4), dpi: int = DPI) -> Path:
    """Squared difference to the reference of one slice before and after registration (shared colour scale).

    Parameters
    ----------
    reference_slice, before_slice, after_slice : (H, W) ndarray
        Same shape; ``before`` is the unregistered volume's slice, ``after``
        the aligned one, both at the same index as the reference's.
    path : str or Path
        Output PNG.
    vmax : float, optional
        Top of the colour scale (default: 99.5th percentile of "before").
    units : str
        Units of the grey values (the colour bar shows their square).
    figsize, dpi
        See :func:`canny_overlay`.

    Returns
    -------
    Path
    """
    ref = as_slice2d(reference_slice, "reference_slice")
    before = as_slice2d(before_slice, "before_slice")
    after = as_slice2d(after_slice, "after_slice")
    if not (ref.shape == before.shape == after.shape):
        raise ValueError(f"squared_difference: slices must have the same shape, got reference {ref.shape}, "
                         f"before {before.shape}, after {after.shape}")
    d_before, d_after = (before - ref) ** 2, (after - ref) ** 2
    if vmax is None:
        fin = d_before[np.isfinite(d_before)]
        vmax = float(np.percentile(fin, 99.5)) if fin.size else 1.0
        vmax = vmax if vmax > 0 else float(np.nanmax(np.r_[d_before.ravel(), d_after.ravel(), 1e-12]))
    fig, axes = new_figure(figsize, dpi, ncols=2)
    for ax, d, name in zip(axes, (d_before, d_after), ("before", "after")):
        im = ax.imshow(d, cmap="inferno", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"{name} registration: mean {np.nanmean(d):.3g}")
        ax.set_xlabel("x (voxel)")
        ax.set_ylabel("y (voxel)")
    cb = fig.colorbar(im, ax=list(axes), shrink=0.9)
    cb.set_label(f"(volume - reference)$^2$ ({units}$^2$)")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi)


def roi_spectra(roi: dict, path, *, title: str | None = None, units: str = "a.u.", figsize=(11.0, 4.4),
                dpi: int = DPI) -> Path:
    """Mean spectrum (+- one standard deviation) of each region, raw and normalised.

    Parameters
    ----------
    roi : dict
        As returned by :func:`gpureg.xanes.roi_spectra`: ``energy``,
        ``names``, ``mean``, ``std`` and optionally ``norm``, ``edge_energy``.
    path : str or Path
        Output PNG.
    units : str
        Units of the raw spectra.
    figsize, dpi
        See :func:`canny_overlay`.

    Returns
    -------
    Path
    """
    try:
        e = as_vector(roi["energy"], "roi['energy']")
        mean = np.atleast_2d(np.asarray(to_host(roi["mean"]), dtype=np.float64))
        std = np.atleast_2d(np.asarray(to_host(roi["std"]), dtype=np.float64))
    except KeyError as exc:
        raise ValueError(f"roi_spectra: roi must hold 'energy', 'mean' and 'std' (from xanes.roi_spectra); "
                         f"missing {exc}") from None
    if mean.shape != std.shape or mean.shape[1] != e.size:
        raise ValueError(f"roi_spectra: mean {mean.shape} and std {std.shape} must be (n_roi, n_energy={e.size})")
    names = list(roi.get("names") or [f"region {k + 1}" for k in range(mean.shape[0])])
    norm = roi.get("norm")
    edge = roi.get("edge_energy")
    fig, axes = new_figure(figsize, dpi, ncols=2 if norm is not None else 1)
    axes = np.atleast_1d(axes)
    colours = series_colours(mean.shape[0])
    for k in range(mean.shape[0]):
        axes[0].fill_between(e, mean[k] - std[k], mean[k] + std[k], color=colours[k], alpha=0.25, lw=0)
        axes[0].plot(e, mean[k], "-o", ms=2.5, lw=1.2, color=colours[k], label=names[k])
    axes[0].set_xlabel("Energy (eV)")
    axes[0].set_ylabel(f"Absorption $\\mu$ ({units})")
    axes[0].set_title("Mean spectra (band: $\\pm$1 s.d. over voxels)")
    axes[0].legend(fontsize=7)
    if norm is not None:
        nm = np.atleast_2d(np.asarray(to_host(norm), dtype=np.float64))
        for k in range(nm.shape[0]):
            lab = names[k]
            if edge is not None and np.isfinite(edge[k]):
                lab += f" (E$_{{1/2}}$ {float(edge[k]):.1f} eV)"
                axes[1].axvline(float(edge[k]), color=colours[k], lw=0.8, ls=":")
            axes[1].plot(e, nm[k], "-o", ms=2.5, lw=1.2, color=colours[k], label=lab)
        axes[1].axhline(0.5, color="0.5", lw=0.6, ls="--")
        axes[1].set_xlabel("Energy (eV)")
        axes[1].set_ylabel("Normalised $\\mu$ (edge jump = 1)")
        axes[1].set_title("Normalised mean spectra")
        axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi)


def edge_distributions(dist: dict, path, *, title: str | None = None, figsize=(6.4, 4.4), dpi: int = DPI) -> Path:
    """Per-particle edge-energy distributions: histogram (bars) and kernel density (line).

    Parameters
    ----------
    dist : dict
        As returned by :func:`gpureg.xanes.edge_distribution`.
    path : str or Path
        Output PNG.
    figsize, dpi
        See :func:`canny_overlay`.

    Returns
    -------
    Path
    """
    try:
        label, edges, hist = dist["label"], np.asarray(dist["bin_edges"]), np.atleast_2d(dist["hist"])
        grid, dens = np.asarray(dist["grid"]), np.atleast_2d(dist["density"])
    except KeyError as exc:
        raise ValueError(f"edge_distributions: dist must come from xanes.edge_distribution; missing {exc}") from None
    if hist.shape != (len(label), edges.size - 1) or dens.shape != (len(label), grid.size):
        raise ValueError(f"edge_distributions: inconsistent shapes: {len(label)} labels, hist {hist.shape}, "
                         f"bin_edges {edges.shape}, density {dens.shape}, grid {grid.shape}")
    fig, ax = new_figure(figsize, dpi)
    colours = series_colours(len(label))
    for k, lb in enumerate(label):
        n = int(dist["count"][k]) if "count" in dist else None
        med = dist["median"][k] if "median" in dist else np.nan
        name = f"particle {int(lb)}" + (f" (n={n}, median {med:.1f} eV)" if n else "")
        ax.stairs(hist[k], edges, fill=True, alpha=0.3, color=colours[k])
        ax.plot(grid, dens[k], color=colours[k], lw=1.6, label=name)
        if np.isfinite(med):
            ax.axvline(med, color=colours[k], lw=0.8, ls="--")
    ax.set_xlabel("Edge energy (eV)")
    ax.set_ylabel("Probability density (1/eV)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "Edge-energy distribution per particle")
    return save_figure(fig, path, dpi)
