"""CPU affine registration: analytic gradient, recovery of known transforms, series, bad input.

Ground truth comes from the analytic phantom (gpureg.phantom): the moving
volume is sampled exactly at ``M^-1 q``, so the only error is the registration's.
Errors are the mean displacement (voxels) between the found and the true
transform over the sample's voxels (both particles).
"""

import numpy as np
import pytest

import gpureg
from gpureg.core import transform as tf
from gpureg.core.metric import mse_terms
from gpureg.register import prepare_volume
from known_transforms import CASES, SHAPE, affine

GREY = gpureg.Prep(binarize=False)  # grey levels (the default binarizes)


@pytest.fixture(scope="module")
def fixed():
    return gpureg.two_particle_phantom(SHAPE, return_labels=True)


def _moving(matrix, **kw):
    return gpureg.two_particle_phantom(SHAPE, matrix, **kw)


def test_gradient_matches_finite_differences():
    shape = (32, 32, 32)
    c = tf.grid_center(shape)
    fixed = gpureg.two_particle_phantom(shape)
    moving = gpureg.two_particle_phantom(shape, affine(angle=3, shift=(1.0, -0.5, 0.7)) * 1.0, seed=0)
    params = np.array([0.02, -0.01, 0.015, 0.01, -0.02, 0.005, -0.01, 0.02, 0.01, 0.4, -0.3, 0.25])
    # Interior mask: every sample stays inside the moving volume for all perturbations,
    # so the valid count is constant and the MSE is differentiable.
    mask = np.zeros(shape, bool)
    mask[6:-6, 6:-6, 6:-6] = True
    terms = mse_terms(fixed, moving, tf.matrix_from_params(params, c), mask=mask)
    fd = np.empty(12)
    for k in range(12):
        h = 1e-3 if k >= 9 else 1e-4  # ~1e-3 voxel displacement either way
        e = np.zeros(12)
        e[k] = h
        up = mse_terms(fixed, moving, tf.matrix_from_params(params + e, c), mask=mask, hessian=False)
        down = mse_terms(fixed, moving, tf.matrix_from_params(params - e, c), mask=mask, hessian=False)
        assert up.count == down.count == terms.count
        fd[k] = (up.mse - down.mse) / (2 * h)
    # Trilinear interpolation is piecewise linear; the few samples crossing a cell
    # face within +-h make FD and analytic differ by O(h); 1 % of the norm is ample.
    np.testing.assert_allclose(terms.gradient, fd, atol=1e-2 * np.linalg.norm(fd))
    # Gauss-Newton matrix is symmetric positive semi-definite.
    h = terms.hessian
    np.testing.assert_allclose(h, h.T)
    assert np.linalg.eigvalsh(h).min() > -1e-9 * np.abs(h).max()


def test_identity_is_exact(fixed):
    vol, _ = fixed
    res = gpureg.register_affine(vol, vol, prep=GREY)
    np.testing.assert_allclose(res.matrix, np.eye(4), atol=1e-6)
    assert res.mse_before == 0.0 and res.mse_after == 0.0
    f = prepare_volume(vol, "cpu", GREY)
    assert gpureg.register_prepared(f, f).prepare_seconds == 0.0  # inputs came prepared


@pytest.mark.parametrize("binarize", [False, True], ids=["grey", "binarized"])
@pytest.mark.parametrize("case", list(CASES))
def test_recovers_known_transform(fixed, case, binarize):
    vol, labels = fixed
    truth = CASES[case]
    res = gpureg.register_affine(vol, _moving(truth), prep=gpureg.Prep(binarize=binarize), device="cpu")
    mean, _ = gpureg.displacement_error(res.matrix, truth, mask=labels > 0)
    assert mean <= 0.1, f"{case}: mean displacement error {mean:.3f} voxel"
    assert res.mse_after < res.mse_before
    assert res.device == "cpu" and len(res.iterations) == 2  # 32^3 and 64^3 levels
    assert 0 < res.prepare_seconds < res.seconds  # preparing both volumes is part of the timed call


def test_series_recovers_drifts():
    shape = (48, 48, 48)
    c = tf.grid_center(shape)
    energies = np.array([6530.0, 6545.0, 6551.0, 6560.0, 6590.0])
    drifts = [(2.0, -1.5, 1.0), (1.5, -1.0, 0.5), (1.0, -0.8, 0.6), (0.5, 0.3, -0.4), (0, 0, 0)]
    truths = []
    for k, d in enumerate(drifts):
        m = tf.compose(tf.rotation_matrix(0.5 * k, (0, 0, 1), c))
        m[:3, 3] += d
        truths.append(m)
    truths[-1] = np.eye(4)  # the highest energy is the reference
    _, labels = gpureg.two_particle_phantom(shape, return_labels=True)
    vols = [gpureg.two_particle_phantom(shape, m) for m in truths]
    seen = []
    series = gpureg.register_series(vols, energies, progress=lambda i, r: seen.append(i))
    assert series.reference_index == 4
    assert seen == [3, 2, 1, 0]  # by distance from the reference
    for k, truth in enumerate(truths):
        mean, _ = gpureg.displacement_error(series.matrices[k], truth, mask=labels > 0)
        assert mean <= 0.2, f"energy {energies[k]}: {mean:.3f} voxel"


def test_series_reference_energy_must_exist():
    vols = [np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)] * 2
    with pytest.raises(ValueError, match="reference energy 7000"):
        gpureg.register_series(vols, [6500.0, 6600.0], reference=7000.0)
    with pytest.raises(ValueError, match="one energy per volume"):
        gpureg.register_series(vols, [6500.0])


def test_translation_model_keeps_linear_part_identity(fixed):
    vol, labels = fixed
    truth = CASES["translation"]
    res = gpureg.register_affine(vol, _moving(truth), prep=GREY, model="translation")
    np.testing.assert_array_equal(res.matrix[:3, :3], np.eye(3))
    assert gpureg.displacement_error(res.matrix, truth, mask=labels > 0)[0] <= 0.1


def test_mask_restricts_metric(fixed):
    vol, labels = fixed
    truth = CASES["translation"]
    res = gpureg.register_affine(vol, _moving(truth), prep=GREY, mask=labels == 1)
    assert gpureg.displacement_error(res.matrix, truth, mask=labels == 1)[0] <= 0.1


# --- bad input -------------------------------------------------------------------------

def test_different_shapes():
    a = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)
    with pytest.raises(ValueError, match=r"same shape.*\(16, 16, 16\) and \(16, 16, 12\)"):
        gpureg.register_affine(a, a[:, :, :12])


def test_not_3d():
    with pytest.raises(ValueError, match="fixed must be a 3D"):
        gpureg.register_affine(np.zeros((16, 16)), np.zeros((16, 16)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite(bad):
    a = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)
    b = a.copy()
    b[3, 4, 5] = bad
    with pytest.raises(ValueError, match="moving contains NaN or inf"):
        gpureg.register_affine(a, b)


def test_constant_volume():
    a = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="fixed is constant"):
        gpureg.register_affine(np.full_like(a, 3.0), a)


def test_empty_after_binarization():
    # Isolated bright voxels vanish under the median filter: nothing left to binarize.
    a = np.zeros((16, 16, 16), np.float32)
    a[4, 4, 4] = a[10, 9, 8] = 1.0
    with pytest.raises(ValueError, match="fixed: .*constant"):
        gpureg.register_affine(a, a, prep=gpureg.Prep(denoise="median"))
    with pytest.raises(ValueError, match="mask selects no voxel"):
        gpureg.register_affine(a, a, prep=GREY, mask=np.zeros(a.shape, bool))


def test_integer_dtypes_are_converted(fixed):
    vol, labels = fixed
    truth = CASES["translation"]
    f16 = (vol * 4000).astype(np.uint16)
    m16 = (_moving(truth) * 4000).astype(np.uint16)
    res = gpureg.register_affine(f16, m16, prep=GREY)
    assert gpureg.displacement_error(res.matrix, truth, mask=labels > 0)[0] <= 0.1


def test_complex_dtype_rejected():
    a = np.ones((8, 8, 8), np.complex64)
    with pytest.raises(TypeError, match="real numbers, got dtype complex64"):
        gpureg.register_affine(a, a)


def test_gpu_without_gpu_is_clear(monkeypatch):
    if gpureg.gpu_available():
        pytest.skip("a GPU is present")
    a = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)
    with pytest.raises(gpureg.GPUUnavailableError, match="device='gpu' was requested but no GPU is usable"):
        gpureg.register_affine(a, a, device="gpu")
