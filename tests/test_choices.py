"""Each choice is defined once, in the lowest layer that uses it; everything above derives from it.

The CLI/pipeline enums of :mod:`gpureg.pipeline.options` are built from the tuples below (so they
cannot drift), and an AST scan of the package finds each tuple's literal exactly once: a second
``("auto", "cpu", "gpu")`` or a hand-typed ``class Model(Enum)`` elsewhere fails here.
"""

import ast
from pathlib import Path

import pytest

import gpureg
from gpureg.core.backend import DEVICES, HARDWARE
from gpureg.core.config import CPU_BACKENDS, SOLVERS
from gpureg.core.segment import DENOISE
from gpureg.io.base import DEGREES, RADIANS
from gpureg.io.results import GREY_STACKS
from gpureg.pipeline import options
from gpureg.recon.fbp import FILTERS
from gpureg.register.affine import MODELS
from gpureg.register.particle_options import PARTICLE_MODELS
from gpureg.xanes.edge import METHODS

ROOT = Path(gpureg.__file__).resolve().parent
CHOICES = {"DEVICES": DEVICES, "HARDWARE": HARDWARE, "CPU_BACKENDS": CPU_BACKENDS, "SOLVERS": SOLVERS,
           "DENOISE": DENOISE, "FILTERS": FILTERS, "MODELS": MODELS, "PARTICLE_MODELS": PARTICLE_MODELS,
           "METHODS": METHODS, "GREY_STACKS": GREY_STACKS, "RADIANS": RADIANS, "DEGREES": DEGREES}
ENUMS = [(options.Device, DEVICES), (options.Model, MODELS), (options.Denoise, DENOISE),
         (options.EdgeMethod, METHODS), (options.FBPFilter, FILTERS)]


def test_keepable_stacks_are_the_result_layouts():
    assert options.KEEPABLE is GREY_STACKS


@pytest.mark.parametrize("enum, values", ENUMS, ids=[e.__name__ for e, _ in ENUMS])
def test_pipeline_enums_are_the_lower_layers_tuples(enum, values):
    assert [m.value for m in enum] == [v for v in values if v is not None]
    assert all(isinstance(m, str) for m in enum)  # the CLI and the result file use the values


def _literals():
    """Every tuple/list/set literal of >= 2 string (or None) constants in gpureg/, and every Enum class body's values."""
    found = []
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 and all(
                    isinstance(e, ast.Constant) and (e.value is None or isinstance(e.value, str)) for e in node.elts):
                found.append((frozenset(e.value for e in node.elts), where))
            if isinstance(node, ast.ClassDef) and any("Enum" in ast.unparse(b) for b in node.bases):
                values = [s.value.value for s in node.body
                          if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant)]
                found.append((frozenset(values), where + " (Enum class)"))
    return found


def test_every_choice_tuple_is_written_once():
    """Once (DEVICES is written as ``("auto", *HARDWARE)``: no literal of its own)."""
    literals = _literals()
    for name, values in CHOICES.items():
        places = [where for value_set, where in literals if value_set == frozenset(values)]
        assert len(places) <= 1, f"{name} {values} is spelled out {len(places)} times: {places}"
