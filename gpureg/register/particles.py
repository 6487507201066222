"""Per-particle registration: align particles that move relative to each other.

One affine for the whole field of view fails when the particles of a sample
move relative to each other between energies (one stays, another tilts). This
module registers each particle on its own:

1. **labels** on the reference grid: connected components of the binarized
   reference (or given by the user);
2. a **global** affine for the whole volume (:func:`gpureg.register_affine`);
3. per particle, an affine **warm-started from the global one**, with the
   metric restricted to the particle's *region* (its label grown by ``dilate``
   voxels, never into another particle) and computed on a box around it;
4. :func:`apply_piecewise` resamples each region with its own transform
   (background: the global one).

:func:`detect_relative_motion` reports the residual MSE inside each particle
after the global registration and warns (:class:`RelativeMotionWarning`) when
one particle's residual is much larger than another's.

Convention
----------
Every matrix is ``moving_from_reference`` in voxel indices ``(z, y, x)``
(DESIGN.md): voxel ``p`` of the reference grid in region ``k`` is sampled at
``matrices[k] @ p`` of the moving volume. Label 0 is the background and uses
the global matrix. Labels are non-negative integers on the reference grid.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..core.backend import array_device, resolve_device, to_device, to_host, xp_of
from .affine import MAX_ITER, TOL, RegistrationResult, register_prepared
from .particle_fit import Crop, fit_shared_rigid, mse_of, region_terms, shift_matrix
from .particle_options import PARTICLE_MODELS, ParticleOptions, particle_options_from
from .prepare import MIN_SIZE, PREP_KEYWORDS, Prep, prep_from, prepare_volume
from .residuals import ResidualReport, region_variance, residual_report

__all__ = ["apply_piecewise", "PARTICLE_MODELS", "particle_regions", "ParticleOptions", "ParticleResult",
           "register_particles"]


_log = logging.getLogger("gpureg")


@dataclass
class ParticleResult:
    """Outcome of :func:`register_particles`.

    Attributes
    ----------
    global_result : RegistrationResult
        The whole-volume registration.
    matrices : dict {int: (4, 4) ndarray of float64}
        ``moving_from_reference`` per label; ``matrices[0]`` is the global one,
        and skipped labels keep it.
    mse_global, mse_particle : dict {int: float}
        Residual MSE of the registration inputs inside each particle region
        after the global and after the per-particle registration (equal for a
        skipped label). Key 0: the whole grid, global alignment vs the
        piecewise one (background global, each region its own transform).
    skipped : dict {int: str}
        Labels that kept the global transform, with the reason.
    labels : (Z, Y, X) ndarray of int32
        Particle labels on the reference grid (host).
    regions : (Z, Y, X) ndarray of int32
        ``labels`` grown by ``dilate`` voxels without overlap (host): the
        metric region of each particle and the map for :func:`apply_piecewise`.
    residual : ResidualReport
        Per-particle residuals after the global registration, and how far
        each particle's own transform moves it from the global one.
    seconds : float
        Wall time of the whole call.
    device : str
        ``"cpu"`` or ``"gpu"``.
    """

    global_result: RegistrationResult
    matrices: dict
    mse_global: dict
    mse_particle: dict
    skipped: dict
    labels: np.ndarray
    regions: np.ndarray
    residual: ResidualReport
    seconds: float = 0.0
    device: str = "cpu"
    iterations: dict = field(default_factory=dict)

    @property
    def n_labels(self) -> int:
        """Largest label value (0 when there is no particle)."""
        return max([0, *self.matrices])

    def stack(self, n_labels: int | None = None) -> np.ndarray:
        """(n_labels + 1, 4, 4) matrices indexed by label (0: global); absent labels get the global one."""
        n = self.n_labels if n_labels is None else int(n_labels)
        out = np.repeat(self.matrices[0][None], n + 1, axis=0)
        for k, m in self.matrices.items():
            if 0 < k <= n:
                out[k] = m
        return out

    def mse_arrays(self, n_labels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(mse_global, mse_particle)``, each (n_labels + 1,) indexed by label (NaN for absent labels)."""
        n = self.n_labels if n_labels is None else int(n_labels)
        out = np.full((2, n + 1), np.nan)
        for row, src in enumerate((self.mse_global, self.mse_particle)):
            for k, v in src.items():
                if k <= n:
                    out[row, k] = v
        return out[0], out[1]


def register_particles(fixed, moving, labels=None, *, prep: Prep | None = None,
                       particles: ParticleOptions | None = None, device: str = "auto", prepared: bool = False,
                       init=None, global_result: RegistrationResult | None = None, **options) -> ParticleResult:
    """Register ``moving`` to ``fixed`` with one transform per particle.

    Parameters
    ----------
    fixed, moving : (Z, Y, X) ndarray
        Reference and moving volumes of the same shape (NumPy or CuPy).
    labels : (Z, Y, X) ndarray of int, optional
        Particle labels on the reference grid (0 background). Default: the
        connected components of the Otsu-binarized ``fixed`` with at least
        ``min_voxels`` voxels (:func:`gpureg.xanes.particle_labels`).
    prep : Prep, optional
        How both volumes are prepared (default ``Prep()``: binarized, the
        reference method; ``Prep(binarize=False)``: grey levels), as in
        :func:`gpureg.register_affine`; its ``denoise`` also applies to the
        default labels.
    device : {"auto", "cpu", "gpu"}
        Where to compute; CuPy inputs always run on the GPU.
    prepared : bool
        ``fixed`` and ``moving`` were already made by
        :func:`gpureg.register.prepare_volume` (as the pipeline does): ``prep``
        is not applied again (and must not be given).
    particles : ParticleOptions, optional
        How each particle is registered (model, size limit, regions, acceptance);
        default ``ParticleOptions()``.
    init : (4, 4) array_like, optional
        Start of the global registration (default: centre of mass).
    global_result : RegistrationResult, optional
        A global registration of these same inputs already done: it is
        used as is (the pipeline passes its own).
    **options
        Passed to :func:`gpureg.register.register_prepared` (``model``,
        ``min_size``, ``max_iter``, ``tol``, ``solver``); ``min_size``,
        ``max_iter`` and ``tol`` also set the per-particle pyramid and solver.
        The old ``binarize``, ``denoise``, ``smooth``, ``ramp`` still build
        ``prep``, and ``particle_model``, ``min_voxels``, ``dilate``, ``guard``,
        ``margin``, ``min_gain``, ``ratio`` build ``particles``
        (:class:`DeprecationWarning`).

    Returns
    -------
    ParticleResult
        ``apply_piecewise(moving, result.matrices, result.regions)`` lies on the
        grid of ``fixed``.

    Raises
    ------
    ValueError
        ``labels`` of another shape than ``fixed``, not integer, or negative.

    Notes
    -----
    Every particle starts from the global transform and keeps it unless its
    own fit lowers the MSE of its region by ``particles.min_gain`` at full resolution.

    Why ``"rigid"`` is the default: a particle of a few thousand voxels
    constrains 12 affine parameters poorly, and the global affine, a
    compromise between particles that moved differently, carries shear and
    scale that belong to neither. On the 64^3 two-particle phantom (binarized,
    particle 2 turned 4 degrees and shifted 3 voxels relative to particle 1)
    independent affines leave about 0.3 voxel on the small particle; the
    shared-affine + rigid model about 0.1 (tests/register/test_particles.py).
    """
    t0 = time.perf_counter()
    po = particle_options_from(particles, options, "register_particles")
    particle_model, min_voxels, dilate, guard, margin = po.model, po.min_voxels, po.dilate, po.guard, po.margin
    min_gain, ratio = po.min_gain, po.ratio
    if "mask" in options:
        raise ValueError("register_particles: option 'mask' is not allowed (each particle's region is its mask)")
    prep = prep_from(prep, {k: options.pop(k) for k in PREP_KEYWORDS if k in options}, "register_particles")
    if prepared:
        if prep != Prep():
            raise ValueError("register_particles: prepared=True takes volumes already prepared; prep is not applied")
        prep = Prep(binarize=False, smooth=0.0)  # only the checks and the conversion to float32
    dev = "gpu" if array_device(fixed) == "gpu" else resolve_device(device)
    f = prepare_volume(fixed, dev, prep, name="fixed")
    m = prepare_volume(moving, dev, prep, name="moving")
    if f.shape != m.shape:
        raise ValueError(f"fixed and moving must have the same shape, got {tuple(f.shape)} and {tuple(m.shape)}")
    lab = _labels(fixed, labels, f.shape, prep.denoise, min_voxels)

    if global_result is None:
        global_result = register_prepared(f, m, init=init, **options)
    g = np.asarray(global_result.matrix, dtype=np.float64)

    regions = particle_regions(lab, dilate)
    sizes = np.bincount(lab.ravel(), minlength=int(lab.max()) + 1)
    crops, skipped = {}, {}
    for k, box in enumerate(_boxes(regions), start=1):
        if box is None:
            continue
        crops[k] = Crop(f, m, regions, lab, k, box, g, margin, guard)
        if sizes[k] < int(min_voxels):
            skipped[k] = f"{int(sizes[k])} voxels < min_voxels={int(min_voxels)}"
        elif not bool(crops[k].mask.any()):
            skipped[k] = f"no voxel farther than guard={int(guard)} from another particle"
    sums_g = {k: cr.terms(g) for k, cr in crops.items()}
    active = sorted((k for k in crops if k not in skipped), key=lambda k: (-sizes[k], k))
    solver = {"min_size": int(options.get("min_size", MIN_SIZE)), "max_iter": int(options.get("max_iter", MAX_ITER)),
              "tol": float(options.get("tol", TOL))}  # register_prepared's defaults, defined there
    found, iterations = {}, {}
    if active and particle_model == "rigid":
        try:
            found, passes = fit_shared_rigid({k: crops[k] for k in active}, active, g, f.shape, **solver)
            iterations = {k: passes for k in active}
        except (ValueError, RuntimeError) as exc:
            skipped.update({k: f"registration failed ({exc})" for k in active})
    elif active:
        for k in active:
            cr = crops[k]
            try:
                res = register_prepared(cr.fixed, cr.moving, init=cr.to_crop(g), mask=cr.mask, **options)
            except (ValueError, RuntimeError) as exc:
                skipped[k] = f"registration failed ({exc})"
            else:
                found[k], iterations[k] = cr.to_full(res.matrix), res.iterations
    matrices, sums_p = {0: g}, {}
    for k, cr in crops.items():
        sums = cr.terms(found[k]) if k in found else sums_g[k]
        if k in found and mse_of(sums) * float(min_gain) <= mse_of(sums_g[k]):
            matrices[k], sums_p[k] = found[k], sums
        else:
            if k in found:
                _log.info("particle %d: own fit lowers its MSE by x%.3f only (< min_gain %.3g); keeps the global "
                          "transform", k, mse_of(sums_g[k]) / max(mse_of(sums), 1e-300), min_gain)
            matrices[k], sums_p[k] = g, sums_g[k]
    for k, why in sorted(skipped.items()):
        warnings.warn(f"register_particles: label {k} skipped ({why}); it keeps the global transform", stacklevel=2)

    mse_g = {k: mse_of(s) for k, s in sums_g.items()}
    mse_p = {k: mse_of(s) for k, s in sums_p.items()}
    whole = region_terms(f, m, g, None)
    mse_g[0] = mse_of(whole)
    # The piecewise alignment over the grid (what apply_piecewise gives): the global sums with each
    # whole region's (guard band included) replaced by its sums under its own transform.
    cnt, sse = whole
    for k in (k for k in crops if matrices[k] is not g):
        before, after = crops[k].terms(g, region=True), crops[k].terms(matrices[k], region=True)
        cnt, sse = cnt - before[0] + after[0], sse - before[1] + after[1]
    mse_p[0] = sse / cnt if cnt > 0 else float("inf")

    done = [k for k in crops if k not in skipped]
    report = residual_report({k: mse_g[k] for k in done}, {k: int(sums_g[k][0]) for k in done}, ratio,
                     region_variance(f, regions), moved={k: crops[k].distance(matrices[k], g) for k in done})
    return ParticleResult(global_result=global_result, matrices=matrices, mse_global=mse_g, mse_particle=mse_p,
                          skipped=skipped, labels=lab, regions=regions, residual=report,
                          seconds=time.perf_counter() - t0, device=dev, iterations=iterations)


def apply_piecewise(moving, transforms, labels, *, background=None, device: str = "auto", cval: float = 0.0,
                    guard: int = 0):
    """Resample every labelled region of the reference grid with its own transform.

    Parameters
    ----------
    moving : (Z', Y', X') ndarray
        Moving volume (NumPy or CuPy); converted to float32.
    transforms : dict {int: (4, 4)} or (n_labels + 1, 4, 4) array_like
        ``moving_from_reference`` per label (array: indexed by label, row 0 the
        background). Labels without a transform use ``background``.
    labels : (Z, Y, X) ndarray of int
        Region of every reference voxel (0 background); defines the output grid.
        :attr:`ParticleResult.regions` is the intended map.
    background : (4, 4) array_like, optional
        Transform of label 0 (default: ``transforms[0]``).
    device : {"auto", "cpu", "gpu"}
        A CuPy ``moving`` always runs on the GPU.
    cval : float
        Value where a sample falls outside ``moving``.
    guard : int
        Voxels of a region within this many voxels of another region take the
        background transform: where two particles touch, a voxel mixes both
        (blur, partial volume) and neither particle's transform is right for
        it, while the global one keeps it consistent with the affine map. On
        ``gpureg simulate --relative-motion --size 48`` (3 seeds), edge
        energies outside the truth's range at the contact: 14-47 voxels with
        0, 13-26 with 2, the affine map's 7-21 with 3.

    Returns
    -------
    (Z, Y, X) ndarray of float32
        ``out[p] = moving(T[labels[p]] @ p)`` (trilinear, as
        :func:`gpureg.apply_affine`); CuPy when ``moving`` was.

    Notes
    -----
    The background is one full resampling; each particle only its bounding box.
    """
    from ..core.transform import apply_affine

    if getattr(moving, "ndim", None) != 3:
        raise ValueError(f"apply_piecewise: moving must be 3D (Z, Y, X), got shape {getattr(moving, 'shape', None)}")
    lab = _check_labels(labels, getattr(labels, "shape", None), name="labels")
    if int(guard) < 0:
        raise ValueError(f"apply_piecewise: guard must be >= 0 voxels, got {guard}")
    if int(guard) > 0:
        lab = _without_contacts(lab, int(guard))
    table = _transform_table(transforms)
    bg = table.get(0) if background is None else np.asarray(to_host(background), dtype=np.float64)
    if bg is None:
        raise ValueError("apply_piecewise: no background transform: give transforms[0] or background=")
    on_gpu = array_device(moving) == "gpu" or resolve_device(device) == "gpu"
    dev = "gpu" if on_gpu else "cpu"
    src = to_device(moving, dev, np.float32)
    out = apply_affine(src, bg, output_shape=lab.shape, cval=cval, device=dev)
    lab_dev = to_device(lab, dev) if dev == "gpu" else lab
    xp = xp_of(out)
    for k, box in enumerate(_boxes(lab), start=1):
        if box is None or k not in table:
            continue
        lo = np.array([s.start for s in box], dtype=np.float64)
        sub = apply_affine(src, table[k] @ shift_matrix(lo), output_shape=tuple(s.stop - s.start for s in box), cval=cval,
                           device=dev)
        out[box] = xp.where(lab_dev[box] == k, sub, out[box])
    return out if array_device(moving) == "gpu" or dev == "cpu" else to_host(out)


def piecewise_map(points, transforms, labels, *, guard: int = 0) -> np.ndarray:
    """Where :func:`apply_piecewise` samples the moving volume for arbitrary reference-grid points.

    Parameters
    ----------
    points : (3, ...) array_like
        Reference-grid coordinates ``(z, y, x)`` (host).
    transforms, labels, guard
        As in :func:`apply_piecewise` (row 0 / label 0: the background transform).

    Returns
    -------
    (3, ...) ndarray of float64
        ``T[k] @ point`` with ``k`` the region of the voxel nearest each point
        (points off the grid take the nearest edge voxel's region): on grid
        points exactly the coordinates :func:`apply_piecewise` samples.
    """
    pts = np.asarray(to_host(points), dtype=np.float64)
    if pts.ndim < 1 or pts.shape[0] != 3:
        raise ValueError(f"piecewise_map: points must have shape (3, ...), got {pts.shape}")
    lab = _check_labels(labels, getattr(labels, "shape", None), name="labels")
    if int(guard) > 0:
        lab = _without_contacts(lab, int(guard))
    table = _transform_table(transforms)
    if 0 not in table:
        raise ValueError("piecewise_map: no background transform: give transforms[0]")
    idx = tuple(np.clip(np.rint(pts[a]), 0, n - 1).astype(np.intp) for a, n in enumerate(lab.shape))
    region = lab[idx]
    out = np.empty_like(pts)
    for k in np.unique(region):
        m = table.get(int(k), table[0])
        sel = region == k
        p = pts[:, sel]
        out[:, sel] = m[:3, :3] @ p + m[:3, 3:4]
    return out


def particle_regions(labels, dilate: int = 3) -> np.ndarray:
    """Labels grown by ``dilate`` voxels into the background, nearest label first.

    Parameters
    ----------
    labels : (Z, Y, X) ndarray of int
        Particle labels (0 background), NumPy or CuPy.
    dilate : int
        Growth in voxels (Euclidean distance); 0 returns the labels.

    Returns
    -------
    (Z, Y, X) ndarray of int32
        On the host. A background voxel within ``dilate`` of a particle takes
        the label of the nearest one; particle voxels keep theirs.
    """
    from scipy import ndimage

    lab = _check_labels(labels, getattr(labels, "shape", None), name="labels")
    if int(dilate) < 0:
        raise ValueError(f"particle_regions: dilate must be >= 0, got {dilate}")
    out = lab.copy()
    if int(dilate) == 0 or not out.any():
        return out
    r = int(dilate)
    best = np.full(lab.shape, np.inf, dtype=np.float32)
    # Distance to each particle within its own box (cheap for many small particles).
    for k, box in enumerate(_boxes(lab), start=1):
        if box is None:
            continue
        big = tuple(slice(max(s.start - r, 0), min(s.stop + r, n)) for s, n in zip(box, lab.shape))
        sub = lab[big]
        d = ndimage.distance_transform_edt(sub != k).astype(np.float32)
        take = (sub == 0) & (d <= r) & (d < best[big])
        out[big][take] = k
        best[big][take] = d[take]
    return out


def _without_contacts(labels, guard):
    """``labels`` with 0 where a voxel lies within ``guard`` voxels of another label."""
    from scipy import ndimage

    out = labels.copy()
    for k in np.unique(labels[labels > 0]):
        other = (labels > 0) & (labels != k)
        if other.any():
            out[(labels == k) & (ndimage.distance_transform_edt(~other) <= guard)] = 0
    return out


def _labels(fixed, labels, shape, denoise, min_voxels):
    if labels is not None:
        return _check_labels(labels, shape, name="labels")
    from ..core.segment import binarize, particle_labels

    mask = to_host(binarize(to_device(fixed, array_device(fixed), np.float32), denoise=denoise)) > 0.5
    lab, _ = particle_labels(mask, min_voxels=int(min_voxels))
    return np.asarray(lab, dtype=np.int32)


def _check_labels(labels, shape, *, name):
    if not hasattr(labels, "shape"):
        labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"{name} must be a 3D (Z, Y, X) array, got shape {tuple(labels.shape)}")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name} must have the reference shape {tuple(shape)}, got {tuple(labels.shape)}")
    dtype = np.dtype(labels.dtype)
    if dtype.kind not in "biu":
        raise ValueError(f"{name} must hold non-negative integers, got dtype {dtype}")
    lab = np.asarray(to_host(labels)).astype(np.int32, copy=False)
    if lab.size and int(lab.min()) < 0:
        raise ValueError(f"{name} must be non-negative (0 background), got minimum {int(lab.min())}")
    return lab


def _boxes(labels):
    """Bounding slices per label 1..max (None for an absent label)."""
    from scipy import ndimage

    return ndimage.find_objects(labels) if labels.any() else []


def _transform_table(transforms):
    if isinstance(transforms, dict):
        items = transforms.items()
    else:
        arr = np.asarray(to_host(transforms), dtype=np.float64)
        if arr.ndim != 3 or arr.shape[1:] != (4, 4):
            raise ValueError(f"apply_piecewise: transforms must be a dict of (4, 4) or an (n_labels + 1, 4, 4) "
                             f"array, got shape {arr.shape}")
        items = enumerate(arr)
    table = {}
    for k, mat in items:
        mat = np.asarray(to_host(mat), dtype=np.float64)
        if mat.shape != (4, 4):
            raise ValueError(f"apply_piecewise: transform of label {k} must have shape (4, 4), got {mat.shape}")
        table[int(k)] = mat
    return table
