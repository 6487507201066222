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

from .backend import to_host

__all__ = [
    "canny_overlay",
    "mse_per_energy",
]

_log = logging.getLogger("gpureg")

DPI = 100
EDGE_CMAP = "viridis"


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
        Figure title (a default naming the agreement is used).
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

    ref = _slice2d(reference_slice, "reference_slice")
    ali = _slice2d(aligned_slice, "aligned_slice")
    if ref.shape != ali.shape:
        raise ValueError(f"canny_overlay: reference_slice and aligned_slice must have the same shape, "
                         f"got {ref.shape} and {ali.shape}")
    if sigma <= 0:
        raise ValueError(f"canny_overlay: sigma must be > 0, got {sigma}")
    e_ref = canny(_unit_range(ref), sigma=sigma)
    e_ali = canny(_unit_range(ali), sigma=sigma)
    near = ndimage.binary_dilation(e_ref, structure=np.ones((3, 3), bool))
    agree = float((e_ali & near).sum() / max(int(e_ali.sum()), 1))
    overlay = np.zeros(ref.shape + (4,), dtype=np.float32)
    overlay[e_ref] = (1.0, 0.0, 1.0, 1.0)
    overlay[e_ali] = (0.0, 1.0, 0.0, 1.0)
    overlay[e_ref & e_ali] = (1.0, 1.0, 0.0, 1.0)

    fig, ax = _figure(figsize, dpi)
    lo, hi = _robust_limits(ref)
    im = ax.imshow(np.nan_to_num(ref, nan=lo), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    ax.imshow(overlay, interpolation="nearest")
    _colorbar(fig, ax, im, f"reference grey value ({units})")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=(1, 0, 1), label="reference edges"), Patch(color=(0, 1, 0), label="aligned edges"),
                       Patch(color=(1, 1, 0), label="both")],
              loc="lower right", fontsize=7, framealpha=0.8)
    ax.set_xlabel("x (voxel)")
    ax.set_ylabel("y (voxel)")
    ax.set_title(title or f"Canny edges: {100 * agree:.0f}% of aligned edges within 1 px of reference")
    return _save(fig, path, dpi)


def mse_per_energy(energies, mse_before, mse_after, path, *, title: str | None = None, log: bool = True,
                   figsize=(6.4, 4.0), dpi: int = DPI) -> Path:
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
    figsize, dpi
        See :func:`canny_overlay`.

    Returns
    -------
    Path
    """
    e = _vector(energies, "energies")
    before = _vector(mse_before, "mse_before")
    after = _vector(mse_after, "mse_after")
    if not (e.size == before.size == after.size):
        raise ValueError(f"mse_per_energy: energies, mse_before and mse_after must have the same length, "
                         f"got {e.size}, {before.size}, {after.size}")
    if e.size == 0:
        raise ValueError("mse_per_energy: no energies to plot")
    fig, ax = _figure(figsize, dpi)
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
    ax.set_ylabel("MSE vs reference (grey value$^2$)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ok = (before > 0) & (after > 0)
    gain = f"; median reduction x{np.median(before[ok] / after[ok]):.3g}" if ok.any() else ""
    ax.set_title(title or f"Registration quality per energy{gain}")
    return _save(fig, path, dpi)


# --------------------------------------------------------------------------- helpers

def _figure(figsize, dpi, ncols: int = 1, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=True, **kw)
    return fig, axes


def _save(fig, path, dpi) -> Path:
    from .io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def _colorbar(fig, ax, mappable, label):
    cb = fig.colorbar(mappable, ax=ax, shrink=0.9)
    cb.set_label(label)
    return cb


def _slice2d(a, name):
    a = np.asarray(to_host(a), dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2D (H, W) slice, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def _vector(a, name):
    a = np.asarray(to_host(a), dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1D, got shape {a.shape}")
    return a


def _robust_limits(a, lo=1.0, hi=99.0):
    v = a[np.isfinite(a)]
    if v.size == 0:
        return 0.0, 1.0
    a0, a1 = np.percentile(v, [lo, hi])
    if not a1 > a0:
        a0, a1 = float(v.min()), float(v.max())
    if not a1 > a0:
        a1 = a0 + 1.0
    return float(a0), float(a1)


def _unit_range(a):
    lo, hi = _robust_limits(a)
    return np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
