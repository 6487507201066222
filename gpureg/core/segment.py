"""Binarization of tomograms: Otsu threshold with optional denoising first."""

from __future__ import annotations

import numpy as np

from .backend import array_device, cpu_engine, ndimage_of, to_host, xp_of

__all__ = ["binarize", "DENOISE", "denoise", "gaussian", "otsu_threshold", "partial_volume", "particle_labels",
           "remove_impulses"]

DENOISE = (None, "median", "gaussian", "impulse")


def otsu_threshold(volume, *, bins: int = 256) -> float:
    """Otsu's threshold of a volume (NumPy or CuPy), maximising between-class variance.

    Parameters
    ----------
    volume : ndarray
        Any shape; non-finite values are an error.
    bins : int
        Histogram bins between the minimum and maximum.

    Returns
    -------
    float
        Threshold ``t``; the foreground is ``volume > t``.
    """
    return _otsu(volume, bins)[0]


def _otsu(volume, bins=256):
    """Otsu's threshold and the volume's minimum and maximum (float32 values)."""
    xp = xp_of(volume)
    v = xp.asarray(volume, dtype=xp.float32).ravel()
    if v.size == 0:
        raise ValueError("cannot threshold an empty volume")
    compiled = xp is np and cpu_engine() == "numba"
    if compiled:
        from . import cpu_prep

        lo, hi, finite = cpu_prep.minmax(v)
        lo, hi = (lo, hi) if finite else (np.nan, np.nan)
    else:
        lo, hi = float(v.min()), float(v.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("volume contains NaN or inf; cannot compute an Otsu threshold")
    if hi <= lo:
        raise ValueError(f"volume is constant (all values {lo}); Otsu threshold is undefined")
    if compiled:
        hist = cpu_prep.histogram(v, bins, lo, hi).astype(np.float64)
    else:
        hist, _ = xp.histogram(v, bins=bins, range=(lo, hi))
        hist = np.asarray(hist.get() if array_device(hist) == "gpu" else hist, dtype=np.float64)
    edges = np.linspace(lo, hi, bins + 1)
    mids = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * mids)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    k = int(np.argmax(between[:-1]))
    return float(edges[k + 1]), lo, hi


def denoise(volume, method: str | None = "median", *, size: float = 3):
    """Filter a volume (same device): ``"median"`` (``size`` voxels wide, removes
    salt-and-pepper noise), ``"impulse"`` (:func:`remove_impulses`: only the
    saturated voxels of salt-and-pepper noise are replaced, ``size`` voxels wide;
    a clean volume is returned unchanged), ``"gaussian"`` (sigma ``size / 3``)
    or ``None`` (unchanged).
    """
    if method not in DENOISE:
        raise ValueError(f"denoise must be one of {DENOISE}, got {method!r}")
    if method is None:
        return volume
    if method == "impulse":
        return remove_impulses(volume, size=int(size))
    if method == "gaussian":
        return gaussian(volume, size / 3.0)
    if int(size) == 3 and _compiled(volume):
        from . import cpu_prep

        return cpu_prep.median3(volume)
    return ndimage_of(volume).median_filter(volume, size=int(size))


def gaussian(volume, sigma: float, order=(0, 0, 0)):
    """Gaussian filter (or its first derivative along axes where ``order`` is 1) of sigma ``sigma`` voxels.

    ``scipy.ndimage.gaussian_filter(volume, sigma, order)`` on the same device. On the CPU
    it runs as compiled, multithreaded separable passes (:mod:`gpureg.core.cpu_gauss`,
    bit-identical to SciPy's float32 result).
    """
    if _compiled(volume):
        from . import cpu_gauss

        return cpu_gauss.gaussian_filter(volume, float(sigma), order)
    return ndimage_of(volume).gaussian_filter(volume, sigma=float(sigma), order=tuple(order))


def remove_impulses(volume, *, size: int = 3, min_fraction: float = 1e-3):
    """Replace the saturated voxels of salt-and-pepper noise; leave every other voxel as it is.

    Salt-and-pepper noise sets voxels to the volume's extreme values. Each
    voxel at the minimum or the maximum takes the mean of the other voxels of
    its ``size``-wide cube that are not at an extreme; when there is none, the
    majority extreme of the cube (then its median). When fewer than
    ``min_fraction`` of the voxels change by more than a quarter of the value
    range, the volume is not noisy and is returned unchanged (the same
    object): a clean phantom has none (its background, at the minimum, would
    otherwise be lifted by up to 0.06 next to the particles), 0.1 % noise
    about 0.05 %, 10 % noise about 5 %.

    Why not the median (issue 13): a 3x3x3 median erodes convex particles
    (curvature flow), and noise strengthens the erosion, so a noisy and a
    clean copy of one volume no longer match: registering them (truth:
    identity) gave a scale of 0.991 and 0.05 voxel (10 %) / 0.13 voxel (30 %)
    binarized, against 1.000 and 0.00 / 0.01 voxel with this filter, which is
    also about 3x faster on the CPU (128^3: 1.2 s against 3.9 s for SciPy's
    median, 2-core CPU, loaded). It only targets saturated (min/max) voxels:
    for impulses at other values use ``"median"``.

    On the CPU (numba engine, 3D float32) it runs compiled and multithreaded
    (:func:`gpureg.core.cpu_prep.remove_impulses`, float64 per-voxel sums); the
    reference, and the CuPy path, use box filters (2x3 separable passes, float32
    between them), equal within float32 rounding.

    Parameters
    ----------
    volume : (Z, Y, X) ndarray
        NumPy or CuPy (the result stays on the same device).
    size : int
        Edge of the neighbourhood cube, voxels.
    min_fraction : float
        Fraction of voxels changed by more than a quarter of the range below
        which nothing is changed (0: always filter).

    Returns
    -------
    (Z, Y, X) ndarray of float32
        ``volume`` itself (as float32) when it is not noisy.
    """
    if _compiled(volume):
        from . import cpu_prep

        out, changed = cpu_prep.remove_impulses(volume, int(size))
        return out if changed >= min_fraction else volume
    xp, nd = xp_of(volume), ndimage_of(volume)
    v = xp.asarray(volume, dtype=xp.float32)
    lo, hi = v.min(), v.max()
    at_lo, at_hi = v <= lo, v >= hi
    good = (~(at_lo | at_hi)).astype(xp.float32)
    box = {"size": int(size), "mode": "constant", "cval": 0.0}
    weight = nd.uniform_filter(good, **box)
    mean = nd.uniform_filter(v * good, **box) / xp.maximum(weight, xp.float32(1e-30))
    majority = xp.where(nd.uniform_filter(at_lo.astype(xp.float32), **box)
                        >= nd.uniform_filter(at_hi.astype(xp.float32), **box), lo, hi)
    # weight is a multiple of 1 / size^3 up to rounding: > half of that means a non-extreme neighbour exists.
    fill = xp.where(weight > 0.5 / int(size) ** 3, mean, majority)
    out = xp.where(good > 0, v, fill).astype(xp.float32)
    changed = float((xp.abs(out - v) > (hi - lo) / 4).mean())
    return out if changed >= min_fraction else v


def binarize(volume, *, threshold: float | None = None, denoise: str | None = None, size: float = 3,
             fraction: float | None = None, fraction_tol: float = 0.05, ramp: float = 0.0):
    """Binary (0/1 float32) volume, foreground ``volume > threshold`` (Otsu by default).

    With ``ramp > 0`` the result is the partial-volume version of that binary
    volume (:func:`partial_volume`): 0/1 away from the threshold surface, a
    ramp of ``ramp`` voxels across it.

    Parameters
    ----------
    volume : (Z, Y, X) ndarray
        NumPy or CuPy; the result stays on the same device.
    threshold : float, optional
        Fixed threshold; Otsu's when None.
    denoise : {None, "median", "gaussian"}
        Filter applied before thresholding (median: ``size`` voxels wide;
        Gaussian: sigma ``size / 3``). Median removes salt-and-pepper noise.
    size : float
        Filter size in voxels.
    fraction : float, optional
        Expected foreground fraction (e.g. the reference energy's). When the
        Otsu foreground's fraction differs from it by more than ``fraction_tol``
        (relative), the threshold becomes the ``1 - fraction`` quantile instead.
        Across an absorption edge the particles' contrasts change differently:
        mid-edge, Otsu can split the bright particle from the faint one and drop
        the faint one; the sample's volume does not change, so matching the
        reference's fraction keeps it (demo data: worst energy 0.75 -> 0.24 voxel).
    fraction_tol : float
        Relative tolerance on the fraction before the quantile is used.
    ramp : float
        0: hard 0/1 binarization. > 0: width (voxels) of the partial-volume
        ramp across the threshold surface (:func:`partial_volume`).

    Returns
    -------
    (Z, Y, X) ndarray of float32
        1 for foreground, 0 for background (values in [0, 1] with ``ramp``).
    """
    xp = xp_of(volume)
    v = _denoise(xp.asarray(volume, dtype=xp.float32), denoise, size=size)
    t, lo, hi = _otsu(v) if threshold is None else (float(threshold), None, None)
    if threshold is None and fraction is not None:
        if not 0 < fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        if abs(float((v > t).mean()) / fraction - 1) > fraction_tol:
            t = float(xp.quantile(v, 1 - fraction))
    if ramp > 0:
        out, n_foreground = _partial_volume(v, t, ramp, value_range=None if lo is None else (lo, hi))
    else:
        out = (v > t).astype(xp.float32)
        n_foreground = int(xp.count_nonzero(out))
    if n_foreground == 0:
        raise ValueError(f"binarization at threshold {t:g} leaves no foreground voxel (empty mask)")
    return out


def partial_volume(volume, threshold: float, *, ramp: float = 3.0, sigma: float = 0.7):
    """Partial-volume binarization: a ramp of ``ramp`` voxels across the surface ``volume = threshold``.

    The signed distance (voxels) of each voxel to the threshold surface is
    estimated to first order, ``d = (v - t) / |grad G v|`` (gradient of the
    volume smoothed by a Gaussian of ``sigma`` voxels), and mapped to
    ``clip(0.5 + d / ramp, 0, 1)``. Away from the surface (``|d| >= ramp / 2``)
    this is the hard binarization ``v > t``; across it, a linear ramp whose
    position follows the surface's sub-voxel position. The distance is
    invariant to ``v -> a v + b`` (with the threshold moved alike), so like
    the hard binarization it ignores contrast changes across the absorption
    edge, but it no longer quantises the surface to the grid: on the
    two-particle phantom at 64^3, pure sub-voxel translations registered
    binarized err up to 0.22 voxel hard, up to 0.04 with this ramp (3 voxels;
    1 voxel: up to 0.18, 2 voxels: up to 0.05, 4 voxels: up to 0.06).

    Parameters
    ----------
    volume : (Z, Y, X) ndarray
        NumPy or CuPy (the result stays on the same device).
    threshold : float
        The surface's grey level (Otsu's, or the matched-fraction quantile).
    ramp : float
        Width of the transition, voxels (> 0).
    sigma : float
        Gaussian sigma (voxels) of the derivative filter (0: central
        differences). Measured: 0.7 beats 1.0 noise-free (0.028 vs 0.036-0.040 voxel)
        and equals it under noise.

    Returns
    -------
    (Z, Y, X) ndarray of float32
        Values in [0, 1]: 1 inside (``v > t``), 0 outside.
    """
    return _partial_volume(volume, threshold, ramp, sigma)[0]


def _partial_volume(volume, threshold, ramp, sigma=0.7, value_range=None):
    """:func:`partial_volume` and the number of voxels above ``threshold`` (``value_range``: the
    volume's float32 minimum and maximum when known)."""
    if not ramp > 0:
        raise ValueError(f"ramp must be a width > 0 voxels, got {ramp!r}")
    xp = xp_of(volume)
    v = xp.asarray(volume, dtype=xp.float32)
    if sigma > 0 and _compiled(v):
        from . import cpu_gauss, cpu_prep

        lo, hi = cpu_prep.minmax(v)[:2] if value_range is None else value_range
        floor = 1e-6 * max(float(np.float32(hi) - np.float32(lo)), 1e-30)
        return cpu_gauss.partial_volume(v, float(threshold), float(ramp), float(sigma), floor)
    if sigma > 0:
        grad = [gaussian(v, sigma, tuple(int(i == a) for i in range(3))) for a in range(3)]
    else:
        grad = xp.gradient(v)
    norm = xp.sqrt(grad[0] * grad[0] + grad[1] * grad[1] + grad[2] * grad[2])
    floor = 1e-6 * max(float(v.max() - v.min()), 1e-30)  # flat regions: the sign of v - t decides
    d = (v - xp.float32(threshold)) / xp.maximum(norm, xp.float32(floor))
    out = xp.clip(0.5 + d / xp.float32(ramp), 0.0, 1.0).astype(xp.float32)
    return out, int(xp.count_nonzero(v > xp.float32(threshold)))


_denoise = denoise  # the module-level name is shadowed by binarize's keyword


def _compiled(volume) -> bool:
    """Whether ``volume`` goes to the compiled CPU kernels (3D float32 NumPy, numba engine)."""
    return (array_device(volume) == "cpu" and getattr(volume, "ndim", 0) == 3
            and getattr(volume, "dtype", None) == np.float32 and cpu_engine() == "numba")


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
