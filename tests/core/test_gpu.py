"""GPU path: CuPy raw kernels against the NumPy/SciPy path and known transforms.

Every test here needs CuPy and a CUDA device (``gpu`` marker; skipped cleanly
otherwise). The per-voxel arithmetic is already checked on the CPU by
test_voxel_math.py; these tests check the launch and reduction scaffolding
and the whole GPU registration.

Tolerances: fused-pass sums within 1e-4 of the CPU's (relative to each
quantity's largest entry; the harness shows ~3e-7, the GPU adds only the
order of float/double reductions), J^T J per entry within
1e-5 sqrt(H_ii H_jj) (an absolute bound on the largest entry would accept
10-49 % error on the small ones); resampling within 1e-4 of scipy's
``affine_transform(order=1)``; registration within 0.1 voxel mean error of the
truth and 0.05 voxel of the CPU result (the issue's contract).
"""

import numpy as np
import pytest

import gpureg
from gpureg.core import cuda
from gpureg import register as reg
from gpureg.core import transform as tf
from gpureg.core.backend import cupy_or_none
from gpureg.core.metric import mse_terms
from gpureg.core.prefetch import HostToDevicePrefetcher
from gpureg.core import cuda_solver
from known_transforms import C, CASES, SHAPE, assert_resampled_like_scipy

pytestmark = pytest.mark.gpu

KNOWN = CASES


@pytest.fixture(scope="module")
def cp():
    return cupy_or_none()


@pytest.fixture(scope="module")
def fixed():
    return gpureg.two_particle_phantom(SHAPE, return_labels=True)


def _close(got, ref, rel, what):
    scale = np.abs(ref).max()
    np.testing.assert_allclose(got, ref, rtol=0, atol=rel * scale, err_msg=what)


def _close_jtj(got, ref, rel=1e-5):
    """|dH_ij| <= rel sqrt(H_ii H_jj): each entry against the scale of its own row and column."""
    d = np.sqrt(np.abs(np.diag(ref)))
    bound = rel * np.outer(d, d) + 1e-12
    err = np.abs(got - ref)
    assert (err <= bound).all(), f"J^T J entries off by up to {(err / bound).max():.2f} x the per-entry bound"


# Shapes: odd row lengths (partial warps), rows > 32 (several lanes' passes), and a grid of
# 9600 rows, more than the resident blocks take in one sweep (grid-stride loop).
@pytest.mark.parametrize("shape", [(24, 28, 37), (60, 160, 45), (33, 20, 70)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_fused_pass_matches_cpu(cp, shape, mask_kind):
    rng = np.random.default_rng(sum(shape))
    c = tf.grid_center(shape)
    truth = tf.compose(tf.rotation_matrix(5.0, (0.2, 1.0, 0.4), c), tf.scale_matrix((1.03, 0.98, 1.01), c))
    truth[:3, 3] += (1.5, -2.0, 0.8)
    f = gpureg.two_particle_phantom(shape, seed=2)
    m = gpureg.two_particle_phantom(shape, truth, seed=2)
    mask = None
    if mask_kind is not None:
        mask = rng.random(shape) > 0.3
        if mask_kind == "float":
            mask = mask.astype(np.float32)
    for trial in range(3):
        params = rng.normal(scale=[0.02] * 9 + [1.0] * 3)
        matrix = tf.matrix_from_params(params, c) @ truth
        cpu = mse_terms(f, m, matrix, mask=None if mask is None else mask > 0.5)
        gpu = mse_terms(cp.asarray(f), cp.asarray(m), matrix, mask=None if mask is None else cp.asarray(mask))
        assert abs(gpu.count - cpu.count) <= max(2, 1e-5 * cpu.count), trial
        np.testing.assert_allclose(gpu.sse, cpu.sse, rtol=1e-4)
        _close(gpu.rj, cpu.rj, 1e-4, "sum r J")
        _close_jtj(gpu.jtj, cpu.jtj)
        no_h = mse_terms(cp.asarray(f), cp.asarray(m), matrix, mask=None if mask is None else cp.asarray(mask),
                         hessian=False)
        assert no_h.jtj is None and no_h.count == gpu.count
        _close(no_h.rj, gpu.rj, 1e-6, "hessian=False gives the same r J")


def test_fused_pass_identity_and_outside(cp):
    f = gpureg.two_particle_phantom((32, 40, 48))
    terms = mse_terms(cp.asarray(f), cp.asarray(f), np.eye(4))
    assert terms.count == f.size and terms.sse < 1e-10
    shifted = np.eye(4)
    shifted[:3, 3] = (0.0, 0.0, 100.0)  # entirely outside the moving volume
    assert mse_terms(cp.asarray(f), cp.asarray(f), shifted).count == 0


@pytest.mark.parametrize("out_shape", [None, (50, 70, 41)])
@pytest.mark.parametrize("case", ["rotation", "combined"])
def test_apply_affine_matches_scipy(cp, case, out_shape):
    vol = gpureg.two_particle_phantom((48, 56, 64), seed=4)
    matrix = KNOWN[case]
    shape = vol.shape if out_shape is None else out_shape
    got = gpureg.apply_affine(cp.asarray(vol), matrix, output_shape=out_shape, cval=-1.0)
    assert isinstance(got, cp.ndarray) and got.dtype == np.float32 and got.shape == shape
    assert_resampled_like_scipy(got.get(), vol, matrix, shape, -1.0, 1e-4, crosses_faces=False)
    # a NumPy input with device="gpu" comes back on the host, equal
    host = gpureg.apply_affine(vol, matrix, output_shape=out_shape, cval=-1.0, device="gpu")
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, got.get())


def test_pyramid_step_matches_numpy(cp):
    v = np.random.default_rng(5).random((33, 46, 51)).astype(np.float32)
    got = reg.downsample2(cp.asarray(v))
    np.testing.assert_allclose(got.get(), reg.downsample2(v), rtol=0, atol=3e-7)
    levels = reg.pyramid(cp.asarray(v), min_size=8)
    assert [lv.shape for lv in levels] == [lv.shape for lv in reg.pyramid(v, min_size=8)]


@pytest.mark.parametrize("kind", ["phantom", "even", "odd", "negative", "constant"])
def test_median_and_center_of_mass_match_numpy(cp, kind):
    rng = np.random.default_rng(6)
    v = {
        "phantom": gpureg.two_particle_phantom((40, 44, 48), KNOWN["combined"]),
        "even": rng.random((10, 12, 14)),
        "odd": rng.random((9, 11, 13)),
        "negative": -rng.random((9, 10, 11)) * 1e3,
        "constant": np.full((8, 8, 8), 2.5),
    }[kind].astype(np.float32)
    assert cuda.median(cp.asarray(v)) == np.median(v)
    np.testing.assert_allclose(reg.center_of_mass(cp.asarray(v)), reg.center_of_mass(v), rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", list(KNOWN))
def test_registration_recovers_known_transform_like_cpu(cp, fixed, case):
    vol, labels = fixed
    truth = KNOWN[case]
    moving = gpureg.two_particle_phantom(SHAPE, truth)
    gpu = gpureg.register_affine(cp.asarray(vol), cp.asarray(moving), prep=gpureg.Prep())
    cpu = gpureg.register_affine(vol, moving, prep=gpureg.Prep(), device="cpu")
    assert gpu.device == "gpu"
    err, _ = gpureg.displacement_error(gpu.matrix, truth, mask=labels > 0)
    diff, _ = gpureg.displacement_error(gpu.matrix, cpu.matrix, mask=labels > 0)
    assert err <= 0.1, f"{case}: GPU mean displacement error {err:.3f} voxel"
    assert diff <= 0.05, f"{case}: GPU and CPU results differ by {diff:.3f} voxel"
    assert gpu.mse_after < gpu.mse_before
    # NumPy inputs with device="gpu" run the same kernels
    host = gpureg.register_affine(vol, moving, prep=gpureg.Prep(), device="gpu")
    np.testing.assert_allclose(host.matrix, gpu.matrix, atol=1e-6)


def test_register_series_on_gpu_streams_volumes(cp):
    shape = (48, 48, 48)
    c = tf.grid_center(shape)
    energies = np.array([6530.0, 6545.0, 6560.0, 6590.0])
    truths = []
    for k, d in enumerate([(2.0, -1.5, 1.0), (1.0, -0.8, 0.6), (0.5, 0.3, -0.4), (0, 0, 0)]):
        m = tf.rotation_matrix(0.5 * k, (0, 0, 1), c)
        m[:3, 3] += d
        truths.append(m)
    truths[-1] = np.eye(4)
    _, labels = gpureg.two_particle_phantom(shape, return_labels=True)
    vols = [gpureg.two_particle_phantom(shape, m).astype(np.float64) for m in truths]  # converted on the way
    series = gpureg.register_series(vols, energies, device="gpu")
    cpu = gpureg.register_series(vols, energies, device="cpu")
    for k, truth in enumerate(truths):
        assert series.results[k].device == "gpu"
        err, _ = gpureg.displacement_error(series.matrices[k], truth, mask=labels > 0)
        diff, _ = gpureg.displacement_error(series.matrices[k], cpu.matrices[k], mask=labels > 0)
        assert err <= 0.2 and diff <= 0.05, (k, err, diff)


def test_prefetcher_returns_the_volumes(cp):
    rng = np.random.default_rng(7)
    vols = [rng.random((6, 7, 8)), rng.integers(0, 9, (6, 7, 8)).astype(np.uint16), cp.ones((6, 7, 8), np.float32),
            np.zeros((6, 7), np.float32), np.zeros((6, 7, 8), np.complex64)]
    with HostToDevicePrefetcher(vols) as fetch:
        fetch.submit(0)
        fetch.submit(1)
        a = fetch.take(0)
        b = fetch.take(1)
        assert a.dtype == b.dtype == np.float32 and isinstance(a, cp.ndarray)
        np.testing.assert_array_equal(a.get(), vols[0].astype(np.float32))
        np.testing.assert_array_equal(b.get(), vols[1].astype(np.float32))
        assert fetch.take(2) is vols[2]
        assert isinstance(fetch.take(3), np.ndarray)  # left for the caller's validation to report
        assert fetch.take(4).dtype == np.complex64


def test_bad_inputs_are_clear(cp):
    v = cp.zeros((8, 8, 8), cp.float32)
    with pytest.raises(TypeError, match="CuPy array"):
        cuda.resample_affine(np.zeros((8, 8, 8), np.float32), np.eye(4), (8, 8, 8))
    with pytest.raises(ValueError, match="3D"):
        cuda.resample_affine(cp.zeros((8, 8), cp.float32), np.eye(4), (8, 8))
    with pytest.raises(ValueError, match="at least 2 voxels"):
        cuda.mse_terms(v, cp.zeros((8, 1, 8), cp.float32), np.eye(4), C)
    with pytest.raises(ValueError, match="mask must have the shape"):
        cuda.mse_terms(v, v, np.eye(4), C, mask=cp.ones((4, 4, 4), bool))
    with pytest.raises(ValueError, match="empty"):
        cuda.median(cp.zeros((0,), cp.float32))


# --- issue 14: inputs the first GPU run would meet, the device solver, empty space ------------

def test_fused_pass_different_shapes_and_centre(cp):
    f = gpureg.two_particle_phantom((30, 36, 41), seed=3)
    m = gpureg.two_particle_phantom((34, 33, 45), seed=3)
    c = np.array([12.0, 20.5, 17.25])  # not the grid centre
    matrix = tf.matrix_from_params(np.r_[0.01, 0, 0.02, 0, -0.01, 0, 0.015, 0, 0, 1.5, -0.5, 2.0], c)
    cpu = mse_terms(f, m, matrix, center=c)
    gpu = mse_terms(cp.asarray(f), cp.asarray(m), matrix, center=c)
    assert abs(gpu.count - cpu.count) <= 2
    _close(gpu.rj, cpu.rj, 1e-4, "sum r J")
    _close_jtj(gpu.jtj, cpu.jtj)


def test_fused_pass_float64_noncontiguous_and_numpy_mask(cp):
    f = gpureg.two_particle_phantom((32, 40, 48), seed=5)
    m = gpureg.two_particle_phantom((32, 40, 48), KNOWN["translation"], seed=5)
    mask = np.random.default_rng(1).random(f.shape) > 0.3
    c = tf.grid_center(f.shape)
    cpu = mse_terms(f, m, np.eye(4), center=c, mask=mask)
    f64 = cp.asarray(f, dtype=cp.float64)
    strided = cp.asfortranarray(cp.asarray(m))  # non-contiguous in C order
    gpu = mse_terms(f64, strided, np.eye(4), center=c, mask=mask)  # NumPy mask with CuPy volumes
    assert gpu.count == cpu.count
    _close(gpu.rj, cpu.rj, 1e-4, "sum r J")
    _close_jtj(gpu.jtj, cpu.jtj)


def test_volume_on_another_gpu_stays_there(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    with cp.cuda.Device(1):
        v = cp.asarray(gpureg.two_particle_phantom((16, 16, 16)), dtype=cp.float64)
    out = cuda.resample_affine(v, np.eye(4), v.shape)
    assert out.device.id == 1


def test_parity_256(cp):
    # 64^3 phantoms upsampled 4x (trilinear): a 256^3 grid with the phantom's structure in ~2 s,
    # where the 256^3 phantoms themselves take about a minute on one core.
    from scipy import ndimage

    shape = (256, 256, 256)
    truth = tf.rotation_matrix(2.0, (0.2, 1.0, 0.3), tf.grid_center(shape))
    small = (64, 64, 64)
    f = ndimage.zoom(gpureg.two_particle_phantom(small, seed=1), 4, order=1).astype(np.float32)
    m = ndimage.zoom(gpureg.two_particle_phantom(small, tf.rotation_matrix(2.0, (0.2, 1.0, 0.3), tf.grid_center(small)),
                                                 seed=1), 4, order=1).astype(np.float32)
    assert f.shape == shape
    cpu = mse_terms(f, m, truth)
    gpu = mse_terms(cp.asarray(f), cp.asarray(m), truth)
    assert abs(gpu.count - cpu.count) <= max(2, 1e-6 * cpu.count)
    np.testing.assert_allclose(gpu.sse, cpu.sse, rtol=1e-4)
    _close(gpu.rj, cpu.rj, 1e-4, "sum r J")
    _close_jtj(gpu.jtj, cpu.jtj)


def test_prefetcher_under_load(cp):
    # Kernels in flight on the consumer's stream while volumes are copied and freed: every
    # volume must arrive intact, and the consumer's results must not see a later copy.
    # Exact: each of the 20 reads compares v voxel by voxel with its own volume (uploaded beforehand,
    # synchronously), so a wrong pairing or a copy landing under a read fails (a sum within a tolerance let
    # 116 of the 132 wrong pairings pass).
    rng = np.random.default_rng(8)
    vols = [rng.random((64, 64, 64)).astype(np.float32) for _ in range(12)]
    expected = [cp.asarray(v) for v in vols]
    cp.cuda.Device().synchronize()
    with HostToDevicePrefetcher(vols) as fetch:
        fetch.submit(0)
        for i in range(len(vols)):
            v = fetch.take(i)
            if i + 1 < len(vols):
                fetch.submit(i + 1)
            same = cp.zeros((), cp.int32)
            for _ in range(20):  # keep the stream busy with reads of v
                same += cp.all(v == expected[i])
            assert int(same) == 20, f"volume {i}: {20 - int(same)} of 20 reads saw other data"
            del v


@pytest.mark.parametrize("skip_empty", [False, True])
def test_device_solver_matches_host_solver(cp, fixed, skip_empty):
    from gpureg.core.solver import levenberg_marquardt

    vol, _ = fixed
    f = gpureg.register.prepare_volume(cp.asarray(vol), "gpu", gpureg.Prep())
    m = gpureg.register.prepare_volume(cp.asarray(gpureg.two_particle_phantom(SHAPE, KNOWN["combined"])), "gpu",
                                       gpureg.Prep())
    c = tf.grid_center(f.shape)
    p0 = np.zeros(12)

    def terms(p):
        return mse_terms(f, m, tf.matrix_from_params(p, c), center=c)

    corners = np.array(np.meshgrid(*[(0, n - 1) for n in f.shape], indexing="ij")).reshape(3, -1).T - c

    def corner_move(x, step):
        return float(np.abs(corners @ step[:9].reshape(3, 3).T + step[9:]).max())

    ref, ref_passes, ref_conv = levenberg_marquardt(terms, p0, corner_move)
    got, passes, conv = cuda_solver.levenberg_marquardt_device(f, m, p0, c, skip_empty=skip_empty)
    assert conv == ref_conv and abs(passes - ref_passes) <= 2
    diff, _ = gpureg.displacement_error(tf.matrix_from_params(got, c), tf.matrix_from_params(ref, c), shape=f.shape)
    assert diff < 0.01, diff


def test_empty_space_skipping_on_gpu(cp, fixed):
    vol, _ = fixed
    f = gpureg.register.prepare_volume(cp.asarray(vol), "gpu", gpureg.Prep())
    m = gpureg.register.prepare_volume(cp.asarray(gpureg.two_particle_phantom(SHAPE, KNOWN["combined"])), "gpu",
                                       gpureg.Prep())
    c = tf.grid_center(f.shape)
    tables = cuda_solver.empty_space_tables(f, m)
    for matrix in (np.eye(4), KNOWN["combined"]):
        full = cuda.unpack_terms(cuda.mse_terms_device(f, m, matrix, c).get())
        skip = cuda.unpack_terms(cuda.mse_terms_device(f, m, matrix, c, empty_space=tables).get())
        assert skip.count == full.count
        _close(skip.rj, full.rj, 1e-6, "sum r J")
        _close_jtj(skip.jtj, full.jtj, 1e-7)


def test_wide_index_build_matches_the_32_bit_build(cp, fixed, monkeypatch):
    # The 64-bit index build (volumes over 2^31 - 1 voxels) on small data: with the size limit
    # lowered, every launcher takes the wide kernels, which must give the 32-bit build's results
    # (same arithmetic, other index types; the radix counts in 64 bits).
    vol, _ = fixed
    f = gpureg.register.prepare_volume(cp.asarray(vol), "gpu", gpureg.Prep())
    m = gpureg.register.prepare_volume(cp.asarray(gpureg.two_particle_phantom(SHAPE, KNOWN["combined"])), "gpu",
                                       gpureg.Prep())
    c = tf.grid_center(f.shape)
    truth = KNOWN["combined"]

    def run():
        return (cuda.mse_terms(f, m, truth, c), cuda.resample_affine(m, truth, f.shape).get(),
                cuda.downsample2(f).get(), cuda.median(m), cuda.center_of_mass(m),
                cuda_solver.levenberg_marquardt_device(f, m, np.zeros(12), c))

    narrow = run()
    monkeypatch.setattr(cuda, "_MAX_ELEMENTS", 1000)
    assert cuda.wide_index(f.shape)
    wide = run()
    assert wide[0].count == narrow[0].count
    _close(wide[0].rj, narrow[0].rj, 1e-6, "sum r J, wide build")
    _close_jtj(wide[0].jtj, narrow[0].jtj, 1e-6)
    np.testing.assert_array_equal(wide[1], narrow[1])
    np.testing.assert_array_equal(wide[2], narrow[2])
    assert wide[3] == narrow[3]
    np.testing.assert_allclose(wide[4], narrow[4], rtol=0, atol=1e-6)
    # the wide state pass may run on fewer resident blocks (3 per SM): other partial sums, rounding only
    np.testing.assert_allclose(wide[5][0], narrow[5][0], rtol=0, atol=1e-4)
    assert abs(wide[5][1] - narrow[5][1]) <= 1 and wide[5][2] == narrow[5][2]
