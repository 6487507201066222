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

from gpureg.core import cuda, cuda_loader, metric
from gpureg.core.kernel_layout import define_flags
from gpureg import register as reg
from gpureg.core import transform as tf
from gpureg.synth.phantom import two_particle_phantom
import cuda_emu
import nvrtc
from cxx import KERNELS
from known_transforms import assert_resampled_like_scipy

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
    cmd = [NVCC, "-std=c++17", f"-arch={arch}", "--cubin", "-I", str(KERNELS), *define_flags(), "-Xptxas",
           "-warn-spills", "-o",
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


NVRTC_LIBS = nvrtc.libraries()


@pytest.fixture(scope="module", params=sorted(NVRTC_LIBS) or [None])
def nvrtc_build(request):
    """Every kernel source compiled for every arch by one libnvrtc build (one subprocess per build)."""
    if request.param is None:
        pytest.skip("libnvrtc not found (install nvidia-cuda-nvrtc, or set GPUREG_NVRTC / GPUREG_NVRTC_DIRS)")
    return nvrtc.compile_all(NVRTC_LIBS[request.param])


@pytest.mark.parametrize("arch", nvrtc.ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_nvrtc_compiles_what_cupy_gets(nvrtc_build, source, arch):
    # Exactly the source text, options and name expressions that gpureg.core.cuda_loader hands to
    # cupy.RawModule, plus the options CuPy adds (tests/nvrtc.py), for every NVRTC build found.
    res = nvrtc_build["results"][source][arch]
    assert res["status"] == 0, res["log"]
    assert set(res["lowered"]) == set(cuda_loader.KERNEL_FILES[source]), res["lowered"]


@pytest.mark.parametrize("arch", nvrtc.ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_nvrtc_kernels_do_not_spill(nvrtc_build, source, arch):
    # ptxas's report (--ptxas-options=-v) of what CuPy builds at run time: the launch bounds must
    # leave every kernel without spills under each NVRTC version, not only under CI's nvcc
    # (NVRTC 13.5 spilled 64 B in mse_terms_state_pass while nvcc 13.0 did not).
    res = nvrtc_build["results"][source][arch]
    assert res["status"] == 0, res["log"]
    report = nvrtc.ptxas_report(res["log"])
    assert set(res["lowered"].values()) <= set(report), (sorted(report), res["lowered"])
    by_name = {v: k for k, v in res["lowered"].items()}
    spilled = {by_name.get(f, f): s for f, s in nvrtc.spills(res["log"]).items()}
    assert not spilled, f"NVRTC {nvrtc_build['version']} {arch}: spills (stores, loads) in {spilled}"


SPILLING = r"""
extern "C" __global__ void __launch_bounds__(1024, 2) spill(const float* in, float* out, int n) {
  float v[96];
#pragma unroll
  for (int k = 0; k < 96; ++k) v[k] = in[threadIdx.x + k * n];
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < 96; ++k) s += v[k] * v[(k * 7) % 96];
#pragma unroll
  for (int k = 0; k < 96; ++k) out[threadIdx.x + k * n] = v[95 - k] * s;
}
"""


def test_nvrtc_spill_check_catches_a_spilling_kernel():
    # The check above can fail: 96 live floats under a 32-register cap must be reported.
    if not NVRTC_LIBS:
        pytest.skip("libnvrtc not found")
    label = max(NVRTC_LIBS)
    res = nvrtc.compile_all(NVRTC_LIBS[label], archs=("sm_90",),
                            extra={"spill.cu": (SPILLING, ["spill"])})["results"]["spill.cu"]["sm_90"]
    assert res["status"] == 0, res["log"]
    assert "spill" in nvrtc.spills(res["log"]), res["log"]


# --- the kernels under a CPU emulation of CUDA threads ---------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["int32", "int64"])
def emu(tmp_path_factory, request):
    # Both builds of the kernels: 32-bit voxel indices, and the 64-bit variant the loader
    # compiles for volumes over 2^31 - 1 voxels (same results at every size).
    return cuda_emu.build(tmp_path_factory, wide=request.param)


def _emulated_mse(emu, fixed, moving, matrix, center, mask, hessian, blocks):
    return cuda_emu.emulated_mse(emu, fixed, moving, matrix, center, mask, hessian, blocks)


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
    assert_resampled_like_scipy(out, vol, matrix, out_shape, -1.0, 2e-6)  # every voxel written


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
    hist = np.zeros(2048, np.uint64 if emu.wide else np.uint32)

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
