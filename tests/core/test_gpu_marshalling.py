"""Kernel launches checked without a GPU: argument tuples against the CUDA signatures, buffers' devices.

The launchers run against tests/fake_cupy.py (NumPy arrays that carry a device id; each launch
is checked by ``check_launch`` against the parameter list in ``kernels/*.cu``), with the
volumes on GPU 1 while GPU 0 is current: every buffer a launcher makes must be on GPU 1.
"""

import numpy as np
import pytest

import fake_cupy
from gpureg.core import cuda_ffd
from gpureg.core import transform as tf


@pytest.fixture
def fake(monkeypatch):
    cp = fake_cupy.FakeCupy()
    rec = fake_cupy.Recorder({"reduce_partials": lambda args: args[2].__setitem__(slice(None), (5.0, 7.0))})
    for module in (cuda_ffd,):
        monkeypatch.setattr(module, "require_cupy", lambda: cp)
        monkeypatch.setattr(module, "get_kernel", rec.get_kernel)
        monkeypatch.setattr(module, "resident_blocks", lambda *a: 3)
    return cp, rec


def test_check_launch_catches_marshalling_errors():
    # The checker itself: a None pointer, a Python int and a missing argument are refused.
    args = [np.zeros(1), np.zeros(1), np.uint64(0), *(np.int32(4),) * 3, np.zeros(1), *(np.int32(4),) * 3,
            *(np.float32(0),) * 15, np.float32(1), np.float32(0.1), np.int32(0), np.zeros(1),
            np.zeros(1)]
    fake_cupy.check_launch("bspline.cu", "ffd_residual_pass", tuple(args))
    for k, bad in ((2, None), (3, 4), (10, np.float64(0))):
        wrong = list(args)
        wrong[k] = bad
        with pytest.raises(AssertionError):
            fake_cupy.check_launch("bspline.cu", "ffd_residual_pass", tuple(wrong))
    with pytest.raises(AssertionError, match="arguments"):
        fake_cupy.check_launch("bspline.cu", "ffd_residual_pass", tuple(args[:-1]))
    assert fake_cupy.signature("affine.cu", "mse_terms_pass<true, bool>")[:4] == ["pointer"] * 4


@pytest.mark.parametrize("with_mask", [False, True])
def test_ffd_pass_marshals_and_allocates_on_the_volumes_gpu(fake, with_mask):
    cp, rec = fake
    shape = (6, 7, 8)
    rng = np.random.default_rng(0)
    fixed = cp.on(rng.random(shape, dtype=np.float32), 1)
    moving = cp.on(rng.random(shape, dtype=np.float32), 1)
    coeffs = np.zeros((3, 5, 5, 5))  # host coefficients: copied to the volumes' GPU
    mask = rng.random(shape) > 0.5 if with_mask else None
    rg, sse, count = cuda_ffd.residual_gradient(fixed, moving, coeffs, np.eye(4), level=1, spacing=4.0, mask=mask)
    assert (sse, count) == (5.0, 7)
    assert [launch["function"] for launch in rec.launches] == ["ffd_residual_pass", "reduce_partials"]
    for launch in rec.launches:
        assert launch["device"] == 1
        for a in launch["args"]:
            if isinstance(a, np.ndarray):
                assert a._device == 1, launch["function"]
    mask_arg = rec.launches[0]["args"][2]
    if with_mask:
        assert mask_arg.dtype == np.float32 and mask_arg._device == 1
    else:
        assert isinstance(mask_arg, np.uint64) and mask_arg == 0  # never None (cupy#9046)
    assert rg._device == 1 and rg.shape == (3, *shape)


def test_ffd_pass_selects_the_64_bit_build_by_size(fake, monkeypatch):
    # Above 2^31 - 1 voxels (here: a limit lowered to 100) every launch uses the wide build.
    cp, rec = fake
    from gpureg.core import cuda

    vol = cp.on(np.zeros((5, 5, 5), np.float32), 0)
    cuda_ffd.residual_gradient(vol, vol, np.zeros((3, 4, 4, 4)), np.eye(4), level=0, spacing=4.0)
    assert [launch["wide"] for launch in rec.launches] == [False, False]
    monkeypatch.setattr(cuda, "_MAX_ELEMENTS", 100)
    cuda_ffd.residual_gradient(vol, vol, np.zeros((3, 4, 4, 4)), np.eye(4), level=0, spacing=4.0)
    assert [launch["wide"] for launch in rec.launches[2:]] == [True, True]
    monkeypatch.setattr(cuda, "_MAX_WIDE", 100)
    with pytest.raises(ValueError, match="fixed has 125 voxels"):
        cuda_ffd.residual_gradient(vol, vol, np.zeros((3, 4, 4, 4)), np.eye(4), level=0, spacing=4.0)


def _solver_fakes(monkeypatch, cp, rec):
    import sys
    import types

    from gpureg.core import cuda, cuda_solver

    for module in (cuda_solver, cuda):
        monkeypatch.setattr(module, "require_cupy", lambda: cp)
        monkeypatch.setattr(module, "get_kernel", rec.get_kernel)
    monkeypatch.setattr(cuda, "resident_blocks", lambda *a: 3)
    monkeypatch.setattr(cuda_solver, "xp_of", lambda a: cp)
    monkeypatch.setitem(sys.modules, "cupyx", types.SimpleNamespace(empty_pinned=lambda n, dtype: np.empty(n, dtype)))
    return cuda_solver


@pytest.mark.parametrize("skip_empty", [False, True])
def test_device_solver_marshals_and_allocates_nothing_per_pass(monkeypatch, skip_empty):
    # Every launch of a level (classify_rows_state, the state pass, reduce_partials, lm_step) against
    # its CUDA signature, every buffer on the volumes' GPU, no allocation per pass, and the status
    # the (stand-in) lm_step leaves reported: converged after 3 passes; max_passes as a warning.
    from gpureg.core.kernel_layout import STATE, STATUS

    def run(poll_every, stop_at, max_iter=60):
        cp = fake_cupy.FakeCupy()

        def lm_step(args):
            state = args[1]
            if state[STATE["status"]] != STATUS["running"]:
                return  # as the kernel: a no-op once stopped
            state[STATE["passes"]] += 1
            if state[STATE["passes"]] >= stop_at:
                state[STATE["status"]] = STATUS["converged"] if stop_at < max_iter else STATUS["max_passes"]

        rec = fake_cupy.Recorder({"lm_step": lm_step})
        cuda_solver = _solver_fakes(monkeypatch, cp, rec)
        shape = (6, 7, 40)
        rng = np.random.default_rng(1)
        fixed = cp.on(rng.random(shape, dtype=np.float32), 1)
        moving = cp.on(rng.random(shape, dtype=np.float32), 1)
        out = cuda_solver.levenberg_marquardt_device(fixed, moving, np.zeros(12), (2.5, 3.0, 19.5),
                                                     poll_every=poll_every, skip_empty=skip_empty, max_iter=max_iter)
        return out, rec, cp

    (params, passes, converged), rec, cp = run(poll_every=8, stop_at=3)
    assert (passes, converged) == (3, True) and params.shape == (12,)
    per_pass = (["classify_rows_state"] if skip_empty else []) + ["mse_terms_state_pass<true, float>",
                                                                  "reduce_partials", "lm_step"]
    assert [launch["function"] for launch in rec.launches] == per_pass * 8  # one block of 8 passes queued
    for launch in rec.launches:
        assert launch["device"] == 1 and not launch["wide"]
        for a in launch["args"]:
            if isinstance(a, np.ndarray):
                assert a._device == 1, launch["function"]
    assert rec.launches[len(per_pass) - 3]["args"][2] == np.uint64(0)  # no mask: a null pointer, never None
    allocations = cp.allocations
    (_, passes, _), rec, cp = run(poll_every=2, stop_at=9)  # 5 blocks of 2 passes
    assert passes == 9 and len(rec.launches) == len(per_pass) * 10
    assert cp.allocations == allocations  # buffers made once per level, whatever the number of passes
    with pytest.warns(RuntimeWarning, match="max_passes"):
        (_, passes, converged), _, _ = run(poll_every=8, stop_at=5, max_iter=5)
    assert (passes, converged) == (5, False)
