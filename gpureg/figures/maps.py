"""Edge-energy maps: one slice, three orthogonal slices (through chosen points), a 3D point view.

With the voxel size (``voxel_nm``) the 2D maps have axes in micrometres and a scale bar.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.backend import to_host
from .common import (
    DPI,
    EDGE_CMAP,
    add_colorbar,
    map_limits,
    masked_map,
    new_figure,
    physical_axes,
    robust_limits,
    save_figure,
)

__all__ = ["edge_energy_3d", "edge_energy_slice", "orthogonal_slices"]


def edge_energy_slice(edge_map, path, *, axis: int = 0, index: int | None = None, mask=None, background=None,
                      vmin: float | None = None, vmax: float | None = None, cmap: str = EDGE_CMAP,
                      title: str | None = None, voxel_nm: float | None = None, figsize=(6.4, 5.2),
                      dpi: int = DPI) -> Path:
    """Edge-energy map of one slice, with a colour bar in eV.

    Parameters
    ----------
    edge_map : (Z, Y, X) or (H, W) ndarray
        Edge energies (eV); NaN where masked (drawn as the background).
    path : str or Path
        Output PNG.
    axis : int
        Axis normal to the slice (0: a z-slice, shown as y down, x across).
    index : int, optional
        Slice index along ``axis``; default the slice with most valid voxels.
    mask : ndarray of bool, optional
        Same shape as ``edge_map``; False hides a voxel.
    background : ndarray, optional
        Grey image (same shape as ``edge_map``) drawn under masked voxels,
        e.g. the reference volume.
    vmin, vmax : float, optional
        Colour range (eV); default the 1-99 % percentiles of the whole map,
        so slices of one map share a scale.
    cmap : str
        Matplotlib colour map.
    voxel_nm : float, optional
        Voxel size (nm): axes in micrometres and a scale bar (voxel indices without it).
    figsize, dpi
        See :func:`~gpureg.figures.plots.canny_overlay`.

    Returns
    -------
    Path
    """
    em = masked_map(edge_map, mask, "edge_map")
    if em.ndim not in (2, 3):
        raise ValueError(f"edge_energy_slice: edge_map must be 2D or 3D, got shape {em.shape}")
    lo, hi = map_limits(em, vmin, vmax)
    bg = None if background is None else np.asarray(to_host(background), dtype=np.float64)
    if bg is not None and bg.shape != em.shape:
        raise ValueError(f"edge_energy_slice: background {bg.shape} must have the shape of edge_map {em.shape}")
    if em.ndim == 3:
        if axis not in (0, 1, 2):
            raise ValueError(f"edge_energy_slice: axis must be 0, 1 or 2, got {axis}")
        if index is None:
            index = int(np.argmax(np.isfinite(em).sum(axis=tuple(a for a in range(3) if a != axis))))
        if not 0 <= index < em.shape[axis]:
            raise ValueError(f"edge_energy_slice: index {index} is outside 0..{em.shape[axis] - 1} along axis {axis}")
        sl = np.take(em, index, axis=axis)
        bg = None if bg is None else np.take(bg, index, axis=axis)
        where = f"{'zyx'[axis]} = {index}"
    else:
        sl, where = em, "slice"
    fig, ax = new_figure(figsize, dpi)
    ax.set_facecolor("0.15")
    if bg is not None:
        b0, b1 = robust_limits(bg)
        ax.imshow(bg, cmap="gray", vmin=b0, vmax=b1, interpolation="nearest")
    im = ax.imshow(sl, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    add_colorbar(fig, ax, im, "Edge energy (eV)")
    names = [n for a, n in enumerate("zyx") if em.ndim == 2 or a != axis][-2:]
    physical_axes(ax, voxel_nm, names)
    n = int(np.isfinite(sl).sum())
    ax.set_title(title or f"Edge energy, {where} ({n} voxels, median {np.nanmedian(sl) if n else np.nan:.1f} eV)")
    return save_figure(fig, path, dpi)


def orthogonal_slices(volume, path, *, center=None, mask=None, vmin: float | None = None, vmax: float | None = None,
                      cmap: str = EDGE_CMAP, label: str = "Edge energy (eV)", title: str | None = None,
                      voxel_nm: float | None = None, figsize=(12.0, 4.4), dpi: int = DPI) -> Path:
    """Three orthogonal slices (z, y, x) through one point of a 3D map (a row per point), one colour scale.

    Parameters
    ----------
    volume : (Z, Y, X) ndarray
        A map (e.g. edge energies, eV); NaN is drawn as the dark background.
    path : str or Path
        Output PNG.
    center : (int, int, int) or list of them, optional
        Voxel ``(z, y, x)`` the slices pass through (several: one row each,
        e.g. every particle's centre); default the centroid of the finite
        voxels (the volume centre when none).
    mask : (Z, Y, X) bool ndarray, optional
        False hides a voxel.
    vmin, vmax : float, optional
        Colour range; default the 1-99 % percentiles.
    label : str
        Colour-bar label with units.
    voxel_nm : float, optional
        Voxel size (nm): axes in micrometres and a scale bar.
    figsize, dpi
        See :func:`~gpureg.figures.plots.canny_overlay` (the height is per row).

    Returns
    -------
    Path
    """
    v = masked_map(volume, mask, "volume")
    if v.ndim != 3:
        raise ValueError(f"orthogonal_slices: volume must be 3D (Z, Y, X), got shape {v.shape}")
    lo, hi = map_limits(v, vmin, vmax)
    if center is None:
        pts = np.argwhere(np.isfinite(v))
        center = pts.mean(axis=0) if pts.size else (np.asarray(v.shape) - 1) / 2
    centers = np.atleast_2d(np.asarray(center, dtype=np.float64))
    if centers.ndim != 2 or centers.shape[1] != 3:
        raise ValueError(f"orthogonal_slices: center must be a voxel (z, y, x) or a list of them, got {center}")
    rows = []
    for point in centers:
        c = [int(round(float(x))) for x in point]
        if any(not 0 <= ci < n for ci, n in zip(c, v.shape)):
            raise ValueError(f"orthogonal_slices: center must be a voxel (z, y, x) inside {v.shape}, got {point}")
        rows.append(c)
    fig, grid = new_figure((figsize[0], figsize[1] * len(rows)), dpi, ncols=3, nrows=len(rows), squeeze=False)
    grid = np.asarray(grid, dtype=object).reshape(len(rows), 3)
    for axes, c in zip(grid, rows):
        panels = ((v[c[0]], "x", "y", (c[2], c[1]), f"z = {c[0]}"),
                  (v[:, c[1]], "x", "z", (c[2], c[0]), f"y = {c[1]}"),
                  (v[:, :, c[2]], "y", "z", (c[1], c[0]), f"x = {c[2]}"))
        for ax, (img, xl, yl, (cx, cy), name) in zip(axes, panels):
            ax.set_facecolor("0.15")
            im = ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.axvline(cx, color="w", lw=0.6, ls="--", alpha=0.7)
            ax.axhline(cy, color="w", lw=0.6, ls="--", alpha=0.7)
            physical_axes(ax, voxel_nm, (yl, xl))
            ax.set_title(name)
    axes = list(np.ravel(grid))
    cb = fig.colorbar(im, ax=list(axes), shrink=0.9)
    cb.set_label(label)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi)


def edge_energy_3d(edge_map, path, *, mask=None, max_points: int = 20000, vmin: float | None = None,
                   vmax: float | None = None, cmap: str = EDGE_CMAP, seed: int = 0, title: str | None = None,
                   voxel_nm: float | None = None, figsize=(7.2, 6.0), dpi: int = DPI) -> Path:
    """Simple 3D view: valid voxels as points coloured by edge energy (random subset when many).

    Parameters
    ----------
    edge_map : (Z, Y, X) ndarray
        Edge energies (eV); NaN where masked (not drawn).
    path : str or Path
        Output PNG.
    mask : (Z, Y, X) bool ndarray, optional
        False hides a voxel.
    max_points : int
        At most this many points are drawn (seeded random subset).
    vmin, vmax, cmap
        Colour range (eV) and map.
    voxel_nm : float, optional
        Voxel size (nm), named on the axes.
    figsize, dpi
        See :func:`~gpureg.figures.plots.canny_overlay`.

    Returns
    -------
    Path
    """
    em = masked_map(edge_map, mask, "edge_map")
    if em.ndim != 3:
        raise ValueError(f"edge_energy_3d: edge_map must be 3D (Z, Y, X), got shape {em.shape}")
    pts = np.argwhere(np.isfinite(em))
    if pts.shape[0] == 0:
        raise ValueError("edge_energy_3d: no finite voxel to draw (everything masked)")
    if pts.shape[0] > max_points:
        pts = pts[np.random.default_rng(seed).choice(pts.shape[0], int(max_points), replace=False)]
    vals = em[tuple(pts.T)]
    lo, hi = map_limits(em, vmin, vmax)
    fig, ax = new_figure(figsize, dpi, subplot_kw={"projection": "3d"})
    sc = ax.scatter(pts[:, 2], pts[:, 1], pts[:, 0], c=vals, cmap=cmap, vmin=lo, vmax=hi, s=4, alpha=0.8,
                    depthshade=False, linewidths=0)
    ax.set_xlim(0, em.shape[2])
    ax.set_ylim(0, em.shape[1])
    ax.set_zlim(0, em.shape[0])
    unit = "voxel" if not voxel_nm else f"voxel of {voxel_nm:.4g} nm"
    ax.set_xlabel(f"x ({unit})")
    ax.set_ylabel(f"y ({unit})")
    ax.set_zlabel(f"z ({unit})")
    add_colorbar(fig, ax, sc, "Edge energy (eV)")
    ax.set_title(title or f"Edge energy, {vals.size} voxels shown")
    return save_figure(fig, path, dpi)
