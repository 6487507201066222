// Per-voxel mathematics of the B-spline free-form deformation kernels (bspline.cu).
//
// Host-compilable like voxel_math.cuh: tests/core/test_bspline_math.py builds these
// functions with g++ and compares them voxel by voxel with the NumPy path
// (gpureg.register.bspline / gpureg.register.ffd_level).
//
// Convention (gpureg/register/bspline.py): control point j of an axis sits at
// fine position (j - 1) S; a fine position x lies in cell k = min(max(floor(x / S), 0), nc - 4)
// with fraction t = x / S - k and is moved by points k .. k + 3 with the
// uniform cubic B-spline weights. Coefficients are (3, cz, cy, cx) float32,
// displacements in fine voxels. On pyramid level l (scale s = 2^l) voxel p has
// fine position s p + (s - 1) / 2 and samples the level's moving volume at
// q = p + D (p - c) + t + u / s (the affine part as in voxel_math.cuh).
#pragma once

#include "voxel_math.cuh"

namespace gpureg {

// The four uniform cubic B-spline weights at fraction t in [0, 1].
GPUREG_HD void bspline_weights(float t, float w[4]) {
  const float s = 1.0f - t;
  const float t2 = t * t, t3 = t2 * t;
  w[0] = s * s * s * (1.0f / 6.0f);
  w[1] = (3.0f * t3 - 6.0f * t2 + 4.0f) * (1.0f / 6.0f);
  w[2] = (-3.0f * t3 + 3.0f * t2 + 3.0f * t + 1.0f) * (1.0f / 6.0f);
  w[3] = t3 * (1.0f / 6.0f);
}

// Cell k and fraction t of fine position x on an axis of nc control points.
GPUREG_HD void control_cell(float x, float inv_spacing, int nc, int& k, float& t) {
  const float xs = x * inv_spacing;
  int c = (int)floorf(xs);
  c = c < 0 ? 0 : (c > nc - 4 ? nc - 4 : c);
  k = c;
  t = xs - (float)c;
}

// Displacement u (fine voxels) at fine position (pz, py, px).
GPUREG_HD void ffd_displacement(const float* coeffs, int cz, int cy, int cx, float inv_spacing, float pz, float py,
                                float px, float u[3]) {
  int kz, ky, kx;
  float tz, ty, tx, wz[4], wy[4], wx[4];
  control_cell(pz, inv_spacing, cz, kz, tz);
  control_cell(py, inv_spacing, cy, ky, ty);
  control_cell(px, inv_spacing, cx, kx, tx);
  bspline_weights(tz, wz);
  bspline_weights(ty, wy);
  bspline_weights(tx, wx);
  const int plane = cy * cx, comp = cz * plane;
  u[0] = u[1] = u[2] = 0.0f;
  GPUREG_UNROLL
  for (int i = 0; i < 4; ++i) {
    GPUREG_UNROLL
    for (int j = 0; j < 4; ++j) {
      const int row = (kz + i) * plane + (ky + j) * cx + kx;
      const float wij = wz[i] * wy[j];
      GPUREG_UNROLL
      for (int d = 0; d < 3; ++d) {
        const float* c = coeffs + d * comp + row;
        const float s = fmaf(wx[0], load(c), fmaf(wx[1], load(c + 1), fmaf(wx[2], load(c + 2), wx[3] * load(c + 3))));
        u[d] = fmaf(wij, s, u[d]);
      }
    }
  }
}

// scipy's "mirror" extension of spline coefficients (c[-k] = c[k], c[n - 1 + k] = c[n - 1 - k]), n >= 2.
GPUREG_HD int mirror_index(int i, int n) {
  i = i < 0 ? -i : i;
  i = i > n - 1 ? 2 * (n - 1) - i : i;
  return i < 0 ? 0 : (i > n - 1 ? n - 1 : i);
}

// Cubic B-spline weights w and their derivatives d at fraction t in [0, 1].
GPUREG_HD void cubic_weights(float t, float w[4], float d[4]) {
  bspline_weights(t, w);
  const float s = 1.0f - t, t2 = t * t;
  d[0] = -0.5f * s * s;
  d[1] = 1.5f * t2 - 2.0f * t;
  d[2] = fmaf(-1.5f, t2, t + 0.5f);
  d[3] = 0.5f * t2;
}

// Cubic B-spline value and gradient of a volume at q = b + u from its spline
// coefficients coef (nz, ny, nx) (scipy.ndimage.spline_filter, order 3, mode
// "mirror"; neighbours beyond the edge mirrored). Valid when 0 <= q_k <= n_k - 1,
// the rule of the trilinear sample(); invalid samples give 0 and return false.
// The CPU twin: gpureg.core.cpu_ffd.residual_gradient_cubic.
GPUREG_HD bool sample_cubic(const float* coef, int nz, int ny, int nx, int bz, int by, int bx, float uz, float uy,
                            float ux, float& value, float g[3]) {
  int cz, cy, cx;
  float tz, ty, tx;
  const bool ok = cell_1d(bz, uz, nz, cz, tz) && cell_1d(by, uy, ny, cy, ty) && cell_1d(bx, ux, nx, cx, tx);
  value = g[0] = g[1] = g[2] = 0.0f;
  if (!ok) return false;
  float wz[4], dz[4], wy[4], dy[4], wx[4], dx[4];
  cubic_weights(tz, wz, dz);
  cubic_weights(ty, wy, dy);
  cubic_weights(tx, wx, dx);
  int xs[4];
  GPUREG_UNROLL
  for (int i = 0; i < 4; ++i) xs[i] = mirror_index(cx - 1 + i, nx);
  GPUREG_UNROLL
  for (int k = 0; k < 4; ++k) {
    const index_t zk = mirror_index(cz - 1 + k, nz);
    float pv = 0.0f, pgy = 0.0f, pgx = 0.0f;
    GPUREG_UNROLL
    for (int j = 0; j < 4; ++j) {
      const float* row = coef + (zk * ny + mirror_index(cy - 1 + j, ny)) * (index_t)nx;
      float rv = 0.0f, rgx = 0.0f;
      GPUREG_UNROLL
      for (int i = 0; i < 4; ++i) {
        const float v = load(row + xs[i]);
        rv = fmaf(wx[i], v, rv);
        rgx = fmaf(dx[i], v, rgx);
      }
      pv = fmaf(wy[j], rv, pv);
      pgy = fmaf(dy[j], rv, pgy);
      pgx = fmaf(wy[j], rgx, pgx);
    }
    value = fmaf(wz[k], pv, value);
    g[0] = fmaf(dz[k], pv, g[0]);
    g[1] = fmaf(wz[k], pgy, g[1]);
    g[2] = fmaf(wz[k], pgx, g[2]);
  }
  return true;
}

// One reference voxel (z, y, x) of the level volumes fixed/moving (nz, ny, nx):
// residual r = M(q) - F(p) and g = grad M(q) at q = p + D (p - c) + t + u / scale: trilinear,
// or with cubic, the cubic B-spline of the coefficients passed as moving (sample_cubic).
// Returns false (r = 0, g = 0) when q is outside.
GPUREG_HD bool ffd_voxel(const float* fixed, const float* moving, int nz, int ny, int nx, const float* coeffs, int cz,
                         int cy, int cx, const Affine& a, float scale, float inv_spacing, int z, int y, int x,
                         float& r, float g[3], bool cubic = false) {
  const float off = 0.5f * (scale - 1.0f);
  float u[3];
  ffd_displacement(coeffs, cz, cy, cx, inv_spacing, fmaf(scale, (float)z, off), fmaf(scale, (float)y, off),
                   fmaf(scale, (float)x, off), u);
  const float inv_scale = 1.0f / scale;
  const float ez = (float)z - a.c[0], ey = (float)y - a.c[1], ex = (float)x - a.c[2];
  float v[3];
  GPUREG_UNROLL
  for (int k = 0; k < 3; ++k) v[k] = fmaf(u[k], inv_scale, fmaf(a.d[3 * k], ez, fmaf(a.d[3 * k + 1], ey, fmaf(a.d[3 * k + 2], ex, a.t[k]))));
  float value;
  const bool ok = cubic ? sample_cubic(moving, nz, ny, nx, z, y, x, v[0], v[1], v[2], value, g)
                        : sample<true>(moving, nz, ny, nx, z, y, x, v[0], v[1], v[2], value, g);
  if (!ok) {
    r = 0.0f;
    return false;
  }
  r = value - load(fixed + ((long long)z * ny + y) * nx + x);
  return true;
}

}  // namespace gpureg
