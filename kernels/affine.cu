// Affine kernels of gpureg: trilinear resampling and the fused MSE pass.
//
// The per-voxel mathematics is in voxel_math.cuh (tested on the CPU); this
// file holds the launch layout and the reductions. Launched by gpureg/cuda.py.
// The transform arrives as the 15 floats of gpureg::Affine (D row-major, t, c):
// q = p + D (p - c) + t for a reference voxel p.
#include "voxel_math.cuh"
#include "reduce.cuh"
#include "lm_step.cuh"

#define GPUREG_AFFINE_PARAMS                                                                         \
  float d00, float d01, float d02, float d10, float d11, float d12, float d20, float d21, float d22, \
      float t0, float t1, float t2, float cz, float cy, float cx
#define GPUREG_AFFINE_INIT {{d00, d01, d02, d10, d11, d12, d20, d21, d22}, {t0, t1, t2}, {cz, cy, cx}}

// out (nz, ny, nx)[p] = volume (mz, my, mx) at q, or cval outside.
// Launch: block (32, 8, 1), grid (ceil(nx / 32), ceil(ny / 8), nz).
extern "C" __global__ void __launch_bounds__(GPUREG_THREADS)
resample_affine(const float* __restrict__ volume, int mz, int my, int mx, float* __restrict__ out, int nz,
                int ny, int nx, GPUREG_AFFINE_PARAMS, float cval) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  const int z = blockIdx.z;
  if (x >= nx || y >= ny || z >= nz) return;
  const gpureg::Affine a = GPUREG_AFFINE_INIT;
  out[((gpureg::index_t)z * ny + y) * nx + x] = gpureg::resample_voxel(volume, mz, my, mx, a, z, y, x, cval);
}

// The fused MSE pass. Each warp takes whole reference rows (z, y) in turn
// (grid-stride over rows), its lanes the voxels x = lane, lane + 32, ...
// (coalesced reads of the fixed row and of the moving neighbourhood). Per
// voxel a lane adds 26 float row sums (voxel_math.cuh, accumulate_voxel); at
// the end of a row the warp transpose-reduces them (lane l gets term l) and
// each lane folds its term times the row's 6 monomials into 6 double
// accumulators. Per-thread state is 32 floats + 6 doubles whatever the
// number of J^T J terms, so the kernel stays far from spilling.
// Empty space (optional, no mask): with row_code from classify_rows, a row coded n >= 0 only
// adds its count n of valid samples (its voxels are not read); -1: the row is read. Null: every
// row is read.
// partials: (kTerms * kMonomials, gridDim.x) float64, term-major.
// Launch: block kMseThreads, grid <= number of row groups (see gpureg/core/cuda.py).
// 256 threads, at least 4 resident blocks per SM: caps the pass at 64
// registers, where ptxas (CUDA 13.0) reports no spills for sm_80 and sm_90
// (without the bound it spilled 12 bytes in the hessian=False variants on sm_80).
constexpr int kMseThreads = GPUREG_THREADS;          // gpureg.core.kernel_layout.THREADS
constexpr int kMseMinBlocks = GPUREG_MSE_MIN_BLOCKS;  // gpureg.core.kernel_layout.MSE_MIN_BLOCKS
// The device solver's pass (transform from shared memory) with 64-bit indices needs more than 64
// registers: NVRTC 13.5 spilled 72 B at 4 blocks per SM, none at 3.
#if defined(GPUREG_WIDE_INDEX)
constexpr int kMseStateMinBlocks = GPUREG_MSE_STATE_MIN_BLOCKS_WIDE;
#else
constexpr int kMseStateMinBlocks = kMseMinBlocks;
#endif

namespace gpureg {

template <bool Hessian, bool Reload, typename MaskT>
__device__ __forceinline__ void mse_pass(const float* __restrict__ fixed, const float* __restrict__ moving,
                                         const MaskT* __restrict__ mask, const int* __restrict__ row_code, int nz, int ny, int nx, int mz, int my,
                                         int mx, const Affine& a, double* __restrict__ partials) {
  const int lane = threadIdx.x & 31;
  const int warps = kMseThreads / 32;
  const int rows = nz * ny;
  double acc[kMonomials];
#pragma unroll
  for (int m = 0; m < kMonomials; ++m) acc[m] = 0.0;
  for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
    const int z = row / ny;
    const int y = row - z * ny;
    const float ez = (float)z - a.c[0], ey = (float)y - a.c[1];
    if (row_code != nullptr) {  // warp-uniform
      const int code = row_code[row];
      if (code >= 0) {
        if (lane == kCount && code > 0) combine_row(acc, (float)code, ez, ey);  // lane l owns term l
        continue;
      }
    }
    float t[kTerms];
#pragma unroll
    for (int k = 0; k < kTerms; ++k) t[k] = 0.0f;
    mse_row_lane<Hessian, MaskT, Reload>(fixed, moving, mask, ny, nx, mz, my, mx, a, z, y, lane, 32, t);
    const float s = warp_transpose_sum(t, lane);
    combine_row(acc, s, ez, ey);
  }
  store_lane_partials<kMseThreads, kMonomials>(acc, partials);
}

}  // namespace gpureg

// The pass at the transform given as 15 floats (gpureg.core.cuda.affine_args).
template <bool Hessian, typename MaskT>
__global__ void __launch_bounds__(kMseThreads, kMseMinBlocks)
mse_terms_pass(const float* __restrict__ fixed, const float* __restrict__ moving, const MaskT* __restrict__ mask,
               const int* __restrict__ row_code, int nz, int ny, int nx, int mz, int my, int mx, GPUREG_AFFINE_PARAMS, double* __restrict__ partials) {
  const gpureg::Affine a = GPUREG_AFFINE_INIT;
  gpureg::mse_pass<Hessian, false>(fixed, moving, mask, row_code, nz, ny, nx, mz, my, mx, a, partials);
}

// The pass of the device-resident solver: the transform is the trial parameters in the solver
// state (lm_step.cuh, written by lm_step in solver.cu), about the centre (cz, cy, cx); nothing
// is computed once the solver has stopped (its partials are then ignored).
template <bool Hessian, typename MaskT>
__global__ void __launch_bounds__(kMseThreads, kMseStateMinBlocks)
mse_terms_state_pass(const float* __restrict__ fixed, const float* __restrict__ moving, const MaskT* __restrict__ mask,
                     const int* __restrict__ row_code, int nz, int ny, int nx, int mz, int my, int mx, const double* __restrict__ state, float cz, float cy, float cx,
                     double* __restrict__ partials) {
  if (state[gpureg::kLmStatus] != (double)gpureg::kLmRunning) return;  // uniform over the grid
  // Through shared memory: held in registers the 15 floats spill (kernel parameters do not:
  // they are read from the constant bank); the pass re-reads them per voxel (Reload).
  __shared__ gpureg::Affine sa;
  if (threadIdx.x == 0) sa = gpureg::affine_from_params(state + gpureg::kLmTrial, cz, cy, cx);
  __syncthreads();
  const gpureg::Affine& a = sa;
  gpureg::mse_pass<Hessian, true>(fixed, moving, mask, row_code, nz, ny, nx, mz, my, mx, a, partials);
}

// Empty-space skipping: row_code[row] of reference row (z, y) = its number of valid samples when
// the fixed row is 0 (fixed_rows[row] == 0, nz * ny bytes) and every sample falls in a cell
// without a non-zero corner (cell_sat: voxel_math.cuh, row_cells_any): the pass then adds only
// that count, exactly what reading the row would add. -1: the pass reads the row. O(1) per row
// (row_valid_range), one thread per row; kept out of the pass, whose registers it would spill.
// Launch: block GPUREG_THREADS, grid ceil(nz * ny / GPUREG_THREADS).
namespace gpureg {
__device__ __forceinline__ void classify_row(const unsigned char* __restrict__ fixed_rows,
                                             const int* __restrict__ cell_sat, int nz, int ny, int nx, int mz, int my,
                                             int mx, const Affine& a, int* __restrict__ row_code) {
  const int row = blockIdx.x * blockDim.x + threadIdx.x;
  if (row >= nz * ny) return;
  const int z = row / ny, y = row - z * ny;
  float base[3];
  row_base(a, (float)z - a.c[0], (float)y - a.c[1], base);
  int x0, x1;
  row_valid_range(a, base, z, y, nx, mz, my, mx, x0, x1);
  const bool skip = x1 < x0 || (fixed_rows[row] == 0 && !row_cells_any(a, base, z, y, x0, x1, mz, my, cell_sat));
  row_code[row] = skip ? (x1 < x0 ? 0 : x1 - x0 + 1) : -1;
}
}  // namespace gpureg

extern "C" __global__ void __launch_bounds__(GPUREG_THREADS)
classify_rows(const unsigned char* __restrict__ fixed_rows, const int* __restrict__ cell_sat, int nz, int ny, int nx,
              int mz, int my, int mx, GPUREG_AFFINE_PARAMS, int* __restrict__ row_code) {
  const gpureg::Affine a = GPUREG_AFFINE_INIT;
  gpureg::classify_row(fixed_rows, cell_sat, nz, ny, nx, mz, my, mx, a, row_code);
}

// classify_rows at the solver's trial parameters (see mse_terms_state_pass).
extern "C" __global__ void __launch_bounds__(GPUREG_THREADS)
classify_rows_state(const unsigned char* __restrict__ fixed_rows, const int* __restrict__ cell_sat, int nz, int ny,
                    int nx, int mz, int my, int mx, const double* __restrict__ state, float cz, float cy, float cx,
                    int* __restrict__ row_code) {
  if (state[gpureg::kLmStatus] != (double)gpureg::kLmRunning) return;
  const gpureg::Affine a = gpureg::affine_from_params(state + gpureg::kLmTrial, cz, cy, cx);
  gpureg::classify_row(fixed_rows, cell_sat, nz, ny, nx, mz, my, mx, a, row_code);
}

// Instantiated here so that a plain `nvcc --cubin` compiles them (CuPy picks
// them by name expression, e.g. "mse_terms_pass<true, float>").
#define GPUREG_PASS_ARGS(MaskT) const float*, const float*, const MaskT*, const int*, int, int, int, int, int, int
template __global__ void mse_terms_pass<true, float>(GPUREG_PASS_ARGS(float), GPUREG_AFFINE_PARAMS, double*);
template __global__ void mse_terms_pass<false, float>(GPUREG_PASS_ARGS(float), GPUREG_AFFINE_PARAMS, double*);
template __global__ void mse_terms_pass<true, bool>(GPUREG_PASS_ARGS(bool), GPUREG_AFFINE_PARAMS, double*);
template __global__ void mse_terms_pass<false, bool>(GPUREG_PASS_ARGS(bool), GPUREG_AFFINE_PARAMS, double*);
template __global__ void mse_terms_state_pass<true, float>(GPUREG_PASS_ARGS(float), const double*, float, float,
                                                           float, double*);
template __global__ void mse_terms_state_pass<true, bool>(GPUREG_PASS_ARGS(bool), const double*, float, float,
                                                          float, double*);
