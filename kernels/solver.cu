// The device-resident Levenberg-Marquardt step of gpureg's registration (lm_step.cuh).
//
// Per pass of a pyramid level the stream holds: the fused pass reading its transform from the
// solver state (mse_terms_state_pass in affine.cu), reduce_partials, then lm_step, which
// turns the pass's sums into the next trial parameters in that same state. The host only
// queues passes and reads the state's status every few passes (gpureg/core/cuda_solver.py).
#include "voxel_math.cuh"
#include "reduce.cuh"
#include "lm_step.cuh"

// One block of one thread: the 12 x 12 system is ~2k double operations, below the cost of
// spreading it over threads. sums: (32, 6) float64 of the pass; state: kLmStateSize float64.
// free_mask: bit a set when parameter a is optimised; (nz, ny, nx): the level's grid.
extern "C" __global__ void __launch_bounds__(32)
lm_step(const double* __restrict__ sums, double* __restrict__ state, unsigned int free_mask, int nz, int ny, int nx,
        double tol, int max_iter) {
  if (blockIdx.x == 0 && threadIdx.x == 0) gpureg::lm_update(state, sums, free_mask, nz, ny, nx, tol, max_iter);
}
