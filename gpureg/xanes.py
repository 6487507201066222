"""XANES chemical mapping: per-voxel edge energy, edge jump and white line.

Every voxel of an aligned energy stack carries an absorption spectrum
``mu(E)``. This module normalises it the usual way (Athena/Larch): a line is
fitted to the pre-edge and another to the post-edge region, the pre-edge line
is subtracted and the result divided by the edge jump (post-line minus
pre-line at the edge). From the normalised spectrum it measures

* the **edge energy**: where the normalised spectrum first crosses 0.5
  (linear interpolation between samples, ``method="half"``), or where
  ``dmu/dE`` is largest after light Gaussian smoothing (the Larch ``E0``
  definition, ``method="derivative"``; parabolic refinement of the peak);
* the **edge jump** (in the units of the input);
* the **white-line** energy: peak of the normalised spectrum above the edge.

Voxels whose jump is too small (background) or whose spectrum has a non-finite
value are masked out. Particles are connected components of a mask; ROI
spectra and per-particle edge-energy distributions summarise them.

Convention
----------
Spectra are ``(n_energy, ...)`` with the energy axis first; maps have shape
``spectra.shape[1:]``. Energies are in eV and strictly increasing. All array
code is written once against ``xp`` (NumPy or CuPy): results come back on the
input's device. The line fits are the same linear map for every voxel, so they
are one small matrix product ``(4, n_energy) @ (n_energy, n_voxel)``; the
edge search runs only over the energies between the two fit ranges.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np

from .backend import ndimage_of, resolve_device, to_device, to_host, xp_of

__all__ = [
    "METHODS",
    "edge_distribution",
    "edge_energy",
    "edge_energy_map",
    "edge_ranges",
    "normalize",
    "particle_labels",
    "roi_spectra",
    "scan_energies",
    "synthetic_spectra",
    "write_xanes",
]

METHODS = ("half", "derivative", "both")

_log = logging.getLogger("gpureg")

# Automatic edge-jump threshold: this fraction of the 99.5th percentile of the
# positive jumps (background voxels have a jump near zero; particles near 1 in
# normalised units). Pass min_jump= to set an absolute threshold instead.
MIN_JUMP_FRACTION = 0.1
_PERCENTILE_SAMPLE = 1 << 20
# Default gaps (eV) between the edge and the fit ranges when the grid has no
# distinct fine-step region (uniform scans).
PRE_GAP_EV = 20.0
POST_GAP_EV = 40.0


def scan_energies(start: float = 6480.0, stop: float = 6710.0, *, fine=(6528.0, 6600.0), fine_step: float = 3.0,
                  coarse_step: float = 15.0) -> np.ndarray:
    """Energy grid of a typical TXM-XANES scan: coarse away from the edge, fine across it.

    The defaults mimic a Mn K-edge scan (edge near 6540-6555 eV): 15 eV steps
    from 6480 eV, 3 eV steps over 6528-6600 eV, then 15 eV steps to 6710 eV
    (36 energies). ``fine_step=1.5`` gives 60 energies.

    Returns
    -------
    (n_energy,) ndarray of float64
        Strictly increasing, eV.
    """
    f0, f1 = (float(v) for v in fine)
    if not (start < f0 < f1 < stop) or fine_step <= 0 or coarse_step <= 0:
        raise ValueError(f"scan_energies: need start < fine[0] < fine[1] < stop and positive steps, got "
                         f"start={start}, fine={fine}, stop={stop}, fine_step={fine_step}, coarse_step={coarse_step}")
    eps = 1e-9
    e = np.r_[np.arange(start, f0 - eps, coarse_step), np.arange(f0, f1 + eps, fine_step),
              np.arange(f1 + coarse_step, stop + eps, coarse_step)]
    return np.unique(np.round(e, 6))


def synthetic_spectra(energies, e0, *, jump=1.0, width=3.0, white_line=0.5, wl_offset=8.0, wl_width=4.0,
                      pre_offset=0.1, pre_slope=-2e-4, post_slope=-1e-3):
    """Model K-edge spectra with a known edge: error-function step, Gaussian white line, sloped lines.

    ``mu(E) = p(E) + S(E) (q(E) - p(E)) + jump * W(E)`` with the pre-edge line
    ``p(E) = pre_offset + pre_slope (E - e0)``, the post-edge line
    ``q(E) = p(E) + jump (1 + post_slope (E - e0))``, the step
    ``S = (1 + erf((E - e0) / width)) / 2`` and the white line
    ``W = white_line exp(-((E - e0 - wl_offset) / wl_width)^2 / 2)``.
    Far from the edge (more than ~4 ``width`` below, ~5 ``wl_width`` above)
    ``mu`` equals the lines to float precision, so a line fit there is exact.
    ``e0`` is the step's midpoint; the 0.5 crossing of the normalised
    spectrum is slightly below it when a white line overlaps the step.

    Parameters
    ----------
    energies : (n_energy,) array_like
        eV.
    e0 : float or ndarray (...)
        Step centres, eV. Its array module (NumPy/CuPy) and shape set the
        output's; the other parameters broadcast against it.

    Returns
    -------
    (n_energy, ...) ndarray of float32
    """
    xp = xp_of(e0) if hasattr(e0, "shape") else np
    e0 = xp.asarray(e0, dtype=xp.float64)
    E = xp.asarray(np.asarray(to_host(energies), dtype=np.float64)).reshape((-1,) + (1,) * e0.ndim)
    p = [xp.asarray(v, dtype=xp.float64) if not np.isscalar(v) else v
         for v in (jump, width, white_line, wl_offset, wl_width, pre_offset, pre_slope, post_slope)]
    jump, width, white_line, wl_offset, wl_width, pre_offset, pre_slope, post_slope = p
    x = E - e0
    erf = _erf(xp)
    step = 0.5 * (1.0 + erf(x / width))
    pre = pre_offset + pre_slope * x
    peak = white_line * xp.exp(-0.5 * ((x - wl_offset) / wl_width) ** 2)
    mu = pre + step * jump * (1.0 + post_slope * x) + jump * peak
    return mu.astype(xp.float32)


def edge_ranges(energies, spectrum=None, *, pre=None, post=None) -> dict:
    """Pre-edge and post-edge fit ranges (eV) chosen from the energy grid.

    Rules, in order:

    1. ``pre`` / ``post`` given: used as they are (each must hold >= 2 energies).
    2. The grid has a distinct fine-step region (steps <= 0.6 x the largest
       step, >= 4 steps long, with >= 2 coarse energies on each side), as
       beamline scans put fine steps across the edge: the pre-edge range is
       every energy up to the region's start, the post-edge range every energy
       from its end.
    3. Otherwise the edge ``e0`` is estimated from ``spectrum`` (maximum of its
       derivative) and the ranges are ``E <= e0 - 20 eV`` and ``E >= e0 + 40 eV``.
    4. Failing that (no spectrum, or a range would hold < 2 energies): the
       first sixth and the last quarter of the grid (at least 2 energies each),
       with a warning.

    Parameters
    ----------
    energies : (n_energy,) array_like
        Strictly increasing, eV.
    spectrum : (n_energy,) array_like, optional
        A representative spectrum (e.g. the mean over voxels), for rule 3.
    pre, post : (float, float), optional
        Inclusive energy ranges (eV) that override the automatic choice.

    Returns
    -------
    dict
        ``pre`` and ``post``: ``(lo, hi)`` in eV (inclusive, snapped to grid
        energies); ``e0``: a reference edge energy (eV) used to start the
        jump estimate; ``rule``: which rule chose the ranges.
    """
    E = _check_energies(energies)
    n = E.size
    rule = "given"
    e0 = None
    if pre is None or post is None:
        auto = _fine_region(E)
        rule = "fine-step region of the grid"
        if auto is None and spectrum is not None:
            spec = np.asarray(to_host(spectrum), dtype=np.float64)
            if spec.shape != E.shape:
                raise ValueError(f"edge_ranges: spectrum must have shape {E.shape}, got {spec.shape}")
            if np.isfinite(spec).all():
                e0 = _derivative_peak_1d(E, spec)
                lo_idx = np.flatnonzero(E <= e0 - PRE_GAP_EV)
                hi_idx = np.flatnonzero(E >= e0 + POST_GAP_EV)
                if lo_idx.size >= 2 and hi_idx.size >= 2:
                    auto = (E[0], E[lo_idx[-1]], E[hi_idx[0]], E[-1])
                    rule = "edge of the mean spectrum +- gaps"
        if auto is None:
            k_pre, k_post = max(2, n // 6), max(2, n // 4)
            if k_pre + k_post + 1 > n:
                raise ValueError(f"edge_ranges: {n} energies are too few to fit pre-edge and post-edge lines "
                                 f"(need at least 5)")
            auto = (E[0], E[k_pre - 1], E[n - k_post], E[-1])
            rule = "grid fractions (fallback)"
            warnings.warn(f"edge_ranges: no fine-step region in the energy grid and no usable spectrum; using the "
                          f"first {k_pre} energies as pre-edge and the last {k_post} as post-edge "
                          f"(pass pre=/post= to choose)", stacklevel=2)
        pre = (auto[0], auto[1]) if pre is None else pre
        post = (auto[2], auto[3]) if post is None else post
    pre = _snap_range(E, pre, "pre")
    post = _snap_range(E, post, "post")
    if pre[1] >= post[0]:
        raise ValueError(f"edge_ranges: pre-edge range {pre} must end below the post-edge range {post}")
    i_lo, i_hi = int(np.searchsorted(E, pre[1])), int(np.searchsorted(E, post[0]))
    if i_hi - i_lo < 2:
        raise ValueError(f"edge_ranges: no energy lies between the pre-edge range {pre} and the post-edge range "
                         f"{post}; the edge cannot be located")
    if e0 is None or not (pre[1] < e0 < post[0]):
        e0 = 0.5 * (pre[1] + post[0])
    return {"pre": pre, "post": post, "e0": float(e0), "rule": rule}


def edge_energy(spectra, energies, *, method: str = "half", pre=None, post=None, min_jump: float | None = None,
                smooth: float = 1.0, mask=None, e0: float | None = None) -> dict:
    """Per-spectrum edge energy, edge jump and white-line energy.

    Parameters
    ----------
    spectra : (n_energy, ...) ndarray
        NumPy or CuPy; absorption ``mu`` per energy (any units, e.g. the
        reconstructed attenuation). Converted to float32.
    energies : (n_energy,) array_like
        Strictly increasing, eV; at least 5.
    method : {"half", "derivative", "both"}
        Edge energy as the first 0.5 crossing of the normalised spectrum, or
        as the maximum of the smoothed ``dmu/dE``; ``"both"`` returns the
        crossing as ``edge_energy`` and the derivative peak as ``e0_derivative``.
    pre, post : (float, float), optional
        Inclusive fit ranges in eV; chosen by :func:`edge_ranges` when None.
    min_jump : float, optional
        Voxels with an edge jump at or below this value are masked out.
        Default: ``0.1 x`` the 99.5th percentile of the positive jumps. A
        jump <= 0 is always masked.
    smooth : float
        Gaussian sigma (eV) applied to ``dmu/dE`` before its maximum is taken
        (``method="derivative"``/``"both"``); 0 disables smoothing.
    mask : (...) ndarray of bool, optional
        Extra mask (e.g. the binarized reference); voxels outside it are masked.
    e0 : float, optional
        Energy (eV) at which the jump is first evaluated (refined per voxel at
        its own edge afterwards); default from :func:`edge_ranges`.

    Returns
    -------
    dict of ndarray, each of shape ``spectra.shape[1:]``, on the input's device
        ``edge_energy`` (float32, eV, NaN where masked), ``edge_jump``
        (float32, input units; NaN for non-finite spectra), ``white_line``
        (float32, eV, NaN where masked or no peak lies above the edge),
        ``mask`` (bool, True for valid voxels) and, for ``method="both"``,
        ``e0_derivative`` (float32, eV).

    Raises
    ------
    ValueError
        Fewer than 5 energies, energies not strictly increasing, spectra whose
        first axis does not match, no spectrum with all values finite, bad
        method or ranges.
    """
    if method not in METHODS:
        raise ValueError(f"edge_energy: method must be one of {METHODS}, got {method!r}")
    if smooth is None or not smooth >= 0:
        raise ValueError(f"edge_energy: smooth must be >= 0 eV, got {smooth!r}")
    E = _check_energies(energies)
    xp, mu, out_shape = _spectra_matrix(spectra, E, "edge_energy")
    if mask is not None:
        mask = xp.asarray(mask)
        if tuple(mask.shape) != out_shape:
            raise ValueError(f"edge_energy: mask must have shape {out_shape} (spectra.shape[1:]), "
                             f"got {tuple(mask.shape)}")
        mask = mask.reshape(-1).astype(bool)
    finite = xp.isfinite(mu.sum(axis=0))
    n_finite = int(finite.sum())
    if n_finite == 0:
        raise ValueError(f"edge_energy: none of the {mu.shape[1]} spectra is finite at every energy "
                         f"(all voxels NaN/inf)")
    if n_finite < mu.shape[1]:
        mu = xp.where(finite[None, :], mu, xp.float32(0))
    if pre is None or post is None:
        mean = to_host(mu.sum(axis=1)) / n_finite
        rng = edge_ranges(E, mean, pre=pre, post=post)
    else:
        rng = edge_ranges(E, pre=pre, post=post)
    res = _edge_core(xp, mu, E, rng, method, smooth, e0 if e0 is not None else rng["e0"])
    jump = res["edge_jump"]
    thr = _auto_min_jump(xp, jump[finite]) if min_jump is None else float(min_jump)
    valid = finite & (jump > max(thr, 0.0)) & xp.isfinite(res["edge_energy"])
    if mask is not None:
        valid &= mask
    nan = xp.float32(np.nan)
    out = {"edge_energy": xp.where(valid, res["edge_energy"], nan),
           "edge_jump": xp.where(finite, jump, nan),
           "white_line": xp.where(valid, res["white_line"], nan),
           "mask": valid}
    if method == "both":
        out["e0_derivative"] = xp.where(valid, res["e0_derivative"], nan)
    return {k: v.astype(xp.float32 if k != "mask" else bool, copy=False).reshape(out_shape) for k, v in out.items()}


def normalize(spectra, energies, *, pre=None, post=None, e0=None):
    """Normalised spectra: pre-edge line subtracted, divided by the edge jump at the 0.5 crossing.

    Parameters
    ----------
    spectra : (n_energy, ...) ndarray
        NumPy or CuPy.
    energies : (n_energy,) array_like
        Strictly increasing, eV.
    pre, post : (float, float), optional
        Fit ranges (eV), see :func:`edge_ranges`.
    e0 : float, optional
        Energy where the jump is first evaluated.

    Returns
    -------
    (n_energy, ...) ndarray of float32
        0 on the pre-edge line, 1 at the post-edge line at the edge; NaN where
        the jump is not positive or a value is non-finite.
    """
    E = _check_energies(energies)
    xp, mu, voxels = _spectra_matrix(spectra, E, "normalize")
    finite = xp.isfinite(mu.sum(axis=0))
    mu0 = xp.where(finite[None, :], mu, xp.float32(0))
    if pre is None or post is None:
        n_finite = max(int(finite.sum()), 1)
        rng = edge_ranges(E, to_host(mu0.sum(axis=1)) / n_finite, pre=pre, post=post)
    else:
        rng = edge_ranges(E, pre=pre, post=post)
    ec = rng["e0"] if e0 is None else float(e0)
    res = _edge_core(xp, mu0, E, rng, "half", 0.0, ec)
    x = xp.asarray((E - ec).astype(np.float32))[:, None]
    pre_line = res["coef"][0][None, :] + x * res["coef"][1][None, :]
    jump = res["edge_jump"]
    ok = finite & (jump > 0)
    norm = (mu - pre_line) / xp.where(ok, jump, xp.float32(1))[None, :]
    norm = xp.where(ok[None, :], norm, xp.float32(np.nan))
    return norm.astype(xp.float32, copy=False).reshape(E.size, *voxels)


def edge_energy_map(stack, energies, *, slab: int = 16, device: str = "auto", mask=None,
                    min_jump: float | None = None, pre=None, post=None, info: dict | None = None, **kw) -> dict:
    """Edge-energy maps of a whole energy stack, processed in z-slabs (bounded memory).

    Parameters
    ----------
    stack : (n_energy, Z, Y, X) array-like, or sequence of n_energy (Z, Y, X) volumes
        NumPy/CuPy array, ``numpy.memmap``, h5py dataset, or a list whose
        items support ``item[z0:z1]``. Only one z-slab of every energy is
        read at a time.
    energies : (n_energy,) array_like
        eV, distinct. When not increasing, the stack is read in increasing
        energy order (results are the same).
    slab : int
        z-planes per slab: a slab holds ``n_energy * slab * Y * X`` float32
        values plus about the same again in temporaries.
    device : {"auto", "cpu", "gpu"}
        Where the maps are computed (slabs are moved there).
    mask : (Z, Y, X) array_like of bool, optional
        Extra mask ANDed into the result (e.g. the binarized reference).
    min_jump : float, optional
        Jump threshold; by default chosen once for the whole volume (same
        rule as :func:`edge_energy`), so slabs agree.
    pre, post : (float, float), optional
        Fit ranges (eV). By default chosen once from the grid, or from the
        mean spectrum of a few z-planes (see :func:`edge_ranges`).
    info : dict, optional
        Filled with what was used: ``pre``, ``post``, ``e0``, ``rule`` (see
        :func:`edge_ranges`), ``min_jump`` (the threshold applied), ``device``.
    **kw
        ``method``, ``smooth``, ``e0``: passed to :func:`edge_energy`.

    Returns
    -------
    dict of (Z, Y, X) NumPy arrays
        As :func:`edge_energy`, on the host.
    """
    if not isinstance(slab, (int, np.integer)) or slab < 1:
        raise ValueError(f"edge_energy_map: slab must be a positive integer, got {slab!r}")
    unknown = set(kw) - {"method", "smooth", "e0"}
    if unknown:
        raise TypeError(f"edge_energy_map: unexpected keyword(s) {sorted(unknown)}")
    E_in = _as_energy_vector(energies)
    order = np.argsort(E_in, kind="stable")
    E = E_in[order]
    _check_energies(E)
    read, shape = _slab_reader(stack, E.size, order)
    dev = resolve_device(device)
    if mask is not None:
        if tuple(mask.shape) != shape:
            raise ValueError(f"edge_energy_map: mask must have the volume shape {shape}, got {tuple(mask.shape)}")
    rng = _stack_ranges(read, shape, E, pre, post)
    kw.setdefault("e0", rng["e0"])
    out = None
    for z0 in range(0, shape[0], int(slab)):
        z1 = min(shape[0], z0 + int(slab))
        sub = to_device(read(z0, z1), dev, dtype=np.float32)
        sub_mask = None if mask is None else to_device(np.asarray(to_host(mask[z0:z1]), dtype=bool), dev)
        try:
            res = edge_energy(sub, E, pre=rng["pre"], post=rng["post"], min_jump=0.0, mask=sub_mask, **kw)
        except ValueError as exc:
            if "none of the" not in str(exc):
                raise
            res = None   # an all-NaN slab: leave it masked
        if out is None:
            keys = ("edge_energy", "edge_jump", "white_line", "mask")
            keys += ("e0_derivative",) if kw.get("method") == "both" else ()
            out = {k: (np.zeros(shape, bool) if k == "mask" else np.full(shape, np.nan, np.float32)) for k in keys}
        if res is not None:
            for k, v in res.items():
                out[k][z0:z1] = to_host(v)
        del sub, res
    valid = out["mask"]
    finite = np.isfinite(out["edge_jump"])
    if not finite.any():
        raise ValueError("edge_energy_map: no voxel has a finite spectrum at every energy (all NaN/inf)")
    thr = _auto_min_jump(np, out["edge_jump"][finite]) if min_jump is None else float(min_jump)
    valid &= out["edge_jump"] > thr
    for k in ("edge_energy", "white_line", "e0_derivative"):
        if k in out:
            out[k][~valid] = np.nan
    if info is not None:
        info.update(pre=rng["pre"], post=rng["post"], e0=float(kw["e0"]), rule=rng["rule"], min_jump=float(thr),
                    device=dev)
    _log.info("edge_energy_map: %d of %d voxels valid (min_jump %.4g, ranges pre %s post %s, %s)",
              int(valid.sum()), valid.size, thr, rng["pre"], rng["post"], rng["rule"])
    return out


def particle_labels(mask, *, min_voxels: int = 64, connectivity: int = 1):
    """Connected components of a mask, small ones dropped, numbered by size.

    Parameters
    ----------
    mask : (Z, Y, X) or (Y, X) ndarray
        NumPy or CuPy; nonzero is foreground.
    min_voxels : int
        Components with fewer voxels are removed (set to 0).
    connectivity : int
        1 (faces), 2 (faces and edges) or 3 (also corners, 3D only).

    Returns
    -------
    labels : ndarray of int32, same shape and device as ``mask``
        0 background, 1 the largest particle, 2 the next, ...
    n : int
        Number of particles kept.
    """
    if not hasattr(mask, "shape"):
        mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise ValueError(f"particle_labels: mask must be 2D or 3D, got shape {tuple(mask.shape)}")
    if not 1 <= int(connectivity) <= mask.ndim:
        raise ValueError(f"particle_labels: connectivity must be in 1..{mask.ndim}, got {connectivity}")
    if int(min_voxels) < 1:
        raise ValueError(f"particle_labels: min_voxels must be >= 1, got {min_voxels}")
    xp, nd = xp_of(mask), ndimage_of(mask)
    m = xp.asarray(mask) != 0
    structure = nd.generate_binary_structure(m.ndim, int(connectivity))
    lab, n = nd.label(m, structure=structure)
    n = int(n)
    if n == 0:
        return xp.zeros(m.shape, dtype=xp.int32), 0
    sizes = to_host(xp.bincount(lab.ravel(), minlength=n + 1)).astype(np.int64)
    sizes[0] = 0
    order = np.argsort(-sizes, kind="stable")
    keep = order[sizes[order] >= int(min_voxels)]
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    labels = xp.asarray(lut)[lab]
    return labels.astype(xp.int32, copy=False), int(keep.size)


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
    E = _check_energies(energies)
    get, shape = _volume_getter(stack, E.size)
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


def write_xanes(aligned_path, out_path, *, dataset: str | None = None, energy_dataset: str | None = None,
                method: str = "half", min_jump: float | None = None, min_voxels: int = 64, slab: int = 16,
                device: str = "auto", smooth: float = 1.0, pre=None, post=None, overwrite: bool = False) -> dict:
    """Edge-energy maps, particle labels and particle spectra of an aligned stack, written to HDF5.

    Reads ``/aligned`` + ``/energy`` (pipeline output) or ``/exchange/recon`` +
    ``/exchange/energy`` (Data Exchange) slab by slab, and writes a new file
    atomically with ``/energy`` and the group ``/xanes``: ``edge_energy``,
    ``edge_jump``, ``white_line``, ``mask`` (Z, Y, X), ``labels`` (int32,
    connected components of the Otsu mask of the highest-energy volume, at
    least ``min_voxels``), and the per-particle spectra ``roi_label``,
    ``roi_count``, ``roi_mean``, ``roi_std``, ``roi_norm``, ``roi_edge_energy``.
    Attributes of ``/xanes`` record the method, fit ranges, threshold and source.

    Parameters
    ----------
    aligned_path, out_path : str or Path
        Input HDF5 and output HDF5 (must differ; an existing output is only
        replaced with ``overwrite=True``).
    dataset, energy_dataset : str, optional
        Override the stack / energy dataset names.
    method, min_jump, smooth, pre, post, slab, device
        See :func:`edge_energy_map`.
    min_voxels : int
        Smallest particle kept in ``labels``.

    Returns
    -------
    dict
        Summary: ``voxels``, ``valid``, ``particles``, ``edge_energy_median``,
        ``pre``, ``post``, ``min_jump``, ``out``.
    """
    import h5py

    from .io import InputError, atomic_path
    from .segment import otsu_threshold

    src, dst = Path(aligned_path), Path(out_path)
    if not src.exists():
        raise InputError(f"{src}: file not found")
    if not h5py.is_hdf5(src):
        raise InputError(f"{src}: not an HDF5 file")
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError(f"{dst}: the output must differ from the input (it would replace the aligned stack)")
    if dst.exists() and not overwrite:
        raise InputError(f"{dst}: file exists (use --overwrite to replace it)")
    with h5py.File(src, "r") as h5:
        name, ename = _stack_names(h5, src, dataset, energy_dataset)
        ds = h5[name]
        E_in = _as_energy_vector(h5[ename][()], where=f"{src}:{ename}")
        if ds.ndim != 4 or ds.shape[0] != E_in.size:
            raise InputError(f"{src}:{name}: expected an (n_energy={E_in.size}, Z, Y, X) stack, got shape {ds.shape}")
        rng = {}
        maps = edge_energy_map(ds, E_in, slab=slab, device=device, min_jump=min_jump, pre=pre, post=post,
                               method=method, smooth=smooth, info=rng)
        order = np.argsort(E_in, kind="stable")
        E_sorted = E_in[order]
        ref = np.asarray(ds[int(np.argmax(E_in))], dtype=np.float32)
        ref_finite = np.where(np.isfinite(ref), ref, np.nanmin(ref) if np.isfinite(ref).any() else 0.0)
        try:
            ref_mask = ref_finite > otsu_threshold(ref_finite)
        except ValueError as exc:
            _log.warning("write_xanes: no particle labels (%s)", exc)
            ref_mask = np.zeros(ref.shape, bool)
        labels, n = particle_labels(ref_mask, min_voxels=min_voxels)
        roi = roi_spectra(_Reordered(ds, order), E_sorted, labels, pre=rng["pre"], post=rng["post"]) if n else None
    valid = maps["mask"]
    summary = {"voxels": int(valid.size), "valid": int(valid.sum()), "particles": n, "pre": rng["pre"],
               "post": rng["post"],
               "edge_energy_median": float(np.nanmedian(maps["edge_energy"])) if valid.any() else float("nan"),
               "min_jump": rng["min_jump"], "out": str(dst)}
    from . import __version__

    with atomic_path(dst) as tmp:
        with h5py.File(tmp, "w") as out:
            out.create_dataset("energy", data=E_sorted).attrs["units"] = "eV"
            g = out.create_group("xanes")
            chunks = (1,) + valid.shape[1:]
            for k, v in maps.items():
                d = g.create_dataset(k, data=v, chunks=chunks)
                if k != "mask":
                    d.attrs["units"] = "input units" if k == "edge_jump" else "eV"
            g.create_dataset("labels", data=labels, chunks=chunks)
            if roi is not None:
                g.create_dataset("roi_label", data=roi["region"])
                g.create_dataset("roi_count", data=roi["count"])
                g.create_dataset("roi_mean", data=roi["mean"])
                g.create_dataset("roi_std", data=roi["std"])
                g.create_dataset("roi_norm", data=roi["norm"])
                g.create_dataset("roi_edge_energy", data=roi["edge_energy"])
            g.attrs.update({"method": method, "smooth_ev": float(smooth), "n_particles": n, "source": str(src),
                            "source_dataset": name, "gpureg_version": __version__,
                            "min_voxels": int(min_voxels), "device": rng["device"],
                            "min_jump": rng["min_jump"], "e0_start_ev": rng["e0"],
                            "min_jump_rule": "auto" if min_jump is None else "given"})
            g.attrs["pre_ev"], g.attrs["post_ev"] = rng["pre"], rng["post"]
            g.attrs["range_rule"] = rng["rule"]
    return summary


# --------------------------------------------------------------------------- helpers

def _edge_core(xp, mu, E, rng, method, smooth, ec):
    """Edge energy, jump and white line of finite spectra ``mu`` (n_energy, N) float32."""
    n = E.size
    pre_idx = np.flatnonzero((E >= rng["pre"][0]) & (E <= rng["pre"][1]))
    post_idx = np.flatnonzero((E >= rng["post"][0]) & (E <= rng["post"][1]))
    x = E - ec
    C = np.zeros((4, n))
    C[0:2] = _line_weights(x, pre_idx)
    C[2:4] = _line_weights(x, post_idx)
    coef = xp.asarray(C.astype(np.float32)) @ mu          # (4, N): b_pre, a_pre, b_post, a_post
    dj0 = coef[2] - coef[0]
    dj1 = coef[3] - coef[1]
    i_lo, i_hi = int(pre_idx[-1]), int(post_idx[0])
    w = slice(i_lo, i_hi + 1)
    Ew = E[w]
    xw = xp.asarray(x[w].astype(np.float32))[:, None]
    d = mu[w] - coef[0][None, :]
    d -= xw * coef[1][None, :]                            # mu minus pre-edge line, edge window only
    Ew_x = xp.asarray(Ew.astype(np.float32))
    out = {"coef": coef}

    def jump_at(e):
        return dj0 + dj1 * (e - xp.float32(ec))

    if method in ("half", "both"):
        e_half = _first_crossing(xp, d, 0.5 * jump_at(xp.float32(ec)), Ew_x)
        j1 = jump_at(xp.where(xp.isfinite(e_half), e_half, xp.float32(ec)))
        e_half = _first_crossing(xp, d, 0.5 * j1, Ew_x)
        edge = e_half
    if method in ("derivative", "both"):
        K = _derivative_operator(E, smooth)[w]             # (W, n): smoothed d/dE
        der = xp.asarray(K.astype(np.float32)) @ mu
        e_der = _peak(xp, der, Ew_x, Ew, interior=True)
        del der
        if method == "derivative":
            edge = e_der
        else:
            out["e0_derivative"] = e_der
    jump = jump_at(xp.where(xp.isfinite(edge), edge, xp.float32(ec)))
    # White line: highest point of the pre-subtracted spectrum above the edge (window only).
    out["white_line"] = _peak(xp, d, Ew_x, Ew, interior=False,
                              lower=xp.where(xp.isfinite(edge), edge, xp.float32(np.inf)))
    out["edge_energy"] = edge
    out["edge_jump"] = jump
    return out


def _stack_ranges(read, shape, E, pre, post):
    """Fit ranges for a whole stack: from the grid, or from the mean spectrum of <= 5 z-planes."""
    if pre is not None and post is not None:
        return edge_ranges(E, pre=pre, post=post)
    if _fine_region(E) is not None:
        return edge_ranges(E, pre=pre, post=post)
    planes = sorted({int(round(z)) for z in np.linspace(0, shape[0] - 1, min(shape[0], 5))})
    acc, count = np.zeros(E.size), 0
    for z in planes:
        sub = np.asarray(to_host(read(z, z + 1)), dtype=np.float64).reshape(E.size, -1)
        ok = np.isfinite(sub).all(axis=0)
        acc += sub[:, ok].sum(axis=1)
        count += int(ok.sum())
    return edge_ranges(E, acc / count if count else None, pre=pre, post=post)


def _first_crossing(xp, d, level, Ew):
    """Energy where ``d`` (W, N) first rises through ``level`` (N,), linear interpolation; NaN if never.

    A loop over the W energies of the window with whole-row operations: rows
    are contiguous, so this is cache-friendly on the CPU and a handful of
    small kernels per energy on the GPU (an ``argmax`` over axis 0 is a
    strided reduction, several times slower on the CPU).
    """
    W, N = d.shape
    idx = xp.zeros(N, dtype=xp.int32)
    todo = xp.ones(N, dtype=bool)
    prev = d[0] >= level
    up = xp.empty_like(prev)
    hit = xp.empty_like(prev)
    for j in range(1, W):
        # In-place, branch-free row operations: masked copies (where/copyto) with scattered
        # masks are ~30x slower than arithmetic in NumPy.
        xp.greater_equal(d[j], level, out=up)
        xp.greater(up, prev, out=hit)           # up and not prev (bool order False < True)
        xp.logical_and(hit, todo, out=hit)      # only the first crossing counts
        idx += hit.astype(xp.int32) * xp.int32(j - 1)
        xp.greater(todo, hit, out=todo)         # todo and not hit
        prev, up = up, prev
    found = ~todo
    i = xp.where(found, idx, xp.int32(0))
    cols = xp.arange(N)
    d0, d1 = d[i, cols], d[i + 1, cols]
    e0, e1 = Ew[i], Ew[i + 1]
    denom = xp.where(found, d1 - d0, xp.float32(1))
    t = xp.clip((level - d0) / denom, 0, 1)
    return xp.where(found, e0 + t * (e1 - e0), xp.float32(np.nan))


def _peak(xp, v, Ew, Ew_host, *, interior, lower=None):
    """Energy of the maximum of ``v`` (W, N) along axis 0, refined by a parabola through 3 samples.

    Only rows with energy above ``lower`` (N,) are candidates when given.
    With ``interior`` the parabola is centred off the window ends; otherwise
    a maximum on the last sample (no peak inside the window) gives NaN, as
    does a column without candidates. Running maximum over rows (see
    :func:`_first_crossing` for why not ``argmax``).
    """
    W, N = v.shape
    best = xp.full(N, -np.inf, dtype=xp.float32)
    k = xp.zeros(N, dtype=xp.int32)
    better = xp.empty(N, dtype=bool)
    ok = xp.empty(N, dtype=bool)
    for j in range(W):                         # branch-free row operations, as in _first_crossing
        xp.greater(v[j], best, out=better)
        if lower is not None:
            xp.less(lower, xp.float32(Ew_host[j]), out=ok)
            xp.logical_and(better, ok, out=better)
        k += better.astype(xp.int32) * (xp.int32(j) - k)
        xp.maximum(best, v[j] - xp.float32(3e38) * (~better), out=best)
    none = ~xp.isfinite(best)
    at_end = k >= W - 1
    kc = xp.clip(k, 1, W - 2)
    cols = xp.arange(N)
    y0, y1, y2 = v[kc - 1, cols], v[kc, cols], v[kc + 1, cols]
    x0, x1, x2 = Ew[kc - 1], Ew[kc], Ew[kc + 1]
    a, b = x1 - x0, x1 - x2
    num = a * a * (y1 - y2) - b * b * (y1 - y0)
    den = a * (y1 - y2) - b * (y1 - y0)
    safe = xp.abs(den) > 0
    vertex = x1 - 0.5 * num / xp.where(safe, den, xp.float32(1))
    vertex = xp.where(safe, xp.clip(vertex, x0, x2), x1)
    # Where the maximum sat on a window end, the parabola is not centred on it: keep the sample.
    vertex = xp.where(k == kc, vertex, Ew[k])
    bad = none if interior else (none | at_end)
    return xp.where(bad, xp.float32(np.nan), vertex).astype(xp.float32)


def _line_weights(x, idx):
    """Rows (intercept, slope) of least-squares line-fit weights over ``x[idx]`` (2, n)."""
    w = np.zeros((2, x.size))
    xi = x[idx]
    xm = xi.mean()
    sxx = ((xi - xm) ** 2).sum()
    slope = (xi - xm) / sxx
    w[1, idx] = slope
    w[0, idx] = 1.0 / idx.size - xm * slope
    return w


def _derivative_operator(E, smooth):
    """(n, n) matrix: Gaussian-smoothed (sigma ``smooth`` eV) second-order d/dE on a non-uniform grid."""
    n = E.size
    G = np.zeros((n, n))
    h = np.diff(E)
    G[0, 0], G[0, 1] = -1 / h[0], 1 / h[0]
    G[-1, -2], G[-1, -1] = -1 / h[-1], 1 / h[-1]
    for i in range(1, n - 1):
        hl, hr = h[i - 1], h[i]
        G[i, i - 1] = -hr / (hl * (hl + hr))
        G[i, i] = (hr - hl) / (hl * hr)
        G[i, i + 1] = hl / (hr * (hl + hr))
    if smooth > 0:
        S = np.exp(-0.5 * ((E[:, None] - E[None, :]) / smooth) ** 2)
        S /= S.sum(axis=1, keepdims=True)
        G = S @ G
    return G


def _derivative_peak_1d(E, spec):
    der = _derivative_operator(E, 0.0) @ spec
    k = int(np.argmax(der[1:-1])) + 1
    return float(E[k])


def _fine_region(E):
    """(pre_lo, pre_hi, post_lo, post_hi) from a distinct fine-step run of the grid, or None."""
    h = np.diff(E)
    if h.size < 6:
        return None
    fine = h <= 0.6 * h.max()
    best, start = (0, 0), None
    for i, f in enumerate(np.r_[fine, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    a, b = best                    # steps a..b-1 are fine: energies a..b
    if b - a < 4 or a < 1 or (E.size - 1 - b) < 1:
        return None
    return (E[0], E[a], E[b], E[-1])


def _snap_range(E, r, name):
    try:
        lo, hi = (float(v) for v in r)
    except (TypeError, ValueError):
        raise ValueError(f"edge_ranges: {name} must be a (low, high) pair of energies in eV, got {r!r}") from None
    if not lo <= hi:
        raise ValueError(f"edge_ranges: {name} range must have low <= high, got {r!r}")
    sel = E[(E >= lo - 1e-6) & (E <= hi + 1e-6)]
    if sel.size < 2:
        raise ValueError(f"edge_ranges: {name}-edge range {(lo, hi)} eV holds {sel.size} energies; a line fit needs "
                         f"at least 2 (grid {E[0]:g}..{E[-1]:g} eV)")
    return (float(sel[0]), float(sel[-1]))


def _as_energy_vector(energies, where="energies"):
    E = np.asarray(to_host(energies), dtype=np.float64)
    if E.ndim != 1:
        raise ValueError(f"{where} must be a 1D array of eV, got shape {E.shape}")
    if E.size < 5:
        raise ValueError(f"{where}: need at least 5 energies (pre-edge, edge and post-edge), got {E.size}")
    if not np.isfinite(E).all():
        raise ValueError(f"{where} contain NaN or inf")
    if np.unique(E).size != E.size:
        raise ValueError(f"{where}: repeated energies {np.unique(E[np.r_[np.diff(np.sort(E)) == 0, False]]).tolist()}")
    return E


def _spectra_matrix(spectra, E, caller):
    """(xp, spectra as float32 (n_energy, n_voxel), voxel shape), checking the energy axis."""
    if not hasattr(spectra, "shape"):
        spectra = np.asarray(spectra)
    if spectra.ndim < 1 or spectra.shape[0] != E.size:
        raise ValueError(f"{caller}: spectra must have shape (n_energy={E.size}, ...), got {tuple(spectra.shape)}")
    xp = xp_of(spectra)
    return xp, xp.asarray(spectra, dtype=xp.float32).reshape(E.size, -1), tuple(spectra.shape[1:])


def _check_energies(energies):
    E = _as_energy_vector(energies)
    if not (np.diff(E) > 0).all():
        k = int(np.flatnonzero(np.diff(E) <= 0)[0])
        raise ValueError(f"energies must be strictly increasing (sort the stack with them); energy[{k}]={E[k]:g} eV "
                         f"is followed by {E[k + 1]:g} eV")
    return E


def _auto_min_jump(xp, jumps):
    j = jumps[jumps > 0] if jumps.size else jumps
    if j.size == 0:
        return 0.0
    step = max(1, int(j.size) // _PERCENTILE_SAMPLE)
    sample = to_host(j[::step]).astype(np.float64)
    return MIN_JUMP_FRACTION * float(np.percentile(sample, 99.5))


def _slab_reader(stack, n_e, order):
    """``read(z0, z1) -> (n_e, z1 - z0, Y, X)`` in ``order`` of energies, and the volume shape."""
    if hasattr(stack, "shape") and hasattr(stack, "ndim") and not isinstance(stack, (list, tuple)):
        if stack.ndim != 4 or stack.shape[0] != n_e:
            raise ValueError(f"stack must have shape (n_energy={n_e}, Z, Y, X), got {tuple(stack.shape)}")
        shape = tuple(int(s) for s in stack.shape[1:])
        identity = bool((order == np.arange(n_e)).all())

        def read(z0, z1):
            sub = stack[:, z0:z1]
            return sub if identity else sub[order]
        return read, shape
    try:
        n = len(stack)
    except TypeError:
        raise ValueError(f"stack must be an (n_energy, Z, Y, X) array or a sequence of volumes, "
                         f"got {type(stack)!r}") from None
    if n != n_e:
        raise ValueError(f"stack holds {n} volumes but {n_e} energies were given")
    first = stack[0]
    if len(first.shape) != 3:
        raise ValueError(f"stack volumes must be 3D (Z, Y, X), got shape {tuple(first.shape)}")
    shape = tuple(int(s) for s in first.shape)

    def read(z0, z1):
        parts = [stack[int(i)] for i in order]
        for p in parts:
            if tuple(p.shape) != shape:
                raise ValueError(f"stack volumes differ in shape: {tuple(p.shape)} vs {shape}")
        xp = xp_of(parts[0])
        return xp.stack([xp.asarray(p[z0:z1]) for p in parts])
    return read, shape


def _volume_getter(stack, n_e):
    if hasattr(stack, "ndim") and not isinstance(stack, (list, tuple)):
        if stack.ndim != 4 or stack.shape[0] != n_e:
            raise ValueError(f"stack must have shape (n_energy={n_e}, Z, Y, X), got {tuple(stack.shape)}")
        return (lambda i: stack[i]), tuple(int(s) for s in stack.shape[1:])
    if len(stack) != n_e:
        raise ValueError(f"stack holds {len(stack)} volumes but {n_e} energies were given")
    return (lambda i: stack[i]), tuple(int(s) for s in stack[0].shape)


class _Reordered:
    """Read-only view of a 4D stack with its first axis permuted (for unsorted energies)."""

    def __init__(self, ds, order):
        self.ds, self.order = ds, np.asarray(order)
        self.shape, self.ndim = tuple(ds.shape), 4

    def __getitem__(self, i):
        return self.ds[int(self.order[i])]


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


def _stack_names(h5, path, dataset, energy_dataset):
    from .io import InputError

    if dataset is None:
        for cand, en in (("aligned", "energy"), ("exchange/recon", "exchange/energy")):
            if cand in h5:
                dataset, energy_dataset = cand, energy_dataset or en
                break
        else:
            raise InputError(f"{path}: no /aligned or /exchange/recon dataset (name one with --dataset)")
    if dataset not in h5:
        raise InputError(f"{path}: dataset {dataset!r} not found")
    if energy_dataset is None:
        energy_dataset = "energy" if "energy" in h5 else "exchange/energy"
    if energy_dataset not in h5:
        raise InputError(f"{path}: energy dataset {energy_dataset!r} not found (name one with --energy-dataset)")
    return dataset, energy_dataset


def _erf(xp):
    if xp is np:
        from scipy.special import erf
    else:
        from cupyx.scipy.special import erf
    return erf
