"""Build a host-compilable kernel header (with a C harness) into a shared library for ctypes."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from gpureg.core.kernel_layout import define_flags

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def build_shared(tmp_path_factory, name: str, source: str, flags) -> ctypes.CDLL:
    """g++ ``source`` (``-I kernels/``, the kernels' ``-D`` constants) with ``flags`` into ``name``.so; skips without g++."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    tmp = tmp_path_factory.mktemp(name)
    src, so = tmp / f"{name}.cpp", tmp / f"{name}.so"
    src.write_text(source)
    out = subprocess.run([gxx, *flags, *define_flags(), "-shared", "-fPIC", "-I", str(KERNELS), "-o", str(so), str(src)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"{name}: the sources must compile as plain C++:\n{out.stderr}"
    return ctypes.CDLL(str(so))
