"""Affine registration by mean squared error (CPU and GPU through the same code).

The coarse-to-fine driver (:func:`register_prepared`) is separate from the
solver (:func:`gpureg.core.solver.levenberg_marquardt`), which only sees a
function returning :class:`~gpureg.core.terms.MetricTerms` for a parameter
vector. On the GPU that function is one fused kernel pass; the solver runs on
the host on the 1 + 1 + 12 + 78 reduced numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..core import transform as tf
from ..core.backend import (
    array_device,
    resolve_device,
    to_device,
)
from ..core.config import SOLVERS, config
from ..core.metric import cell_support, mse_terms
from ..core.solver import levenberg_marquardt
from .prepare import MIN_SIZE, Prep, center_of_mass_init, level_to_fine, prep_from, prepare_volume, pyramid

__all__ = ["MODELS", "register_affine", "register_prepared", "RegistrationResult"]

MODELS = ("affine", "translation")
MAX_ITER = 60  # metric passes per pyramid level at most (default)
TOL = 1e-3  # a level stops when a step moves no voxel by more than this (voxels of that level; default)


_log = logging.getLogger("gpureg")


@dataclass
class RegistrationResult:
    """Outcome of one affine registration.

    Attributes
    ----------
    matrix : (4, 4) ndarray of float64
        ``moving_from_reference`` in voxel indices ``(z, y, x)``.
    mse_before, mse_after : float
        MSE of the registration inputs (binarized when asked) at the initial
        identity and at the result, at full resolution.
    iterations : list of int
        Metric passes per pyramid level, coarse to fine.
    seconds : float
        Wall time of the whole registration.
    device : str
        ``"cpu"`` or ``"gpu"``.
    converged : bool
        Whether the finest level met the step tolerance.
    prepare_seconds : float
        Part of ``seconds`` spent preparing both volumes (:func:`register_affine`;
        0 for :func:`register_prepared`, whose inputs come prepared).
    """

    matrix: np.ndarray
    mse_before: float
    mse_after: float
    iterations: list = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    converged: bool = False
    prepare_seconds: float = 0.0


def register_affine(fixed, moving, *, prep: Prep | None = None, device: str = "auto", init=None, mask=None,
                    model: str = "affine", min_size: int = MIN_SIZE, max_iter: int = MAX_ITER, tol: float = TOL,
                    solver: str | None = None, **deprecated) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a 12-parameter affine minimising MSE.

    Parameters
    ----------
    fixed, moving : (Z, Y, X) ndarray
        Reference and moving volumes of the same shape (NumPy or CuPy; any real
        dtype, converted to float32). NaN/inf and constant volumes are errors.
    prep : Prep, optional
        How both volumes are prepared (:class:`gpureg.Prep`): default ``Prep()``,
        Otsu-binarized (the reference method) with a partial-volume ramp of 3
        voxels, then smoothed (sigma 1 voxel); ``Prep(binarize=False)`` registers
        grey levels. Its ``denoise``, ``smooth`` and ``ramp`` are explained below.
    device : {"auto", "cpu", "gpu"}
        Where to compute; CuPy inputs always run on the GPU.
    init : (4, 4) array_like, optional
        Starting ``moving_from_reference``; default: centre-of-mass translation.
    mask : (Z, Y, X) ndarray of bool, optional
        Restrict the metric to these reference voxels.
    model : {"affine", "translation"}
        Free parameters: all 12, or the 3 shifts only.
    min_size : int
        The pyramid halves the grid while the smallest axis stays >= this.
    max_iter : int
        Metric passes per level at most.
    tol : float
        Stop a level when a step moves no voxel of the grid by more than this
        many voxels (of that level).
    solver : {"device", "host"}, optional
        On the GPU: Levenberg-Marquardt steps on the device, or the NumPy solver
        on the host (for comparisons); default ``gpureg.config.solver``. The
        CPU always solves on the host.
    **deprecated
        ``binarize``, ``denoise``, ``smooth``, ``ramp``: the old spelling of
        ``prep`` (they build the :class:`Prep`, with a :class:`DeprecationWarning`).

    Returns
    -------
    RegistrationResult
        ``apply_affine(moving, result.matrix)`` lies on the grid of ``fixed``.

    Notes
    -----
    ``prep.denoise``: filter both volumes first (before binarization when that is asked).
    For salt-and-pepper noise ``"impulse"`` (only the saturated voxels
    replaced: unbiased, measured 0.09 -> 0.04 voxel at 10 % binarized)
    rather than ``"median"`` (erodes the particles the more the noisier).

    ``prep.smooth``: Gaussian sigma (voxels) applied to both volumes (after binarization)
    before registering; 0 = off. The MSE of two binary volumes is nearly
    piecewise constant in sub-voxel motion, and with trilinear interpolation
    the MSE of sharp grey volumes is biased toward grid-aligned transforms
    (the "grid effect"); sigma = 1 removes both (test phantom: binarized
    0.24 -> 0.04 voxel, grey near-identity motion 0.25 -> 0.03 voxel).

    ``prep.ramp``: with ``binarize``, width (voxels) of the partial-volume ramp across the
    Otsu surface (:func:`gpureg.core.segment.partial_volume`, the clipped
    signed distance to the surface, contrast-invariant like the hard
    binarization); 0 = hard 0/1. Smoothing alone cannot undo the grid
    quantisation of a hard binarization: measured at 64^3 (CPU,
    tests/register/test_accuracy.py, bench/accuracy.py), pure sub-voxel
    shifts 0.22 -> 0.04 voxel, random affines 0.08 -> 0.03 voxel noise-free.
    """
    t0 = time.perf_counter()
    prep = prep_from(prep, deprecated, "register_affine")
    dev = "gpu" if array_device(fixed) == "gpu" else resolve_device(device)
    f = prepare_volume(fixed, dev, prep, name="fixed")
    m = prepare_volume(moving, dev, prep, name="moving")
    prepared = time.perf_counter()
    result = register_prepared(f, m, init=init, mask=mask, model=model, min_size=min_size, max_iter=max_iter, tol=tol,
                               solver=solver)
    result.prepare_seconds = prepared - t0
    result.seconds = time.perf_counter() - t0  # preparation included
    return result


def register_prepared(fixed, moving, *, init=None, mask=None, model: str = "affine", min_size: int = MIN_SIZE,
                      max_iter: int = MAX_ITER, tol: float = TOL, solver: str | None = None) -> RegistrationResult:
    """Register volumes already made by :func:`prepare_volume` (no further filtering).

    Series, the pipeline and watch mode prepare the reference once and call
    this for every energy. Parameters as in :func:`register_affine`; the
    device is that of ``fixed`` (NumPy or CuPy float32 arrays). On the GPU the
    Levenberg-Marquardt steps run on the device
    (:func:`gpureg.core.cuda_solver.levenberg_marquardt_device`) unless
    ``solver="host"`` (default: ``gpureg.config.solver``) selects the NumPy
    solver on the host (for comparisons).
    """
    t0 = time.perf_counter()
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    solver = config.solver if solver is None else solver
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    f, m = fixed, moving
    dev = array_device(f)
    if f.shape != m.shape:
        raise ValueError(f"fixed and moving must have the same shape, got {tuple(f.shape)} and {tuple(m.shape)}")
    msk = _check_mask(mask, f.shape, dev)
    matrix = center_of_mass_init(f, m) if init is None else tf.compose(init)
    fixed_levels, moving_levels = pyramid(f, min_size), pyramid(m, min_size)
    mask_levels = [None] * len(fixed_levels) if msk is None else pyramid(msk, min_size)
    free = np.ones(12, bool) if model == "affine" else np.r_[np.zeros(9, bool), np.ones(3, bool)]
    iterations, converged = [], False
    for level in range(len(fixed_levels) - 1, -1, -1):
        fl, ml = fixed_levels[level], moving_levels[level]
        ml_mask = None if mask_levels[level] is None else mask_levels[level] > 0.5
        to_fine = level_to_fine(level)
        center = tf.grid_center(fl.shape)
        params0 = tf.params_from_matrix(np.linalg.inv(to_fine) @ matrix @ to_fine, center)

        support = _support(ml)
        seen = {}  # finest level: the pass at the result is mse_after (same grid, mask and matrix)

        def terms(p, fl=fl, ml=ml, center=center, ml_mask=ml_mask, support=support, seen=seen):
            out = mse_terms(fl, ml, tf.matrix_from_params(p, center), center=center, mask=ml_mask, support=support)
            seen[np.asarray(p, dtype=np.float64).tobytes()] = out
            return out

        if dev == "gpu" and solver == "device":
            # The solver's state stays on the GPU; the host reads its status every 8 passes.
            from ..core.cuda_solver import levenberg_marquardt_device

            params, n_pass, converged = levenberg_marquardt_device(fl, ml, params0, center, free=free, mask=ml_mask,
                                                                   max_iter=max_iter, tol=tol)
        else:
            params, n_pass, converged = levenberg_marquardt(
                terms, params0, _corner_move(fl.shape), free=free, max_iter=max_iter, tol=tol,
                empty_start="the initial transform maps the reference grid entirely outside the moving volume")
        matrix = to_fine @ tf.matrix_from_params(params, center) @ np.linalg.inv(to_fine)
        iterations.append(n_pass)
    # the loop ended at level 0 (pyramid()[0] is f itself): support is that of m
    before = mse_terms(f, m, np.eye(4), mask=msk, hessian=False, support=support)
    after = seen.get(np.asarray(params, dtype=np.float64).tobytes()) if fixed_levels[0] is f else None
    if after is None or not np.array_equal(matrix, tf.matrix_from_params(params, tf.grid_center(f.shape))):
        after = mse_terms(f, m, matrix, mask=msk, hessian=False, support=support)
    if after.count == 0:
        raise RuntimeError("registration diverged: the moving volume no longer overlaps the reference")
    return RegistrationResult(matrix=matrix, mse_before=before.mse, mse_after=after.mse, iterations=iterations,
                              seconds=time.perf_counter() - t0, device=dev, converged=converged)


def _support(moving):
    # CPU only: lets the metric skip voxels that cannot contribute (exact).
    return None if array_device(moving) == "gpu" else cell_support(moving)


def _corner_move(shape):
    """``step_size`` for :func:`levenberg_marquardt`: largest displacement of the grid's corners (voxels)."""
    corners = np.array([[z, y, x] for z in (0, shape[0] - 1) for y in (0, shape[1] - 1) for x in (0, shape[2] - 1)],
                       dtype=np.float64) - tf.grid_center(shape)

    def move(params, step):
        return float(np.abs(corners @ step[:9].reshape(3, 3).T + step[9:]).max())

    return move


def _check_mask(mask, shape, device):
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have the reference shape {tuple(shape)}, got {tuple(mask.shape)}")
    m = to_device(mask, device, np.float32)
    if not bool((m > 0.5).any()):
        raise ValueError("mask selects no voxel")
    return m
