"""One Levenberg-Marquardt solver for every least-squares fit in gpureg.

The affine registration (12 parameters), the per-particle joint fit (12 + 6
per particle) and, later, a deformable registration (B-spline coefficients)
all minimise a mean of squared residuals whose Gauss-Newton sums come from
one metric pass. The solver sees only two callables:

- ``evaluate(x) -> terms``: one pass at the parameters ``x`` (n,), returning
  an object with ``count`` (valid samples; 0 means none), ``mse`` (the
  objective), ``gradient`` (n,) and ``hessian`` (n, n) (Gauss-Newton
  approximation). :class:`~gpureg.core.terms.MetricTerms` is such an object;
- ``step_size(x, step) -> float``: the largest displacement (voxels) the step
  causes; the fit has converged when a step moves nothing by more than ``tol``.

It runs on the host on these reduced numbers; the passes themselves may run
on the GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["LMResult", "levenberg_marquardt"]

# Damping limits: a step rejected while lam > LAM_MAX means no descent direction is left.
LAM_MIN, LAM_MAX = 1e-7, 1e8
# Damping factors: an accepted step divides it by LAM_DOWN, a rejected one multiplies it by
# LAM_UP, a system that cannot be solved by LAM_SINGULAR (then retried, up to LAM_MAX).
LAM_DOWN, LAM_UP, LAM_SINGULAR = 3.0, 4.0, 10.0
# Marquardt's scaling diag(H), floored at DIAG_FLOOR times its largest entry.
DIAG_FLOOR = 1e-12
# A rejected step that moved nothing by REJECT_FACTOR * tol or more ends the fit: at that scale
# the objective's own noise (interpolation, the count of overlapping samples) decides, and the
# damping would need several more passes to shrink the step below tol. Measured on the CPU
# benchmark (bench/register_cpu.py, 128^3, 10 % noise, binarized): finest-level passes 12 -> 7,
# error unchanged (0.0158 voxel). The device solver (kernels/lm_step.cuh) gets these constants
# through gpureg.core.kernel_layout.
REJECT_FACTOR = 10.0


class LMResult(NamedTuple):
    """Outcome of :func:`levenberg_marquardt`."""

    x: np.ndarray
    """(n,) ndarray of float64: the parameters found."""
    passes: int
    """Calls of ``evaluate`` (metric passes)."""
    converged: bool
    """A step met the tolerance, or no step lowered the objective any more."""


def levenberg_marquardt(evaluate, x0, step_size, *, free=None, max_iter: int = 60, tol: float = 1e-3,
                        lam0: float = 1e-2, empty_start: str = "the start parameters leave no valid sample"
                        ) -> LMResult:
    """Minimise ``evaluate(x).mse`` by Levenberg-Marquardt on Gauss-Newton sums.

    Each iteration solves ``(H + lam diag(H)) step = -g`` on the free
    parameters (Marquardt's scaling), evaluates the trial and keeps it when
    its objective is not larger (then ``lam /= 3``; else ``lam *= 4``). A
    rejected step that moved nothing by ``REJECT_FACTOR * tol`` or more ends
    the fit (converged): the objective's noise dominates at that scale.

    Parameters
    ----------
    evaluate : callable
        ``evaluate(x) -> terms`` with ``count``, ``mse``, ``gradient`` (n,)
        and ``hessian`` (n, n) (see the module docstring).
    x0 : (n,) array_like
        Start parameters.
    step_size : callable
        ``step_size(x, step) -> float``: largest displacement (voxels) of the
        step ``step`` (n,) taken from ``x``.
    free : (n,) array_like of bool, optional
        Parameters to optimise; the others keep their start values. Default: all.
    max_iter : int
        Metric passes at most (the first one included).
    tol : float
        Converged when a proposed step moves nothing by more than this.
    lam0 : float
        Initial damping (> 0).
    empty_start : str
        Message of the ``RuntimeError`` raised when ``evaluate(x0)`` has no
        valid sample.

    Returns
    -------
    LMResult
        ``(x, passes, converged)``.
    """
    if not lam0 > 0:
        raise ValueError(f"lam0 must be > 0, got {lam0}")
    x = np.asarray(x0, dtype=np.float64).copy()
    free = np.ones(x.size, bool) if free is None else np.asarray(free, bool)
    cur = evaluate(x)
    if cur.count == 0:
        raise RuntimeError(empty_start)
    passes, lam, converged = 1, lam0, False
    while passes < max_iter:
        g = cur.gradient[free]
        h = cur.hessian[np.ix_(free, free)]
        diag = np.diag(h).copy()
        diag = np.maximum(diag, DIAG_FLOOR * max(diag.max(), 1e-30))
        try:
            step_free = np.linalg.solve(h + lam * np.diag(diag), -g)
        except np.linalg.LinAlgError:
            lam = max(lam, LAM_MIN) * LAM_SINGULAR  # grows from any lam, so the retries end
            if lam > LAM_MAX:
                break
            continue
        step = np.zeros(x.size)
        step[free] = step_free
        move = step_size(x, step)
        if move < tol:
            converged = True
            break
        trial = evaluate(x + step)
        passes += 1
        if trial.count > 0 and trial.mse <= cur.mse:
            x, cur = x + step, trial
            lam = max(lam / LAM_DOWN, LAM_MIN)
        else:
            lam *= LAM_UP
            if lam > LAM_MAX or move < REJECT_FACTOR * tol:
                converged = True  # no descent direction left (at this resolution, or above the MSE's noise)
                break
    return LMResult(x, passes, converged)
