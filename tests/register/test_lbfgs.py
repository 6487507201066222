"""The device-resident L-BFGS of the deformable registration (gpureg.register.lbfgs), run here on NumPy arrays.

On the GPU the same code runs on CuPy arrays (the solver is written once
against ``xp``); the GPU run itself is a ``gpu`` test in test_deformable.py.
"""

import numpy as np
import pytest
from scipy.optimize import minimize, rosen, rosen_der

from gpureg.core import transform as tf
from gpureg.register import bspline
from gpureg.register.ffd_level import LevelObjective
from gpureg.register.lbfgs import minimize_lbfgs
from gpureg.register.prepare import Prep, prepare_volume
from gpureg.synth.deform import SmoothWarp
from gpureg.synth.phantom import two_particle_phantom


def test_quadratic_minimum_is_found():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 30))
    h = a @ a.T + 0.5 * np.eye(30)  # condition number ~ 10^3
    b = rng.normal(size=30)
    res = minimize_lbfgs(lambda x: (0.5 * x @ h @ x - b @ x, h @ x - b), np.zeros(30), max_iter=200, tol=1e-15)
    np.testing.assert_allclose(res.x, np.linalg.solve(h, b), rtol=0, atol=1e-6)


def test_rosenbrock_converges_like_scipy():
    x0 = np.full(8, -1.2)
    res = minimize_lbfgs(lambda x: (rosen(x), rosen_der(x)), x0, max_iter=500, tol=1e-14)
    ref = minimize(rosen, x0, jac=rosen_der, method="L-BFGS-B", options={"maxiter": 500, "ftol": 1e-14})
    assert res.fun < 1e-8 and ref.fun < 1e-8
    np.testing.assert_allclose(res.x, 1.0, atol=1e-4)
    assert res.nfev < 3 * ref.nfev  # a comparable number of evaluations


def test_deformable_level_reaches_scipys_objective():
    """One control grid of a 32^3 warped pair: the same objective value as scipy's L-BFGS-B (within 2 %)."""
    shape = (32, 32, 32)
    warp = SmoothWarp(shape, 1.5, seed=3)
    prep = Prep(binarize=False)
    fixed = prepare_volume(two_particle_phantom(shape, seed=2), "cpu", prep)
    moving = prepare_volume(two_particle_phantom(shape, warp, seed=2), "cpu", prep)
    control = bspline.control_shape(shape, 8.0)

    def objective():
        return LevelObjective(fixed, moving, tf.identity(), level=0, spacing=8.0, control=control,
                              variance=float(fixed.var()), regularization=1.0)

    obj = objective()
    x0 = np.zeros(obj.size)
    f0 = obj.evaluate(x0, gradient=False)[0]
    res = minimize_lbfgs(lambda x: obj.evaluate(x, host=False)[:2], x0, max_iter=25, tol=1e-6)
    ref = minimize(objective(), x0, jac=True, method="L-BFGS-B", options={"maxiter": 25, "maxcor": 20,
                                                                          "ftol": 1e-6, "gtol": 1e-12})
    assert res.fun < 0.5 * f0  # the warp is largely recovered
    assert res.fun <= 1.02 * ref.fun, (res.fun, ref.fun, res.message)
    assert res.nfev <= 3 * 25


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_step_backs_off(bad):
    def fun(x):
        v = float(x @ x)
        return (bad if abs(x[0]) > 2 else v), 2 * x  # the objective is undefined far away

    res = minimize_lbfgs(fun, np.array([1.5, 1.0]), max_iter=50, tol=1e-12)
    assert res.fun < 1e-8
