"""L-BFGS with its state on the arrays' device (NumPy or CuPy): the deformable optimiser on the GPU.

scipy's L-BFGS-B keeps its state on the host, so every objective evaluation
on the GPU would copy the coefficients down and the gradient back. This
solver keeps the iterate, the gradient and the ``m`` correction pairs as
``xp`` arrays; only the objective's value (a float) and a few dot products
per iteration reach the host.

Method (Nocedal and Wright, Numerical Optimization, algorithms 7.4 and 3.5):
the two-loop recursion with the initial Hessian scaled by ``s.y / y.y``; a
line search from step 1 (the first iteration: a step of length 1 in the
coefficients' units, i.e. about a voxel) that backtracks on the sufficient-
decrease condition and extrapolates while the slope is still steeply negative
(a bracketing search on the weak Wolfe conditions), and a pair is kept only
when ``s.y > 0``. It stops like scipy's ``ftol``: when an iteration lowers
the objective by at most ``tol * max(|f_k|, |f_k+1|, 1)``, or after
``max_iter`` iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.backend import xp_of

__all__ = ["LbfgsResult", "minimize_lbfgs"]

_C1, _C2 = 1e-4, 0.9  # sufficient decrease and curvature constants of the (weak) Wolfe conditions


@dataclass
class LbfgsResult:
    """Outcome of :func:`minimize_lbfgs`: the minimiser ``x`` (same device as ``x0``), ``fun``, counts, message."""

    x: object
    fun: float
    nit: int
    nfev: int
    message: str


def minimize_lbfgs(fun, x0, *, max_iter: int = 25, tol: float = 1e-6, memory: int = 20,
                   max_line_search: int = 20) -> LbfgsResult:
    """Minimise ``fun`` from ``x0`` with L-BFGS, every vector on the device of ``x0``.

    Parameters
    ----------
    fun : callable
        ``fun(x) -> (value, gradient)``: a float and an array like ``x``.
    x0 : 1D ndarray (NumPy or CuPy)
        Start.
    max_iter : int
        Iterations at most.
    tol : float
        Relative decrease per iteration below which it stops (scipy's ``ftol``).
    memory : int
        Correction pairs kept.
    max_line_search : int
        Objective evaluations per line search at most.

    Returns
    -------
    LbfgsResult
    """
    xp = xp_of(x0)
    x = xp.array(x0, dtype=xp.float64, copy=True)
    f, g = fun(x)
    g = xp.asarray(g, dtype=xp.float64)
    nfev, pairs = 1, []
    message = "max_iter reached"
    it = 0
    for it in range(1, int(max_iter) + 1):
        d = -_two_loop(g, pairs, xp)
        slope = float(d @ g)
        if not slope < 0:  # not a descent direction (rounding): restart from the gradient
            pairs.clear()
            d, slope = -g, -float(g @ g)
            if not slope < 0:
                message = "gradient is zero"
                break
        step = 1.0 if pairs else 1.0 / max(float(xp.sqrt(-slope)), 1e-30)
        found, step, f_new, g_new, x_new, n = _line_search(fun, x, f, d, slope, step, max_line_search, xp)
        nfev += n
        if not found:
            message = "line search failed"
            break
        s, y = x_new - x, g_new - g
        sy = float(s @ y)
        if sy > 1e-12 * float(y @ y):
            pairs.append((s, y, 1.0 / sy))
            if len(pairs) > memory:
                pairs.pop(0)
        decrease = f - f_new
        x, f, g = x_new, f_new, g_new
        if decrease <= tol * max(abs(f), abs(f + decrease), 1.0):
            message = "relative reduction of f <= tol"
            break
    return LbfgsResult(x=x, fun=float(f), nit=it, nfev=nfev, message=message)


def _two_loop(g, pairs, xp):
    """``H g`` of the L-BFGS inverse-Hessian approximation (identity scaled by ``s.y / y.y``)."""
    q = g.copy()
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * float(s @ q)
        alphas.append(a)
        q -= a * y
    if pairs:
        s, y, rho = pairs[-1]
        q *= 1.0 / (rho * float(y @ y))
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        b = rho * float(y @ q)
        q += (a - b) * s
    return q


def _line_search(fun, x, f, d, slope, step, max_eval, xp):
    """A step along ``d`` meeting the weak Wolfe conditions (bracketing, bisection / doubling)."""
    lo, hi = 0.0, None
    best = None
    for n in range(1, max_eval + 1):
        x_new = x + step * d
        f_new, g_new = fun(x_new)
        g_new = xp.asarray(g_new, dtype=xp.float64)
        if f_new > f + _C1 * step * slope or not f_new == f_new:  # too long (or NaN)
            hi = step
        else:
            best = (step, f_new, g_new, x_new)
            if float(d @ g_new) >= _C2 * slope:
                return True, step, f_new, g_new, x_new, n
            lo = step  # still steeply descending: longer
        step = 0.5 * (lo + hi) if hi is not None else 2.0 * step
    if best is not None:  # sufficient decrease without the curvature condition: still progress
        return True, best[0], best[1], best[2], best[3], max_eval
    return False, step, f, None, x, max_eval
