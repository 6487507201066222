"""Figures of a deformable run: displacement magnitude and Jacobian determinant (folding flagged)."""

from __future__ import annotations

import numpy as np

from .common import new_figure, save_figure

__all__ = ["deformation_figure"]

_DPI = 120


def deformation_figure(magnitude, jacobian, path, *, title: str = ""):
    """Central z-slice of the B-spline displacement magnitude and of the Jacobian determinant.

    Parameters
    ----------
    magnitude : (Z, Y, X) ndarray
        ``|u|`` in voxels (the deformation on top of the affine).
    jacobian : (Z, Y, X) ndarray
        ``det(dq/dp)``; voxels with ``det <= 0`` (folding) are outlined in red
        on the slice with the most of them (the central slice when none fold).
    path : str or Path
        PNG to write.
    title : str
        Figure title.

    Returns
    -------
    Path
    """
    folded = jacobian <= 0
    n_fold = int(folded.sum())
    z = int(np.argmax(folded.sum(axis=(1, 2)))) if n_fold else magnitude.shape[0] // 2
    fig, axes = new_figure((10.0, 4.4), _DPI, 2, squeeze=False)
    im = axes[0].imshow(magnitude[z], cmap="magma", vmin=0, interpolation="nearest")
    fig.colorbar(im, ax=axes[0], shrink=0.85).set_label("|displacement| (voxel)")
    axes[0].set_title(f"B-spline displacement, max {float(magnitude.max()):.2f} vox", fontsize=10)
    spread = max(float(np.abs(jacobian - 1).max()), 1e-3)
    im = axes[1].imshow(jacobian[z], cmap="RdBu_r", vmin=1 - spread, vmax=1 + spread, interpolation="nearest")
    if folded[z].any():
        axes[1].contour(folded[z].astype(float), levels=[0.5], colors="red", linewidths=1.0)
    fig.colorbar(im, ax=axes[1], shrink=0.85).set_label("Jacobian determinant")
    status = f"FOLDING in {n_fold} voxels (det <= 0)" if n_fold else "no folding"
    axes[1].set_title(f"Jacobian det: min {float(jacobian.min()):.3f}, {status}", fontsize=10,
                      color="red" if n_fold else "black")
    for ax in axes:
        ax.set_xlabel("x (voxel)")
    axes[0].set_ylabel("y (voxel)")
    fig.suptitle(f"{title} (z = {z})" if title else f"z = {z}")
    return save_figure(fig, path, _DPI)
