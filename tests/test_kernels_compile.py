"""The CUDA kernels without a GPU: they compile, and run correctly under a CPU emulation of CUDA threads.

A broken kernel is caught on every CI run even though CI has no GPU:

- nvcc --cubin for sm_90 and sm_80 (and no register spills);
- NVRTC on exactly the source text, options and name expressions that
  :mod:`gpureg.core.cuda` hands to ``cupy.RawModule`` (needs libnvrtc, e.g. from the
  ``nvidia-cuda-nvrtc`` wheel; skipped without it);
- the kernels themselves, unchanged, compiled with g++ against a small
  emulation of the CUDA thread model (every thread a fiber, ``__syncthreads``
  and the warp intrinsics as barriers), launched with the grids gpureg.cuda
  computes and compared with the NumPy path. This covers the launch and
  reduction scaffolding (warp transpose-reduction, block partials, partial
  reduction, grid-stride loops, radix histogram) that test_voxel_math.py
  leaves out; only CuPy's marshalling and real-hardware behaviour remain for
  the GPU tests.
"""

import ctypes
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from gpureg.core import cuda, cuda_loader, metric
from gpureg import register as reg
from gpureg.core import transform as tf
from gpureg.synth.phantom import two_particle_phantom

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
SOURCES = sorted(p.name for p in KERNELS.glob("*.cu"))
ARCHS = ("sm_90", "sm_80")
NVCC = shutil.which("nvcc")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def test_every_source_is_loaded_by_gpureg_cuda():
    # A .cu file that gpureg.cuda does not know would never be compiled at run time.
    assert SOURCES and set(SOURCES) == set(cuda_loader.KERNEL_FILES)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_cubin_without_register_spills(source, arch, tmp_path):
    cmd = [NVCC, "-std=c++17", f"-arch={arch}", "--cubin", "-I", str(KERNELS), "-Xptxas", "-warn-spills", "-o",
           str(tmp_path / (Path(source).stem + f".{arch}.cubin")), str(KERNELS / source)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr}"
    # Spilled accumulators would live in local memory and slow the memory-bound
    # passes; the launch bounds in the sources are chosen so that ptxas needs none.
    assert "spill" not in out.stderr, out.stderr


def test_import_needs_no_cupy():
    code = "import sys, gpureg.core.cuda; print('cupy' in sys.modules)"
    env = dict(os.environ, GPUREG_DISABLE_GPU="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=KERNELS.parent, check=True)
    assert out.stdout.strip() == "False"


def test_kernel_dir_finds_checkout_and_wheel_layouts(tmp_path):
    assert cuda_loader.kernel_dir() == KERNELS
    # Installed wheel: gpureg/kernels/*.cuh beside gpureg/cuda.py.
    wheel = tmp_path / "site" / "gpureg"
    (wheel / "kernels").mkdir(parents=True)
    (wheel / "kernels" / "voxel_math.cuh").write_text("")
    assert cuda_loader._find_kernel_dir(wheel) == wheel / "kernels"
    # Source checkout: kernels/ beside gpureg/.
    checkout = tmp_path / "src"
    (checkout / "gpureg").mkdir(parents=True)
    (checkout / "kernels").mkdir()
    (checkout / "kernels" / "voxel_math.cuh").write_text("")
    assert cuda_loader._find_kernel_dir(checkout / "gpureg") == checkout / "kernels"
    with pytest.raises(FileNotFoundError, match="voxel_math.cuh"):
        cuda_loader._find_kernel_dir(tmp_path / "nowhere" / "gpureg")


def test_kernel_source_has_line_directive_and_header_digest():
    src = cuda_loader.kernel_source("affine.cu")
    lines = src.splitlines()
    assert lines[1] == '#line 1 "kernels/affine.cu"'
    assert lines[2:] == (KERNELS / "affine.cu").read_text().splitlines()
    assert lines[0].startswith("// gpureg headers ")
    with pytest.raises(FileNotFoundError, match="nope.cu"):
        cuda_loader.kernel_source("nope.cu")


def _nvrtc():
    candidates = [os.environ.get("GPUREG_NVRTC", "")]
    for root in sys.path:
        candidates += glob.glob(os.path.join(root, "nvidia", "cu1*", "lib", "libnvrtc.so*"))
        candidates += glob.glob(os.path.join(root, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    candidates += glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*")
    candidates.append(ctypes.util.find_library("nvrtc") or "")
    for path in candidates:
        if path and "builtins" not in path and "alt" not in os.path.basename(path):
            try:
                # libnvrtc dlopens its builtins by soname: load them first from the same folder.
                for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
                    if ".alt." not in builtins:
                        ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_nvrtc_compiles_what_cupy_gets(source, arch):
    lib = _nvrtc()
    if lib is None:
        pytest.skip("libnvrtc not found (install nvidia-cuda-nvrtc or set GPUREG_NVRTC)")
    code = cuda_loader.kernel_source(source).encode()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), code, f"{source}".encode(), 0, None, None) == 0
    try:
        names = cuda_loader.KERNEL_FILES[source]
        for name in names:
            assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0, name
        # The options CuPy adds for NVRTC (cupy/cuda/compiler.py) after ours.
        options = [*cuda_loader.compile_options(), f"-arch={arch}", "--device-as-default-execution-space", "-ftz=true"]
        argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        status = lib.nvrtcCompileProgram(prog, len(options), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert status == 0, log.value.decode(errors="replace")
        for name in names:
            lowered = ctypes.c_char_p()
            assert lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)) == 0, name
            assert lowered.value
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))



# --- the kernels under a CPU emulation of CUDA threads ---------------------------------------

EMULATOR = r"""// CPU emulation of the CUDA thread model, enough to run gpureg's kernels
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

inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;  // fibers never interleave inside a call
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

static dim3 d3(const int* v) { return dim3{(unsigned)v[0], (unsigned)v[1], (unsigned)v[2]}; }

extern "C" {

// Each returns 0, or 1 when a warp intrinsic was misused or the threads deadlocked.
int e_mse(const float* fixed, const float* moving, const float* maskf, const bool* maskb, int nz, int ny, int nx,
          int mz, int my, int mx, const float* a, int hessian, int blocks, int threads, double* out) {
  std::vector<double> partials(32 * 6 * blocks, -1.0);
  const dim3 g{(unsigned)blocks, 1, 1}, b{(unsigned)threads, 1, 1};
  emu::misuse = false;
#define ARGS nz, ny, nx, mz, my, mx, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], \
             a[12], a[13], a[14], partials.data()
  if (maskb) {
    if (hessian) emu::launch(mse_terms_pass<true, bool>, g, b, fixed, moving, maskb, ARGS);
    else emu::launch(mse_terms_pass<false, bool>, g, b, fixed, moving, maskb, ARGS);
  } else {
    if (hessian) emu::launch(mse_terms_pass<true, float>, g, b, fixed, moving, maskf, ARGS);
    else emu::launch(mse_terms_pass<false, float>, g, b, fixed, moving, maskf, ARGS);
  }
#undef ARGS
  emu::launch(reduce_partials, dim3{32 * 6, 1, 1}, b, (const double*)partials.data(), blocks, out);
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
            unsigned* hist, int blocks, int threads) {
  emu::misuse = false;
  emu::launch(radix_histogram, dim3{(unsigned)blocks, 1, 1}, dim3{(unsigned)threads, 1, 1}, v, n, prefix,
              prefix_mask, shift, bin_mask, hist);
  return emu::misuse ? 1 : 0;
}

}  // extern "C"
"""

F32 = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
F64 = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
I32 = np.ctypeslib.ndpointer(np.int32, flags="C_CONTIGUOUS")
U32 = np.ctypeslib.ndpointer(np.uint32, flags="C_CONTIGUOUS")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    tmp = tmp_path_factory.mktemp("emulator")
    src, so = tmp / "emulator.cpp", tmp / "emulator.so"
    src.write_text(EMULATOR)
    cmd = [gxx, "-std=c++20", "-O1", "-Wall", "-Wno-unknown-pragmas", "-shared", "-fPIC", "-I", str(KERNELS),
           "-o", str(so), str(src)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lib = ctypes.CDLL(str(so))
    i, f = ctypes.c_int, ctypes.c_float
    lib.e_mse.argtypes = [F32, F32, ctypes.c_void_p, ctypes.c_void_p, i, i, i, i, i, i, F32, i, i, i, F64]
    lib.e_resample.argtypes = [F32, i, i, i, F32, i, i, i, F32, f, I32, I32]
    lib.e_downsample2.argtypes = [F32, i, i, F32, i, i, i, I32, I32]
    lib.e_moments.argtypes = [F32, i, i, i, f, i, i, F64]
    lib.e_radix.argtypes = [F32, ctypes.c_longlong, ctypes.c_uint, ctypes.c_uint, i, ctypes.c_uint, U32, i, i]
    return lib


def _emulated_mse(emu, fixed, moving, matrix, center, mask, hessian, blocks):
    aff = np.array(cuda.affine_args(matrix, center), np.float32)
    maskf = maskb = None
    if mask is not None:
        mask = np.ascontiguousarray(mask)
        if mask.dtype == np.bool_:
            maskb = mask.ctypes.data
        else:
            maskf = mask.ctypes.data
    out = np.empty(cuda.N_TERMS * cuda.N_MONOMIALS)
    assert emu.e_mse(fixed, moving, maskf, maskb, *fixed.shape, *moving.shape, aff, int(hessian), blocks,
                     cuda_loader.THREADS, out) == 0
    return cuda.unpack_terms(out.reshape(cuda.N_TERMS, cuda.N_MONOMIALS), hessian)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_emulated_fused_pass_matches_cpu(emu, mask_kind):
    shape = (8, 8, 45)  # rows longer than a warp, a partial last pass of lanes
    c = tf.grid_center(shape)
    truth = tf.rotation_matrix(6.0, (1.0, 0.3, 0.2), c)
    truth[:3, 3] += (0.7, -1.2, 2.0)  # part of the grid samples outside the moving volume
    fixed = two_particle_phantom(shape, seed=1)
    moving = two_particle_phantom((9, 10, 40), truth, seed=1)
    mask = None
    if mask_kind is not None:
        mask = np.random.default_rng(0).random(shape) > 0.25
        if mask_kind == "float":
            mask = mask.astype(np.float32)
    cpu = metric.mse_terms(fixed, moving, truth, center=c, mask=None if mask is None else mask > 0.5)
    rows = shape[0] * shape[1]
    # 3 blocks: each warp walks several rows (grid-stride); rows / 8: one row per warp, as on a big GPU
    runs = [(3, True), (-(-rows // 8), True), (3, False)] if mask_kind is None else [(3, True)]
    for blocks, hessian in runs:
        gpu = _emulated_mse(emu, fixed, moving, truth, c, mask, hessian, blocks)
        assert gpu.count == cpu.count and cpu.count > 1000
        np.testing.assert_allclose(gpu.sse, cpu.sse, rtol=2e-6)
        np.testing.assert_allclose(gpu.rj, cpu.rj, rtol=0, atol=2e-6 * np.abs(cpu.rj).max())
        if hessian:
            np.testing.assert_allclose(gpu.jtj, cpu.jtj, rtol=0, atol=2e-6 * np.abs(cpu.jtj).max())
        else:
            assert gpu.jtj is None


def test_emulated_resampling_matches_scipy(emu):
    vol = two_particle_phantom((14, 18, 21), seed=2)
    out_shape = (12, 19, 37)
    matrix = tf.rotation_matrix(8.0, (0.4, 1.0, 0.1), tf.grid_center(out_shape))
    matrix[:3, 3] += (1.0, -2.0, -6.5)
    out = np.full(out_shape, np.nan, np.float32)
    grid = np.array(cuda._grid_3d(out_shape), np.int32)
    assert emu.e_resample(vol, *vol.shape, out, *out_shape,
                          np.array(cuda.affine_args(matrix, tf.grid_center(out_shape)), np.float32), -1.0, grid,
                          np.array(cuda._BLOCK_3D, np.int32)) == 0
    ref = ndimage.affine_transform(vol.astype(np.float64), matrix[:3, :3], offset=matrix[:3, 3],
                                   output_shape=out_shape, order=1, mode="constant", cval=-1.0)
    q = np.stack(np.indices(out_shape), -1).reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]
    n = np.asarray(vol.shape)
    near_face = np.any((np.abs(q) < 1e-4) | (np.abs(q - (n - 1)) < 1e-4), axis=1).reshape(out_shape)
    assert 0 < (ref == -1.0).sum() < ref.size
    np.testing.assert_allclose(out[~near_face], ref[~near_face], rtol=0, atol=2e-6)  # every voxel written


def test_emulated_downsample_matches_numpy(emu):
    v = np.random.default_rng(3).random((9, 19, 70)).astype(np.float32)
    shape = tuple(n // 2 for n in v.shape)
    out = np.full(shape, np.nan, np.float32)
    assert emu.e_downsample2(v, v.shape[1], v.shape[2], out, *shape, np.array(cuda._grid_3d(shape), np.int32),
                             np.array(cuda._BLOCK_3D, np.int32)) == 0
    np.testing.assert_allclose(out, reg.downsample2(v), rtol=0, atol=3e-7)


@pytest.mark.parametrize("data", ["phantom", "even"])
def test_emulated_median_and_center_of_mass(emu, data):
    rng = np.random.default_rng(4)
    v = (two_particle_phantom((12, 14, 40), seed=4) if data == "phantom"
         else (rng.random((8, 9, 34)) - 0.5).astype(np.float32))
    flat = v.ravel()
    hist = np.zeros(2048, np.uint32)

    def histogram(prefix, prefix_mask, shift, bits):
        hist[:] = 0
        assert emu.e_radix(flat, flat.size, prefix, prefix_mask, shift, (1 << bits) - 1, hist, 3,
                           cuda_loader.THREADS) == 0
        return hist[: 1 << bits].astype(np.int64)

    med = cuda.median_from_histograms(histogram, flat.size)
    assert med == np.median(v)
    moments = np.empty(4)
    assert emu.e_moments(v, *v.shape, med, 2, cuda_loader.THREADS, moments) == 0
    np.testing.assert_allclose(moments[1:] / moments[0], reg.center_of_mass(v), rtol=0, atol=1e-5)
