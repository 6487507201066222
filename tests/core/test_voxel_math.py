"""The GPU's per-voxel arithmetic, checked on the CPU.

``kernels/voxel_math.cuh`` holds every per-voxel computation of the CUDA
kernels (cell and out-of-bounds rule, trilinear value and gradient, the fused
pass's row sums, the pyramid box mean, the moments and the radix key). Here a
small host harness compiled with g++ runs those same functions, arranged as
the kernels arrange them (32 lanes per row, per-row combination), and the
results are compared voxel by voxel with the NumPy path of
:mod:`gpureg.metric`. Only the CUDA launch and shuffle/shared-memory
scaffolding is left to the GPU tests.

Tolerances: the header computes in float32 (q as p + u with |u| of a few
voxels, so q carries ~1e-6 voxel of rounding) while the NumPy path uses
float64; values and gradients of volumes in [0, 1] then agree to ~1e-7 and
sums over ~25k voxels to ~3e-7 of their largest entry. The bounds below
(1e-6 and 2e-6) leave a margin of about 10x over what the harness showed.
"""

import ctypes

import numpy as np
import pytest

from gpureg.core import cuda, metric
from gpureg import register as reg
from gpureg.core import transform as tf
from gpureg.synth.phantom import two_particle_phantom
from known_transforms import assert_resampled_like_scipy
from cxx import build_shared


HARNESS = r"""
#include "voxel_math.cuh"
using namespace gpureg;

static Affine make_affine(const float* p) {
  Affine a;
  for (int i = 0; i < 9; ++i) a.d[i] = p[i];
  for (int i = 0; i < 3; ++i) { a.t[i] = p[9 + i]; a.c[i] = p[12 + i]; }
  return a;
}

// mse_terms_pass of affine.cu without the GPU: each row's 32 lanes, the row
// sums over lanes, and the per-term combination with the row's monomials.
template <bool Hessian, typename MaskT>
static void mse_sums(const float* fixed, const float* moving, const MaskT* mask, int nz, int ny, int nx,
                     int mz, int my, int mx, const Affine& a, double* out) {
  for (int k = 0; k < kTerms * kMonomials; ++k) out[k] = 0.0;
  for (int z = 0; z < nz; ++z) {
    for (int y = 0; y < ny; ++y) {
      float rowsum[kTerms] = {};
      for (int lane = 0; lane < 32; ++lane) {
        float t[kTerms] = {};
        mse_row_lane<Hessian>(fixed, moving, mask, ny, nx, mz, my, mx, a, z, y, lane, 32, t);
        for (int k = 0; k < kTerms; ++k) rowsum[k] += t[k];
      }
      for (int k = 0; k < kTerms; ++k)
        combine_row(out + k * kMonomials, rowsum[k], (float)z - a.c[0], (float)y - a.c[1]);
    }
  }
}

template <int H>
static void lockstep(float t[32][32]) {
  float send[32][16];
  for (int l = 0; l < 32; ++l)
    for (int k = 0; k < H; ++k) send[l][k] = transpose_send<H>(t[l], l, k);
  for (int l = 0; l < 32; ++l)
    for (int k = 0; k < H; ++k) t[l][k] = transpose_keep<H>(t[l], l, k) + send[l ^ H][k];
}

extern "C" {

void h_sample(const float* vol, int nz, int ny, int nx, int n, const int* b, const float* u, int gradient,
              float* value, float* grad, int* valid) {
  for (int k = 0; k < n; ++k) {
    float g[3] = {-1.0f, -1.0f, -1.0f};
    bool ok;
    if (gradient)
      ok = sample<true>(vol, nz, ny, nx, b[3 * k], b[3 * k + 1], b[3 * k + 2], u[3 * k], u[3 * k + 1],
                        u[3 * k + 2], value[k], g);
    else
      ok = sample<false>(vol, nz, ny, nx, b[3 * k], b[3 * k + 1], b[3 * k + 2], u[3 * k], u[3 * k + 1],
                         u[3 * k + 2], value[k], g);
    valid[k] = ok ? 1 : 0;
    for (int i = 0; i < 3; ++i) grad[3 * k + i] = g[i];
  }
}

void h_mse_sums(const float* fixed, const float* moving, const float* maskf, const unsigned char* maskb, int nz,
                int ny, int nx, int mz, int my, int mx, const float* affine, int hessian, double* out) {
  const Affine a = make_affine(affine);
  const bool* mb = reinterpret_cast<const bool*>(maskb);
  if (maskb != nullptr) {
    if (hessian) mse_sums<true>(fixed, moving, mb, nz, ny, nx, mz, my, mx, a, out);
    else mse_sums<false>(fixed, moving, mb, nz, ny, nx, mz, my, mx, a, out);
  } else {
    if (hessian) mse_sums<true>(fixed, moving, maskf, nz, ny, nx, mz, my, mx, a, out);
    else mse_sums<false>(fixed, moving, maskf, nz, ny, nx, mz, my, mx, a, out);
  }
}

void h_voxel_terms(float r, const float* g, const float* p, const float* c, int hessian, double* out) {
  float t[kTerms] = {};
  if (hessian) accumulate_voxel<true>(t, r, g, p[2] - c[2]);
  else accumulate_voxel<false>(t, r, g, p[2] - c[2]);
  for (int k = 0; k < kTerms * kMonomials; ++k) out[k] = 0.0;
  for (int k = 0; k < kTerms; ++k) combine_row(out + k * kMonomials, t[k], p[0] - c[0], p[1] - c[1]);
}

void h_transpose(const float* in, float* out) {
  float t[32][32];
  for (int l = 0; l < 32; ++l)
    for (int k = 0; k < 32; ++k) t[l][k] = in[32 * l + k];
  lockstep<16>(t); lockstep<8>(t); lockstep<4>(t); lockstep<2>(t); lockstep<1>(t);
  for (int l = 0; l < 32; ++l) out[l] = t[l][0];
}

void h_resample(const float* vol, int mz, int my, int mx, float* out, int nz, int ny, int nx, const float* affine,
                float cval) {
  const Affine a = make_affine(affine);
  for (int z = 0; z < nz; ++z)
    for (int y = 0; y < ny; ++y)
      for (int x = 0; x < nx; ++x) out[(z * ny + y) * nx + x] = resample_voxel(vol, mz, my, mx, a, z, y, x, cval);
}

void h_downsample2(const float* in, int ny, int nx, float* out, int oz, int oy, int ox) {
  for (int z = 0; z < oz; ++z)
    for (int y = 0; y < oy; ++y)
      for (int x = 0; x < ox; ++x) out[(z * oy + y) * ox + x] = box_mean8(in, ny, nx, z, y, x);
}

void h_moments(const float* v, int nz, int ny, int nx, float median, double* out) {
  for (int m = 0; m < 4; ++m) out[m] = 0.0;
  for (int z = 0; z < nz; ++z)
    for (int y = 0; y < ny; ++y)
      for (int lane = 0; lane < 32; ++lane) {
        float w = 0.0f, wx = 0.0f;
        moments_row_lane(v + (z * ny + y) * nx, nx, median, lane, 32, w, wx);
        combine_moments(out, w, wx, z, y);
      }
}

void h_keys(const float* v, int n, unsigned int* keys) {
  for (int k = 0; k < n; ++k) keys[k] = float_key(v[k]);
}

}  // extern "C"
"""

F32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
F64 = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
I32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
U32 = np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS")
c_int, c_float = ctypes.c_int, ctypes.c_float


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    h = build_shared(tmp_path_factory, "voxel_math", HARNESS, ("-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror"))
    h.h_sample.argtypes = [F32, c_int, c_int, c_int, c_int, I32, F32, c_int, F32, F32, I32]
    h.h_mse_sums.argtypes = [F32, F32, ctypes.c_void_p, ctypes.c_void_p, c_int, c_int, c_int, c_int, c_int, c_int,
                             F32, c_int, F64]
    h.h_voxel_terms.argtypes = [c_float, F32, F32, F32, c_int, F64]
    h.h_transpose.argtypes = [F32, F32]
    h.h_resample.argtypes = [F32, c_int, c_int, c_int, F32, c_int, c_int, c_int, F32, c_float]
    h.h_downsample2.argtypes = [F32, c_int, c_int, F32, c_int, c_int, c_int]
    h.h_moments.argtypes = [F32, c_int, c_int, c_int, c_float, F64]
    h.h_keys.argtypes = [F32, c_int, U32]
    for f in (h.h_sample, h.h_mse_sums, h.h_voxel_terms, h.h_transpose, h.h_resample, h.h_downsample2,
              h.h_moments, h.h_keys):
        f.restype = None
    return h


def _sample(lib, vol, b, u, gradient=True):
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    n = len(b)
    value, grad, valid = np.empty(n, np.float32), np.empty((n, 3), np.float32), np.empty(n, np.int32)
    lib.h_sample(vol, *vol.shape, n, np.ascontiguousarray(b, np.int32), np.ascontiguousarray(u, np.float32),
                 int(gradient), value, grad, valid)
    return value, grad, valid.astype(bool)


def _mse_sums(lib, fixed, moving, matrix, center, mask=None, hessian=True):
    fixed = np.ascontiguousarray(fixed, np.float32)
    moving = np.ascontiguousarray(moving, np.float32)
    aff = np.array(cuda.affine_args(matrix, center), dtype=np.float32)
    maskf = maskb = None
    if mask is not None and mask.dtype == np.bool_:
        mask = np.ascontiguousarray(mask)
        maskb = mask.ctypes.data
    elif mask is not None:
        mask = np.ascontiguousarray(mask, np.float32)
        maskf = mask.ctypes.data
    out = np.empty(cuda.N_TERMS * cuda.N_MONOMIALS)
    lib.h_mse_sums(fixed, moving, maskf, maskb, *fixed.shape, *moving.shape, aff, int(hessian), out)
    return cuda.unpack_terms(out.reshape(cuda.N_TERMS, cuda.N_MONOMIALS), hessian)


def _special_points(shape):
    """Points on, just inside and just outside every face, as (b, u) pairs."""
    rows = []
    for axis, n in enumerate(shape):
        for b, u in [(0, 0.0), (n - 1, 0.0), (0, float(n - 1)), (n, -1.0), (n - 2, 1.0), (1, -1.0),
                     (0, -1e-6), (n - 1, 1e-6), (n - 1, -1e-6), (0, 1e-6), (-1, 1.0), (-1, 0.999999),
                     (n - 2, 0.5), (3, -3.25), (0, -0.0)]:
            bb, uu = [1, 1, 1], [0.25, 0.5, 0.75]
            bb[axis], uu[axis] = b, u
            rows.append((bb, uu))
    b, u = zip(*rows)
    return np.array(b, np.int32), np.array(u, np.float32)


def test_sample_matches_numpy_voxel_by_voxel(lib):
    rng = np.random.default_rng(1)
    vol = rng.random((5, 7, 9)).astype(np.float32)
    n = 4000
    b = rng.integers(0, 9, size=(n, 3)).astype(np.int32)
    u = rng.uniform(-1.5, 1.5, size=(n, 3)).astype(np.float32)
    sb, su = _special_points(vol.shape)
    b, u = np.concatenate([b, sb]), np.concatenate([u, su])
    q = b + u.astype(np.float64)  # exactly the point the header samples
    value, grad, valid = _sample(lib, vol, b, u)
    ref_value, ref_grad, ref_valid = metric.trilinear_sample(vol, q)
    assert ref_valid.sum() > 500 and (~ref_valid).sum() > 500  # both branches exercised
    np.testing.assert_array_equal(valid, ref_valid)
    np.testing.assert_allclose(value, ref_value, rtol=0, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-6)
    # the value-only variant (resampling) gives the same values
    value2, _, valid2 = _sample(lib, vol, b, u, gradient=False)
    np.testing.assert_array_equal(valid2, valid)
    np.testing.assert_array_equal(value2, value)


def test_boundary_rule_is_exact(lib):
    vol = np.arange(4 * 4 * 4, dtype=np.float32).reshape(4, 4, 4)
    b, u = _special_points(vol.shape)
    _, _, valid = _sample(lib, vol, b, u)
    q = b + u.astype(np.float64)
    np.testing.assert_array_equal(valid, np.all((q >= 0) & (q <= 3), axis=1))
    # q = n - 1 exactly is inside and interpolates the last cell with f = 1 (value = last voxel)
    value, grad, ok = _sample(lib, vol, np.array([[3, 3, 3]]), np.zeros((1, 3)))
    assert ok[0] and value[0] == vol[3, 3, 3]
    np.testing.assert_array_equal(grad[0], [16.0, 4.0, 1.0])


def test_warp_transpose_reduction_gives_lane_l_the_sum_of_term_l(lib):
    rng = np.random.default_rng(2)
    t = rng.standard_normal((32, 32)).astype(np.float32)  # t[lane, term]
    out = np.empty(32, np.float32)
    lib.h_transpose(t, out)
    np.testing.assert_allclose(out, t.astype(np.float64).sum(axis=0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("hessian", [True, False])
def test_voxel_contribution_is_r_j_and_j_jt(lib, hessian):
    rng = np.random.default_rng(3)
    for _ in range(50):
        r = np.float32(rng.standard_normal())
        g = rng.standard_normal(3).astype(np.float32)
        p = rng.integers(0, 64, size=3).astype(np.float32)
        c = np.float32(31.5) * np.ones(3, np.float32)
        out = np.empty(cuda.N_TERMS * cuda.N_MONOMIALS)
        lib.h_voxel_terms(r, g, p, c, int(hessian), out)
        terms = cuda.unpack_terms(out.reshape(cuda.N_TERMS, cuda.N_MONOMIALS), hessian)
        jac = metric.voxel_jacobian(g[None].astype(np.float64), p[None].astype(np.float64), c)[0]
        assert terms.count == 1
        np.testing.assert_allclose(terms.sse, float(r) ** 2, rtol=1e-6)
        np.testing.assert_allclose(terms.rj, float(r) * jac, rtol=1e-5, atol=1e-5 * np.abs(jac).max())
        if hessian:
            jtj = np.outer(jac, jac)
            np.testing.assert_allclose(terms.jtj, jtj, rtol=1e-5, atol=1e-5 * np.abs(jtj).max())
        else:
            assert terms.jtj is None


def _pair():
    fixed = two_particle_phantom((24, 28, 36), seed=3)
    moving = two_particle_phantom((26, 28, 33), tf.rotation_matrix(4.0, (0.3, 1.0, 0.2), center=(12, 14, 17)),
                                  seed=3)
    return fixed, moving


CASES = {
    "identity": np.eye(4),
    "small affine": tf.matrix_from_params([0.02, -0.01, 0.015, 0.01, -0.03, 0.0, 0.005, 0.02, 0.01, 0.7, -1.2, 0.4],
                                          tf.grid_center((24, 28, 36))),
    "rotated, partly outside": tf.compose(tf.rotation_matrix(9.0, (1.0, 0.4, -0.2), center=(11.5, 13.5, 17.5)),
                                          np.array([[1, 0, 0, 2.3], [0, 1, 0, -3.1], [0, 0, 1, 4.7], [0, 0, 0, 1.0]])),
}


@pytest.mark.parametrize("mask_kind", [None, "float", "bool"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_pass_sums_match_cpu_mse_terms(lib, case, mask_kind):
    fixed, moving = _pair()
    matrix = CASES[case]
    center = tf.grid_center(fixed.shape) + np.array([0.5, -1.0, 0.0])  # any centre works
    mask = None
    if mask_kind is not None:
        z, y, x = np.indices(fixed.shape)
        mask = (x + 2 * y + 3 * z) % 5 != 0
        if mask_kind == "float":
            mask = np.where(mask, np.float32(0.9), np.float32(0.1))
    cpu = metric.mse_terms(fixed, moving, matrix, center=center, mask=None if mask is None else mask > 0.5)
    gpu_math = _mse_sums(lib, fixed, moving, matrix, center, mask=mask)
    assert cpu.count > 5000
    # a voxel whose q lies within float32 rounding of a face may flip; none did here
    assert abs(gpu_math.count - cpu.count) <= 2
    np.testing.assert_allclose(gpu_math.sse, cpu.sse, rtol=2e-6)
    np.testing.assert_allclose(gpu_math.rj, cpu.rj, rtol=0, atol=2e-6 * np.abs(cpu.rj).max())
    np.testing.assert_allclose(gpu_math.jtj, cpu.jtj, rtol=0, atol=2e-6 * np.abs(cpu.jtj).max())
    np.testing.assert_allclose(np.diag(gpu_math.jtj), np.diag(cpu.jtj), rtol=2e-6)
    np.testing.assert_array_equal(gpu_math.jtj, gpu_math.jtj.T)
    without = _mse_sums(lib, fixed, moving, matrix, center, mask=mask, hessian=False)
    assert without.jtj is None and without.count == gpu_math.count
    np.testing.assert_array_equal(without.rj, gpu_math.rj)


def test_identity_pass_counts_every_voxel(lib):
    fixed, _ = _pair()
    terms = _mse_sums(lib, fixed, fixed, np.eye(4), tf.grid_center(fixed.shape))
    assert terms.count == fixed.size
    # r = 0 except float32 rounding of v0 + 1 * (v1 - v0) on the last face of each axis
    assert terms.sse < 1e-10


@pytest.mark.parametrize("out_shape", [(24, 28, 36), (20, 31, 29)])
def test_resample_matches_scipy_affine_transform(lib, out_shape):
    fixed, moving = _pair()
    matrix = CASES["rotated, partly outside"]
    out = np.empty(out_shape, np.float32)
    aff = np.array(cuda.affine_args(matrix, tf.grid_center(out_shape)), np.float32)
    lib.h_resample(moving, *moving.shape, out, *out_shape, aff, np.float32(-2.0))
    assert_resampled_like_scipy(out, moving, matrix, out_shape, -2.0, 2e-6)


def test_downsample_matches_numpy_pyramid(lib):
    v = np.random.default_rng(4).random((9, 12, 15)).astype(np.float32)
    oz, oy, ox = (n // 2 for n in v.shape)
    out = np.empty((oz, oy, ox), np.float32)
    lib.h_downsample2(v, v.shape[1], v.shape[2], out, oz, oy, ox)
    np.testing.assert_allclose(out, reg.downsample2(v), rtol=0, atol=3e-7)


def test_moments_give_the_cpu_center_of_mass(lib):
    v = two_particle_phantom((20, 24, 40), seed=5) + np.float32(0.1)
    med = np.float32(np.median(v))
    out = np.empty(4)
    lib.h_moments(v, *v.shape, med, out)
    np.testing.assert_allclose(out[1:] / out[0], reg.center_of_mass(v), rtol=0, atol=1e-5)


def _keys(lib, v):
    v = np.ascontiguousarray(v, np.float32)
    keys = np.empty(v.size, np.uint32)
    lib.h_keys(v, v.size, keys)
    return keys


def test_float_key_orders_like_floats_and_inverts(lib):
    rng = np.random.default_rng(6)
    v = np.concatenate([rng.standard_normal(500) * 10.0 ** rng.integers(-40, 38, 500),
                        [0.0, -0.0, 1e-45, -1e-45, np.inf, -np.inf, 3.4e38, -3.4e38]]).astype(np.float32)
    keys = _keys(lib, v)
    order = np.argsort(keys, kind="stable")
    assert np.all(np.diff(v[order].astype(np.float64)) >= 0)
    back = np.array([cuda._key_to_float(k) for k in keys], np.float32)
    np.testing.assert_array_equal(back.view(np.uint32), v.view(np.uint32))


@pytest.mark.parametrize("data", ["odd", "even", "ties", "constant", "negative", "two", "one", "split"])
def test_median_from_radix_histograms_equals_numpy(lib, data):
    rng = np.random.default_rng(7)
    v = {
        "odd": rng.standard_normal(1001),
        "even": rng.standard_normal(1000),
        "ties": np.round(rng.random(2000) * 4) / 4,
        "constant": np.full(64, 0.25),
        "negative": -rng.random(999) - 5.0,
        "two": np.array([1.0, 2.0]),
        "one": np.array([-7.5]),
        # the two middle values differ in the top bits (the second needs its own selection)
        "split": np.array([-1.0, -1.0, 1.0, 1.0]),
    }[data].astype(np.float32)
    keys = _keys(lib, v).astype(np.int64)
    calls = []

    def histogram(prefix, prefix_mask, shift, bits):
        calls.append(shift)
        sel = keys[(keys & prefix_mask) == prefix]
        return np.bincount((sel >> shift) & ((1 << bits) - 1), minlength=1 << bits)

    got = cuda.median_from_histograms(histogram, v.size)
    assert got.dtype == np.float32
    assert got == np.median(v)
    assert len(calls) in (3, 6)


def test_unpack_of_nothing_is_an_empty_pass():
    terms = cuda.unpack_terms(np.zeros((32, 6)))
    assert terms.count == 0 and terms.mse == float("inf") and not terms.jtj.any()


def test_affine_args_reproduce_the_matrix():
    matrix = CASES["rotated, partly outside"]
    center = np.array([11.5, 13.5, 17.5])
    args = np.array(cuda.affine_args(matrix, center), np.float64)
    d, t, c = args[:9].reshape(3, 3), args[9:12], args[12:]
    p = np.array([[0.0, 0.0, 0.0], [23.0, 27.0, 35.0], [5.0, 20.0, 3.0]])
    q = p + (p - c) @ d.T + t
    np.testing.assert_allclose(q, p @ matrix[:3, :3].T + matrix[:3, 3], atol=1e-5)
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        cuda.affine_args(np.eye(3), center)
