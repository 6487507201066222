"""Figure of a run with ``--align-projections``: shifts per energy and angle, reprojection error before/after."""

from __future__ import annotations

import numpy as np

from .common import new_figure, save_figure

__all__ = ["alignment_figure"]

_DPI = 110


def alignment_figure(theta_deg, energies, shifts, error_before, error_after, path, *, status=None):
    """Heat maps of the row and column shift of every projection, and the reprojection error per energy.

    Parameters
    ----------
    theta_deg : (n_angle,) array_like
        Angles (degrees).
    energies : (n_energy,) array_like
        eV.
    shifts : (n_energy, n_angle, 2) array_like
        Estimated ``(row, column)`` shifts (pixels; NaN rows for energies not aligned).
    error_before, error_after : (n_energy,) array_like
        Relative reprojection error of the unaligned and the aligned projections.
    path : str or Path
        PNG to write.
    status : sequence of str, optional
        Per energy ``"aligned"``, ``"unchanged"`` or ``"fallback"``; energies not aligned are marked.

    Returns
    -------
    Path
    """
    theta = np.asarray(theta_deg, dtype=np.float64)
    e = np.asarray(energies, dtype=np.float64)
    s = np.asarray(shifts, dtype=np.float64)
    if s.shape != (e.size, theta.size, 2):
        raise ValueError(f"shifts must be ({e.size}, {theta.size}, 2), got {s.shape}")
    lim = max(float(np.nanmax(np.abs(s))) if np.isfinite(s).any() else 0.0, 0.1)
    fig, axes = new_figure((13.5, 4.2), _DPI, 3, squeeze=False)
    extent = (theta[0], theta[-1], -0.5, e.size - 0.5)
    for ax, k, label in ((axes[0], 0, "row"), (axes[1], 1, "column")):
        im = ax.imshow(s[:, :, k], aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim,
                       extent=extent, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.9).set_label(f"{label} shift (px)")
        ax.set_xlabel("angle (deg)")
        ax.set_title(f"{label} shift per projection", fontsize=10)
    step = max(1, e.size // 8)
    axes[0].set_yticks(range(0, e.size, step), [f"{v:.0f}" for v in e[::step]])
    axes[0].set_ylabel("energy (eV)")
    axes[1].set_yticks([])
    ax = axes[2]
    ax.plot(e, error_before, "o-", color="tab:red", ms=3, label="before")
    ax.plot(e, error_after, "o-", color="tab:blue", ms=3, label="after")
    if status is not None:
        bad = np.array([st != "aligned" for st in status])
        if bad.any():
            ax.plot(e[bad], np.asarray(error_before)[bad], "kx", ms=8, label="not applied")
    ax.set_xlabel("energy (eV)")
    ax.set_ylabel("relative reprojection error")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("reprojection error |p - P(FBP(p))| / |p|", fontsize=10)
    return save_figure(fig, path, _DPI)
