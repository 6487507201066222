"""The pipeline: projections -> FBP -> binarize -> register -> align -> XANES -> report.

Energies stream one at a time: the reference is reconstructed first, then the
others in order of distance from it; while one registers, the next is read
and reconstructed in a worker thread. Everything is written to
``OUTPUT.partial`` as it completes (flushed per energy, with a ``done`` flag),
so rerunning the same command after an interruption resumes where it stopped
and gives the same result; the finished file is renamed onto ``OUTPUT``
(atomic) and never overwritten without ``overwrite=True``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def particle_mse_figure(energies, mse_g, mse_p, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..io.files import atomic_path

    fig = Figure(figsize=(6.4, 4.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def edge_maps_figure(maps, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..io.files import atomic_path

    first = next(iter(maps.values()))
    z = int(np.argmax(np.isfinite(first).sum(axis=(1, 2))))
    vals = np.concatenate([m[z][np.isfinite(m[z])] for m in maps.values()])
    lo, hi = (np.percentile(vals, [1, 99]) if vals.size else (0.0, 1.0))
    fig = Figure(figsize=(4.2 * len(maps) + 1.0, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(maps))
    for ax, (name, m) in zip(axes, maps.items()):
        ax.set_facecolor("0.15")
        im = ax.imshow(m[z], cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("x (voxel)")
    axes[0].set_ylabel("y (voxel)")
    fig.colorbar(im, ax=list(axes), shrink=0.85).set_label("Edge energy (eV)")
    fig.suptitle(f"Edge energy, z = {z}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
