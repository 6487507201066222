"""The B-spline kernels' per-voxel arithmetic (kernels/bspline_math.cuh), checked on the CPU.

A host harness compiled with g++ runs the header's functions as
``kernels/bspline.cu`` arranges them (one voxel per call, the block sums as
plain double sums) and compares them with the NumPy path of
:mod:`gpureg.register.bspline` and :mod:`gpureg.register.ffd_level`. Only the CUDA launch is left
to the GPU tests (nvcc compiles kernels/bspline.cu in test_kernels_compile.py).

Tolerances: both sides compute in float32 (weights to ~1e-7; u as sums of 64
terms of coefficients ~1 voxel, ~1e-6); the trilinear cell can differ only
where q lands within float32 rounding of a voxel face, so rg is compared on
all voxels with an absolute bound of 1e-5 of its largest value.
"""

import ctypes

import numpy as np
import pytest

from gpureg.core import cuda
from gpureg.core import transform as tf
from gpureg.register import bspline
from gpureg.register.ffd_level import LevelObjective, level_positions
from gpureg.register.prepare import pyramid
from gpureg.synth.phantom import two_particle_phantom
from cxx import build_shared


HARNESS = r"""
#include "bspline_math.cuh"
using namespace gpureg;

extern "C" {

void h_weights(const float* t, int n, float* w) {
  for (int k = 0; k < n; ++k) bspline_weights(t[k], w + 4 * k);
}

void h_field(const float* coeffs, int cz, int cy, int cx, float inv_spacing, float scale, int nz, int ny, int nx,
             float* u) {
  const long long n = (long long)nz * ny * nx;
  const float off = 0.5f * (scale - 1.0f);
  for (int z = 0; z < nz; ++z)
    for (int y = 0; y < ny; ++y)
      for (int x = 0; x < nx; ++x) {
        float v[3];
        ffd_displacement(coeffs, cz, cy, cx, inv_spacing, scale * z + off, scale * y + off, scale * x + off, v);
        const long long i = ((long long)z * ny + y) * nx + x;
        for (int d = 0; d < 3; ++d) u[d * n + i] = v[d];
      }
}

void h_pass(const float* fixed, const float* moving, int nz, int ny, int nx, const float* coeffs, int cz, int cy,
            int cx, const float* p, float scale, float inv_spacing, float* rg, double* sums, int cubic) {
  Affine a;
  for (int i = 0; i < 9; ++i) a.d[i] = p[i];
  for (int i = 0; i < 3; ++i) { a.t[i] = p[9 + i]; a.c[i] = p[12 + i]; }
  const long long n = (long long)nz * ny * nx;
  sums[0] = sums[1] = 0.0;
  for (long long i = 0; i < n; ++i) {
    const int x = (int)(i % nx), y = (int)((i / nx) % ny), z = (int)(i / ((long long)nx * ny));
    float r, g[3];
    const bool ok = ffd_voxel(fixed, moving, nz, ny, nx, coeffs, cz, cy, cx, a, scale, inv_spacing, z, y, x, r, g,
                              cubic != 0);
    const float s = ok ? r / scale : 0.0f;
    for (int d = 0; d < 3; ++d) rg[d * n + i] = s * g[d];
    if (ok) { sums[0] += (double)r * r; sums[1] += 1.0; }
  }
}
}
"""

F32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
F64 = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    h = build_shared(tmp_path_factory, "bspline_harness", HARNESS, ("-std=c++17", "-O1", "-Wall"))
    i, f = ctypes.c_int, ctypes.c_float
    h.h_weights.argtypes = [F32, i, F32]
    h.h_field.argtypes = [F32, i, i, i, f, f, i, i, i, F32]
    h.h_pass.argtypes = [F32, F32, i, i, i, F32, i, i, i, F32, f, f, F32, F64, i]
    return h


def test_weights_match_numpy(lib):
    t = np.linspace(0.0, 1.0, 101, dtype=np.float32)
    w = np.empty((t.size, 4), np.float32)
    lib.h_weights(t, t.size, w)
    np.testing.assert_allclose(w, bspline.basis(t), rtol=0, atol=2e-7)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=3e-7)


@pytest.mark.parametrize("level,spacing", [(0, 5.0), (1, 8.0)])
def test_displacement_matches_separable_numpy(lib, level, spacing):
    fine = (23, 30, 37)
    shape = tuple(n >> level for n in fine)
    control = bspline.control_shape(fine, spacing)
    c = np.random.default_rng(level).normal(size=(3, *control)).astype(np.float32)
    weights = [bspline.axis_weights(level_positions(level, n), spacing, k) for n, k in zip(shape, control)]
    ref = bspline.evaluate(c.astype(np.float64), tuple(weights))
    u = np.empty((3, *shape), np.float32)
    lib.h_field(c, *control, np.float32(1.0 / spacing), np.float32(2.0 ** level), *shape, u)
    np.testing.assert_allclose(u, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def _pass_case(level):
    """Level volumes, control grid, coefficients and objective of the fused-pass tests."""
    fine = (32, 36, 40)
    c0 = tf.grid_center(fine)
    matrix = tf.rotation_matrix(4.0, (1.0, 0.4, -0.3), c0)
    matrix[:3, 3] += (0.6, -1.3, 2.2)  # part of the grid samples outside the moving volume
    fixed = pyramid(two_particle_phantom(fine, seed=5), 8)[level]
    moving = pyramid(two_particle_phantom(fine, matrix, seed=5), 8)[level]
    control = bspline.control_shape(fine, 8.0)
    coeffs = (np.random.default_rng(7).normal(size=(3, *control)) * 1.5).astype(np.float32)
    obj = LevelObjective(fixed, moving, matrix, level=level, spacing=8.0, control=control, variance=1.0,
                         regularization=0.0)
    return fixed, moving, control, coeffs, obj


def _host_pass(lib, fixed, moving, control, coeffs, obj, cubic):
    rg = np.empty((3, *fixed.shape), np.float32)
    sums = np.empty(2)
    args = np.array(cuda.affine_args(obj.matrix_level, tf.grid_center(fixed.shape)), np.float32)
    lib.h_pass(fixed, moving, *fixed.shape, coeffs, *control, args, np.float32(obj.scale), np.float32(1.0 / 8.0), rg,
               sums, int(cubic))
    return rg, sums


@pytest.mark.parametrize("level", [0, 1])
def test_fused_voxel_pass_matches_level_objective(lib, level):
    fixed, moving, control, coeffs, obj = _pass_case(level)
    rg_ref, sse_ref, count_ref = obj.residual_gradient(coeffs)
    rg, sums = _host_pass(lib, fixed, moving, control, coeffs, obj, cubic=False)
    assert 0.5 * fixed.size < count_ref < fixed.size  # some samples fall outside
    assert abs(sums[1] - count_ref) <= 2
    np.testing.assert_allclose(sums[0], sse_ref, rtol=1e-4)
    np.testing.assert_allclose(rg, rg_ref, rtol=0, atol=1e-5 * np.abs(rg_ref).max())


@pytest.mark.parametrize("level", [0, 1])
def test_fused_cubic_pass_matches_the_compiled_cpu_pass(lib, level):
    """The GPU's cubic sampling (sample_cubic) against gpureg.core.cpu_ffd.residual_gradient_cubic.

    Same tolerances as the trilinear pass: both sum the 64 taps in float32
    (in another order) and form q differently (the CPU from a float64 affine
    part), so rg agrees to ~1e-6 of its largest value; q landing on the
    other side of a voxel face only changes rounding (the interpolant is C2).
    """
    pytest.importorskip("numba")
    from scipy import ndimage

    from gpureg.core import cpu_ffd

    fixed, moving, control, coeffs, obj = _pass_case(level)
    coef = ndimage.spline_filter(moving, order=3, mode="mirror").astype(np.float32)  # mirrored edges are used
    rg_ref, sse_ref, count_ref = cpu_ffd.residual_gradient_cubic(fixed, coef, bspline.evaluate(coeffs, obj.weights),
                                                                 obj.matrix_level, obj.scale)
    rg, sums = _host_pass(lib, fixed, coef, control, coeffs, obj, cubic=True)
    assert 0.5 * fixed.size < count_ref < fixed.size
    assert abs(sums[1] - count_ref) <= 2
    np.testing.assert_allclose(sums[0], sse_ref, rtol=1e-4)
    np.testing.assert_allclose(rg, rg_ref, rtol=0, atol=1e-5 * np.abs(rg_ref).max())
