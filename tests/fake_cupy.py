"""A stand-in for CuPy that records kernel launches and checks them against the CUDA signatures (no GPU).

CuPy marshals a raw kernel's arguments by their Python types alone: a ``None`` becomes an
undefined pointer on CuPy <= 13, a Python ``int`` becomes a 64-bit integer, a wrong count
shifts every later argument. :func:`check_launch` compares a launch's argument tuple with the
parameter list of the kernel in ``kernels/*.cu`` (pointer <- array or a 64-bit null, ``int`` <-
``numpy.int32``, ``float`` <- ``numpy.float32``...). :class:`FakeCupy` gives launchers NumPy
arrays that carry a device id, so a test can also check on which device each buffer was made.
"""

from __future__ import annotations

import contextlib
import re
import types

import numpy as np

from cxx import KERNELS

SCALARS = {"int": np.int32, "unsigned int": np.uint32, "long long": np.int64, "float": np.float32,
           "double": np.float64}
MACROS = {"GPUREG_AFFINE_PARAMS": ", ".join(f"float {n}" for n in (
    "d00 d01 d02 d10 d11 d12 d20 d21 d22 t0 t1 t2 cz cy cx".split()))}


def signature(source: str, function: str) -> list:
    """Parameter types of ``function`` (``"name"`` or ``"name<A, B>"``) in ``kernels/<source>``."""
    text = "\n".join([(KERNELS / source).read_text(), *(h.read_text() for h in sorted(KERNELS.glob("*.cuh")))])
    name, _, targs = function.partition("<")
    m = re.search(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?" + re.escape(name) + r"\s*\(([^)]*)\)", text)
    assert m, f"no kernel {name} in {source}"
    params = m.group(1)
    for macro, expansion in MACROS.items():
        params = params.replace(macro, expansion)
    if targs:  # template <bool Hessian, typename MaskT>: substitute MaskT
        t = re.search(r"template\s*<([^>]*)>\s*__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?"
                      + re.escape(name) + r"\s*\(", text)
        names = [p.split()[-1] for p in t.group(1).split(",")]
        values = [v.strip() for v in targs.rstrip(">").split(",")]
        for n, v in zip(names, values):
            params = re.sub(rf"\b{n}\b", v, params)
    types = []
    for p in params.split(","):
        p = re.sub(r"\b(const|__restrict__)\b", " ", p).strip()
        if "*" in p:
            types.append("pointer")
        else:
            types.append(" ".join(p.split()[:-1]))
    return types


def check_launch(source: str, function: str, args: tuple) -> None:
    """Assert that ``args`` marshal as the parameters of ``function`` in ``kernels/<source>``."""
    types = signature(source, function)
    assert len(args) == len(types), f"{function}: {len(args)} arguments for {len(types)} parameters"
    for k, (t, a) in enumerate(zip(types, args)):
        if t == "pointer":
            ok = isinstance(a, np.ndarray) or (isinstance(a, np.uint64) and a == 0)
            assert ok, f"{function} argument {k}: a pointer needs an array or np.uint64(0), got {type(a).__name__}"
        else:
            assert t in SCALARS, f"{function} argument {k}: unknown type {t}"
            assert type(a) is SCALARS[t], f"{function} argument {k} ({t}): got {type(a).__name__}"


class FakeArray(np.ndarray):
    """A NumPy array that remembers the device it was made on."""

    def __array_finalize__(self, obj):
        self._device = getattr(obj, "_device", None)

    @property
    def device(self):
        return FakeDevice(self._device)

    def get(self, stream=None, out=None, blocking=True):
        if out is None:
            return np.array(self)
        out[...] = np.asarray(self)
        return out


class FakeDevice:
    current = 0

    def __init__(self, id=None):
        self.id = FakeDevice.current if id is None else id

    def __enter__(self):
        self._prev, FakeDevice.current = FakeDevice.current, self.id
        return self

    def __exit__(self, *exc):
        FakeDevice.current = self._prev
        return False


class FakeCupy:
    """The part of the ``cupy`` namespace the launchers use, on NumPy."""

    float32, float64, int32, uint8, bool_ = np.float32, np.float64, np.int32, np.uint8, np.bool_

    class cuda:  # noqa: N801 - mirrors cupy.cuda
        Device = FakeDevice

        class _Stream:
            def record(self):
                return types.SimpleNamespace(synchronize=lambda: None)

        @staticmethod
        def get_current_stream():
            return FakeCupy.cuda._Stream()

    allocations = 0  # buffers made by empty/zeros

    @staticmethod
    def asnumpy(a):
        return np.array(a)

    @staticmethod
    def _on_device(a):
        out = np.asarray(a).view(FakeArray)
        out._device = FakeDevice.current
        return out

    def empty(self, shape, dtype=np.float32):
        self.allocations += 1
        return self._on_device(np.full(shape, np.nan if np.dtype(dtype).kind == "f" else 0, dtype))

    def zeros(self, shape, dtype=np.float32):
        self.allocations += 1
        return self._on_device(np.zeros(shape, dtype))

    def asarray(self, a, dtype=None):
        if isinstance(a, FakeArray) and a._device == FakeDevice.current and (dtype is None or a.dtype == dtype):
            return a
        return self._on_device(np.array(a, dtype=dtype))

    def ascontiguousarray(self, a, dtype=None):
        if isinstance(a, FakeArray) and a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
            return a
        dev = a._device if isinstance(a, FakeArray) else FakeDevice.current
        with FakeDevice(dev):
            return self._on_device(np.ascontiguousarray(a, dtype=dtype))

    def on(self, a, device: int):
        """``a`` as an array on ``device``."""
        with FakeDevice(device):
            return self._on_device(np.array(a))


class Recorder:
    """``get_kernel`` stand-in: each launch is checked (:func:`check_launch`) and recorded with its device."""

    def __init__(self, results=None):
        self.launches = []
        self.results = results or {}  # function -> callable(args) run at launch (e.g. to fill outputs)

    def get_kernel(self, source, function, wide=False):
        def launch(grid, block, args):
            check_launch(source, function, args)
            self.launches.append({"function": function, "grid": grid, "block": block, "args": args,
                                  "device": FakeDevice.current, "wide": bool(wide)})
            if function in self.results:
                self.results[function](args)

        return launch


@contextlib.contextmanager
def current_device(device: int):
    with FakeDevice(device):
        yield
