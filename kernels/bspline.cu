// B-spline free-form deformation kernels of gpureg: the fused residual pass.
//
// Per-voxel mathematics in bspline_math.cuh (tested on the CPU through g++);
// launched by gpureg/core/cuda_ffd.py. One pass per objective evaluation:
// each thread evaluates the cubic B-spline displacement of its voxels from
// the 4x4x4 control points (coefficients read through the read-only cache),
// resamples the moving volume (trilinear, or with cubic != 0 cubic B-spline
// from the moving volume's spline coefficients passed as moving), and writes r g / scale per voxel
// (3 planes) for the separable scatter onto the control points (cuBLAS on the
// host side), plus per-block sums of r^2 and of the valid count (no atomics).
#include "voxel_math.cuh"
#include "bspline_math.cuh"
#include "reduce.cuh"

constexpr int kFfdThreads = GPUREG_THREADS;  // gpureg.core.kernel_layout.THREADS

// fixed, moving (nz, ny, nx); mask (nz, ny, nx) float (> 0.5 counts) or null;
// coeffs (3, cz, cy, cx); rg (3, nz, ny, nx) out; partials (2, gridDim.x) out.
// Launch: block GPUREG_THREADS, grid-stride over voxels (x fastest: coalesced rows).
extern "C" __global__ void __launch_bounds__(kFfdThreads)
ffd_residual_pass(const float* __restrict__ fixed, const float* __restrict__ moving, const float* __restrict__ mask,
                  int nz, int ny, int nx, const float* __restrict__ coeffs, int cz, int cy, int cx, float d00,
                  float d01, float d02, float d10, float d11, float d12, float d20, float d21, float d22, float t0,
                  float t1, float t2, float c0, float c1, float c2, float scale, float inv_spacing, int cubic,
                  float* __restrict__ rg, double* __restrict__ partials) {
  const gpureg::Affine a = {{d00, d01, d02, d10, d11, d12, d20, d21, d22}, {t0, t1, t2}, {c0, c1, c2}};
  const long long n = (long long)nz * ny * nx;
  const float inv_scale = 1.0f / scale;
  double acc[2] = {0.0, 0.0};
  for (long long i = (long long)blockIdx.x * kFfdThreads + threadIdx.x; i < n; i += (long long)gridDim.x * kFfdThreads) {
    const int x = (int)(i % nx);
    const long long row = i / nx;
    const int y = (int)(row % ny);
    const int z = (int)(row / ny);
    float r, g[3];
    const bool ok = gpureg::ffd_voxel(fixed, moving, nz, ny, nx, coeffs, cz, cy, cx, a, scale, inv_spacing, z, y, x,
                                      r, g, cubic != 0) && gpureg::inside(mask, (gpureg::index_t)i);
    const float s = ok ? r * inv_scale : 0.0f;
    rg[i] = s * g[0];
    rg[n + i] = s * g[1];
    rg[2 * n + i] = s * g[2];
    if (ok) {
      acc[0] += (double)r * r;
      acc[1] += 1.0;
    }
  }
  gpureg::store_block_sums<kFfdThreads, 2>(acc, partials);
}
