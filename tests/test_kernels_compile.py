"""The CUDA kernels compile without a GPU: nvcc --cubin for sm_90 and sm_80, and NVRTC as CuPy calls it.

A broken kernel is caught on every CI run even though CI has no GPU. The
NVRTC check compiles exactly the source text, options and name expressions
that :mod:`gpureg.cuda` hands to ``cupy.RawModule`` (it needs libnvrtc, e.g.
from the ``nvidia-cuda-nvrtc`` wheel; skipped without it).
"""

import ctypes
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpureg import cuda

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
SOURCES = sorted(p.name for p in KERNELS.glob("*.cu"))
ARCHS = ("sm_90", "sm_80")
NVCC = shutil.which("nvcc")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")


def test_every_source_is_loaded_by_gpureg_cuda():
    # A .cu file that gpureg.cuda does not know would never be compiled at run time.
    assert SOURCES and set(SOURCES) == set(cuda.KERNEL_FILES)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_nvcc_cubin(source, arch, tmp_path):
    _nvcc(source, arch, tmp_path)


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_no_register_spills(source, arch, tmp_path):
    # Spilled accumulators would live in local memory and slow the memory-bound
    # passes; the launch bounds in the sources are chosen so that ptxas needs none.
    _nvcc(source, arch, tmp_path, "-Xptxas", "-warn-spills", "-Werror", "all-warnings")


def test_import_needs_no_cupy():
    code = "import sys, gpureg.cuda; print('cupy' in sys.modules)"
    env = dict(os.environ, GPUREG_DISABLE_GPU="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=KERNELS.parent, check=True)
    assert out.stdout.strip() == "False"


def test_kernel_dir_finds_checkout_and_wheel_layouts(tmp_path):
    assert cuda.kernel_dir() == KERNELS
    # Installed wheel: gpureg/kernels/*.cuh beside gpureg/cuda.py.
    wheel = tmp_path / "site" / "gpureg"
    (wheel / "kernels").mkdir(parents=True)
    (wheel / "kernels" / "voxel_math.cuh").write_text("")
    assert cuda._find_kernel_dir(wheel) == wheel / "kernels"
    # Source checkout: kernels/ beside gpureg/.
    checkout = tmp_path / "src"
    (checkout / "gpureg").mkdir(parents=True)
    (checkout / "kernels").mkdir()
    (checkout / "kernels" / "voxel_math.cuh").write_text("")
    assert cuda._find_kernel_dir(checkout / "gpureg") == checkout / "kernels"
    with pytest.raises(FileNotFoundError, match="voxel_math.cuh"):
        cuda._find_kernel_dir(tmp_path / "nowhere" / "gpureg")


def test_kernel_source_has_line_directive_and_header_digest():
    src = cuda.kernel_source("affine.cu")
    lines = src.splitlines()
    assert lines[1] == '#line 1 "kernels/affine.cu"'
    assert lines[2:] == (KERNELS / "affine.cu").read_text().splitlines()
    assert lines[0].startswith("// gpureg headers ")
    with pytest.raises(FileNotFoundError, match="nope.cu"):
        cuda.kernel_source("nope.cu")


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
    code = cuda.kernel_source(source).encode()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), code, f"{source}".encode(), 0, None, None) == 0
    try:
        names = cuda.KERNEL_FILES[source]
        for name in names:
            assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0, name
        # The options CuPy adds for NVRTC (cupy/cuda/compiler.py) after ours.
        options = [*cuda.compile_options(), f"-arch={arch}", "--device-as-default-execution-space", "-ftz=true"]
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


def _nvcc(source, arch, tmp_path, *extra):
    cmd = [NVCC, "-std=c++17", f"-arch={arch}", "--cubin", "-I", str(KERNELS), "-o",
           str(tmp_path / (Path(source).stem + f".{arch}.cubin")), str(KERNELS / source), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr}"
