"""The one Levenberg-Marquardt solver (gpureg.core.solver) on problems with a known minimum."""

import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from gpureg.core.solver import levenberg_marquardt


def _least_squares(residual, jacobian):
    """``evaluate`` for MSE = mean(r^2): the terms the solver expects (gradient 2/N J^T r, hessian 2/N J^T J)."""
    def evaluate(x):
        r, j = residual(x), jacobian(x)
        n = r.size
        return SimpleNamespace(count=n, mse=float(r @ r) / n, gradient=2.0 * j.T @ r / n, hessian=2.0 * j.T @ j / n)
    return evaluate


def _max_step(x, step):
    return float(np.abs(step).max())


def test_linear_least_squares_reaches_the_normal_equations_solution():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 5))
    b = rng.normal(size=40)
    evaluate = _least_squares(lambda x: a @ x - b, lambda x: a)
    x, passes, converged = levenberg_marquardt(evaluate, np.zeros(5), _max_step, tol=1e-10, max_iter=100)
    assert converged and passes < 100
    np.testing.assert_allclose(x, np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-8)


def test_nonlinear_fit_recovers_known_parameters():
    t = np.linspace(0.0, 4.0, 50)
    truth = np.array([2.5, 0.7, 0.3])            # y = a exp(-b t) + c, noise-free
    y = truth[0] * np.exp(-truth[1] * t) + truth[2]

    def residual(x):
        return x[0] * np.exp(-x[1] * t) + x[2] - y

    def jacobian(x):
        e = np.exp(-x[1] * t)
        return np.stack([e, -x[0] * t * e, np.ones_like(t)], axis=1)

    x, _, converged = levenberg_marquardt(_least_squares(residual, jacobian), [1.0, 0.2, 0.0], _max_step,
                                          tol=1e-12, max_iter=200)
    assert converged
    np.testing.assert_allclose(x, truth, atol=1e-8)


def test_fixed_parameters_keep_their_start_values():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(30, 4))
    b = rng.normal(size=30)
    free = np.array([True, False, True, False])
    x0 = np.array([0.0, 0.5, 0.0, -1.0])
    evaluate = _least_squares(lambda x: a @ x - b, lambda x: a)
    x, _, _ = levenberg_marquardt(evaluate, x0, _max_step, free=free, tol=1e-10, max_iter=100)
    assert x[1] == 0.5 and x[3] == -1.0
    expect = np.linalg.lstsq(a[:, free], b - a[:, ~free] @ x0[~free], rcond=None)[0]
    np.testing.assert_allclose(x[free], expect, atol=1e-8)


def test_max_iter_counts_metric_passes():
    calls = []
    evaluate = _least_squares(lambda x: np.exp(x) - 5.0, lambda x: np.diag(np.exp(x)))

    def counted(x):
        calls.append(x)
        return evaluate(x)

    _, passes, converged = levenberg_marquardt(counted, np.zeros(3), _max_step, tol=0.0, max_iter=4)
    assert passes == len(calls) == 4 and not converged


def test_start_without_valid_samples_is_an_error():
    empty = SimpleNamespace(count=0, mse=float("inf"), gradient=np.zeros(2), hessian=np.zeros((2, 2)))
    with pytest.raises(RuntimeError, match="nothing overlaps"):
        levenberg_marquardt(lambda x: empty, np.zeros(2), _max_step, empty_start="nothing overlaps")


def _noisy_quadratic(noise):
    """MSE ``|x - x*|^2`` plus a ripple of amplitude ``noise`` (a metric's sampling noise); the Hessian is 1.5x
    too large, so each step goes 2/3 of the way and the steps shrink geometrically."""
    target = np.array([0.3, -0.2, 0.1])

    def evaluate(x):
        d = x - target
        ripple = noise * (zlib.crc32(np.asarray(x, np.float64).tobytes()) % 1024) / 1024
        return SimpleNamespace(count=1, mse=float(d @ d) + ripple, gradient=2.0 * d, hessian=3.0 * np.eye(3))
    return evaluate, target


def test_rejected_small_step_ends_the_fit(monkeypatch):
    """A step under REJECT_FACTOR * tol that does not lower the MSE stops the fit (converged).

    On a quadratic with a ripple of 1e-6 (steps under ~1e-3 cannot lower it reliably), the
    fit must stop at the first such rejection, where damping alone would spend several more
    passes shrinking the step below tol; both end within 10 tol of the minimum.
    """
    from gpureg.core import solver

    evaluate, target = _noisy_quadratic(1e-6)
    x, passes, converged = levenberg_marquardt(evaluate, np.ones(3), _max_step, tol=1e-4, max_iter=60)
    monkeypatch.setattr(solver, "REJECT_FACTOR", 0.0)
    x_slow, passes_slow, converged_slow = levenberg_marquardt(evaluate, np.ones(3), _max_step, tol=1e-4, max_iter=60)
    assert converged and converged_slow
    assert passes < passes_slow, (passes, passes_slow)
    assert np.abs(x - target).max() < 10 * 1e-4 + 1e-3 and np.abs(x_slow - target).max() < 2e-3
