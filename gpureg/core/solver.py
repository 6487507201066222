"""Affine registration by mean squared error (CPU and GPU through the same code).

The coarse-to-fine driver (:func:`register_affine`) is separate from the
solver (:func:`levenberg_marquardt`), which only sees a function returning
:class:`~gpureg.metric.MetricTerms` for a parameter vector. On the GPU that
function is one fused kernel pass; the solver runs on the host on the 1 + 1 +
12 + 78 reduced numbers.
"""

from __future__ import annotations

import numpy as np

from . import transform as tf
from .terms import MetricTerms

__all__ = ["levenberg_marquardt"]

def levenberg_marquardt(terms, params0, shape, *, free=None, max_iter: int = 60, tol: float = 1e-3,
                        lam0: float = 1e-2):
    """Minimise an MSE with Levenberg-Marquardt on Gauss-Newton sums.

    Parameters
    ----------
    terms : callable
        ``terms(params) -> MetricTerms`` (one metric pass).
    params0 : (12,) ndarray
        Start parameters (:func:`gpureg.transform.matrix_from_params` order).
    shape : tuple of int
        Grid shape; the step size is measured as the largest voxel displacement
        it causes over the grid's corners.
    free : (12,) bool array, optional
        Parameters to optimise (others stay fixed).
    max_iter : int
        Metric passes at most.
    tol : float
        Converged when an accepted (or proposed) step moves no voxel more than this.
    lam0 : float
        Initial damping (Marquardt: ``H + lam diag(H)``).

    Returns
    -------
    params : (12,) ndarray
    passes : int
        Metric passes used.
    converged : bool
    """
    free = np.ones(12, bool) if free is None else np.asarray(free, bool)
    corners = np.array([[z, y, x] for z in (0, shape[0] - 1) for y in (0, shape[1] - 1) for x in (0, shape[2] - 1)],
                       dtype=np.float64) - tf.grid_center(shape)
    params = np.asarray(params0, dtype=np.float64).copy()
    cur: MetricTerms = terms(params)
    if cur.count == 0:
        raise RuntimeError("the initial transform maps the reference grid entirely outside the moving volume")
    passes, lam, converged = 1, lam0, False
    while passes < max_iter:
        g = cur.gradient[free]
        h = cur.hessian[np.ix_(free, free)]
        diag = np.diag(h).copy()
        diag = np.maximum(diag, 1e-12 * max(diag.max(), 1e-30))
        try:
            step = np.linalg.solve(h + lam * np.diag(diag), -g)
        except np.linalg.LinAlgError:
            lam *= 10
            continue
        full = np.zeros(12)
        full[free] = step
        move = float(np.abs(corners @ full[:9].reshape(3, 3).T + full[9:]).max())
        if move < tol:
            converged = True
            break
        trial = terms(params + full)
        passes += 1
        if trial.count > 0 and trial.mse <= cur.mse:
            params, cur = params + full, trial
            lam = max(lam / 3.0, 1e-7)
        else:
            lam *= 4.0
            if lam > 1e8:
                converged = True  # no descent direction left at this resolution
                break
    return params, passes, converged
