"""A CPU emulation of the CUDA thread model that runs gpureg's kernels unchanged (shared by the tests).

Every CUDA thread of a block is a fiber, ``__syncthreads`` and the warp
intrinsics are barriers; the kernel sources are included as they are and
compiled with g++ (see test_kernels_compile.py and test_gpu_solver.py).
"""

import ctypes

import numpy as np

from gpureg.core import cuda, cuda_loader
from cxx import build_shared


SOURCE = r"""// CPU emulation of the CUDA thread model, enough to run gpureg's kernels
// unchanged: every CUDA thread of a block is a fiber (ucontext) run
// cooperatively, blocks one after another, __syncthreads a block barrier,
// warp shuffles/ballots/matches barriers among the participating lanes.
#include <ucontext.h>

#include <cstring>
#include <functional>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
static dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {

// The threads of one block are fibers run cooperatively on one OS thread: a
// fiber runs until it waits at a barrier (or ends), then the next runnable one.
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  bool done = false, waiting = false;
};

static ucontext_t scheduler;
static Fiber* current = nullptr;
static std::function<void()> body;
static bool misuse = false;  // a warp intrinsic used in a way the GPU would not allow, or a deadlock

inline void yield() { swapcontext(&current->ctx, &scheduler); }

struct Barrier {
  int arrived = 0;
  std::vector<Fiber*> waiters;
  void wait(int expected) {
    if (++arrived == expected) {
      arrived = 0;
      for (Fiber* f : waiters) f->waiting = false;
      waiters.clear();
    } else {
      Fiber* self = current;
      self->waiting = true;
      waiters.push_back(self);
      while (self->waiting) yield();
    }
  }
};

struct Warp {
  Barrier full, part;  // all 32 lanes; the lanes of a partial mask
  unsigned long long slot[32];
  unsigned value[32];
};

static std::vector<Warp> warps;
static Barrier block_barrier;
static int block_threads = 0;

inline int tid() { return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }

static void entry() {
  body();
  current->done = true;
}

}  // namespace emu

inline void __syncthreads() { emu::block_barrier.wait(emu::block_threads); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs((int)v); }
template <class T>
inline T __ldg(const T* p) { return *p; }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int offset) {
  if (mask != 0xffffffffu) emu::misuse = true;
  emu::Warp& w = emu::warps[emu::tid() >> 5];
  const int lane = emu::tid() & 31;
  std::memcpy(&w.slot[lane], &v, sizeof(T));
  w.full.wait(32);
  T r;
  std::memcpy(&r, &w.slot[lane ^ offset], sizeof(T));
  w.full.wait(32);
  return r;
}

inline unsigned __ballot_sync(unsigned mask, bool pred) {
  if (mask != 0xffffffffu) emu::misuse = true;
  emu::Warp& w = emu::warps[emu::tid() >> 5];
  const int lane = emu::tid() & 31;
  w.slot[lane] = pred ? 1 : 0;
  w.full.wait(32);
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= (w.slot[l] ? 1u : 0u) << l;
  w.full.wait(32);
  return r;
}

inline unsigned __match_any_sync(unsigned mask, unsigned v) {
  emu::Warp& w = emu::warps[emu::tid() >> 5];
  const int lane = emu::tid() & 31;
  if (!(mask >> lane & 1u)) emu::misuse = true;
  w.value[lane] = v;
  w.part.wait(__popc(mask));
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && w.value[l] == v) r |= 1u << l;
  w.part.wait(__popc(mask));
  return r;
}

template <class T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;  // fibers never interleave inside a call
  *p += v;
  return old;
}

namespace emu {

template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, Args... args) {
  gridDim = grid;
  blockDim = block;
  const int n = (int)(block.x * block.y * block.z);
  block_threads = n;
  std::vector<Fiber> fibers(n);
  for (Fiber& f : fibers) f.stack.resize(1 << 16);
  body = [=] { kernel(args...); };
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = {bx, by, bz};
        warps = std::vector<Warp>((n + 31) / 32);
        block_barrier = Barrier();
        for (int t = 0; t < n; ++t) {
          Fiber& f = fibers[t];
          f.done = f.waiting = false;
          f.tid = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &scheduler;
          makecontext(&f.ctx, entry, 0);
        }
        for (int left = n; left > 0;) {
          bool ran = false;
          for (Fiber& f : fibers) {
            if (f.done || f.waiting) continue;
            current = &f;
            threadIdx = f.tid;
            swapcontext(&scheduler, &f.ctx);
            ran = true;
            if (f.done) --left;
          }
          if (!ran) {  // everyone waits: a barrier that not all threads reach
            misuse = true;
            return;
          }
        }
      }
}

}  // namespace emu

#include "affine.cu"
#include "volume.cu"
#include "solver.cu"

static dim3 d3(const int* v) { return dim3{(unsigned)v[0], (unsigned)v[1], (unsigned)v[2]}; }

extern "C" {

// Each returns 0, or 1 when a warp intrinsic was misused or the threads deadlocked.
int e_mse(const float* fixed, const float* moving, const float* maskf, const bool* maskb, const int* row_code,
          int nz, int ny, int nx, int mz, int my, int mx, const float* a, int hessian, int blocks, int threads,
          double* out) {
  std::vector<double> partials(32 * 6 * blocks, -1.0);
  const dim3 g{(unsigned)blocks, 1, 1}, b{(unsigned)threads, 1, 1};
  emu::misuse = false;
#define ARGS row_code, nz, ny, nx, mz, my, mx, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], \
             a[12], a[13], a[14], partials.data()
  if (maskb) {
    if (hessian) emu::launch(mse_terms_pass<true, bool>, g, b, fixed, moving, maskb, ARGS);
    else emu::launch(mse_terms_pass<false, bool>, g, b, fixed, moving, maskb, ARGS);
  } else {
    if (hessian) emu::launch(mse_terms_pass<true, float>, g, b, fixed, moving, maskf, ARGS);
    else emu::launch(mse_terms_pass<false, float>, g, b, fixed, moving, maskf, ARGS);
  }
#undef ARGS
  emu::launch(reduce_partials, dim3{32 * 6, 1, 1}, dim3{32, 1, 1}, (const double*)partials.data(), blocks, out);  // one warp per term: any block size works, 8x fewer fibers
  return emu::misuse ? 1 : 0;
}

int e_resample(const float* vol, int mz, int my, int mx, float* out, int nz, int ny, int nx, const float* a,
               float cval, const int* grid, const int* block) {
  emu::misuse = false;
  emu::launch(resample_affine, d3(grid), d3(block), vol, mz, my, mx, out, nz, ny, nx, a[0], a[1], a[2], a[3], a[4],
              a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12], a[13], a[14], cval);
  return emu::misuse ? 1 : 0;
}

int e_downsample2(const float* in, int ny, int nx, float* out, int oz, int oy, int ox, const int* grid,
                  const int* block) {
  emu::misuse = false;
  emu::launch(downsample2, d3(grid), d3(block), in, ny, nx, out, oz, oy, ox);
  return emu::misuse ? 1 : 0;
}

int e_moments(const float* v, int nz, int ny, int nx, float median, int blocks, int threads, double* out) {
  std::vector<double> partials(4 * blocks, -1.0);
  emu::misuse = false;
  const dim3 b{(unsigned)threads, 1, 1};
  emu::launch(com_moments, dim3{(unsigned)blocks, 1, 1}, b, v, nz, ny, nx, median, partials.data());
  emu::launch(reduce_partials, dim3{4, 1, 1}, b, (const double*)partials.data(), blocks, out);
  return emu::misuse ? 1 : 0;
}

int e_radix(const float* v, long long n, unsigned prefix, unsigned prefix_mask, int shift, unsigned bin_mask,
            radix_count_t* hist, int blocks, int threads) {
  emu::misuse = false;
  emu::launch(radix_histogram, dim3{(unsigned)blocks, 1, 1}, dim3{(unsigned)threads, 1, 1}, v, n, prefix,
              prefix_mask, shift, bin_mask, hist);
  return emu::misuse ? 1 : 0;
}

int e_classify(const unsigned char* fixed_rows, const int* cell_sat, int nz, int ny, int nx, int mz, int my, int mx,
               const float* a, int* row_code) {
  emu::misuse = false;
  emu::launch(classify_rows, dim3{(unsigned)((nz * ny + 255) / 256), 1, 1}, dim3{256, 1, 1}, fixed_rows, cell_sat, nz,
              ny, nx, mz, my, mx, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12],
              a[13], a[14], row_code);
  return emu::misuse ? 1 : 0;
}

// One pass of the device-resident solver, as gpureg/core/cuda_solver.py queues it: classify_rows_state
// (when tables are given), mse_terms_state_pass, reduce_partials, lm_step.
int e_solver_pass(const float* fixed, const float* moving, const unsigned char* fixed_rows, const int* cell_sat,
                  int nz, int ny, int nx, int mz, int my, int mx, double* state, const float* c, unsigned free_mask,
                  double tol, int max_iter, int blocks, double* sums) {
  std::vector<double> partials(32 * 6 * blocks, -1.0);
  std::vector<int> row_code(nz * ny, -2);
  emu::misuse = false;
  const dim3 b{256, 1, 1};
  const int* codes = nullptr;
  if (fixed_rows) {
    emu::launch(classify_rows_state, dim3{(unsigned)((nz * ny + 255) / 256), 1, 1}, b, fixed_rows, cell_sat, nz, ny,
                nx, mz, my, mx, (const double*)state, c[0], c[1], c[2], row_code.data());
    codes = row_code.data();
  }
  emu::launch(mse_terms_state_pass<true, float>, dim3{(unsigned)blocks, 1, 1}, b, fixed, moving, (const float*)nullptr,
              codes, nz, ny, nx, mz, my, mx, (const double*)state, c[0], c[1], c[2], partials.data());
  emu::launch(reduce_partials, dim3{32 * 6, 1, 1}, dim3{32, 1, 1}, (const double*)partials.data(), blocks, sums);
  emu::launch(lm_step, dim3{1, 1, 1}, dim3{32, 1, 1}, (const double*)sums, state, free_mask, nz, ny, nx, tol, max_iter);
  return emu::misuse ? 1 : 0;
}

// The solver step alone (lm_step.cuh on the host, no emulation needed) and the sums index.
void h_lm_update(double* state, const double* sums, unsigned free_mask, int nz, int ny, int nx, double tol,
                 int max_iter) {
  gpureg::lm_update(state, sums, free_mask, nz, ny, nx, tol, max_iter);
}
void h_jtj_slots(int* out) {
  for (int a = 0; a < 12; ++a)
    for (int b = 0; b < 12; ++b) out[12 * a + b] = gpureg::jtj_slot(a, b);
}
void h_row_range(const float* a, int z, int y, int nx, int mz, int my, int mx, int* out) {
  gpureg::Affine af;
  for (int i = 0; i < 9; ++i) af.d[i] = a[i];
  for (int i = 0; i < 3; ++i) { af.t[i] = a[9 + i]; af.c[i] = a[12 + i]; }
  float base[3];
  gpureg::row_base(af, (float)z - af.c[0], (float)y - af.c[1], base);
  gpureg::row_valid_range(af, base, z, y, nx, mz, my, mx, out[0], out[1]);
  int n = 0;
  for (int x = 0; x < nx; ++x) n += gpureg::sample_valid(af, base, z, y, x, mz, my, mx) ? 1 : 0;
  out[2] = n;
}

}  // extern "C"
"""

F32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
F64 = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
I32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
U32 = np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS")
U64 = np.ctypeslib.ndpointer(np.uint64, flags="C_CONTIGUOUS")
U8 = np.ctypeslib.ndpointer(np.uint8, flags="C_CONTIGUOUS")


def build(tmp_path_factory, wide: bool = False):
    """Compile the emulator with the kernels (skips the test without g++); ``wide``: the 64-bit index build."""
    flags = ("-std=c++20", "-O1", "-Wall", "-Wno-unknown-pragmas", *((cuda_loader.WIDE_INDEX,) if wide else ()))
    lib = build_shared(tmp_path_factory, "emulator_wide" if wide else "emulator", SOURCE, flags)
    lib.wide = wide
    i, f = ctypes.c_int, ctypes.c_float
    lib.e_mse.argtypes = [F32, F32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, i, i, i, i, i, i, F32, i, i, i,
                          F64]
    lib.e_classify.argtypes = [U8, I32, i, i, i, i, i, i, F32, I32]
    lib.e_solver_pass.argtypes = [F32, F32, ctypes.c_void_p, ctypes.c_void_p, i, i, i, i, i, i, F64, F32, ctypes.c_uint,
                                  ctypes.c_double, i, i, F64]
    lib.h_lm_update.argtypes = [F64, F64, ctypes.c_uint, i, i, i, ctypes.c_double, i]
    lib.h_jtj_slots.argtypes = [I32]
    lib.h_row_range.argtypes = [F32, i, i, i, i, i, i, I32]
    lib.e_resample.argtypes = [F32, i, i, i, F32, i, i, i, F32, f, I32, I32]
    lib.e_downsample2.argtypes = [F32, i, i, F32, i, i, i, I32, I32]
    lib.e_moments.argtypes = [F32, i, i, i, f, i, i, F64]
    lib.e_radix.argtypes = [F32, ctypes.c_longlong, ctypes.c_uint, ctypes.c_uint, i, ctypes.c_uint, U64 if wide else U32,
                            i, i]
    return lib


def emulated_mse(emu, fixed, moving, matrix, center, mask, hessian, blocks, row_code=None):
    """The fused pass under the emulator: MetricTerms (``row_code``: classify_rows's output, optional)."""
    aff = np.array(cuda.affine_args(matrix, center), np.float32)
    maskf = maskb = None
    if mask is not None:
        mask = np.ascontiguousarray(mask)
        if mask.dtype == np.bool_:
            maskb = mask.ctypes.data
        else:
            maskf = mask.ctypes.data
    out = np.empty(cuda.N_TERMS * cuda.N_MONOMIALS)
    codes = None if row_code is None else np.ascontiguousarray(row_code, np.int32).ctypes.data
    assert emu.e_mse(fixed, moving, maskf, maskb, codes, *fixed.shape, *moving.shape, aff, int(hessian), blocks,
                     cuda_loader.THREADS, out) == 0
    return cuda.unpack_terms(out.reshape(cuda.N_TERMS, cuda.N_MONOMIALS), hessian)


