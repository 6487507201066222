// Volume kernels of gpureg: 2x pyramid downsampling, centre-of-mass moments
// and the radix-select histogram behind the exact median.
// Per-voxel arithmetic in voxel_math.cuh (tested on the CPU). Launched by gpureg/cuda.py.
#include "voxel_math.cuh"
#include "reduce.cuh"

// out (oz, oy, ox)[z, y, x] = mean of in[2z:2z+2, 2y:2y+2, 2x:2x+2]; in has
// rows of nx voxels and planes of ny rows (odd trailing planes/rows/voxels are dropped).
// Launch: block (32, 8, 1), grid (ceil(ox / 32), ceil(oy / 8), oz).
extern "C" __global__ void __launch_bounds__(GPUREG_THREADS)
downsample2(const float* __restrict__ in, int ny, int nx, float* __restrict__ out, int oz, int oy, int ox) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  const int z = blockIdx.z;
  if (x >= ox || y >= oy || z >= oz) return;
  out[((gpureg::index_t)z * oy + y) * ox + x] = gpureg::box_mean8(in, ny, nx, z, y, x);
}

// Moments (sum w, sum w z, sum w y, sum w x) of w = max(v - median, 0).
// Warps take whole rows (grid-stride), lanes x = lane, lane + 32, ...
// partials: (4, gridDim.x) float64, term-major. Launch: block GPUREG_THREADS.
// The bound of 4 blocks per SM avoids a 12-byte spill ptxas (CUDA 13.0) made for sm_90 without it.
constexpr int kMomentThreads = GPUREG_THREADS;

extern "C" __global__ void __launch_bounds__(kMomentThreads, 4)
com_moments(const float* __restrict__ v, int nz, int ny, int nx, float median, double* __restrict__ partials) {
  const int lane = threadIdx.x & 31;
  const int warps = kMomentThreads / 32;
  const int rows = nz * ny;
  double m[4] = {0.0, 0.0, 0.0, 0.0};
  for (int row = blockIdx.x * warps + (threadIdx.x >> 5); row < rows; row += gridDim.x * warps) {
    const int z = row / ny;
    const int y = row - z * ny;
    float w = 0.0f, wx = 0.0f;
    gpureg::moments_row_lane(v + (long long)row * nx, nx, median, lane, 32, w, wx);
    gpureg::combine_moments(m, w, wx, z, y);
  }
  gpureg::store_block_sums<kMomentThreads, 4>(m, partials);
}

// Histogram of the keys (gpureg::float_key) of the n values v whose key
// matches `prefix` on the bits of `prefix_mask`: hist[(key >> shift) & bin_mask]
// += 1. hist (<= kRadixBins bins) must be zeroed. Shared-memory histogram with
// warp-aggregated atomics (a smoothed binary volume is mostly one value).
// Launch: block GPUREG_THREADS, any grid.
constexpr int kRadixBins = 2048;

// The counts: 32-bit, or 64-bit in the wide build (a 2048 x 2048 x 1024 volume has 2^32 values).
#if defined(GPUREG_WIDE_INDEX)
typedef unsigned long long radix_count_t;
#else
typedef unsigned int radix_count_t;
#endif

extern "C" __global__ void __launch_bounds__(GPUREG_THREADS)
radix_histogram(const float* __restrict__ v, long long n, unsigned int prefix, unsigned int prefix_mask, int shift,
                unsigned int bin_mask, radix_count_t* __restrict__ hist) {
  __shared__ unsigned int sh[kRadixBins];
  for (int b = threadIdx.x; b < kRadixBins; b += blockDim.x) sh[b] = 0u;
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const long long stride = (long long)gridDim.x * blockDim.x;
  // The loop bound is uniform across the warp, so the warp intrinsics see all 32 lanes.
  for (long long base = (long long)blockIdx.x * blockDim.x + (threadIdx.x - lane); base < n; base += stride) {
    const long long i = base + lane;
    unsigned int key = 0u;
    bool take = false;
    if (i < n) {
      key = gpureg::float_key(__ldg(v + i));
      take = (key & prefix_mask) == prefix;
    }
    const unsigned int bin = (key >> shift) & bin_mask;
    const unsigned int active = __ballot_sync(gpureg::kFullWarp, take);
    if (take) {
      const unsigned int peers = __match_any_sync(active, bin);
      if (lane == __ffs(peers) - 1) atomicAdd(&sh[bin], (unsigned int)__popc(peers));
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b <= (int)bin_mask; b += blockDim.x) {
    if (sh[b] != 0u) atomicAdd(&hist[b], (radix_count_t)sh[b]);
  }
}
