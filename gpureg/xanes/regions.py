"""Summaries of XANES maps over regions: ROI spectra (labels or index boxes) and per-particle edge-energy distributions.

Particles are connected components of a mask (labels on the reference grid);
boxes are index ranges. The stack is read one energy (or one box) at a time.
"""

from __future__ import annotations

import math

import numpy as np

from ..core.backend import to_host, xp_of
from .edge import edge_energy, normalize
from ..core.energies import check_energies
from .spectra import MIN_ENERGIES
from .stack import volume_getter

__all__ = ["edge_distribution", "roi_spectra"]


def roi_spectra(stack, energies, labels_or_boxes, *, names=None, pre=None, post=None) -> dict:
    """Mean and spread of the spectra in regions (particle labels or index boxes).

    Parameters
    ----------
    stack : (n_energy, Z, Y, X) array-like, or sequence of (Z, Y, X) volumes
        As in :func:`edge_energy_map`; read one energy at a time (or one box).
    energies : (n_energy,) array_like
        Strictly increasing, eV.
    labels_or_boxes : (Z, Y, X) int ndarray, or sequence of boxes
        Labels: one region per nonzero label present. Boxes: each a tuple of
        3 ``slice`` objects or 3 ``(start, stop)`` pairs of voxel indices.
    names : sequence of str, optional
        Region names (default ``"particle <k>"`` / ``"box <k>"``).
    pre, post : (float, float), optional
        Fit ranges for the normalised mean spectra.

    Returns
    -------
    dict
        ``energy`` (n_energy,) eV; ``region`` (n_roi,) int (label or box
        index); ``names`` list of str; ``count`` (n_roi,) voxels;
        ``mean``, ``std`` (n_roi, n_energy) over finite voxels, input units;
        ``norm`` (n_roi, n_energy) the normalised mean spectrum;
        ``edge_energy`` (n_roi,) eV, 0.5 crossing of ``norm`` (NaN if none).
    """
    E = check_energies(energies, increasing=True, min_count=MIN_ENERGIES)
    get, shape = volume_getter(stack, E.size)
    boxes = None
    if hasattr(labels_or_boxes, "shape") and len(labels_or_boxes.shape) == 3:
        lab = np.asarray(to_host(labels_or_boxes))
        if lab.shape != shape:
            raise ValueError(f"roi_spectra: labels must have the volume shape {shape}, got {lab.shape}")
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"roi_spectra: labels must be integers, got dtype {lab.dtype}")
        region = np.unique(lab[lab > 0]).astype(np.int64)
        if region.size == 0:
            raise ValueError("roi_spectra: the label volume has no nonzero label")
        default = [f"particle {k}" for k in region]
    else:
        boxes = [_box(b, shape, k) for k, b in enumerate(labels_or_boxes)]
        if not boxes:
            raise ValueError("roi_spectra: no boxes given")
        region = np.arange(len(boxes))
        default = [f"box {k}" for k in region]
    names = list(default if names is None else names)
    if len(names) != region.size:
        raise ValueError(f"roi_spectra: {region.size} regions but {len(names)} names")
    n_roi = region.size
    s1 = np.zeros((n_roi, E.size))
    s2 = np.zeros((n_roi, E.size))
    cnt = np.zeros((n_roi, E.size))
    if boxes is None:
        lut = np.zeros(int(lab.max()) + 1, dtype=np.int64)
        lut[region] = np.arange(1, n_roi + 1)
        idx = lut[lab].ravel()
    for i in range(E.size):
        vol = get(i)
        if boxes is None:
            xp = xp_of(vol)
            v = xp.asarray(vol, dtype=xp.float64).ravel()
            ok = xp.isfinite(v)
            ii = xp.asarray(idx)
            w = xp.where(ok, v, 0.0)
            okf = ok.astype(xp.float64)
            cnt[:, i] = to_host(xp.bincount(ii, weights=okf, minlength=n_roi + 1))[1:]
            s1[:, i] = to_host(xp.bincount(ii, weights=w, minlength=n_roi + 1))[1:]
            s2[:, i] = to_host(xp.bincount(ii, weights=w * w, minlength=n_roi + 1))[1:]
        else:
            for r, b in enumerate(boxes):
                v = np.asarray(to_host(vol[b]), dtype=np.float64).ravel()
                v = v[np.isfinite(v)]
                cnt[r, i], s1[r, i], s2[r, i] = v.size, v.sum(), (v * v).sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / cnt
        std = np.sqrt(np.maximum(s2 / cnt - mean * mean, 0.0))
    count = cnt.min(axis=1).astype(np.int64)
    norm = np.full(mean.shape, np.nan, np.float32)
    edge = np.full(n_roi, np.nan, np.float32)
    ok = np.isfinite(mean).all(axis=1)
    if ok.any():
        norm[ok] = normalize(mean[ok].T, E, pre=pre, post=post).T
        res = edge_energy(mean[ok].T, E, pre=pre, post=post, min_jump=0.0)
        edge[ok] = res["edge_energy"]
    return {"energy": E, "region": region, "names": names, "count": count, "mean": mean.astype(np.float32),
            "std": std.astype(np.float32), "norm": norm, "edge_energy": edge}


def edge_distribution(edge_map, labels, *, bins: int = 60, range=None, mask=None, bandwidth: float | None = None,
                      grid_points: int = 512) -> dict:
    """Per-particle histogram and kernel density of edge energies.

    Parameters
    ----------
    edge_map : (Z, Y, X) ndarray
        Edge energies (eV); NaN where masked.
    labels : (Z, Y, X) int ndarray
        Particle labels (0 background).
    bins : int
        Histogram bins over ``range``.
    range : (float, float), optional
        eV; default the 0.5-99.5 % percentiles of all labelled finite values,
        widened by 10 % on each side.
    mask : (Z, Y, X) bool ndarray, optional
        Only these voxels count.
    bandwidth : float, optional
        Gaussian kernel sigma (eV); default Silverman's rule per particle
        (never below the KDE grid spacing).
    grid_points : int
        Points of the density grid over ``range``.

    Returns
    -------
    dict
        ``label`` (n,) int; ``count`` (n,) voxels used; ``mean``, ``median``,
        ``std`` (n,) eV; ``bin_edges`` (bins + 1,); ``hist`` (n, bins)
        probability density (1/eV, integrates to 1); ``grid`` (grid_points,)
        eV; ``density`` (n, grid_points) kernel density (1/eV, integrates to
        1 over the grid); ``bandwidth`` (n,) eV.
    """
    em = np.asarray(to_host(edge_map), dtype=np.float64)
    lab = np.asarray(to_host(labels))
    if em.shape != lab.shape:
        raise ValueError(f"edge_distribution: edge_map {em.shape} and labels {lab.shape} must have the same shape")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"edge_distribution: labels must be integers, got dtype {lab.dtype}")
    if int(bins) < 1 or int(grid_points) < 8:
        raise ValueError(f"edge_distribution: bins must be >= 1 and grid_points >= 8, got {bins}, {grid_points}")
    ok = np.isfinite(em) & (lab > 0)
    if mask is not None:
        m = np.asarray(to_host(mask), dtype=bool)
        if m.shape != em.shape:
            raise ValueError(f"edge_distribution: mask {m.shape} must have the shape of edge_map {em.shape}")
        ok &= m
    label = np.unique(lab[lab > 0]).astype(np.int64)
    if label.size == 0:
        raise ValueError("edge_distribution: the label volume has no nonzero label")
    vals = em[ok]
    if vals.size == 0:
        raise ValueError("edge_distribution: no labelled voxel has a finite edge energy")
    if range is None:
        lo, hi = np.percentile(vals, [0.5, 99.5])
        pad = 0.1 * (hi - lo) if hi > lo else 1.0
        range = (lo - pad, hi + pad)
    lo, hi = float(range[0]), float(range[1])
    if not hi > lo:
        raise ValueError(f"edge_distribution: range must be increasing, got {range}")
    edges = np.linspace(lo, hi, int(bins) + 1)
    grid = np.linspace(lo, hi, int(grid_points))
    dg = grid[1] - grid[0]
    fine_edges = np.r_[grid - dg / 2, grid[-1] + dg / 2]
    n = label.size
    hist = np.zeros((n, int(bins)))
    dens = np.zeros((n, grid.size))
    stats = np.full((4, n), np.nan)
    bw = np.full(n, np.nan)
    by_label = lab[ok]
    for k, lb in enumerate(label):
        v = vals[by_label == lb]
        stats[0, k] = v.size
        if v.size == 0:
            continue
        stats[1, k], stats[2, k], stats[3, k] = v.mean(), np.median(v), v.std()
        h, _ = np.histogram(v, bins=edges)
        if h.sum():
            hist[k] = h / (h.sum() * np.diff(edges))
        if bandwidth is None:
            q75, q25 = np.percentile(v, [75, 25])
            spread = min(v.std(), (q75 - q25) / 1.34) if q75 > q25 else v.std()
            b = 0.9 * spread * v.size ** (-0.2)
        else:
            b = float(bandwidth)
        b = max(b, dg)
        bw[k] = b
        c, _ = np.histogram(v, bins=fine_edges)
        half = int(math.ceil(4 * b / dg))
        t = np.arange(-half, half + 1) * dg
        kern = np.exp(-0.5 * (t / b) ** 2)
        d = np.convolve(c.astype(np.float64), kern, mode="full")[half: half + grid.size]
        if d.sum() > 0:
            dens[k] = d / (d.sum() * dg)
    return {"label": label, "count": stats[0].astype(np.int64), "mean": stats[1], "median": stats[2], "std": stats[3],
            "bin_edges": edges, "hist": hist, "grid": grid, "density": dens, "bandwidth": bw}


def _box(b, shape, k):
    if len(b) != 3:
        raise ValueError(f"roi_spectra: box {k} must have 3 (z, y, x) ranges, got {b!r}")
    out = []
    for ax, r in enumerate(b):
        s = r if isinstance(r, slice) else slice(int(r[0]), int(r[1]))
        start, stop, step = s.indices(shape[ax])
        if stop <= start or step != 1:
            raise ValueError(f"roi_spectra: box {k} axis {ax} range {r!r} is empty or strided for size {shape[ax]}")
        out.append(slice(start, stop))
    return tuple(out)
