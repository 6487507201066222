"""What every figure shares: an Agg figure without pyplot, atomic PNG writing, colour limits and input checks.

Figures take arrays (NumPy or CuPy; copied to the host), write a PNG
atomically and return its ``Path``. Figure size is ``figsize`` inches at
``dpi`` (no tight cropping), so a figure's pixel size is known in advance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.backend import to_host

__all__ = ["add_colorbar", "as_slice2d", "as_vector", "DPI", "EDGE_CMAP", "map_limits", "masked_map", "median_mse_ratio",
           "new_figure",
           "physical_axes", "robust_limits", "save_figure", "series_colours", "unit_range"]

DPI = 100
EDGE_CMAP = "viridis"


def new_figure(figsize, dpi, ncols: int = 1, *, nrows: int = 1, squeeze: bool = True, **kw):
    """A matplotlib ``Figure`` on an Agg canvas (no pyplot) with ``nrows`` rows of ``ncols`` axes.

    ``squeeze=False`` returns the axes as a 1D array even for one column (one row), or a 2D
    ``(nrows, ncols)`` array when ``nrows > 1``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, **kw)
    return fig, (axes if squeeze or nrows > 1 else axes[0])


def save_figure(fig, path, dpi) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically; return the ``Path``."""
    from ..io.files import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def add_colorbar(fig, ax, mappable, label):
    cb = fig.colorbar(mappable, ax=ax, shrink=0.9)
    cb.set_label(label)
    return cb


def as_slice2d(a, name):
    a = np.asarray(to_host(a), dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2D (H, W) slice, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    return a


def as_vector(a, name):
    a = np.asarray(to_host(a), dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1D, got shape {a.shape}")
    return a


def physical_axes(ax, voxel_nm, names=("y", "x")):
    """Label an image's axes ``names = (rows, columns)``: in micrometres with a scale bar when the voxel size
    (nm) is known, else in voxel indices. The image stays in voxel coordinates (ticks are relabelled)."""
    if not voxel_nm or not np.isfinite(voxel_nm) or voxel_nm <= 0:
        ax.set_xlabel(f"{names[1]} (voxel)")
        ax.set_ylabel(f"{names[0]} (voxel)")
        return
    from matplotlib.ticker import FuncFormatter, MultipleLocator
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    um = float(voxel_nm) / 1000.0
    span = abs(np.diff(ax.get_xlim())[0]) * um
    step = _nice(span / 4)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MultipleLocator(step / um))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * um:.4g}"))
    ax.set_xlabel(f"{names[1]} (\u00b5m)")
    ax.set_ylabel(f"{names[0]} (\u00b5m)")
    bar = _nice(span / 5)
    ax.add_artist(AnchoredSizeBar(ax.transData, bar / um, f"{bar:.4g} \u00b5m", "lower right", pad=0.4,
                                  color="white", frameon=False, size_vertical=max(0.5, 0.01 * span / um)))


def robust_limits(a, lo=1.0, hi=99.0):
    v = a[np.isfinite(a)]
    if v.size == 0:
        return 0.0, 1.0
    a0, a1 = np.percentile(v, [lo, hi])
    if not a1 > a0:
        a0, a1 = float(v.min()), float(v.max())
    if not a1 > a0:
        a1 = a0 + 1.0
    return float(a0), float(a1)


def unit_range(a):
    lo, hi = robust_limits(a)
    return np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def masked_map(a, mask, name):
    m = np.asarray(to_host(a), dtype=np.float64)
    if m.size == 0:
        raise ValueError(f"{name} is empty")
    if mask is not None:
        mk = np.asarray(to_host(mask), dtype=bool)
        if mk.shape != m.shape:
            raise ValueError(f"mask {mk.shape} must have the shape of {name} {m.shape}")
        m = np.where(mk, m, np.nan)
    return m


def map_limits(m, vmin, vmax):
    lo, hi = robust_limits(m)
    lo = lo if vmin is None else float(vmin)
    hi = hi if vmax is None else float(vmax)
    if not hi > lo:
        raise ValueError(f"colour range must be increasing, got vmin={lo}, vmax={hi}")
    return lo, hi


def median_mse_ratio(mse_before, mse_after) -> float:
    """Median over energies of ``mse_before / mse_after`` (energies with both positive; NaN when none).

    The one statistic of registration gain shown by ``mse_per_energy.png`` and ``report.md``.
    """
    b, a = np.asarray(mse_before, dtype=np.float64), np.asarray(mse_after, dtype=np.float64)
    ok = (b > 0) & (a > 0)
    return float(np.median(b[ok] / a[ok])) if ok.any() else float("nan")


def _nice(x):
    """1, 2 or 5 times a power of ten, at most ``x`` (``x`` > 0)."""
    p = 10.0 ** np.floor(np.log10(x))
    return float(max(m for m in (1.0, 2.0, 5.0, 10.0) if m * p <= x * (1 + 1e-9)) * p)


def series_colours(n):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(k % 10) for k in range(n)]
