"""NVRTC without a GPU: find libnvrtc builds, compile gpureg's kernels exactly as CuPy does, read ptxas's report.

Each library is loaded in its own subprocess (``python tests/nvrtc.py LIB``): builds of
the same major version share a soname and could not be loaded side by side. Libraries
searched: the ``nvidia-cuda-nvrtc`` wheel on ``sys.path`` (the ``test`` extra), the file in
``$GPUREG_NVRTC``, every ``libnvrtc.so*`` under the folders of ``$GPUREG_NVRTC_DIRS``
(``os.pathsep``-separated; e.g. other wheel versions installed with
``pip install --no-deps --target DIR nvidia-cuda-nvrtc==13.0.88``), and CUDA toolkits in
``/usr/local/cuda*``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Targets: each arch, and the variant with 64-bit voxel indices for sm_90.
ARCHS = ("sm_90", "sm_80", "sm_90+wide")
# The options CuPy adds for NVRTC (cupy/cuda/compiler.py) after gpureg's, and ptxas's report.
CUPY_OPTIONS = ("--device-as-default-execution-space", "-ftz=true")
REPORT = "--ptxas-options=-v"


def libraries() -> dict:
    """``{label: path}`` of the libnvrtc builds found (label: the version where it can be read)."""
    candidates = [os.environ.get("GPUREG_NVRTC", "")]
    roots = [*sys.path, *[d for d in os.environ.get("GPUREG_NVRTC_DIRS", "").split(os.pathsep) if d]]
    for root in roots:
        for sub in ("cu1*", "cuda_nvrtc"):
            candidates += glob.glob(os.path.join(root, "nvidia", sub, "lib", "libnvrtc.so*"))
    candidates += glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*")
    candidates.append(ctypes.util.find_library("nvrtc") or "")
    found = {}
    for path in candidates:
        name = os.path.basename(path)
        if not path or not os.path.isfile(path) or "builtins" in name or ".alt." in name:
            continue
        real = os.path.realpath(path)
        if real not in found.values():
            found.setdefault(_label(real), real)
    return found


def _label(path: str) -> str:
    """The wheel's version (its dist-info beside ``nvidia/``), else the builtins' version suffix."""
    lib = Path(path).parent
    for info in lib.parents[2].glob("nvidia_cuda_nvrtc*.dist-info") if len(lib.parents) > 2 else ():
        return info.name.removesuffix(".dist-info").split("-")[1]
    for builtins in sorted(lib.glob("libnvrtc-builtins.so.*")):
        return builtins.name.split(".so.")[1]
    return path


def compile_all(lib_path: str, sources=None, archs=ARCHS, extra=None) -> dict:
    """Compile ``kernels/*.cu`` (or ``extra``: ``{name: (source text, name expressions)}``) with one libnvrtc.

    Returns ``{"version": "13.5", "results": {source: {arch: {"status", "log", "lowered"}}}}``
    from a subprocess.
    """
    job = {"lib": lib_path, "sources": sources, "archs": list(archs), "extra": extra}
    out = subprocess.run([sys.executable, __file__], input=json.dumps(job), capture_output=True, text=True,
                         cwd=ROOT, timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(ROOT), os.environ.get("PYTHONPATH", "")])})
    if out.returncode != 0:
        raise RuntimeError(f"nvrtc subprocess failed for {lib_path}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def ptxas_report(log: str) -> dict:
    """``{function: {"registers", "stack", "spill_stores", "spill_loads"}}`` from ptxas's ``-v`` output."""
    report, current = {}, None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            current = m.group(1)
            report.setdefault(current, {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            report[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            report[current]["registers"] = int(m.group(1))
    return report


def spills(log: str) -> dict:
    """Functions of a ptxas ``-v`` log that spill registers: ``{function: (stores, loads)}``."""
    return {f: (r["spill_stores"], r["spill_loads"]) for f, r in ptxas_report(log).items()
            if r.get("spill_stores", 0) or r.get("spill_loads", 0)}


def _run(job: dict) -> dict:
    """In the subprocess: load one libnvrtc and compile every requested source for every arch."""
    from gpureg.core import cuda_loader

    lib_path = job["lib"]
    folder = os.path.dirname(lib_path)
    # libnvrtc dlopens its builtins by soname: load them first from the same folder.
    for builtins in glob.glob(os.path.join(folder, "libnvrtc-builtins.so*")):
        if ".alt." not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(lib_path)
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    results = {}
    for source in job["extra"] or job.get("sources") or cuda_loader.KERNEL_FILES:
        for arch in job["archs"]:  # "sm_90", or "sm_90+wide": the 64-bit index variant
            target, _, variant = arch.partition("+")
            if job["extra"]:
                (text, names), options = job["extra"][source], []
            else:
                text, names = cuda_loader.kernel_source(source), cuda_loader.KERNEL_FILES[source]
                options = list(cuda_loader.compile_options(wide=variant == "wide"))
            results.setdefault(source, {})[arch] = _compile(lib, text, source, names,
                                                            [*options, f"-arch={target}", *CUPY_OPTIONS, REPORT])
    return {"version": f"{major.value}.{minor.value}", "results": results}


def _compile(lib, text: str, source: str, names, options) -> dict:
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), source.encode(), 0, None, None) == 0
    try:
        for name in names:
            assert lib.nvrtcAddNameExpression(prog, name.encode()) == 0, name
        argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        status = lib.nvrtcCompileProgram(prog, len(options), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        lowered = {}
        if status == 0:
            for name in names:
                out = ctypes.c_char_p()
                if lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)) == 0 and out.value:
                    lowered[name] = out.value.decode()
        return {"status": int(status), "log": log.value.decode(errors="replace"), "lowered": lowered}
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


if __name__ == "__main__":
    print(json.dumps(_run(json.loads(sys.stdin.read()))))
