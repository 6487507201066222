"""The compiled CPU engine (numba) against the NumPy reference and the g++-compiled CUDA header.

Three implementations of the per-voxel arithmetic (DESIGN.md): the numba
kernels of :mod:`gpureg.core.cpu_kernels` / :mod:`gpureg.core.cpu_prep`, the
NumPy reference (``gpureg.config.cpu_backend = "numpy"``) and ``kernels/voxel_math.cuh``
compiled by g++ (the harness of ``tests/test_voxel_math.py``). They run here on
the same inputs and are compared term by term.

Tolerances: numba and the header form ``q`` and interpolate in float32
(``q`` carries ~1e-6 voxel of rounding), NumPy in float64; numba sums in
float64, the header's row sums in float32. Each Gauss-Newton entry is compared
relative to its natural scale, ``|dH_ij| <= tol sqrt(H_ii H_jj)`` (Cauchy-Schwarz
bounds ``|H_ij|`` by it), and each gradient entry relative to
``sqrt(sse H_ii)``; ``tol = 1e-5`` is ~10x what the runs showed (1e-7..1e-6).
Filters of the preparation are compared bit for bit with SciPy/NumPy: the
kernels reproduce their arithmetic exactly.
"""

import numpy as np
import pytest
from scipy import ndimage
from test_voxel_math import CASES, _mse_sums, _pair, lib  # noqa: F401  (the g++ harness and its fixture)

import gpureg
from gpureg.core import cpu_gauss, cpu_kernels, cpu_prep, metric, segment
from gpureg.core.config import config
from gpureg.core import transform as tf
from gpureg.register import prepare as prep
from gpureg.register import prepare_volume, register_affine
from gpureg.synth.phantom import two_particle_phantom
from gpureg.synth import salt_and_pepper
from known_transforms import assert_resampled_like_scipy

TOL = 1e-5


@pytest.fixture
def numpy_engine():
    """Switch to the NumPy reference kernels (True) and back (False); conftest restores the config."""
    def use(flag: bool):
        config.set(cpu_backend="numpy" if flag else "numba")
    return use


def _assert_terms_close(a, b, hessian=True, count_slack=2):
    assert abs(a.count - b.count) <= count_slack
    np.testing.assert_allclose(a.sse, b.sse, rtol=TOL)
    ref = b.jtj if b.jtj is not None else None
    if hessian:
        d = np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
        assert np.all(np.abs(a.jtj - ref) <= TOL * d + 1e-12), np.max(np.abs(a.jtj - ref) / (d + 1e-30))
        scale = np.sqrt(b.sse * np.diag(ref))
        assert np.all(np.abs(a.rj - b.rj) <= TOL * scale + 1e-12)
    else:
        assert a.jtj is None
        np.testing.assert_allclose(a.rj, b.rj, rtol=0, atol=TOL * np.abs(b.rj).max())


@pytest.mark.parametrize("hessian", [True, False])
@pytest.mark.parametrize("mask_kind", [None, "bool"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_pass_numba_numpy_and_header_agree(lib, numpy_engine, case, mask_kind, hessian):  # noqa: F811
    fixed, moving = _pair()
    rng = np.random.default_rng(5)
    moving = moving + rng.normal(0, 0.05, moving.shape).astype(np.float32)  # grey, no plateaus
    matrix = CASES[case]
    center = tf.grid_center(fixed.shape) + np.array([0.5, -1.0, 0.0])
    mask = None
    if mask_kind is not None:
        z, y, x = np.indices(fixed.shape)
        mask = (x + 2 * y + 3 * z) % 5 != 0
    numba_terms = metric.mse_terms(fixed, moving, matrix, center=center, mask=mask, hessian=hessian)
    numpy_engine(True)
    ref = metric.mse_terms(fixed, moving, matrix, center=center, mask=mask, hessian=True)
    header = _mse_sums(lib, fixed, moving, matrix, center, mask=mask, hessian=True)
    assert ref.count > 5000
    _assert_terms_close(numba_terms, ref, hessian)
    _assert_terms_close(header, ref)
    if hessian:
        np.testing.assert_array_equal(numba_terms.jtj, numba_terms.jtj.T)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sparse_support_skip_is_exact(numpy_engine, case):
    fixed, moving = _pair()
    fixed = (fixed > 0.5).astype(np.float32)
    moving = (moving > 0.5).astype(np.float32)  # sparse: most cells empty
    support = metric.cell_support(moving)
    numpy_engine(True)
    np.testing.assert_array_equal(support, metric.cell_support(moving))
    numpy_engine(False)
    assert support.mean() < 0.5
    with_skip = metric.mse_terms(fixed, moving, CASES[case], support=support)
    without = metric.mse_terms(fixed, moving, CASES[case])
    assert with_skip.count == without.count
    np.testing.assert_allclose(with_skip.sse, without.sse, rtol=1e-12)
    np.testing.assert_allclose(with_skip.jtj, without.jtj, rtol=1e-12, atol=1e-12 * np.abs(without.jtj).max())


def test_pass_is_deterministic_for_any_thread_count():
    shape = (44, 40, 48)  # above SMALL_VOLUME, so the threads are used
    assert np.prod(shape) >= cpu_kernels.SMALL_VOLUME
    fixed = two_particle_phantom(shape, seed=1)
    moving = two_particle_phantom(shape, tf.rotation_matrix(3.0, (1, 1, 0), tf.grid_center(shape)), seed=1)
    matrix = tf.matrix_from_params([0.01, 0, 0, 0, -0.02, 0, 0, 0, 0.01, 0.5, 0.2, -0.3], tf.grid_center(shape))
    runs = []
    for n in (1, 2, 3):
        with config(threads=n):
            runs.append(metric.mse_terms(fixed, moving, matrix))
    for r in runs[1:]:
        assert r.count == runs[0].count and r.sse == runs[0].sse
        np.testing.assert_array_equal(r.jtj, runs[0].jtj)


def _sse_in_child(args):
    fixed, moving = args
    return metric.mse_terms(fixed, moving, np.eye(4)).sse


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_kernels_run_in_a_forked_child():
    """The thread pool of the parent is not inherited by a forked child (Dask, multiprocessing):
    the child builds its own and gets the same sums."""
    import multiprocessing

    config.set(threads=2)
    shape = (44, 40, 48)
    fixed = two_particle_phantom(shape, seed=1)
    moving = two_particle_phantom(shape, tf.rotation_matrix(3.0, (1, 1, 0), tf.grid_center(shape)), seed=1)
    here = metric.mse_terms(fixed, moving, np.eye(4)).sse  # the parent's pool now exists
    with multiprocessing.get_context("fork").Pool(1) as pool:
        there = pool.apply_async(_sse_in_child, ((fixed, moving),)).get(timeout=120)
    assert there == here


def test_bad_thread_count_is_a_clear_error():
    with pytest.raises(ValueError, match="threads"):
        config.set(threads=0)
    with pytest.raises(ValueError, match="threads"):
        cpu_kernels.set_threads(1.5)


@pytest.mark.parametrize("out_shape", [(24, 28, 36), (20, 31, 29)])
def test_resample_matches_scipy_affine_transform(out_shape):
    _, moving = _pair()
    matrix = CASES["rotated, partly outside"]
    out = gpureg.apply_affine(moving, matrix, output_shape=out_shape, cval=-2.0)
    assert_resampled_like_scipy(out, moving, matrix, out_shape, -2.0, 2e-6)


def test_pyramid_and_center_of_mass_match_numpy(numpy_engine):
    v = two_particle_phantom((33, 40, 46), seed=2)
    down, com = prep.downsample2(v), prep.center_of_mass(v)
    numpy_engine(True)
    np.testing.assert_allclose(down, prep.downsample2(v), rtol=0, atol=3e-7)
    # NumPy sums the weights in float32 (~1e-7 relative); the kernel in float64
    np.testing.assert_allclose(com, prep.center_of_mass(v), rtol=0, atol=2e-5)


@pytest.mark.parametrize("sigma", [1.0, 2.3])
def test_gaussian_is_scipy_bit_for_bit(sigma):
    v = np.random.default_rng(6).random((20, 27, 33)).astype(np.float32)
    np.testing.assert_array_equal(segment.gaussian(v, sigma), ndimage.gaussian_filter(v, sigma))
    small = v[:3, :5, :4].copy()  # radius beyond the volume: reflection folds repeatedly
    np.testing.assert_array_equal(cpu_gauss.gaussian_filter(small, 1.5), ndimage.gaussian_filter(small, 1.5))


@pytest.mark.parametrize("order", [(1, 0, 0), (0, 1, 0), (0, 0, 1)])
def test_gaussian_derivative_is_scipy_bit_for_bit(order):
    # partial-volume binarization takes the gradient of the Gaussian-smoothed volume (sigma 0.7)
    v = np.random.default_rng(7).random((20, 27, 33)).astype(np.float32)
    for sigma in (0.7, 2.3):
        np.testing.assert_array_equal(segment.gaussian(v, sigma, order), ndimage.gaussian_filter(v, sigma, order=order))
    small = v[:3, :5, :4].copy()
    np.testing.assert_array_equal(cpu_gauss.gaussian_filter(small, 1.5, order),
                                  ndimage.gaussian_filter(small, 1.5, order=order))
    with pytest.raises(ValueError, match="order"):
        cpu_gauss.gaussian_filter(v, 1.0, (2, 0, 0))


def _flat_rows_volume():
    """A volume with every kind of row: constant rows of differing values (v = f(z, y)), zero
    background, a bright plateau and grey structure (the constant-row skips of cpu_gauss)."""
    v = np.zeros((26, 30, 34), np.float32)
    z, y = np.mgrid[:26, :30]
    v[:, :8] = (0.1 * z + 0.02 * y)[:, :8, None]
    v[10:20, 12:22, :] = 1.0
    v[14:17, 15:19, 5:25] = np.random.default_rng(9).random((3, 4, 20))
    return v


@pytest.mark.parametrize("sigma", [0.7, 1.0])
def test_gaussian_constant_row_skip_is_scipy_bit_for_bit(sigma):
    v = _flat_rows_volume()
    const, _ = cpu_gauss.row_constants(v)
    assert 0.3 < const.mean() < 0.99  # both paths taken
    np.testing.assert_array_equal(segment.gaussian(v, sigma), ndimage.gaussian_filter(v, sigma))
    for order in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        np.testing.assert_array_equal(segment.gaussian(v, sigma, order), ndimage.gaussian_filter(v, sigma, order=order))


def test_partial_volume_is_the_numpy_reference_bit_for_bit(numpy_engine):
    """The fused compiled ramp (shared passes, constant rows skipped, far voxels decided without the
    root) against segment.partial_volume's NumPy arithmetic; and binarize's empty-mask check."""
    phantom = two_particle_phantom((30, 34, 38), seed=3)
    volumes = [phantom, salt_and_pepper(phantom, 0.1, seed=1), _flat_rows_volume(),
               np.random.default_rng(6).random((20, 27, 33)).astype(np.float32),
               np.ascontiguousarray(phantom[12:15, 14:19, 15:19])]  # radius beyond the volume
    for v in volumes:
        v = np.asarray(v, np.float32)
        t = segment.otsu_threshold(v)
        fast = [segment.partial_volume(v, t, ramp=r) for r in (1.0, 3.0)] + [segment.binarize(v, ramp=3.0)]
        numpy_engine(True)
        ref = [segment.partial_volume(v, t, ramp=r) for r in (1.0, 3.0)] + [segment.binarize(v, ramp=3.0)]
        numpy_engine(False)
        for a, b in zip(fast, ref):
            np.testing.assert_array_equal(a, b)
        assert np.any((fast[1] > 0) & (fast[1] < 1)) and np.any(fast[1] == 0) and np.any(fast[1] == 1)
    with pytest.raises(ValueError, match="no foreground"):
        segment.binarize(phantom, threshold=float(phantom.max()), ramp=3.0)


def test_median_and_otsu_are_scipy_numpy_bit_for_bit(numpy_engine):
    v = salt_and_pepper(two_particle_phantom((24, 30, 36), seed=4), 0.1, seed=1)
    np.testing.assert_array_equal(segment.denoise(v, "median"), ndimage.median_filter(v, size=3))
    lo, hi = float(v.min()), float(v.max())
    np.testing.assert_array_equal(cpu_prep.histogram(v, 256, lo, hi), np.histogram(v, 256, range=(lo, hi))[0])
    # NumPy bins float32 data by float32 edges: values within a float32 step of an edge (here a
    # few per 10^6 voxels) fall as NumPy puts them
    w = (np.random.default_rng(3).normal(size=(50, 60, 70)) * 1e3 + 7).astype(np.float32)
    for bins in (256, 7):
        np.testing.assert_array_equal(cpu_prep.histogram(w, bins, float(w.min()), float(w.max())),
                                      np.histogram(w, bins, range=(float(w.min()), float(w.max())))[0])
    t = segment.otsu_threshold(v)
    numpy_engine(True)
    assert segment.otsu_threshold(v) == t
    bad = v.copy()
    bad[1, 2, 3] = np.nan
    numpy_engine(False)
    with pytest.raises(ValueError, match="NaN"):
        segment.otsu_threshold(bad)


@pytest.mark.parametrize("size", [3, 4])
def test_remove_impulses_compiled_matches_the_reference(numpy_engine, size):
    """The numba kernel against the SciPy box-filter reference; clean volumes come back untouched.

    The kernel sums each cube exactly in float64, the reference through three
    separable float32 box passes: measured at most 1.2e-7 apart (one float32
    step at 1) at 10-60 % noise, sizes 3-5; 1e-6 leaves 8x margin and is far below
    any filtered value (> 1e-3). 60 % noise exercises the all-extreme fallback.
    """
    clean = two_particle_phantom((40, 40, 40), seed=3)
    assert segment.remove_impulses(clean, size=size) is clean
    for level in (0.1, 0.6):
        noisy = salt_and_pepper(clean, level, seed=2)
        out = segment.remove_impulses(noisy, size=size)
        keep = (noisy > noisy.min()) & (noisy < noisy.max())
        np.testing.assert_array_equal(out[keep], noisy[keep])
        if level == 0.1:
            before, after = np.mean(np.abs(noisy - clean) > 0.1), np.mean(np.abs(out - clean) > 0.1)
            assert before > level / 3 and after < before / 5, (level, before, after)
        numpy_engine(True)
        ref = segment.remove_impulses(noisy, size=size)
        assert segment.remove_impulses(clean, size=size) is clean
        numpy_engine(False)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)
    bad = salt_and_pepper(clean, 0.1, seed=2)
    bad[0, 0, 0] = np.nan
    assert segment.remove_impulses(bad) is bad  # as the reference: NaN is neither extreme


@pytest.mark.parametrize("binarize", [True, False])
def test_registration_matches_the_numpy_engine(numpy_engine, binarize):
    shape = (40, 40, 40)
    c = tf.grid_center(shape)
    truth = tf.compose(tf.rotation_matrix(5.0, (0.3, 1, 1), c), tf.scale_matrix((1.03, 0.97, 1.0), c))
    truth[:3, 3] += (1.5, -2.0, 1.0)
    fixed, labels = two_particle_phantom(shape, return_labels=True)
    moving = two_particle_phantom(shape, truth)
    fast = register_affine(fixed, moving, device="cpu", prep=gpureg.Prep(binarize=binarize))
    numpy_engine(True)
    ref = register_affine(fixed, moving, device="cpu", prep=gpureg.Prep(binarize=binarize))
    # float32 vs float64 coordinates: the same minimum within far less than the accuracy
    assert tf.displacement_error(fast.matrix, ref.matrix, mask=labels > 0)[0] < 2e-3
    err = tf.displacement_error(fast.matrix, truth, mask=labels > 0)[0]
    assert err < 0.1, err
    np.testing.assert_allclose(fast.mse_after, ref.mse_after, rtol=1e-3)
    np.testing.assert_allclose(fast.mse_before, ref.mse_before, rtol=1e-5)


def test_noisy_registration_with_impulse_filter_is_as_accurate_as_clean():
    shape = (40, 40, 40)
    c = tf.grid_center(shape)
    truth = tf.compose(tf.rotation_matrix(4.0, (1, 0.2, 0.5), c))
    truth[:3, 3] += (-1.0, 2.0, 1.5)
    fixed, labels = two_particle_phantom(shape, return_labels=True)
    moving = two_particle_phantom(shape, truth)
    clean = register_affine(fixed, moving, device="cpu", prep=gpureg.Prep())
    impulse = gpureg.Prep(denoise="impulse")
    f = prepare_volume(salt_and_pepper(fixed, 0.1, seed=1), "cpu", impulse)
    m = prepare_volume(salt_and_pepper(moving, 0.1, seed=2), "cpu", impulse)
    noisy = gpureg.register_prepared(f, m)
    e_clean = tf.displacement_error(clean.matrix, truth, mask=labels > 0)[0]
    e_noisy = tf.displacement_error(noisy.matrix, truth, mask=labels > 0)[0]
    assert e_noisy < max(2 * e_clean, 0.1), (e_clean, e_noisy)


def test_cli_threads_option_sets_the_kernel_thread_count():
    import os

    from typer.testing import CliRunner

    from gpureg.cli.app import app

    before = os.environ.get("GPUREG_THREADS")
    r = CliRunner().invoke(app, ["--threads", "1", "info"])
    assert r.exit_code == 0, r.output
    assert cpu_kernels.threads() == 1 and config.threads == 1
    assert "threads=1" in r.output  # gpureg info shows the configuration
    assert os.environ.get("GPUREG_THREADS") == before  # the configuration, not the environment
    assert CliRunner().invoke(app, ["--threads", "0", "info"]).exit_code != 0
