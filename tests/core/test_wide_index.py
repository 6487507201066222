"""The kernels' 64-bit index build on a volume of more than 2^31 voxels, without a GPU or 8 GiB of memory.

The per-voxel functions of ``kernels/voxel_math.cuh`` (the ones every kernel indexes volumes
with) are compiled with g++ in the loader's wide variant (``cuda_loader.WIDE_INDEX``) and run
on a sparse memory-mapped file of 1024 x 1024 x 2049 float32 (2^31 + 1M voxels, 8 GiB
of which a few pages are written): sampling, the 2x block mean and one row of the fused pass
past voxel 2^31 must read what was written there. With 32-bit indices these offsets wrap
negative. Run in a subprocess, so that a regression crashes it and not the test session.
The launch scaffolding of the wide build is compared with the NumPy path at small sizes by
the emulation tests of test_kernels_compile.py (both builds).
"""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cxx import build_shared
from gpureg.core import cuda, cuda_loader

HARNESS = r"""
#include "voxel_math.cuh"
using namespace gpureg;
extern "C" {
float h_sample(const float* v, int nz, int ny, int nx, int z, int y, int x, float uz, float uy, float ux) {
  float value, g[3];
  return sample<false>(v, nz, ny, nx, z, y, x, uz, uy, ux, value, g) ? value : -1.0f;
}
float h_box(const float* v, int ny, int nx, int z, int y, int x) { return box_mean8(v, ny, nx, z, y, x); }
void h_row(const float* f, const float* m, int nz, int ny, int nx, int z, int y, double* out) {
  Affine a = {{0, 0, 0, 0, 0, 0, 0, 0, 0}, {0, 0, 0}, {0.5f * (nz - 1), 0.5f * (ny - 1), 0.5f * (nx - 1)}};
  float t[kTerms] = {0};
  for (int lane = 0; lane < 32; ++lane) mse_row_lane<false>(f, m, (const float*)nullptr, ny, nx, nz, ny, nx, a, z, y, lane, 32, t);
  out[0] = t[kSSE];
  out[1] = t[kCount];
  out[2] = index_t(1) << 40 > 0 ? sizeof(index_t) : 0;
}
}
"""

SHAPE = (1024, 1024, 2049)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    lib = build_shared(tmp_path_factory, "wide_harness", HARNESS, ("-std=c++17", "-O1", cuda_loader.WIDE_INDEX))
    return lib._name


def test_wide_build_reads_past_two_to_the_31(harness, tmp_path):
    assert np.prod(SHAPE) > cuda._MAX_ELEMENTS and cuda.wide_index(SHAPE) and not cuda.wide_index((1024, 1024, 2047))
    big = tmp_path / "big.f32"
    with open(big, "wb") as fh:
        fh.truncate(int(np.prod(SHAPE)) * 4)  # sparse: nothing is stored until written
    script = textwrap.dedent(f'''
        import ctypes, numpy as np
        lib = ctypes.CDLL({harness!r})
        f, i, d = ctypes.c_float, ctypes.c_int, ctypes.c_double
        lib.h_sample.restype = lib.h_box.restype = f
        lib.h_sample.argtypes = [ctypes.c_void_p, i, i, i, i, i, i, f, f, f]
        lib.h_box.argtypes = [ctypes.c_void_p, i, i, i, i, i]
        lib.h_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, i, i, i, i, i, ctypes.POINTER(d)]
        nz, ny, nx = {SHAPE}
        v = np.memmap({str(big)!r}, dtype=np.float32, mode="r+", shape=(nz, ny, nx))
        v[-2:, -2:, :] = np.arange(2 * 2 * nx, dtype=np.float32).reshape(2, 2, nx) / nx  # past voxel 2^31
        v.flush()
        p = v.ctypes.data
        out = [lib.h_sample(p, nz, ny, nx, nz - 1, ny - 1, nx - 2, 0.0, 0.0, 0.5),
               lib.h_box(p, ny, nx, nz // 2 - 1, ny // 2 - 1, nx // 2 - 1)]
        row = (d * 3)()
        lib.h_row(p, p, nz, ny, nx, nz - 1, ny - 1, row)
        print(repr(out + list(row)))
    ''')
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    sample, box, sse, count, index_bytes = eval(res.stdout.strip())
    v = np.arange(4 * SHAPE[2], dtype=np.float32).reshape(2, 2, SHAPE[2]) / SHAPE[2]
    # trilinear at x = nx - 1.5 on the last row: the mean of its last two voxels (float32 arithmetic)
    assert sample == pytest.approx(float(v[1, 1, -2:].mean()), rel=1e-6)
    assert box == pytest.approx(float(v[:, :, -3:-1].mean()), rel=1e-6)  # block (z, y) = last 2, x = nx-3..nx-2
    assert index_bytes == 8
    # moving == fixed on the last row: every voxel valid, r = 0 up to the float32 rounding of a + 1 (b - a)
    # at the grid's last plane and row (f = 1 there)
    assert count == SHAPE[2] and sse < 1e-9
