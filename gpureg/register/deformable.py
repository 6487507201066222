"""Deformable refinement after the affine: cubic B-spline free-form deformation (FFD) minimising MSE.

The coarse-to-fine driver (:func:`register_deformable_prepared`) walks control
grids from coarse to fine (spacing ``spacing * 2^k``, each on the pyramid level
with ``2^k`` times fewer voxels per axis when the pyramid has it), refining the
coefficients exactly between grids (:func:`gpureg.register.bspline.refine`).
On each grid the solver (scipy's L-BFGS-B on the host) only sees
``E(C), dE/dC`` of :class:`~gpureg.register.ffd_level.LevelObjective`:
MSE / var(reference) + ``regularization`` x bending energy, with the analytic
gradient. On the GPU one fused kernel pass forms the residuals and ``r g`` and
cuBLAS products scatter them onto the control points.

Convention
----------
``q(p) = A p + t + u(p)``: reference voxel ``p`` lies at ``q`` in the moving
volume; ``A, t`` is the affine (``matrix``, ``moving_from_reference``) and ``u``
the B-spline displacement (fine voxels, ``(z, y, x)``). The result's
``displacement[:, p] = q(p) - p`` includes the affine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..core import transform as tf
from ..core.config import config
from ..core.backend import (
    array_device,
    cpu_engine,
    ndimage_of,
    resolve_device,
    to_device,
    to_host,
    xp_of,
)
from . import bspline
from .affine import RegistrationResult, register_prepared
from .ffd_level import LevelObjective
from .prepare import Prep, prep_from, prepare_volume, pyramid

__all__ = [
    "DeformableResult",
    "apply_deformation",
    "deformation_field",
    "deformation_mse",
    "register_deformable",
    "register_deformable_prepared",
]

_log = logging.getLogger("gpureg")


@dataclass
class DeformableResult:
    """Outcome of one deformable registration.

    Attributes
    ----------
    displacement : (3, Z, Y, X) ndarray of float32
        Reference voxel ``p`` lies at ``p + displacement[:, p]`` in the moving
        volume (affine included); on the device of the inputs.
    matrix : (4, 4) ndarray of float64
        The affine ``moving_from_reference`` the B-spline refines.
    coefficients : (3, cz, cy, cx) ndarray of float32
        B-spline coefficients (fine voxels) on the finest control grid.
    spacing : float
        Control-point spacing of ``coefficients`` (voxels).
    mse_before, mse_affine, mse_after : float
        MSE of the registration inputs at the identity, after the affine and
        after the deformation (full resolution).
    min_jacobian : float
        Smallest determinant of ``dq/dp`` over the reference grid (<= 0: folding).
    iterations : list of int
        Objective evaluations per control grid, coarse to fine.
    seconds : float
        Wall time (affine included when it was run here).
    device : str
        ``"cpu"`` or ``"gpu"``.
    affine : RegistrationResult or None
        The affine registration run first (None when ``init`` was given).
    """

    displacement: object
    matrix: np.ndarray
    coefficients: np.ndarray
    spacing: float
    mse_before: float
    mse_affine: float
    mse_after: float
    min_jacobian: float
    iterations: list = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    affine: RegistrationResult | None = None


def register_deformable(fixed, moving, *, prep: Prep | None = None, init=None, spacing: float = 8.0,
                        levels: int = 3, regularization: float = 1.0, device: str = "auto", mask=None,
                        max_iter: int = 25, tol: float = 1e-6, min_size: int = 16, interpolation: str = "auto",
                        **deprecated) -> DeformableResult:
    """Register ``moving`` to ``fixed``: an affine, then a cubic B-spline free-form deformation.

    Parameters
    ----------
    fixed, moving : (Z, Y, X) ndarray
        Reference and moving volumes of the same shape (NumPy or CuPy).
    prep : Prep, optional
        How both volumes are prepared, as in :func:`gpureg.register_affine`
        (default ``Prep()``: binarized with a ramp, smoothed; ``Prep(binarize=False)``: grey levels).
    init : (4, 4) array_like or RegistrationResult, optional
        The affine ``moving_from_reference`` to refine; default: run
        :func:`gpureg.register_affine` on the same prepared volumes first.
    spacing : float
        Control-point spacing of the finest grid (voxels, >= 3 and at most the
        smallest axis - 1).
    levels : int
        Control grids ``spacing * 2^(levels-1) .. spacing`` (grids coarser than
        the volume are skipped).
    regularization : float
        Weight of the bending energy (mean squared second derivative of the
        displacement, 1/voxel^2) against MSE / var(reference); >= 0. Chosen
        over ``bench/deformable.py``'s 64^3 sweep (warp amplitude 1-6 voxels,
        smoothness sigma 4-12, salt-and-pepper 0-10 %; cubic sampling, 25
        iterations): 1 was within 0.01 voxel of the best of {0.5, 1, 2} in
        every row (e.g. amplitude 3, sigma 8: 0.071 / 0.070 / 0.077 voxel;
        amplitude 1, sigma 12: 0.026 / 0.027 / 0.026).
    device : {"auto", "cpu", "gpu"}
        As in :func:`gpureg.register_affine`.
    mask : (Z, Y, X) ndarray of bool, optional
        Reference voxels that count in the metric.
    max_iter : int
        L-BFGS-B iterations per control grid at most (64^3 sweep, cubic: 25
        iterations within 0.005 voxel of 40 and 80, at 0.6x the time of 40).
    tol : float
        Stop a control grid when an iteration lowers the objective by less
        than this fraction of its value at the grid's start.
    min_size : int
        Smallest pyramid axis used for the coarse grids.
    **deprecated
        ``binarize``, ``denoise``, ``smooth``, ``ramp``: the old spelling of
        ``prep`` (they build the :class:`Prep`, with a :class:`DeprecationWarning`).

    interpolation : {"auto", "linear", "cubic"}
        Sampling of the moving volume in the objective: trilinear or cubic
        B-spline (the compiled CPU engine and the GPU; the NumPy engine is
        trilinear only). ``"auto"``: cubic where it runs, else trilinear.
        Trilinear sampling biases the MSE minimum by its own interpolation
        error (the "grid effect"): on ``bench/deformable.py``'s 64^3 sweep the
        mean error over the particles falls from 0.11-0.14 voxel (trilinear)
        to 0.03-0.08 (cubic) for amplitudes 1-3 voxels, at about 1.5x the time.

    Returns
    -------
    DeformableResult
        ``apply_deformation(moving, result)`` lies on the grid of ``fixed``.
    """
    t0 = time.perf_counter()
    prep = prep_from(prep, deprecated, "register_deformable")
    _check_options(getattr(fixed, "shape", ()), spacing, levels, regularization)
    dev = "gpu" if array_device(fixed) == "gpu" else resolve_device(device)
    f = prepare_volume(fixed, dev, prep, name="fixed")
    m = prepare_volume(moving, dev, prep, name="moving")
    result = register_deformable_prepared(f, m, init=init, spacing=spacing, levels=levels,
                                          regularization=regularization, mask=mask, max_iter=max_iter, tol=tol,
                                          min_size=min_size, interpolation=interpolation)
    result.seconds = time.perf_counter() - t0  # preparation included
    return result


def register_deformable_prepared(fixed, moving, *, init=None, spacing: float = 8.0, levels: int = 3,
                                 regularization: float = 1.0, mask=None, max_iter: int = 25, tol: float = 1e-6,
                                 min_size: int = 16, interpolation: str = "auto") -> DeformableResult:
    """:func:`register_deformable` on volumes already made by :func:`prepare_volume` (same device).

    ``interpolation="cubic"`` (the ``"auto"`` choice where it runs: the
    compiled CPU engine or the GPU) samples the moving volume with cubic
    B-splines in the objective (:func:`gpureg.core.cpu_ffd.residual_gradient_cubic`,
    ``kernels/bspline.cu``): trilinear sampling biases the MSE minimum (the "grid effect").
    """
    t0 = time.perf_counter()
    if fixed.shape != moving.shape:
        raise ValueError(f"fixed and moving must have the same shape, got {tuple(fixed.shape)} and {tuple(moving.shape)}")
    shape = tuple(int(n) for n in fixed.shape)
    _check_options(shape, spacing, levels, regularization)
    dev = array_device(fixed)
    interpolation = _interpolation(interpolation, dev)
    msk = None
    if mask is not None:
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask must have the reference shape {shape}, got {tuple(mask.shape)}")
        msk = to_device(mask, dev, np.float32)
    affine = None
    if init is None:
        affine = register_prepared(fixed, moving, mask=mask)
        matrix = affine.matrix
    else:
        matrix = tf.compose(init.matrix if isinstance(init, RegistrationResult) else init)
    variance = float(xp_of(fixed).var(fixed))
    fixed_levels, moving_levels = pyramid(fixed, min_size), pyramid(moving, min_size)
    mask_levels = None if msk is None else pyramid(msk, min_size)
    grids = [k for k in range(int(levels) - 1, -1, -1) if float(spacing) * 2 ** k <= min(shape) - 1]
    coeffs, prev, iterations = None, None, []
    for k in grids:
        s = float(spacing) * 2 ** k
        control = bspline.control_shape(shape, s)
        coeffs = (np.zeros((3, *control)) if coeffs is None else bspline.refine(coeffs, shape, prev, s))
        lvl = min(k, len(fixed_levels) - 1)
        obj = LevelObjective(fixed_levels[lvl], moving_levels[lvl], matrix, level=lvl, spacing=s, control=control,
                             variance=variance, regularization=regularization,
                             mask=None if mask_levels is None else mask_levels[lvl] > 0.5, interpolation=interpolation)
        res = _minimize(obj, coeffs.ravel(), max_iter, tol)
        coeffs, prev = res.x.reshape(3, *control), s
        iterations.append(int(obj.evaluations))
        _log.debug("deformable: spacing %g on level %d: %d evaluations, E %.6g (%s)", s, lvl, obj.evaluations,
                   res.fun, res.message)
    final = LevelObjective(fixed, moving, matrix, level=0, spacing=prev, control=coeffs.shape[1:], variance=variance,
                           regularization=0.0, mask=None if msk is None else msk > 0.5)
    mse_after = final.evaluate(coeffs.ravel(), gradient=False)[2]
    mse_affine = final.evaluate(np.zeros(coeffs.size), gradient=False)[2]
    identity = LevelObjective(fixed, moving, np.eye(4), level=0, spacing=prev, control=coeffs.shape[1:],
                              variance=variance, regularization=0.0, mask=final.mask)
    mse_before = identity.evaluate(np.zeros(coeffs.size), gradient=False)[2]
    c32 = coeffs.astype(np.float32)
    disp = deformation_field(c32, matrix, shape, prev, device=dev)
    jac = bspline.jacobian_determinant(coeffs, matrix, shape, prev)
    return DeformableResult(displacement=disp, matrix=matrix, coefficients=c32, spacing=float(prev),
                            mse_before=mse_before, mse_affine=mse_affine, mse_after=mse_after,
                            min_jacobian=float(jac.min()), iterations=iterations, seconds=time.perf_counter() - t0,
                            device=dev, affine=affine)


def deformation_field(coefficients, matrix, shape, spacing: float, *, device: str = "cpu"):
    """Displacement ``(3, Z, Y, X)`` float32 (affine included) of stored coefficients.

    Parameters
    ----------
    coefficients : (3, cz, cy, cx) array_like
        B-spline coefficients (fine voxels) at ``spacing``.
    matrix : (4, 4) array_like
        The affine ``moving_from_reference``.
    shape : tuple of 3 int
        Reference grid.
    spacing : float
        Control-point spacing (voxels).
    device : {"cpu", "gpu", "auto"}
        Where to build the field.

    Returns
    -------
    (3, Z, Y, X) ndarray of float32
        ``displacement[:, p] = A p + t + u(p) - p``.
    """
    shape = tuple(int(n) for n in shape)
    c = np.asarray(to_host(coefficients), dtype=np.float64)
    if c.ndim != 4 or c.shape[0] != 3 or tuple(c.shape[1:]) != bspline.control_shape(shape, spacing):
        raise ValueError(f"coefficients must have shape (3, {bspline.control_shape(shape, spacing)}) for grid "
                         f"{shape} at spacing {spacing}, got {c.shape}")
    m = tf.compose(matrix)
    dev = resolve_device(device)
    xp = xp_of(to_device(np.zeros(1), dev))
    weights = tuple(xp.asarray(bspline.axis_weights(np.arange(n, dtype=np.float64), spacing, nc), dtype=np.float32)
                    for n, nc in zip(shape, c.shape[1:]))
    out = bspline.evaluate(xp.asarray(c, dtype=np.float32), weights)
    d = m[:3, :3] - np.eye(3)
    axes = [xp.arange(n, dtype=np.float32) for n in shape]
    for i in range(3):
        out[i] += np.float32(m[i, 3])
        for k in range(3):
            if d[i, k] != 0:
                out[i] += np.float32(d[i, k]) * axes[k].reshape([-1 if a == k else 1 for a in range(3)])
    return out


def apply_deformation(moving, result, *, order: int = 1, cval: float = 0.0, device: str = "auto"):
    """Resample ``moving`` onto the reference grid through a deformation.

    Parameters
    ----------
    moving : (Z, Y, X) ndarray
        Moving volume (NumPy or CuPy).
    result : DeformableResult or (3, Z, Y, X) ndarray
        The deformation (its ``displacement``), on the reference grid.
    order : int
        Interpolation order (1: trilinear; scipy/cupyx ``map_coordinates``).
    cval : float
        Value where ``p + displacement`` falls outside the moving volume.
    device : {"auto", "cpu", "gpu"}
        Where to resample; a CuPy input always runs on the GPU.

    Returns
    -------
    (Z, Y, X) ndarray of float32
        ``out[p] = moving(p + displacement[:, p])``; on the GPU when ``moving`` was a CuPy array.
    """
    disp = result.displacement if isinstance(result, DeformableResult) else result
    if getattr(moving, "ndim", None) != 3:
        raise ValueError(f"moving must be a 3D (Z, Y, X) array, got shape {getattr(moving, 'shape', None)}")
    if disp.ndim != 4 or disp.shape[0] != 3:
        raise ValueError(f"displacement must have shape (3, Z, Y, X), got {tuple(disp.shape)}")
    dev = "gpu" if array_device(moving) == "gpu" else resolve_device(device)
    v = to_device(moving, dev, np.float32)
    d = to_device(disp, dev, np.float32)
    xp = xp_of(v)
    coords = d + xp.indices(d.shape[1:], dtype=np.float32)
    out = ndimage_of(v).map_coordinates(v, coords, order=order, mode="constant", cval=float(cval))
    out = out.astype(np.float32, copy=False)
    return out if array_device(moving) == "gpu" else to_host(out)


def deformation_mse(fixed, moving, displacement) -> float:
    """MSE between ``fixed`` and ``moving`` sampled at ``p + displacement[:, p]`` over the valid samples (host).

    The rule of :func:`gpureg.mse_terms`: trilinear, a sample is valid when
    ``0 <= q_k <= n_k - 1`` on every axis.
    """
    from .ffd_level import sample_cpu

    m = np.ascontiguousarray(to_host(moving), dtype=np.float32)
    q = (np.asarray(to_host(displacement), dtype=np.float32) + np.indices(m.shape, dtype=np.float32)).reshape(3, -1)
    value, _, valid = sample_cpu(m.reshape(-1), m.shape, q)
    r = (value - np.asarray(to_host(fixed), dtype=np.float32).reshape(-1))[valid].astype(np.float64)
    return float(r @ r / max(r.size, 1)) if r.size else float("nan")


def _minimize(objective, x0, max_iter, tol):
    """L-BFGS on ``objective`` scaled to 1 at ``x0``: ``tol`` is then the relative decrease per iteration.

    On the GPU (``gpureg.config.solver == "device"``, the default) the
    solver's state stays on the device (:func:`gpureg.register.lbfgs.minimize_lbfgs`);
    else scipy's L-BFGS-B on the host. BLAS runs on one thread meanwhile:
    L-BFGS-B's vectors are a few thousand long, and OpenBLAS's threads cost
    more than they bring (48^3, 2-core CPU under load: 20 ms per L-BFGS-B step
    with its threads, 1 ms without; the separable B-spline products are as
    fast on one thread at these sizes). The residual pass keeps its own
    threads (:mod:`gpureg.core.cpu_kernels`).
    """
    if objective.device == "gpu" and config.solver == "device":
        from .lbfgs import minimize_lbfgs

        xd = to_device(x0, "gpu", np.float64)
        v0 = max(float(objective.evaluate(xd, gradient=False, host=False)[0]), 1e-30)

        def scaled_device(x):
            v, g, _ = objective.evaluate(x, host=False)
            return v / v0, g / v0

        res = minimize_lbfgs(scaled_device, xd, max_iter=max_iter, tol=tol, memory=20)
        res.x, res.fun = to_host(res.x), res.fun * v0
        return res

    from scipy.optimize import minimize

    v0 = max(float(objective(x0)[0]), 1e-30)

    def scaled(x):
        v, g = objective(x)
        return v / v0, g / v0

    with _one_blas_thread():
        return minimize(scaled, x0, jac=True, method="L-BFGS-B",
                        options={"maxiter": int(max_iter), "maxcor": 20, "ftol": float(tol), "gtol": 1e-12})


def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; without it BLAS keeps its threads
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _interpolation(interpolation, device):
    """``"auto"`` -> ``"cubic"`` on the GPU and the compiled CPU engine, ``"linear"`` on the NumPy engine."""
    if interpolation == "auto":
        return "cubic" if device == "gpu" or cpu_engine() == "numba" else "linear"
    if interpolation not in ("linear", "cubic"):
        raise ValueError(f"interpolation must be 'auto', 'linear' or 'cubic', got {interpolation!r}")
    return interpolation


def _check_options(shape, spacing, levels, regularization):
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"volumes must be 3D (Z, Y, X), got shape {shape}")
    if min(shape) < 4:
        raise ValueError(f"volume shape {shape} is too small for one control cell (needs at least 4 voxels per axis)")
    if not np.isfinite(spacing) or spacing < 3:
        raise ValueError(f"spacing must be at least 3 voxels, got {spacing}")
    if spacing > min(shape) - 1:
        raise ValueError(f"spacing {spacing:g} is larger than the volume (at most {min(shape) - 1} voxels for "
                         f"shape {shape})")
    if int(levels) != levels or levels < 1:
        raise ValueError(f"levels must be a positive integer, got {levels}")
    if not np.isfinite(regularization) or regularization < 0:
        raise ValueError(f"regularization must be >= 0, got {regularization}")
