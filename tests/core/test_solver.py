"""The one Levenberg-Marquardt solver (gpureg.core.solver) on problems with a known minimum."""

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
