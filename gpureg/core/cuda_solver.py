"""Device-resident Levenberg-Marquardt for the GPU registration, and empty-space skipping.

Per pass of a pyramid level the GPU runs the fused pass at the trial parameters held in a
small float64 state in device memory, the reduction of its partials, and ``lm_step``
(``kernels/solver.cu``, arithmetic in ``kernels/lm_step.cuh``), which accepts or rejects the
trial, adapts the damping, solves the damped 12x12 Gauss-Newton system in double (Cholesky)
and writes the next trial parameters into that state. No pass takes launch arguments from
the host that depend on the previous one, so the host only queues passes and reads the
state's status every ``poll_every`` passes (one synchronisation per ``poll_every`` passes).
The NumPy :func:`gpureg.core.solver.levenberg_marquardt` is the reference it mirrors step for
step (``tests/core/test_gpu_solver.py``).

Importing this module needs neither CuPy nor a GPU.
"""

from __future__ import annotations

import numpy as np

from .backend import xp_of
from .cuda import (N_MONOMIALS, N_TERMS, as_mask, check_size, mse_pass_blocks, pointer_or_null, reduce_partials,
                   wide_index)
from .cuda_loader import THREADS, get_kernel, require_cupy
from .kernel_layout import STATE, STATUS
from .solver import LAM_MAX

__all__ = ["STATE", "empty_space_tables", "free_mask", "initial_state", "levenberg_marquardt_device", "solver_outcome"]

RUNNING, CONVERGED, MAX_PASSES, NO_OVERLAP, SINGULAR = (STATUS[k] for k in ("running", "converged", "max_passes",
                                                                            "no_overlap", "singular"))


def empty_space_tables(fixed, moving):
    """Tables that let the fused pass skip rows that can only add their count.

    Parameters
    ----------
    fixed : (Z, Y, X) ndarray of float32
        Reference volume (NumPy or CuPy; the tables are on the same device).
    moving : (Z', Y', X') ndarray of float32
        Moving volume, each axis at least 2 long.

    Returns
    -------
    fixed_rows : (Z * Y,) ndarray of uint8
        1 where the fixed row ``(z, y)`` has a non-zero voxel.
    cell_sat : (Z' * Y',) ndarray of int32
        Summed-area table of the moving volume's cell rows: ``cell_sat[i, j]`` counts the
        ``(i' < i, j' < j)`` with a non-zero voxel in ``moving[i':i'+2, j':j'+2, :]`` (any
        trilinear cell of those rows has a non-zero corner), ``(Z', Y')`` C order.

    Notes
    -----
    A reference row whose fixed values are 0 and whose samples all fall in cells without a
    non-zero corner has ``r = 0`` and ``g = 0`` at every valid voxel: the pass adds only its
    number of valid samples, computed in O(1) (``classify_rows`` in ``kernels/affine.cu``).
    """
    xp = xp_of(fixed)
    nz, ny, _ = fixed.shape
    fixed_rows = (fixed != 0).any(axis=2).reshape(nz * ny).astype(xp.uint8)
    rows = (moving != 0).any(axis=2)
    cells = rows[:-1, :-1] | rows[1:, :-1] | rows[:-1, 1:] | rows[1:, 1:]
    sat = xp.zeros(rows.shape, dtype=xp.int32)
    sat[1:, 1:] = cells.astype(xp.int32).cumsum(axis=0).cumsum(axis=1)
    return xp.ascontiguousarray(fixed_rows), xp.ascontiguousarray(sat.reshape(-1))


def free_mask(free) -> int:
    """Bit mask of the free parameters (bit ``a`` set when parameter ``a`` is optimised)."""
    free = np.ones(12, bool) if free is None else np.asarray(free, bool).reshape(12)
    return int(sum(1 << a for a in range(12) if free[a]))


def initial_state(params0, lam0: float = 1e-2) -> np.ndarray:
    """Host copy of a fresh solver state: ``params0`` accepted and to be evaluated first."""
    state = np.zeros(STATE["size"])
    p = np.asarray(params0, dtype=np.float64).reshape(12)
    state[STATE["params"]:STATE["params"] + 12] = p
    state[STATE["trial"]:STATE["trial"] + 12] = p
    state[STATE["lam"]] = lam0
    return state


def levenberg_marquardt_device(fixed, moving, params0, center, *, free=None, mask=None, max_iter: int = 60,
                               tol: float = 1e-3, lam0: float = 1e-2, poll_every: int = 8,
                               skip_empty: bool = True):
    """:func:`gpureg.core.solver.levenberg_marquardt` on the MSE of two CuPy volumes, on the GPU.

    Parameters
    ----------
    fixed : (Z, Y, X) cupy.ndarray of float32
        Reference volume of this pyramid level (its grid gives the step size, as ``shape``).
    moving : (Z', Y', X') cupy.ndarray of float32
        Moving volume of this level.
    params0 : (12,) array_like
        Start parameters about ``center`` (:func:`gpureg.core.transform.matrix_from_params`).
    center : (3,) array_like
        Centre of the parameters (voxel indices).
    free : (12,) bool array, optional
        Parameters to optimise.
    mask : (Z, Y, X) ndarray of bool or float32, optional
        Reference voxels to use (NumPy or CuPy).
    max_iter, tol, lam0 : as :func:`~gpureg.core.solver.levenberg_marquardt`.
    poll_every : int
        Passes queued between two reads of the solver's status (the only host synchronisations).
    skip_empty : bool
        Skip rows that can only add their count (:func:`empty_space_tables`; without a mask).

    Returns
    -------
    params : (12,) ndarray of float64
    passes : int
        Metric passes used (passes queued after the solver stopped return at once and are not counted).
    converged : bool
        False with a ``RuntimeWarning`` when the solver stopped at ``max_iter`` or on a singular
        system (:func:`solver_outcome`).
    """
    if poll_every < 1:
        raise ValueError(f"poll_every must be >= 1, got {poll_every}")
    if not lam0 > 0:
        raise ValueError(f"lam0 must be > 0, got {lam0}")
    cp = require_cupy()
    check_size(fixed.shape, "fixed")
    check_size(moving.shape, "moving")
    wide = wide_index(fixed.shape, moving.shape)
    nz, ny, nx = (int(n) for n in fixed.shape)
    mz, my, mx = (int(n) for n in moving.shape)
    c = np.asarray(center, dtype=np.float64).reshape(3)
    with fixed.device:  # every buffer, converted volume included, on the volumes' GPU
        fixed = cp.ascontiguousarray(fixed, dtype=cp.float32)
        moving = cp.ascontiguousarray(moving, dtype=cp.float32)
        mask = as_mask(cp, mask, fixed)
        name = f"mse_terms_state_pass<true, {'bool' if mask is not None and mask.dtype == np.bool_ else 'float'}>"
        blocks = mse_pass_blocks(name, nz * ny, wide=wide)
        state = cp.asarray(initial_state(params0, lam0))
        partials = cp.empty(N_TERMS * N_MONOMIALS * blocks, dtype=cp.float64)
        sums = cp.empty(N_TERMS * N_MONOMIALS, dtype=cp.float64)  # reused by every pass: no allocation per pass
        tables = empty_space_tables(fixed, moving) if skip_empty and mask is None else None
        row_code = cp.empty(nz * ny, dtype=cp.int32) if tables is not None else None
        dims = (np.int32(nz), np.int32(ny), np.int32(nx), np.int32(mz), np.int32(my), np.int32(mx))
        centre = tuple(np.float32(v) for v in c)
        step_args = (np.uint32(free_mask(free)), np.int32(nz), np.int32(ny), np.int32(nx), np.float64(tol),
                     np.int32(max_iter))
        pass_kernel = get_kernel("affine.cu", name, wide)
        classify = get_kernel("affine.cu", "classify_rows_state", wide)
        step = get_kernel("solver.cu", "lm_step")
        import cupyx

        status = cupyx.empty_pinned(2, dtype=np.float64)  # passes, status
        stream = cp.cuda.get_current_stream()
        queued = 0
        while True:
            for _ in range(poll_every):
                if tables is not None:
                    classify((-(-(nz * ny) // THREADS),), (THREADS,), (*tables, *dims, state, *centre, row_code))
                pass_kernel((blocks,), (THREADS,), (fixed, moving, pointer_or_null(mask), pointer_or_null(row_code),
                                                    *dims, state, *centre, partials))
                reduce_partials("affine.cu", partials, N_TERMS * N_MONOMIALS, blocks, wide=wide, out=sums)
                step((1,), (32,), (sums, state, *step_args))
            queued += poll_every
            state[STATE["passes"]:STATE["status"] + 1].get(stream=stream, out=status, blocking=False)
            done = stream.record()
            done.synchronize()
            if status[1] != RUNNING or queued > max_iter + poll_every:
                break
        passes, code = int(status[0]), int(status[1])
        converged = solver_outcome(code, passes, max_iter)
        params = cp.asnumpy(state[STATE["params"]:STATE["params"] + 12])
    return params, passes, converged


def solver_outcome(code: int, passes: int, max_iter: int) -> bool:
    """Whether the device solver converged, from its final status; says so when it stopped short.

    Parameters
    ----------
    code : int
        ``state[STATE["status"]]`` (:data:`gpureg.core.kernel_layout.STATUS`).
    passes, max_iter : int
        Passes it ran, and the most it was allowed.

    Returns
    -------
    bool
        True for ``converged``. ``max_passes`` and ``singular`` (the damped Gauss-Newton system
        could not be factorised up to the largest damping) return False with a
        ``RuntimeWarning`` naming the status; the last accepted parameters stand.

    Raises
    ------
    RuntimeError
        ``no_overlap`` (the start parameters leave no valid sample), or a status that is not a
        final one (the solver was still running: a bug).
    """
    import warnings

    if code == NO_OVERLAP:
        raise RuntimeError("the initial transform maps the reference grid entirely outside the moving volume")
    if code == SINGULAR:
        warnings.warn(f"GPU solver status 'singular' after {passes} passes: the damped Gauss-Newton system could "
                      f"not be factorised up to damping {LAM_MAX:g} (degenerate or non-finite data); keeping the "
                      "last accepted transform", RuntimeWarning, stacklevel=3)
    elif code == MAX_PASSES:
        warnings.warn(f"GPU solver status 'max_passes': {passes} passes (max_iter={max_iter}) without converging",
                      RuntimeWarning, stacklevel=3)
    elif code != CONVERGED:
        raise RuntimeError(f"GPU solver ended with status {code} after {passes} passes (expected one of {STATUS})")
    return code == CONVERGED
