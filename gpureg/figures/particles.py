"""Figures of a per-particle or deformable run: MSE per energy (global vs per-particle), edge-energy maps side by
side, and the difference between a mode's map and the affine map."""

from __future__ import annotations

import numpy as np

from .common import new_figure, save_figure

__all__ = ["difference_map_figure", "edge_maps_figure", "particle_mse_figure"]

_DPI = 120


def particle_mse_figure(energies, mse_g, mse_p, path):
    """Residual MSE per energy inside each particle, global (dashed) vs per-particle (solid) registration.

    ``mse_g``, ``mse_p``: (n_energy, 1 + n_particle) arrays (column 0: the whole grid). Returns the ``Path``.
    """
    fig, ax = new_figure((6.4, 4.0), _DPI)
    order = np.argsort(energies)
    colours = ["0.3", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for k in range(mse_g.shape[1]):
        name, c = ("whole grid" if k == 0 else f"particle {k}"), colours[k % len(colours)]
        for y, style, what in ((mse_g, "--", "global"), (mse_p, "-", "per-particle")):
            v = y[order, k].copy()
            v[~(v > 0)] = np.nan
            ax.plot(energies[order], v, style, color=c, marker="o" if style == "-" else None, ms=3, lw=1.2,
                    label=f"{name}, {what}")
    if np.isfinite(np.where(mse_g > 0, mse_g, np.nan)).any():
        ax.set_yscale("log")
    ax.set_xlabel("Energy (eV)")
    ax.set_ylabel("Residual MSE (registration inputs)")
    ax.set_title("Residual inside each particle: global vs per-particle registration", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path, _DPI)


def edge_maps_figure(maps, path):
    """Edge-energy maps side by side (``{name: (Z, Y, X) map}``) at the z-plane with most valid voxels."""
    first = next(iter(maps.values()))
    z = int(np.argmax(np.isfinite(first).sum(axis=(1, 2))))
    vals = np.concatenate([m[z][np.isfinite(m[z])] for m in maps.values()])
    lo, hi = (np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0))
    fig, axes = new_figure((4.2 * len(maps) + 1.0, 4.2), _DPI, len(maps), squeeze=False)
    for ax, (name, m) in zip(axes, maps.items()):
        ax.set_facecolor("0.15")
        im = ax.imshow(m[z], cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x (voxel)")
    axes[0].set_ylabel("y (voxel)")
    fig.colorbar(im, ax=list(axes), shrink=0.85).set_label("Edge energy (eV)")
    fig.suptitle(f"Edge energy, z = {z}")
    return save_figure(fig, path, _DPI)


def difference_map_figure(difference, path, *, title: str):
    """A map difference (eV, NaN outside) at the z-plane with most valid voxels, on a symmetric diverging scale."""
    z = int(np.argmax(np.isfinite(difference).sum(axis=(1, 2))))
    vals = np.abs(difference[z][np.isfinite(difference[z])])
    lim = float(np.percentile(vals, 99)) if vals.size else 1.0
    fig, ax = new_figure((5.4, 4.6), _DPI)
    ax.set_facecolor("0.15")
    im = ax.imshow(difference[z], cmap="RdBu_r", vmin=-max(lim, 1e-3), vmax=max(lim, 1e-3), interpolation="nearest")
    ax.set_xlabel("x (voxel)")
    ax.set_ylabel("y (voxel)")
    fig.colorbar(im, ax=ax, shrink=0.85).set_label("Edge energy difference (eV)")
    ax.set_title(f"{title}, z = {z}", fontsize=10)
    return save_figure(fig, path, _DPI)
