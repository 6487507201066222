"""Deformable refinement (B-spline FFD): accuracy on known smooth deformations, gradient, bad input.

Ground truth: the analytic two-particle phantom moved by
:class:`gpureg.synth.deform.SmoothWarp` (a small affine plus three sinusoidal
modes, at most 3 voxels, about 1.5 periods across the grid), sampled exactly
(no interpolation), so the true position of every reference voxel in the
moving volume is known analytically. Errors are mean distances (voxels) over
the particle voxels between ``p + displacement[:, p]`` and the truth.
"""

import numpy as np
import pytest
from scipy import ndimage

from gpureg.core import transform as tf
from gpureg.core.backend import cupy_or_none
from gpureg.core.config import config
from gpureg.register import bspline
from gpureg.register.deformable import (
    DeformableResult,
    apply_deformation,
    deformation_field,
    register_deformable,
)
from gpureg.register.ffd_level import LevelObjective
from gpureg.register.prepare import Prep, pyramid
from gpureg.synth.deform import SmoothWarp
from gpureg.synth.phantom import two_particle_phantom

SHAPE = (64, 64, 64)
GREY = Prep(binarize=False)  # the accuracies below were measured on grey levels (the default binarizes)


@pytest.fixture(scope="module")
def deformed():
    c = tf.grid_center(SHAPE)
    affine = tf.rotation_matrix(3.0, (1.0, 0.5, 0.2), c)
    affine[:3, 3] += (1.0, -0.8, 0.6)
    warp = SmoothWarp(SHAPE, 3.0, matrix=affine, seed=1)
    fixed, labels = two_particle_phantom(SHAPE, seed=2, return_labels=True)
    moving = two_particle_phantom(SHAPE, warp, seed=2)
    result = register_deformable(fixed, moving, prep=GREY, device="cpu", spacing=8)
    points = np.argwhere(labels > 0).astype(np.float64)
    return {"warp": warp, "fixed": fixed, "moving": moving, "labels": labels, "result": result, "points": points,
            "truth": warp.moving_from_reference(points)}


def _mean_error(displacement, points, truth):
    idx = tuple(points.astype(int).T)
    q = points + np.stack([d[idx] for d in displacement], axis=1)
    return float(np.linalg.norm(q - truth, axis=1).mean())


def test_recovers_smooth_deformation_better_than_any_affine(deformed):
    res, pts, truth = deformed["result"], deformed["points"], deformed["truth"]
    assert isinstance(res, DeformableResult)
    assert res.displacement.shape == (3, *SHAPE) and res.displacement.dtype == np.float32
    best = deformed["warp"].best_affine(pts)
    best_err = float(np.linalg.norm(pts @ best[:3, :3].T + best[:3, 3] - truth, axis=1).mean())
    err = _mean_error(res.displacement, pts, truth)
    assert best_err > 0.3  # the case needs a deformation: no affine comes close
    assert err <= 0.25, err
    assert err <= 0.5 * best_err, (err, best_err)
    assert res.min_jacobian > 0.5  # no folding (the true field's Jacobian stays above ~0.6)
    assert res.mse_after < 0.2 * res.mse_affine < res.mse_before
    assert res.coefficients.shape == (3, *bspline.control_shape(SHAPE, 8)) and res.spacing == 8
    assert res.device == "cpu" and res.affine is not None and res.seconds > 0 and len(res.iterations) == 3


def test_stored_coefficients_rebuild_the_field_and_resampling_aligns(deformed):
    res, fixed, moving = deformed["result"], deformed["fixed"], deformed["moving"]
    field = deformation_field(res.coefficients, res.matrix, SHAPE, res.spacing)
    np.testing.assert_allclose(field, res.displacement, rtol=0, atol=1e-4)
    aligned = apply_deformation(moving, res)
    affine_only = tf.apply_affine(moving, res.matrix)
    inner = (slice(4, -4),) * 3
    err_def = float(np.mean((aligned - fixed)[inner] ** 2))
    err_aff = float(np.mean((affine_only - fixed)[inner] ** 2))
    assert err_def < 0.25 * err_aff
    # apply_deformation is map_coordinates at p + displacement
    coords = np.indices(SHAPE, dtype=np.float32) + res.displacement
    np.testing.assert_allclose(aligned, ndimage.map_coordinates(moving, coords, order=1), rtol=0, atol=1e-6)


def test_identity_input_stays_identity():
    shape = (48, 48, 48)
    vol, labels = two_particle_phantom(shape, seed=3, return_labels=True)
    res = register_deformable(vol, vol, prep=GREY, device="cpu", spacing=8)
    idx = labels > 0
    dist = np.sqrt((res.displacement ** 2).sum(axis=0))
    assert float(dist[idx].mean()) <= 0.02 and float(dist[idx].max()) <= 0.05
    assert res.min_jacobian > 0.98


@pytest.mark.parametrize("level", [0, 1])
def test_gradient_matches_central_differences(level):
    fine = (32, 32, 32)
    c0 = tf.grid_center(fine)
    matrix = tf.rotation_matrix(2.0, (0.3, 1.0, 0.2), c0)
    # smoothed as prepare_volume does (sigma 1): the objective the driver minimises
    fixed = pyramid(ndimage.gaussian_filter(two_particle_phantom(fine, seed=4), 1.0), 8)[level]
    moving = pyramid(ndimage.gaussian_filter(two_particle_phantom(fine, SmoothWarp(fine, 1.5, seed=4), seed=4), 1.0),
                     8)[level]
    spacing = 8.0
    control = bspline.control_shape(fine, spacing)
    mask = np.zeros(fixed.shape, bool)
    m = 4 >> level
    mask[m:-m, m:-m, m:-m] = True  # random coefficients move samples <= ~1 voxel: none leaves the volume
    obj = LevelObjective(fixed, moving, matrix, level=level, spacing=spacing, control=control,
                         variance=float(fixed.var()), regularization=0.5, mask=mask)
    rng = np.random.default_rng(level)
    x = rng.normal(size=obj.size) * 0.4
    _, grad = obj(x)
    idx = np.unique(np.r_[np.argsort(-np.abs(grad))[:40], rng.choice(obj.size, 40, replace=False)])
    eps = 1e-2
    fd = np.empty(idx.size)
    for k, i in enumerate(idx):
        e = np.zeros(obj.size)
        e[i] = eps
        fd[k] = (obj(x + e)[0] - obj(x - e)[0]) / (2 * eps)
    assert np.linalg.norm(fd - grad[idx]) <= 0.01 * np.linalg.norm(grad[idx])
    for _ in range(2):  # directional derivatives along random directions (all coefficients at once)
        d = rng.normal(size=obj.size)
        d *= eps / np.linalg.norm(d)
        fd_dir = (obj(x + d)[0] - obj(x - d)[0]) / 2
        np.testing.assert_allclose(fd_dir, grad @ d, rtol=0.01)


def test_bspline_refinement_is_exact_and_adjoint_is_the_transpose():
    shape = (20, 27, 33)
    rng = np.random.default_rng(0)
    coarse = rng.normal(size=(3, *bspline.control_shape(shape, 8)))
    fine = bspline.refine(coarse, shape, 8, 4)
    assert fine.shape == (3, *bspline.control_shape(shape, 4))
    w8 = [bspline.axis_weights(np.arange(n), 8, k) for n, k in zip(shape, coarse.shape[1:])]
    w4 = [bspline.axis_weights(np.arange(n), 4, k) for n, k in zip(shape, fine.shape[1:])]
    np.testing.assert_allclose(bspline.evaluate(fine, w4), bspline.evaluate(coarse, w8), rtol=0, atol=1e-9)
    g = rng.normal(size=(3, *shape))
    lhs = float((bspline.evaluate(coarse, w8) * g).sum())
    rhs = float((coarse * bspline.adjoint(g, w8)).sum())
    assert abs(lhs - rhs) <= 1e-9 * abs(lhs)


def test_bending_energy_is_zero_for_affine_fields_and_jacobian_matches():
    shape = (24, 24, 24)
    a = np.array([[1.05, 0.02, 0.0], [0.01, 0.97, 0.03], [0.0, -0.02, 1.01]])
    control = bspline.control_shape(shape, 6)
    pos = np.stack(np.meshgrid(*[(np.arange(k) - 1.0) * 6 for k in control], indexing="ij"))
    coeffs = np.einsum("ij,j...->i...", a - np.eye(3), pos)  # B-splines reproduce linear fields exactly
    energy, grad = bspline.bending_energy(coeffs, 6)
    assert energy < 1e-20 and np.abs(grad).max() < 1e-12
    det = bspline.jacobian_determinant(coeffs, np.eye(4), shape, 6)
    np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-5)
    _, grad = bspline.bending_energy(np.random.default_rng(1).normal(size=coeffs.shape), 6)
    assert np.abs(grad).max() > 0


def test_smooth_warp_inverse_and_truth_field():
    shape = (24, 28, 32)
    warp = SmoothWarp(shape, 2.0, matrix=tf.rotation_matrix(5.0, (1, 0, 0), tf.grid_center(shape)), seed=3)
    p = np.random.default_rng(2).uniform(0, 23, size=(500, 3))
    np.testing.assert_allclose(warp.reference_from_moving(warp.moving_from_reference(p)), p, atol=1e-8)
    w = np.linalg.norm(warp.offset(np.indices(shape).reshape(3, -1).T), axis=1)
    assert 1.9 < w.max() <= 2.0 + 1e-6
    field = warp.displacement_field()
    idx = (5, 6, 7)
    np.testing.assert_allclose(field[(slice(None), *idx)], warp.moving_from_reference(np.array([idx]))[0] - idx,
                               atol=1e-5)
    with pytest.raises(ValueError, match="too large"):
        SmoothWarp(shape, 12.0)


@pytest.mark.parametrize("kwargs,shape,match", [
    ({"spacing": 2}, (32, 32, 32), "spacing must be at least 3"),
    ({"spacing": 40}, (32, 32, 32), "larger than the volume"),
    ({"regularization": -0.1}, (32, 32, 32), "regularization must be >= 0"),
    ({}, (3, 32, 32), "too small for one control cell"),
    ({"interpolation": "quintic"}, (32, 32, 32), "interpolation must be 'auto', 'linear' or 'cubic'"),
])
def test_bad_input_is_one_line_error(kwargs, shape, match):
    vol = np.random.default_rng(0).random(shape).astype(np.float32)
    with pytest.raises(ValueError, match=match) as err:
        register_deformable(vol, vol, prep=GREY, device="cpu", **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.gpu
def test_gpu_objective_matches_cpu():
    cp = cupy_or_none()
    fine = (40, 44, 48)
    matrix = tf.rotation_matrix(3.0, (1.0, 0.2, 0.1), tf.grid_center(fine))
    fixed = two_particle_phantom(fine, seed=6)
    moving = two_particle_phantom(fine, SmoothWarp(fine, 2.0, matrix=matrix, seed=6), seed=6)
    control = bspline.control_shape(fine, 8)
    x = np.random.default_rng(3).normal(size=3 * int(np.prod(control))) * 0.5
    for level, interpolation in ((0, "linear"), (1, "linear"), (0, "cubic"), (1, "cubic")):
        f, m = pyramid(fixed, 8)[level], pyramid(moving, 8)[level]
        kw = {"level": level, "spacing": 8.0, "control": control, "variance": float(f.var()), "regularization": 0.1,
              "interpolation": interpolation}
        cpu = LevelObjective(f, m, matrix, **kw)(x)
        gpu_obj = LevelObjective(cp.asarray(f), cp.asarray(m), matrix, **kw)
        gpu = gpu_obj(x)
        np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-4)
        np.testing.assert_allclose(gpu[1], cpu[1], rtol=0, atol=1e-3 * np.abs(cpu[1]).max())
        on_device = gpu_obj.evaluate(cp.asarray(x), host=False)[1]  # the device solver's form: stays on the GPU
        assert isinstance(on_device, cp.ndarray)
        np.testing.assert_allclose(cp.asnumpy(on_device), gpu[1], rtol=0, atol=1e-12 * np.abs(gpu[1]).max())
    res_cpu = register_deformable(fixed, moving, prep=GREY, device="cpu")
    for solver in ("device", "host"):  # L-BFGS with its state on the GPU, and scipy's on the host
        with config(solver=solver):
            res_gpu = register_deformable(cp.asarray(fixed), cp.asarray(moving), prep=GREY)
        assert res_gpu.device == "gpu"
        d = cp.asnumpy(res_gpu.displacement) - res_cpu.displacement
        # two solvers' paths through 25 iterations per grid: the fields agree to a small part of their error
        assert float(np.sqrt((d ** 2).sum(axis=0)).mean()) < 0.05, solver


def test_simulate_with_deformation_stores_exact_truth(tmp_path):
    from gpureg.io.readers import open_input
    from gpureg.synth.scan import deformation_truth, simulate

    energies = [6500.0, 6550.0, 6600.0]
    path = simulate(tmp_path / "d.h5", size=16, energies=energies, n_angles=8, seed=3, deformation=3.0)
    with open_input(path) as data:
        truth = data.truth()
    amp = np.asarray(truth["deformation_amplitude"])
    np.testing.assert_allclose(amp, [3.0 * 16 / 64, 3.0 * 16 / 128, 0.0])  # grows away from the reference (last)
    disp = np.asarray(truth["displacement"])
    assert disp.shape == (3, 3, 16, 16, 16) and disp.dtype == np.float32
    assert np.abs(disp[2]).max() == 0  # reference energy: identity
    for i in range(2):
        warp = deformation_truth(truth, i)
        p = np.argwhere(np.ones((16, 16, 16), bool)).astype(np.float64)
        np.testing.assert_allclose(disp[i].reshape(3, -1).T, warp.moving_from_reference(p) - p, atol=1e-5)
        np.testing.assert_allclose(warp.matrix, np.asarray(truth["matrices"])[i])
    with pytest.raises(ValueError, match="cannot be combined"):
        simulate(tmp_path / "x.h5", size=16, energies=energies, n_angles=8, deformation=1.0, relative_motion=True)


def test_pipeline_deformable_stores_coefficients_and_reports(tmp_path):
    import json

    from gpureg.io.results import ResultFile
    from gpureg.pipeline.options import RunOptions
    from gpureg.pipeline.runner import run
    from gpureg.synth.scan import simulate

    path = simulate(tmp_path / "in.h5", size=24, energies=[6500.0, 6540.0, 6555.0, 6570.0, 6600.0], n_angles=24, seed=1,
                    deformation=3.0, noise=0.0)
    res = run(path, tmp_path / "out.h5", RunOptions(device="cpu", deformable=True, spacing=6.0))
    with ResultFile(res.output) as rf:
        d = rf.deformation()
        coeffs = d["coefficients"][...]
        aligned = rf.stack("aligned")[0]
    assert coeffs.shape == (5, 3, *bspline.control_shape((24, 24, 24), 6.0)) and d["spacing"] == 6.0
    assert np.abs(coeffs[4]).max() == 0 and np.abs(coeffs[0]).max() > 0.1  # reference (highest energy): identity
    assert np.all(d["min_jacobian"] > 0)
    assert res.mse_after[0] < d["mse_affine"][0]  # the deformation lowers the registration MSE beyond the affine
    assert np.isfinite(aligned).all()
    summary = json.loads((res.report_dir / "summary.json").read_text())
    assert "deformation.png" in summary["figures"] and summary["deformable"]["folded_voxels"] == 0
    # Series smoothing (default): the affine-only map of the same run is kept and compared
    assert "edge_energy_mode_minus_affine.png" in summary["figures"]
    assert summary["mode_vs_affine"]["mode"] == "deformable" and "truth_error_ev" in summary["mode_vs_affine"]
    assert (res.report_dir / "deformation.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="spacing must be at least 3"):
        RunOptions(deformable=True, spacing=2)


def test_validate_deformable_rows_beat_the_affine():
    from gpureg.validate.sweep import run_validation

    res = run_validation(size=32, device="cpu", distortions=["deformation"], magnitudes={"deformation": (0.05,)},
                         noise=(0.0,), modes=("raw",), sitk=False, figures=False, deformable=True)
    by = {r["method"]: r for r in res.rows}
    assert set(by) == {"gpureg", "gpureg deformable"} and res.failures == []
    # the best affine leaves floor_vox; the deformation goes below it and well below the affine's error
    assert by["gpureg deformable"]["error_vox"] < min(0.6 * by["gpureg"]["error_vox"], by["gpureg"]["floor_vox"])
    assert by["gpureg deformable"]["mse_after"] < by["gpureg"]["mse_after"]


@pytest.mark.parametrize("level,masked", [(0, False), (1, True)])
def test_compiled_residual_pass_matches_the_numpy_reference(level, masked):
    """The numba pass (gpureg.core.cpu_ffd) against the NumPy reference, term by term: r grad M, sum r^2, count.

    Samples that leave the volume are part of the case (a 4-degree turn and coefficients up to ~2 voxels).
    float32 positions in both, interpolation in float64 vs float32: 1e-5 relative on ``r g``.
    """
    fine = (28, 30, 32)
    matrix = tf.rotation_matrix(4.0, (0.3, 1.0, 0.2), tf.grid_center(fine))
    fixed = pyramid(two_particle_phantom(fine, seed=5), 8)[level]
    moving = pyramid(two_particle_phantom(fine, SmoothWarp(fine, 2.0, seed=5), seed=5), 8)[level]
    control = bspline.control_shape(fine, 6.0)
    mask = (np.random.default_rng(7).random(fixed.shape) < 0.8) if masked else None
    obj = LevelObjective(fixed, moving, matrix, level=level, spacing=6.0, control=control, variance=1.0,
                         regularization=0.0, mask=mask)
    coeffs = (np.random.default_rng(level).normal(size=(3, *control)) * 0.8).astype(np.float32)
    out = {}
    for engine in ("numpy", "numba"):
        with config(cpu_backend=engine):
            out[engine] = obj.residual_gradient(coeffs)
    (rg_ref, sse_ref, n_ref), (rg, sse, n) = out["numpy"], out["numba"]
    assert 0 < n == n_ref < fixed.size  # some samples are invalid, the same ones
    np.testing.assert_allclose(sse, sse_ref, rtol=1e-5)
    np.testing.assert_allclose(rg, rg_ref, rtol=0, atol=1e-5 * np.abs(rg_ref).max())
    assert np.array_equal(rg == 0, rg_ref == 0) or np.abs(rg[rg_ref == 0]).max() < 1e-6


def test_cubic_residual_pass_matches_scipy_cubic_interpolation():
    """The cubic pass samples like scipy's map_coordinates(order=3, mode="mirror"); its gradient is the spline's.

    Central differences of that interpolation (float64, step 1e-3 voxel) agree with the analytic gradient to 1e-3
    of its largest value (the kernel reads float32 coefficients).
    """
    from gpureg.core.cpu_ffd import residual_gradient_cubic

    rng = np.random.default_rng(0)
    m = ndimage.gaussian_filter(rng.random((14, 16, 18)).astype(np.float32), 2)
    coef = ndimage.spline_filter(m, order=3, mode="mirror").astype(np.float32)
    u = (rng.random((3, *m.shape)) * 3 - 1.5).astype(np.float32)
    f = np.zeros_like(m)
    rg, sse, count = residual_gradient_cubic(f, coef, u, np.eye(4), 1.0)
    coords = np.indices(m.shape, dtype=np.float32) + u
    val = ndimage.map_coordinates(m, coords, order=3, mode="mirror")
    valid = np.all((coords >= 0) & (coords <= (np.array(m.shape) - 1)[:, None, None, None]), axis=0)
    assert count == int(valid.sum()) and 0 < count < m.size
    np.testing.assert_allclose(sse, float((val[valid].astype(np.float64) ** 2).sum()), rtol=1e-5)
    sel = valid & (np.abs(val) > 1e-2)
    for axis in range(3):
        step = np.zeros((3, 1, 1, 1))
        step[axis] = 1e-3
        c64 = coords.astype(np.float64)
        fd = (ndimage.map_coordinates(m.astype(np.float64), c64 + step, order=3, mode="mirror")
              - ndimage.map_coordinates(m.astype(np.float64), c64 - step, order=3, mode="mirror")) / 2e-3
        np.testing.assert_allclose(rg[axis][sel] / val[sel], fd[sel], rtol=0, atol=1e-3 * np.abs(fd[sel]).max())
    assert not rg[:, ~valid].any()


def test_cubic_interpolation_is_refused_on_the_numpy_engine():
    vol = np.zeros((8, 8, 8), np.float32)
    with config(cpu_backend="numpy"), pytest.raises(ValueError, match="cubic"):
        LevelObjective(vol, vol, np.eye(4), level=0, spacing=4.0, control=bspline.control_shape(vol.shape, 4.0),
                       variance=1.0, regularization=0.0, interpolation="cubic")


def test_auto_interpolation_is_cubic_where_it_runs_and_trilinear_on_the_numpy_engine():
    vol = two_particle_phantom((24, 24, 24), seed=1)
    shift = np.eye(4)
    shift[:3, 3] = (0.4, -0.3, 0.2)
    moved = two_particle_phantom((24, 24, 24), shift, seed=1)
    kw = {"prep": GREY, "device": "cpu", "spacing": 8, "levels": 1, "max_iter": 3, "init": np.eye(4)}

    def field(**extra):
        return register_deformable(vol, moved, **kw, **extra).displacement

    with config(cpu_backend="numpy"):
        np.testing.assert_array_equal(field(), field(interpolation="linear"))
        with pytest.raises(ValueError, match="cubic"):
            field(interpolation="cubic")
    pytest.importorskip("numba")
    with config(cpu_backend="numba"):
        auto = field()
        np.testing.assert_array_equal(auto, field(interpolation="cubic"))
        assert np.abs(auto - field(interpolation="linear")).max() > 1e-4  # the two samplings do differ


def test_folding_is_refused_unless_allowed():
    """A deformation whose Jacobian determinant reaches 0 stops the run (one line naming the energy and the way out)."""
    from types import SimpleNamespace

    from gpureg.io.files import InputError
    from gpureg.pipeline.deform import check_folding
    from gpureg.pipeline.options import RunOptions

    store = SimpleNamespace(energies=np.array([6540.0, 6555.0]))
    with pytest.raises(InputError, match=r"energy 6555 eV: the deformation folds .*allow_folding=True") as err:
        check_folding(store, 1, -0.2, RunOptions(deformable=True))
    assert "\n" not in str(err.value)
    check_folding(store, 1, -0.2, RunOptions(deformable=True, allow_folding=True))  # allowed: no error
    check_folding(store, 1, 0.4, RunOptions(deformable=True))  # no folding: no error
