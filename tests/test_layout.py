"""The package layout rules (issue 11), checked on every CI run.

- the import-linter contracts in pyproject.toml (layers point down; no cycles
  between sibling modules, function-level imports included);
- no module under ``gpureg/`` is over 500 lines;
- no module imports another module's ``_private`` name;
- ``import gpureg`` stays light (no CuPy, matplotlib, astra, dask, typer).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gpureg"
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (it is in the test extra)")
    out = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_small(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= 500, f"{path.relative_to(ROOT)} has {n} lines (limit 500): split it by what it does"


def _private_imports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("gpureg")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield f"line {node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}"


def test_no_module_imports_another_modules_private_names():
    bad = [f"{p.relative_to(ROOT)} {line}" for p in MODULES for line in _private_imports(p)]
    assert not bad, "imports of private names:\n" + "\n".join(bad)


def test_import_gpureg_is_light():
    code = ("import sys, gpureg; heavy = [m for m in ('cupy', 'matplotlib', 'astra', 'dask', 'typer', 'numba') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"import gpureg pulled in: {out.stdout.strip()}"


def test_every_subpackage_is_in_the_wheel():
    # setuptools gets an explicit package list (gpureg.kernels comes from kernels/): a subpackage missing
    # there installs without it, and `pip install .` then fails on import while a source checkout works.
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"


def test_siblings_are_declared_independent():
    """synth/figures and pipeline/validate/viewer do not import each other: the contract says so (issue 23)."""
    tomllib = pytest.importorskip("tomllib")

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    assert "gpureg.figures | gpureg.synth" in layers
    assert "gpureg.pipeline | gpureg.validate | gpureg.viewer" in layers


def test_public_api_one_name_per_object_and_no_shadowing():
    """``dir(gpureg)`` lists each public object once (declared in ``__init__.pyi``, loaded lazily); no function
    hides a submodule of the same name; the subpackages do not re-export each other's objects."""
    import importlib
    import types
    import warnings

    import gpureg

    names = dir(gpureg)
    assert len(names) == len(set(names)) and set(names) == set(gpureg.__all__)
    objects = {}
    for name in names:
        obj = getattr(gpureg, name)
        if not isinstance(obj, str):  # __version__
            assert id(obj) not in objects, f"gpureg.{name} is gpureg.{objects.get(id(obj))}"
            objects[id(obj)] = name
    subs = ["core", "io", "io.results", "recon", "register", "xanes", "figures", "synth", "pipeline", "validate",
            "viewer"]
    owner = {}
    for sub in subs:
        mod = importlib.import_module(f"gpureg.{sub}")
        for name in mod.__all__:
            obj = getattr(mod, name)
            assert not isinstance(obj, types.ModuleType) or obj.__name__ == f"gpureg.{sub}.{name}"
            if callable(obj) or isinstance(obj, type):
                assert id(obj) not in owner, f"gpureg.{sub}.{name} is also gpureg.{owner.get(id(obj))}"
                owner[id(obj)] = f"{sub}.{name}"
    assert isinstance(gpureg.pipeline.watch, types.ModuleType)  # the module; the function is watch_folder
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DeprecationWarning, match="flatfield_correct"):
            gpureg.normalize  # noqa: B018 - the deprecated name of the flat-field correction
