// Per-voxel mathematics of gpureg's CUDA kernels.
//
// Everything here is a __host__ __device__ inline function that also compiles
// as plain C++ (g++), so tests/core/test_voxel_math.py builds a host harness around
// this header and checks it voxel by voxel against the NumPy path
// (gpureg.metric.trilinear_sample / voxel_jacobian / mse_terms). The .cu files
// add only the launch and reduction scaffolding around these functions.
//
// Convention (DESIGN.md): volumes are float32, C order, index order (z, y, x).
// A reference voxel p maps to the moving point q = A p + offset. The kernels
// write q = p + u with the small offset u = D (p - c) + t, D = A - I and
// t = D c + offset (float32, computed in float64 on the host by
// gpureg.cuda.affine_args): the integer part of p stays exact and the
// interpolation fraction keeps about 1e-6 voxel precision at any grid size.
// A sample is valid when 0 <= q_k <= n_k - 1 on every axis; its trilinear cell
// has lower corner min(floor(q), n - 2), exactly as gpureg.metric.trilinear_sample.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define GPUREG_HD __host__ __device__ __forceinline__
#define GPUREG_UNROLL _Pragma("unroll")
#else
#define GPUREG_HD inline
#define GPUREG_UNROLL
#endif

#if !defined(__CUDACC_RTC__)
#include <math.h>
#include <string.h>
#endif

// The constants shared with Python (threads, sums and solver-state layout, LM damping), generated from
// gpureg/core/kernel_layout.py; the loader also passes them as identical -D options.
#include "kernel_layout.cuh"

namespace gpureg {

// Index of a voxel in a volume. 32-bit by default; the loader builds a second variant with
// GPUREG_WIDE_INDEX for volumes of more than 2^31 - 1 voxels (a 2048 x 2048 x 1024 tomogram),
// selected by size as cupyx.scipy.ndimage does. Row and plane counts stay int.
#if defined(GPUREG_WIDE_INDEX)
typedef long long index_t;
#else
typedef int index_t;
#endif

// Layout of the per-row sums of the fused MSE pass (one float per term). With
// x' = x - c_x, the sums over one reference row (z, y) are
//   S_a[ik] = sum g_i g_k x'^a  (a = 0, 1, 2; pairs ik = zz zy zx yy yx xx),
//   R_a[i]  = sum r g_i x'^a    (a = 0, 1),  sum r^2,  number of valid voxels.
// Every J^T J entry sum g_i g_k e_j e_l (e = (z', y', x', 1)) and every r J
// entry is one of these times a monomial in (z', y') that is constant along the
// row, so the pass accumulates 26 floats per voxel instead of 92 and combines
// them per row into kTerms x kMonomials double sums (see combine_row and
// gpureg.cuda.unpack_terms). kTerms is padded to a warp: in the row reduction
// lane l ends up owning term l.
// Defined once in gpureg/core/kernel_layout.py, passed as -D options (see the check below).
enum : int {
  kS0 = GPUREG_SUMS_S0,
  kS1 = GPUREG_SUMS_S1,
  kS2 = GPUREG_SUMS_S2,
  kR0 = GPUREG_SUMS_R0,
  kR1 = GPUREG_SUMS_R1,
  kSSE = GPUREG_SUMS_SSE,
  kCount = GPUREG_SUMS_COUNT,
  kTerms = GPUREG_N_TERMS,
  kMonomials = GPUREG_N_MONOMIALS,  // 1, z', y', z'^2, z'y', y'^2
};

// The transform as the kernels use it: u = q - p = D (p - c) + t.
struct Affine {
  float d[9];  // D = A - I, row-major (z, y, x)
  float t[3];  // D c + offset
  float c[3];  // centre c (also the centre of the Jacobian's D parameters)
};

GPUREG_HD float load(const float* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// Linear interpolation a + f (b - a), the form used by the NumPy path.
GPUREG_HD float lerp(float a, float b, float f) { return fmaf(f, b - a, a); }

// Pair k = 0..5 -> (i, k) in (0,0) (0,1) (0,2) (1,1) (1,2) (2,2).
GPUREG_HD constexpr int pair_i(int k) { return k < 3 ? 0 : (k < 5 ? 1 : 2); }
GPUREG_HD constexpr int pair_j(int k) { return k < 3 ? k : (k < 5 ? k - 2 : 2); }

// One coordinate q = b + u (b integer, u float) of a sample: the cell i0 in
// [0, n - 2] and fraction f in [0, 1] with q = i0 + f. Returns false when q is
// outside [0, n - 1] (i0 and f are then still in range, so reads stay inside).
// Needs n >= 2.
GPUREG_HD bool cell_1d(int b, float u, int n, int& i0, float& f) {
  const float lim = 1.0e9f;  // keeps the int conversion defined (NaN -> -lim)
  const float uc = fminf(fmaxf(u, -lim), lim);
  const float fl = floorf(uc);
  const int i = b + (int)fl;
  const float frac = uc - fl;  // exact: the fractional bits of uc
  const bool inside = i >= 0 && (i < n - 1 || (i == n - 1 && frac == 0.0f));
  const bool last = i >= n - 1;
  i0 = last ? n - 2 : (i < 0 ? 0 : i);
  f = last ? 1.0f : frac;
  return inside;
}

// Trilinear value (and, with Gradient, the gradient d value / d q of the
// interpolant, one-sided at cell faces) of vol (nz, ny, nx) at q = b + u.
// Interpolates along x, then y, then z, as gpureg.metric.trilinear_sample.
// Invalid samples give value 0, gradient 0 and return false.
template <bool Gradient>
GPUREG_HD bool sample(const float* vol, int nz, int ny, int nx, int bz, int by, int bx,
                      float uz, float uy, float ux, float& value, float g[3]) {
  int iz, iy, ix;
  float fz, fy, fx;
  const bool okz = cell_1d(bz, uz, nz, iz, fz);
  const bool oky = cell_1d(by, uy, ny, iy, fy);
  const bool okx = cell_1d(bx, ux, nx, ix, fx);
  if (!(okz && oky && okx)) {
    value = 0.0f;
    if (Gradient) {
      g[0] = g[1] = g[2] = 0.0f;
    }
    return false;
  }
  const index_t sy = nx;
  const index_t sz = (index_t)ny * nx;
  const float* p = vol + (((index_t)iz * ny + iy) * nx + ix);
  const float v000 = load(p), v001 = load(p + 1);
  const float v010 = load(p + sy), v011 = load(p + sy + 1);
  const float v100 = load(p + sz), v101 = load(p + sz + 1);
  const float v110 = load(p + sz + sy), v111 = load(p + sz + sy + 1);
  const float dx00 = v001 - v000, dx01 = v011 - v010, dx10 = v101 - v100, dx11 = v111 - v110;
  const float c00 = fmaf(fx, dx00, v000), c01 = fmaf(fx, dx01, v010);
  const float c10 = fmaf(fx, dx10, v100), c11 = fmaf(fx, dx11, v110);
  const float dy0 = c01 - c00, dy1 = c11 - c10;
  const float c0 = fmaf(fy, dy0, c00), c1 = fmaf(fy, dy1, c10);
  value = fmaf(fz, c1 - c0, c0);
  if (Gradient) {
    g[0] = c1 - c0;
    g[1] = lerp(dy0, dy1, fz);
    g[2] = lerp(lerp(dx00, dx01, fy), lerp(dx10, dx11, fy), fz);
  }
  return true;
}

// The part of u that is constant along the reference row (z, y).
GPUREG_HD void row_base(const Affine& a, float ez, float ey, float base[3]) {
  GPUREG_UNROLL
  for (int k = 0; k < 3; ++k) base[k] = fmaf(a.d[3 * k], ez, fmaf(a.d[3 * k + 1], ey, a.t[k]));
}

// u at x' = x - c_x of the row whose base is row_base(...).
GPUREG_HD void voxel_offset(const Affine& a, const float base[3], float ex, float u[3]) {
  GPUREG_UNROLL
  for (int k = 0; k < 3; ++k) u[k] = fmaf(a.d[3 * k + 2], ex, base[k]);
}

// Whether reference voxel idx is inside the optional mask (null: no mask).
GPUREG_HD bool inside(const float* mask, index_t idx) { return mask == nullptr || mask[idx] > 0.5f; }
GPUREG_HD bool inside(const bool* mask, index_t idx) { return mask == nullptr || mask[idx]; }

// Adds one valid voxel's residual r, gradient g and x' to the row sums t
// (layout above). Without Hessian only R, SSE and the count are formed.
template <bool Hessian>
GPUREG_HD void accumulate_voxel(float t[kTerms], float r, const float g[3], float ex) {
  if (Hessian) {
    float gx[3];
    GPUREG_UNROLL
    for (int i = 0; i < 3; ++i) gx[i] = g[i] * ex;
    GPUREG_UNROLL
    for (int k = 0; k < 6; ++k) {
      t[kS0 + k] = fmaf(g[pair_i(k)], g[pair_j(k)], t[kS0 + k]);
      t[kS1 + k] = fmaf(g[pair_i(k)], gx[pair_j(k)], t[kS1 + k]);
      t[kS2 + k] = fmaf(gx[pair_i(k)], gx[pair_j(k)], t[kS2 + k]);
    }
  }
  GPUREG_UNROLL
  for (int i = 0; i < 3; ++i) {
    const float rg = r * g[i];
    t[kR0 + i] += rg;
    t[kR1 + i] = fmaf(rg, ex, t[kR1 + i]);
  }
  t[kSSE] = fmaf(r, r, t[kSSE]);
  t[kCount] += 1.0f;
}

// Folds the row sum s of one term into its kMonomials double accumulators,
// multiplied by the row's monomials 1, z', y', z'^2, z'y', y'^2.
GPUREG_HD void combine_row(double acc[kMonomials], float s, float ez, float ey) {
  const double v = s, z = ez, y = ey;
  acc[0] += v;
  acc[1] += v * z;
  acc[2] += v * y;
  acc[3] += v * z * z;
  acc[4] += v * z * y;
  acc[5] += v * y * y;
}

// One lane's share (x = lane, lane + stride, ...) of the fused MSE pass over
// the reference row (z, y): samples the moving volume (mz, my, mx) at q = p + u,
// forms r = M(q) - F(p) and its gradient, and adds them to t (not reset here).
// Reload: `a` lives in memory (shared), not in kernel parameters. Each voxel then reads the
// x-column of D and c_x from it again (a compiler barrier per voxel) instead of holding them
// in registers over the loop: kernel parameters are operands from the constant bank and cost
// no register, shared values do, and the 4 extra registers spilled 64 B per thread under
// NVRTC 13.5 (mse_terms_state_pass; tests/core/test_kernels_compile.py).
template <bool Hessian, typename MaskT, bool Reload = false>
GPUREG_HD void mse_row_lane(const float* fixed, const float* moving, const MaskT* mask, int ny, int nx,
                            int mz, int my, int mx, const Affine& a, int z, int y, int lane, int stride,
                            float t[kTerms]) {
  const float ez = (float)z - a.c[0];
  const float ey = (float)y - a.c[1];
  float base[3];
  row_base(a, ez, ey, base);
  const index_t row = ((index_t)z * ny + y) * nx;
  for (int x = lane; x < nx; x += stride) {
#if defined(__CUDA_ARCH__)
    if (Reload) asm volatile("" ::: "memory");
#endif
    if (!inside(mask, row + x)) continue;
    const float ex = (float)x - a.c[2];
    float u[3], value, g[3];
    voxel_offset(a, base, ex, u);
    if (!sample<true>(moving, mz, my, mx, z, y, x, u[0], u[1], u[2], value, g)) continue;
    accumulate_voxel<Hessian>(t, value - load(fixed + row + x), g, ex);
  }
}

// Empty-space skipping of the fused pass. A reference row (z, y) whose fixed values are all 0
// and whose samples all fall in trilinear cells without a non-zero corner adds r = 0 and g = 0
// at every valid voxel: only its count of valid samples, which row_valid_range gives in O(1).

// Whether the sample of reference voxel (z, y, x) is valid (the test of mse_row_lane).
GPUREG_HD bool sample_valid(const Affine& a, const float base[3], int z, int y, int x, int mz, int my, int mx) {
  float u[3];
  voxel_offset(a, base, (float)x - a.c[2], u);
  int i;
  float f;
  const bool okz = cell_1d(z, u[0], mz, i, f);
  const bool oky = cell_1d(y, u[1], my, i, f);
  return okz && oky && cell_1d(x, u[2], mx, i, f);
}

// The valid samples of row (z, y) are x0 <= x <= x1 (none when x1 < x0). q is affine in x, so
// the valid x form an interval: estimated in float, then its ends are settled with the
// float32 test of sample_valid itself (rounding moves them by at most a voxel).
GPUREG_HD void row_valid_range(const Affine& a, const float base[3], int z, int y, int nx, int mz, int my, int mx,
                               int& x0, int& x1) {
  float lo = 0.0f, hi = nx - 1.0f;  // float is enough for an estimate within a voxel
  const int b[3] = {z, y, 0};
  const int n[3] = {mz, my, mx};
  for (int k = 0; k < 3; ++k) {  // 0 <= alpha + beta x <= n - 1
    const float beta = a.d[3 * k + 2] + (k == 2 ? 1.0f : 0.0f);
    const float alpha = b[k] + base[k] - a.d[3 * k + 2] * a.c[2];
    if (!(alpha == alpha) || !(beta == beta)) {
      hi = lo - 1.0f;
    } else if (beta == 0.0f) {
      if (alpha < 0.0f || alpha > n[k] - 1.0f) hi = lo - 1.0f;
    } else {
      const float inv = 1.0f / beta;
      const float e0 = -alpha * inv, e1 = (n[k] - 1.0f - alpha) * inv;
      lo = fmaxf(lo, fminf(e0, e1));
      hi = fminf(hi, fmaxf(e0, e1));
    }
  }
  const float big = 4.0f * nx + 8.0f;  // keeps the int conversion defined
  int s = (int)ceilf(fminf(fmaxf(lo, -big), big)), e = (int)floorf(fminf(fmaxf(hi, -big), big));
  s = s < 0 ? 0 : (s > nx - 1 ? nx - 1 : s);
  e = e < 0 ? 0 : (e > nx - 1 ? nx - 1 : e);
  x0 = 0;
  x1 = -1;
  if (s > e) {  // estimated empty: at most a voxel or two may still be valid
    const int from = (e < s ? e : s) - 2, to = (e < s ? s : e) + 2;
    int hit = -1;
    for (int x = from < 0 ? 0 : from; x <= to && x < nx && hit < 0; ++x)
      if (sample_valid(a, base, z, y, x, mz, my, mx)) hit = x;
    if (hit < 0) return;
    s = e = hit;
  }
  if (sample_valid(a, base, z, y, s, mz, my, mx)) {
    for (int k = 0; k < 4 && s > 0 && sample_valid(a, base, z, y, s - 1, mz, my, mx); ++k) --s;
  } else {
    for (int k = 0; k < 4 && s < e && !sample_valid(a, base, z, y, s, mz, my, mx); ++k) ++s;
    if (!sample_valid(a, base, z, y, s, mz, my, mx)) return;
  }
  if (sample_valid(a, base, z, y, e, mz, my, mx)) {
    for (int k = 0; k < 4 && e < nx - 1 && sample_valid(a, base, z, y, e + 1, mz, my, mx); ++k) ++e;
  } else {
    for (int k = 0; k < 4 && e > s && !sample_valid(a, base, z, y, e, mz, my, mx); ++k) --e;
    if (!sample_valid(a, base, z, y, e, mz, my, mx)) return;
  }
  x0 = s;
  x1 = e;
}

// Whether any sample of row (z, y) at x0 <= x <= x1 may fall in a cell with a non-zero corner.
// cell_sat (mz, my) int32: summed-area table of the moving volume's cell rows, cell_sat[i][j] =
// number of (i' < i, j' < j) with a non-zero in moving[i':i'+2, j':j'+2, :]. The cells' (iz, iy)
// along the row lie in the box spanned by its two ends (q is monotone in x); one cell of margin.
GPUREG_HD bool row_cells_any(const Affine& a, const float base[3], int z, int y, int x0, int x1, int mz, int my,
                             const int* cell_sat) {
  float u0[3], u1[3];
  voxel_offset(a, base, (float)x0 - a.c[2], u0);
  voxel_offset(a, base, (float)x1 - a.c[2], u1);
  int i0, i1, j0, j1;
  float f;
  cell_1d(z, fminf(u0[0], u1[0]), mz, i0, f);
  cell_1d(z, fmaxf(u0[0], u1[0]), mz, i1, f);
  cell_1d(y, fminf(u0[1], u1[1]), my, j0, f);
  cell_1d(y, fmaxf(u0[1], u1[1]), my, j1, f);
  i0 = i0 > 0 ? i0 - 1 : 0;
  j0 = j0 > 0 ? j0 - 1 : 0;
  i1 = i1 < mz - 2 ? i1 + 2 : mz - 1;  // exclusive ends, in [1, mz - 1]
  j1 = j1 < my - 2 ? j1 + 2 : my - 1;
  return cell_sat[i1 * my + j1] - cell_sat[i0 * my + j1] - cell_sat[i1 * my + j0] + cell_sat[i0 * my + j0] > 0;
}

// Value of the resampled volume at reference voxel (z, y, x): the moving
// volume (mz, my, mx) at q = p + u, or cval when q is outside.
GPUREG_HD float resample_voxel(const float* vol, int mz, int my, int mx, const Affine& a, int z, int y, int x,
                               float cval) {
  float base[3], u[3], value, g[3];
  row_base(a, (float)z - a.c[0], (float)y - a.c[1], base);
  voxel_offset(a, base, (float)x - a.c[2], u);
  return sample<false>(vol, mz, my, mx, z, y, x, u[0], u[1], u[2], value, g) ? value : cval;
}

// Mean of the 2x2x2 block of v (., ny, nx) under output voxel (z, y, x).
GPUREG_HD float box_mean8(const float* v, int ny, int nx, int z, int y, int x) {
  const index_t sz = (index_t)ny * nx;
  const float* p = v + ((index_t)(2 * z) * ny + 2 * y) * nx + 2 * x;
  const float lo = (load(p) + load(p + 1)) + (load(p + nx) + load(p + nx + 1));
  const float hi = (load(p + sz) + load(p + sz + 1)) + (load(p + sz + nx) + load(p + sz + nx + 1));
  return (lo + hi) * 0.125f;
}

// One lane's share of the centre-of-mass moments of row `row` (nx voxels):
// w = max(v - median, 0); adds sum w and sum w x.
GPUREG_HD void moments_row_lane(const float* row, int nx, float median, int lane, int stride, float& w,
                                float& wx) {
  for (int x = lane; x < nx; x += stride) {
    const float v = fmaxf(load(row + x) - median, 0.0f);
    w += v;
    wx = fmaf(v, (float)x, wx);
  }
}

// Folds a lane's row sums into the moments (sum w, sum w z, sum w y, sum w x).
GPUREG_HD void combine_moments(double m[4], float w, float wx, int z, int y) {
  m[0] += (double)w;
  m[1] += (double)w * z;
  m[2] += (double)w * y;
  m[3] += (double)wx;
}

// Order-preserving unsigned key of a (non-NaN) float, for radix selection:
// a < b  <=>  float_key(a) < float_key(b) (with -0 just below +0).
GPUREG_HD unsigned int float_key(float v) {
#if defined(__CUDA_ARCH__)
  const unsigned int u = __float_as_uint(v);
#else
  unsigned int u;
  memcpy(&u, &v, sizeof u);
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The warp transpose-reduction of kTerms row sums, one step (Half = 16, 8, 4,
// 2, 1): lane l keeps t[0 .. Half) (indices re-based on its bit Half), sends
// its partner l ^ Half the half that the partner keeps and adds what it gets.
// After the 5 steps lane l holds the warp's sum of term l in t[0]. Split into
// send/keep so that the host harness can replay the exchange in lockstep.
template <int Half>
GPUREG_HD float transpose_send(const float* t, int lane, int k) {
  return (lane & Half) ? t[k] : t[k + Half];
}
template <int Half>
GPUREG_HD float transpose_keep(const float* t, int lane, int k) {
  return (lane & Half) ? t[k + Half] : t[k];
}

}  // namespace gpureg
