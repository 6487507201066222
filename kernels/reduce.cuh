// Warp and block reductions of gpureg's CUDA kernels (device code only).
//
// No per-voxel global atomics: a kernel keeps per-thread accumulators, reduces
// them across its block through shuffles and shared memory, and writes one
// partial per block and term, term-major: partials[term * gridDim.x + block].
// reduce_partials then adds the partials of each term in double.
#pragma once

#include "voxel_math.cuh"

namespace gpureg {

constexpr unsigned int kFullWarp = 0xffffffffu;

template <int Half>
__device__ __forceinline__ void transpose_step(float* t, int lane) {
#pragma unroll
  for (int k = 0; k < Half; ++k) {
    // t[k] is read (send or keep) before it is overwritten; t[k + Half] is never written.
    const float keep = transpose_keep<Half>(t, lane, k);
    const float send = transpose_send<Half>(t, lane, k);
    t[k] = keep + __shfl_xor_sync(kFullWarp, send, Half);
  }
}

// Warp transpose-reduction of 32 floats per lane: returns, in lane l, the sum
// over the warp of t[l] (31 shuffles instead of 32 x 5 for 32 butterflies).
// t is clobbered. All 32 lanes must call it.
__device__ __forceinline__ float warp_transpose_sum(float* t, int lane) {
  transpose_step<16>(t, lane);
  transpose_step<8>(t, lane);
  transpose_step<4>(t, lane);
  transpose_step<2>(t, lane);
  transpose_step<1>(t, lane);
  return t[0];
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o >= 1; o >>= 1) v += __shfl_xor_sync(kFullWarp, v, o);
  return v;
}

// Lane-resolved block partials: lane l of every warp holds acc[M] for term
// l * M + m; sums them over the block's warps into partials[(l * M + m) * gridDim.x + blockIdx.x].
template <int Threads, int M>
__device__ __forceinline__ void store_lane_partials(const double* acc, double* __restrict__ partials) {
  __shared__ double sh[Threads / 32][32 * M];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m) sh[warp][lane * M + m] = acc[m];
  __syncthreads();
  for (int k = threadIdx.x; k < 32 * M; k += Threads) {
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < Threads / 32; ++w) s += sh[w][k];
    partials[(long long)k * gridDim.x + blockIdx.x] = s;
  }
}

// Block sums of acc[M] over all threads into partials[m * gridDim.x + blockIdx.x].
template <int Threads, int M>
__device__ __forceinline__ void store_block_sums(const double* acc, double* __restrict__ partials) {
  __shared__ double sh[Threads / 32][M];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const double s = warp_sum(acc[m]);
    if (lane == 0) sh[warp][m] = s;
  }
  __syncthreads();
  if (threadIdx.x < M) {
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < Threads / 32; ++w) s += sh[w][threadIdx.x];
    partials[(long long)threadIdx.x * gridDim.x + blockIdx.x] = s;
  }
}

}  // namespace gpureg

// out[term] = sum over b < nblocks of partials[term * nblocks + b], in double.
// Launch: grid = number of terms, block = GPUREG_THREADS threads.
extern "C" __global__ void __launch_bounds__(GPUREG_THREADS)
reduce_partials(const double* __restrict__ partials, int nblocks, double* __restrict__ out) {
  __shared__ double sh[GPUREG_THREADS / 32];
  const double* col = partials + (long long)blockIdx.x * nblocks;
  double s = 0.0;
  for (int b = threadIdx.x; b < nblocks; b += blockDim.x) s += col[b];
  s = gpureg::warp_sum(s);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.0;
    s = gpureg::warp_sum(s);
    if (lane == 0) out[blockIdx.x] = s;
  }
}
