"""Kernel constants are defined once (gpureg/core/kernel_layout.py, gpureg/core/solver.py) and reach the kernels.

The kernels get them as ``-D`` options (NVRTC through the loader, nvcc and g++ in the tests);
here: every macro is used and none is defined again in C, no kernel names a ``GPUREG_`` macro
that nobody defines, the Levenberg-Marquardt literals are gone from the kernel, each Python
constant has exactly one literal definition in the package, and a kernel header compiled
without the options stops with a message saying what to pass.
"""

import ast
import functools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cxx import KERNELS
from gpureg.core import kernel_layout

PACKAGE = Path(kernel_layout.__file__).resolve().parents[1]
# The hand-written sources; kernel_layout.cuh is generated from kernel_layout.py (checked below).
SOURCES = {p.name: p.read_text() for p in sorted(KERNELS.glob("*.cu*")) if p.name != kernel_layout.HEADER}
# Macros the kernels define for themselves (parameter lists, host/device qualifiers) and the
# compile variant switches the loader sets.
OWN = {m for text in SOURCES.values() for m in re.findall(r"#define\s+(GPUREG_\w+)", text)}
VARIANTS = {"GPUREG_WIDE_INDEX"}


def _code(text):
    """C source without comments."""
    return re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)


def test_every_define_is_used_and_defined_nowhere_else():
    code = "\n".join(_code(t) for t in SOURCES.values())
    for name in kernel_layout.defines():
        assert re.search(rf"\b{name}\b", code), f"{name} is passed to the kernels but never used"
        assert name not in OWN, f"{name} is defined again in the kernel sources"
    used = set(re.findall(r"\bGPUREG_[A-Z0-9_]+\b", code))
    unknown = used - set(kernel_layout.defines()) - OWN - VARIANTS
    assert not unknown, f"kernel macros nobody defines: {sorted(unknown)}"


def test_no_solver_literal_left_in_the_kernel():
    code = _code(SOURCES["lm_step.cuh"])
    for literal in ("1e-7", "1e8", "1e-12", "3.0", "4.0", "10.0", "= 192", "= 184"):
        assert literal not in code, f"lm_step.cuh types {literal!r} instead of using kernel_layout"


@functools.lru_cache(maxsize=1)
def _literal_definitions():
    """``{name: [module, ...]}`` of module-level assignments of a literal (or literal tuple) in gpureg."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.Assign):
                continue
            try:
                ast.literal_eval(node.value)
            except ValueError:
                continue
            for target in node.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                for n in names:
                    if isinstance(n, ast.Name):
                        found.setdefault(n.id.lstrip("_"), []).append(path.relative_to(PACKAGE).as_posix())
    return found


@pytest.mark.parametrize("name, home", [
    ("THREADS", "core/kernel_layout.py"), ("MSE_MIN_BLOCKS", "core/kernel_layout.py"),
    ("MSE_STATE_MIN_BLOCKS_WIDE", "core/kernel_layout.py"), ("WIDE_INDEX", "core/cuda_loader.py"),
    ("N_TERMS", "core/kernel_layout.py"), ("N_MONOMIALS", "core/kernel_layout.py"),
    ("SUMS", "core/kernel_layout.py"), ("STATE", "core/kernel_layout.py"), ("STATUS", "core/kernel_layout.py"),
    ("LAM_MIN", "core/solver.py"), ("LAM_MAX", "core/solver.py"), ("LAM_DOWN", "core/solver.py"),
    ("LAM_UP", "core/solver.py"), ("LAM_SINGULAR", "core/solver.py"), ("REJECT_FACTOR", "core/solver.py"),
    ("DIAG_FLOOR", "core/solver.py")])
def test_each_kernel_constant_has_one_python_definition(name, home):
    assert _literal_definitions().get(name) == [home]


def test_generated_header_equals_the_python_definitions_and_compiles_alone(tmp_path):
    """kernels/kernel_layout.cuh is kernel_layout.header_text() (regenerate it when this fails); the kernels
    compile with it alone (a plain nvcc/g++ call) and with the loader's identical -D options."""
    assert (KERNELS / kernel_layout.HEADER).read_text() == kernel_layout.header_text()
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    src = tmp_path / "t.cpp"
    src.write_text('#include "lm_step.cuh"\n')
    flags = kernel_layout.define_flags()
    for extra in ((), flags):
        out = subprocess.run([gxx, "-std=c++17", "-fsyntax-only", "-Werror", "-I", str(KERNELS), *extra, str(src)],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    assert "-DGPUREG_LM_LAM_MIN=1e-07" in flags and "-DGPUREG_LM_SIZE=192" in flags
    assert "#define GPUREG_LM_LAM_MIN 1e-07" in kernel_layout.header_text()
