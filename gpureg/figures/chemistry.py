"""Figures of chemical state: reference-fraction maps, cluster maps with centroid spectra, PCA scree plots.

Same habits as :mod:`gpureg.figures.plots`: arrays in (NumPy or CuPy, copied
to the host), a PNG written atomically with the Agg canvas, the ``Path`` out.
Slices are shown with ``origin="upper"`` and voxel-index axes.
"""

from __future__ import annotations

import numpy as np

from ..core.backend import to_host
from .common import DPI, add_colorbar, new_figure, save_figure, series_colours

__all__ = ["cluster_map", "fraction_maps", "scree_plot"]


def fraction_maps(fractions, path, *, names=None, z: int | None = None, labels=None, bins: int = 40,
                  title: str | None = None, figsize=None, dpi: int = DPI):
    """One z-slice of every reference's fraction, and per-particle histograms of the fractions.

    Parameters
    ----------
    fractions : (n_refs, Z, Y, X) ndarray
        From :func:`gpureg.xanes.fit_references` (NaN outside the mask).
    path : str or Path
        Output PNG.
    names : sequence of str, optional
        Reference names.
    z : int, optional
        Slice index (default: the slice with most fitted voxels).
    labels : (Z, Y, X) int ndarray, optional
        Particle labels (0 background); one histogram per particle (else one for all voxels).
    bins : int
        Histogram bins over 0..1.

    Returns
    -------
    Path
    """
    F = np.asarray(to_host(fractions), dtype=np.float64)
    if F.ndim != 4:
        raise ValueError(f"fractions must be (n_refs, Z, Y, X), got shape {F.shape}")
    n = F.shape[0]
    names = [f"ref {j + 1}" for j in range(n)] if names is None else [str(v) for v in names]
    if len(names) != n:
        raise ValueError(f"names: {len(names)} given for {n} references")
    fitted = np.isfinite(F[0])
    if z is None:
        z = int(np.argmax(fitted.reshape(F.shape[1], -1).sum(axis=1)))
    if not 0 <= z < F.shape[1]:
        raise ValueError(f"z={z} is outside 0..{F.shape[1] - 1}")
    lab = None if labels is None else np.asarray(to_host(labels))
    if lab is not None and lab.shape != F.shape[1:]:
        raise ValueError(f"labels {lab.shape} must have the volume shape {F.shape[1:]}")
    fig, axes = new_figure(figsize or (3.6 * n, 6.4), dpi, ncols=n)
    axes = np.atleast_1d(axes)
    fig.clear()
    grid = fig.add_gridspec(2, n)
    edges = np.linspace(0.0, 1.0, bins + 1)
    groups = [("all voxels", fitted)] if lab is None else [(f"particle {int(v)}", (lab == v) & fitted)
                                                           for v in np.unique(lab) if v > 0]
    colours = series_colours(len(groups))
    for j in range(n):
        ax = fig.add_subplot(grid[0, j])
        im = ax.imshow(F[j, z], cmap="magma", vmin=0.0, vmax=1.0, origin="upper", interpolation="nearest")
        ax.set_title(f"{names[j]} (z={z})")
        ax.set_xlabel("x (voxel)")
        ax.set_ylabel("y (voxel)")
        add_colorbar(fig, ax, im, "fraction")
        hx = fig.add_subplot(grid[1, j])
        for (label, sel), c in zip(groups, colours):
            v = F[j][sel]
            v = v[np.isfinite(v)]
            if v.size:
                hx.hist(np.clip(v, 0, 1), bins=edges, histtype="step", color=c, density=True,
                        label=f"{label}: {np.median(v):.2f}")
        hx.set_xlabel(f"fraction of {names[j]}")
        hx.set_ylabel("density")
        hx.legend(fontsize="small", title="median")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi)


def cluster_map(clusters, centroids, energies, path, *, z: int | None = None, title: str | None = None,
                figsize=(11.0, 4.6), dpi: int = DPI):
    """A z-slice of the cluster labels beside the clusters' centroid spectra, in the same colours.

    Parameters
    ----------
    clusters : (Z, Y, X) int ndarray
        1..k (0: not clustered), from :func:`gpureg.xanes.cluster_spectra`.
    centroids : (k, n_energy) ndarray
        Centroid (normalised) spectra.
    energies : (n_energy,) array_like
        eV.
    path : str or Path
        Output PNG.
    z : int, optional
        Slice (default: the one with most clustered voxels).

    Returns
    -------
    Path
    """
    from matplotlib.colors import ListedColormap

    L = np.asarray(to_host(clusters))
    C = np.asarray(to_host(centroids), dtype=np.float64)
    E = np.asarray(to_host(energies), dtype=np.float64).reshape(-1)
    if L.ndim != 3:
        raise ValueError(f"clusters must be (Z, Y, X), got shape {L.shape}")
    if C.ndim != 2 or C.shape[1] != E.size:
        raise ValueError(f"centroids must be (k, n_energy={E.size}), got shape {C.shape}")
    k = C.shape[0]
    if z is None:
        z = int(np.argmax((L > 0).reshape(L.shape[0], -1).sum(axis=1)))
    if not 0 <= z < L.shape[0]:
        raise ValueError(f"z={z} is outside 0..{L.shape[0] - 1}")
    colours = series_colours(k)
    cmap = ListedColormap([(1, 1, 1, 1)] + list(colours))
    fig, (ax, sx) = new_figure(figsize, dpi, ncols=2)
    im = ax.imshow(L[z], cmap=cmap, vmin=-0.5, vmax=k + 0.5, origin="upper", interpolation="nearest")
    ax.set_title(f"clusters (z={z})")
    ax.set_xlabel("x (voxel)")
    ax.set_ylabel("y (voxel)")
    cb = add_colorbar(fig, ax, im, "cluster")
    cb.set_ticks(range(0, k + 1))
    counts = [(L == j + 1).sum() for j in range(k)]
    for j in range(k):
        sx.plot(E, C[j], color=colours[j], label=f"cluster {j + 1} ({counts[j]} voxels)")
    sx.set_xlabel("energy (eV)")
    sx.set_ylabel("normalised absorption")
    sx.set_title("centroid spectra")
    sx.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi)


def scree_plot(explained_variance_ratio, path, *, title: str | None = None, figsize=(5.6, 4.2), dpi: int = DPI):
    """Explained variance ratio per principal component (bars) and cumulative (line), log scale.

    Parameters
    ----------
    explained_variance_ratio : (n,) array_like
        From :func:`gpureg.xanes.spectral_components`.
    path : str or Path
        Output PNG.

    Returns
    -------
    Path
    """
    r = np.asarray(to_host(explained_variance_ratio), dtype=np.float64).reshape(-1)
    if r.size == 0 or not np.isfinite(r).all():
        raise ValueError(f"explained_variance_ratio must be a finite, non-empty 1D array, got {r!r}")
    fig, ax = new_figure(figsize, dpi)
    idx = np.arange(1, r.size + 1)
    ax.bar(idx, np.maximum(r, 1e-12), color="tab:blue", label="component")
    ax.plot(idx, np.minimum(np.cumsum(r), 1.0), "o-", color="tab:orange", label="cumulative")
    ax.set_yscale("log")
    ax.set_xlabel("component")
    ax.set_ylabel("explained variance ratio")
    ax.set_xticks(idx)
    ax.legend(fontsize="small")
    ax.set_title(title or "PCA scree plot")
    return save_figure(fig, path, dpi)
