// Affine kernels of gpureg: trilinear resampling and the fused MSE pass.
//
// The per-voxel mathematics is in voxel_math.cuh (tested on the CPU); this
// file holds the launch layout and the reductions. Launched by gpureg/cuda.py.
// The transform arrives as the 15 floats of gpureg::Affine (D row-major, t, c):
// q = p + D (p - c) + t for a reference voxel p.
#include "voxel_math.cuh"
#include "reduce.cuh"

#define GPUREG_AFFINE_PARAMS                                                                         \
  float d00, float d01, float d02, float d10, float d11, float d12, float d20, float d21, float d22, \
      float t0, float t1, float t2, float cz, float cy, float cx
#define GPUREG_AFFINE_INIT {{d00, d01, d02, d10, d11, d12, d20, d21, d22}, {t0, t1, t2}, {cz, cy, cx}}

// out (nz, ny, nx)[p] = volume (mz, my, mx) at q, or cval outside.
// Launch: block (32, 8, 1), grid (ceil(nx / 32), ceil(ny / 8), nz).
extern "C" __global__ void __launch_bounds__(256)
resample_affine(const float* __restrict__ volume, int mz, int my, int mx, float* __restrict__ out, int nz,
                int ny, int nx, GPUREG_AFFINE_PARAMS, float cval) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  const int z = blockIdx.z;
  if (x >= nx || y >= ny || z >= nz) return;
  const gpureg::Affine a = GPUREG_AFFINE_INIT;
  out[(z * ny + y) * nx + x] = gpureg::resample_voxel(volume, mz, my, mx, a, z, y, x, cval);
}

// The fused MSE pass. Each warp takes whole reference rows (z, y) in turn
// (grid-stride over rows), its lanes the voxels x = lane, lane + 32, ...
// (coalesced reads of the fixed row and of the moving neighbourhood). Per
// voxel a lane adds 26 float row sums (voxel_math.cuh, accumulate_voxel); at
// the end of a row the warp transpose-reduces them (lane l gets term l) and
// each lane folds its term times the row's 6 monomials into 6 double
// accumulators. Per-thread state is 32 floats + 6 doubles whatever the
// number of J^T J terms, so the kernel stays far from spilling.
// partials: (kTerms * kMonomials, gridDim.x) float64, term-major.
// Launch: block kMseThreads, grid <= number of row groups (see gpureg/cuda.py).
// 256 threads, at least 4 resident blocks per SM: caps the pass at 64
// registers, where ptxas (CUDA 13.0) reports no spills for sm_80 and sm_90
// (without the bound it spilled 12 bytes in the hessian=False variants on sm_80).
constexpr int kMseThreads = 256;
constexpr int kMseMinBlocks = 4;

template <bool Hessian, typename MaskT>
__global__ void __launch_bounds__(kMseThreads, kMseMinBlocks)
mse_terms_pass(const float* __restrict__ fixed, const float* __restrict__ moving, const MaskT* __restrict__ mask,
               int nz, int ny, int nx, int mz, int my, int mx, GPUREG_AFFINE_PARAMS,
               double* __restrict__ partials) {
  const gpureg::Affine a = GPUREG_AFFINE_INIT;
  const int lane = threadIdx.x & 31;
  const int warps = kMseThreads / 32;
  const int rows = nz * ny;
  double acc[gpureg::kMonomials];
#pragma unroll
  for (int m = 0; m < gpureg::kMonomials; ++m) acc[m] = 0.0;
  for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
    const int z = row / ny;
    const int y = row - z * ny;
    float t[gpureg::kTerms];
#pragma unroll
    for (int k = 0; k < gpureg::kTerms; ++k) t[k] = 0.0f;
    gpureg::mse_row_lane<Hessian>(fixed, moving, mask, ny, nx, mz, my, mx, a, z, y, lane, 32, t);
    const float s = gpureg::warp_transpose_sum(t, lane);
    gpureg::combine_row(acc, s, (float)z - a.c[0], (float)y - a.c[1]);
  }
  gpureg::store_lane_partials<kMseThreads, gpureg::kMonomials>(acc, partials);
}

// Instantiated here so that a plain `nvcc --cubin` compiles them (CuPy picks
// them by name expression, e.g. "mse_terms_pass<true, float>").
template __global__ void mse_terms_pass<true, float>(const float*, const float*, const float*, int, int, int, int,
                                                     int, int, GPUREG_AFFINE_PARAMS, double*);
template __global__ void mse_terms_pass<false, float>(const float*, const float*, const float*, int, int, int, int,
                                                      int, int, GPUREG_AFFINE_PARAMS, double*);
template __global__ void mse_terms_pass<true, bool>(const float*, const float*, const bool*, int, int, int, int, int,
                                                    int, GPUREG_AFFINE_PARAMS, double*);
template __global__ void mse_terms_pass<false, bool>(const float*, const float*, const bool*, int, int, int, int,
                                                     int, int, GPUREG_AFFINE_PARAMS, double*);
