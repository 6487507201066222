"""The device-resident solver and the empty-space skipping, checked on the CPU.

- ``kernels/lm_step.cuh`` (the arithmetic of the ``lm_step`` kernel) compiled with g++ drives a
  whole Levenberg-Marquardt level on sums of the CPU metric, and must follow the NumPy reference
  :func:`gpureg.core.solver.levenberg_marquardt` fed the very same sums: same passes, same
  outcome, parameters equal to 1e-9 (Cholesky in the kernel, LU in NumPy: the steps differ by
  rounding only, ~1e-15 relative).
- Under the CUDA-thread emulation (tests/cuda_emu.py) the kernels of one device pass
  (classify_rows_state, mse_terms_state_pass, reduce_partials, lm_step) run a level as
  gpureg/core/cuda_solver.py queues them, against the NumPy solver on the emulated pass's sums.
- Empty-space skipping: the O(1) valid range of a row equals the per-voxel count, and a pass
  that skips rows gives the same sums as one that reads every row.
"""

import numpy as np
import pytest
from scipy import ndimage

import cuda_emu
from gpureg.core import cuda, cuda_solver, metric, solver
from gpureg.core import transform as tf
from gpureg.core.solver import levenberg_marquardt
from gpureg.synth.phantom import two_particle_phantom

TRANSLATION = np.r_[np.zeros(9, bool), np.ones(3, bool)]
RIPPLE_DIRECTION = np.random.default_rng(5).normal(size=12)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return cuda_emu.build(tmp_path_factory)


def _pair(shape, seed=1):
    """Smoothed phantom pair with empty space around the particles, and its known motion."""
    c = tf.grid_center(shape)
    truth = tf.compose(tf.rotation_matrix(3.0, (0.3, 1.0, 0.2), c), tf.scale_matrix((1.02, 0.99, 1.01), c))
    truth[:3, 3] += (0.8, -0.6, 1.1)
    f = ndimage.gaussian_filter(two_particle_phantom(shape, seed=seed), 1.0).astype(np.float32)
    m = ndimage.gaussian_filter(two_particle_phantom(shape, truth, seed=seed), 1.0).astype(np.float32)
    f[np.abs(f) < 1e-3] = 0  # exact zeros in the background, as after binarize + smooth
    m[np.abs(m) < 1e-3] = 0
    return f, m, truth


def _pack(t):
    """(32, 6) sums whose unpack_terms is ``t`` (the layout of the fused pass)."""
    s = np.zeros(cuda.N_TERMS * cuda.N_MONOMIALS)
    s[cuda._JTJ_INDEX.ravel()] = t.jtj.ravel()
    for i in range(3):
        s[(cuda._R0 + i) * 6 + 1] = t.rj[3 * i]
        s[(cuda._R0 + i) * 6 + 2] = t.rj[3 * i + 1]
        s[(cuda._R1 + i) * 6] = t.rj[3 * i + 2]
        s[(cuda._R0 + i) * 6] = t.rj[9 + i]
    s[cuda._SSE * 6] = t.sse
    s[cuda._COUNT * 6] = t.count
    return s


def corner_move(shape):
    """``step_size`` of the NumPy solver for the affine parameters: largest move of the grid's corners."""
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], indexing="ij")).reshape(3, -1).T - tf.grid_center(shape)

    def move(x, step):
        return float(np.abs(corners @ step[:9].reshape(3, 3).T + step[9:]).max())

    return move


def _status(state):
    return int(state[cuda_solver.STATE["status"]])


def test_solver_sums_index_matches_unpack_terms(emu):
    slots = np.empty(144, np.int32)
    emu.h_jtj_slots(slots)
    np.testing.assert_array_equal(slots.reshape(12, 12), cuda._JTJ_INDEX)
    t = cuda.unpack_terms(np.random.default_rng(0).random((32, 6)))
    np.testing.assert_array_equal(cuda.unpack_terms(_pack(t).reshape(32, 6)).jtj, t.jtj)


@pytest.mark.parametrize("free, max_iter, ripple", [(None, 60, 0.0), (TRANSLATION, 60, 0.0), (None, 4, 0.0),
                                                     (None, 60, 1e-4)])
def test_device_solver_step_matches_numpy_solver(emu, free, max_iter, ripple, monkeypatch):
    """``ripple``: a deterministic relative perturbation of the SSE (the MSE's sampling noise), so that
    small steps are rejected and the REJECT_FACTOR rule ends the level (checked: without the rule
    the NumPy solver takes more passes)."""
    shape = (20, 24, 28)
    f, m, truth = _pair(shape)
    c = tf.grid_center(shape)

    def sums(p):
        s = _pack(metric.mse_terms(f, m, tf.matrix_from_params(p, c), center=c))
        # smooth at the solvers' rounding (1e-15), rough at the scale of a small step
        s[cuda._SSE * 6] *= 1.0 + ripple * (1.0 + np.sin(3e4 * float(np.asarray(p) @ RIPPLE_DIRECTION)))
        return s

    params0 = tf.params_from_matrix(np.eye(4), c)
    ref, ref_passes, ref_conv = levenberg_marquardt(lambda p: cuda.unpack_terms(sums(p).reshape(32, 6)), params0,
                                                    corner_move(shape), free=free, max_iter=max_iter, tol=1e-3)
    state = cuda_solver.initial_state(params0)
    trial = slice(cuda_solver.STATE["trial"], cuda_solver.STATE["trial"] + 12)
    for _ in range(max_iter + 2):
        if _status(state) != cuda_solver.RUNNING:
            break
        emu.h_lm_update(state, sums(state[trial].copy()), cuda_solver.free_mask(free), *shape, 1e-3, max_iter)
    assert _status(state) != cuda_solver.RUNNING
    assert int(state[cuda_solver.STATE["passes"]]) == ref_passes
    assert (_status(state) == cuda_solver.CONVERGED) == ref_conv
    np.testing.assert_allclose(state[:12], ref, rtol=0, atol=1e-9)
    if max_iter == 60:
        assert ref_conv and ref_passes >= 3
    if max_iter == 60 and free is None:  # and the level actually registered: near the truth
        err, _ = tf.displacement_error(tf.matrix_from_params(ref, c), truth, shape=shape, mask=f > 0.1)
        assert err < 0.3, err
    if free is not None:
        np.testing.assert_array_equal(state[:9], params0[:9])
    if ripple:
        monkeypatch.setattr(solver, "REJECT_FACTOR", 0.0)
        slow = levenberg_marquardt(lambda p: cuda.unpack_terms(sums(p).reshape(32, 6)), params0, corner_move(shape),
                                   free=free, max_iter=max_iter, tol=1e-3)
        assert slow.passes > ref_passes, (slow.passes, ref_passes)


def test_device_solver_stops_without_overlap(emu):
    state = cuda_solver.initial_state(np.zeros(12))
    emu.h_lm_update(state, np.zeros(192), 0xFFF, 8, 8, 8, 1e-3, 60)
    assert _status(state) == cuda_solver.NO_OVERLAP


def test_device_solver_under_emulation_matches_numpy_solver(emu, skip_empty=True):
    shape = (10, 16, 40)
    f, m, truth = _pair(shape, seed=3)
    c = tf.grid_center(shape)
    max_iter, blocks = 8, 4

    def terms(p):
        return cuda_emu.emulated_mse(emu, f, m, tf.matrix_from_params(p, c), c, None, True, blocks)

    params0 = tf.params_from_matrix(np.eye(4), c)
    ref, ref_passes, ref_conv = levenberg_marquardt(terms, params0, corner_move(shape), max_iter=max_iter, tol=1e-3)
    state = cuda_solver.initial_state(params0)
    tables = cuda_solver.empty_space_tables(f, m) if skip_empty else (None, None)
    ptrs = [None if t is None else t.ctypes.data for t in tables]
    sums = np.empty(192)
    for _ in range(max_iter + 2):
        assert emu.e_solver_pass(f, m, *ptrs, *shape, *m.shape, state, c.astype(np.float32),
                                 cuda_solver.free_mask(None), 1e-3, max_iter, blocks, sums) == 0
    assert _status(state) != cuda_solver.RUNNING
    assert int(state[cuda_solver.STATE["passes"]]) == ref_passes and ref_passes > 2
    assert (_status(state) == cuda_solver.CONVERGED) == ref_conv
    # The emulated state pass rounds the parameters to float32 itself (affine_from_params) where
    # the reference pass gets affine_args' float32: sums agree to ~1e-7, parameters to ~1e-6.
    np.testing.assert_allclose(state[:12], ref, rtol=0, atol=2e-5)


def test_row_valid_range_equals_per_voxel_count(emu):
    rng = np.random.default_rng(5)
    out = np.empty(3, np.int32)
    nx, mz, my, mx = 45, 20, 22, 40
    for trial in range(60):
        c = np.array([9.5, 10.5, 22.0])
        scale = [0.3] * 9 + [8.0] * 3 if trial % 2 else [0.02] * 9 + [3.0] * 3
        p = rng.normal(scale=scale)
        if trial % 7 == 0:
            p[2] = p[5] = 0.0  # rows parallel to the moving grid: the all-or-nothing branch
        a = np.array([*p, *c], np.float32)
        for z, y in ((0, 0), (9, 10), (19, 21), (3, 17), (25, -4)):
            emu.h_row_range(a, z, y, nx, mz, my, mx, out)
            x0, x1, n = (int(v) for v in out)
            assert max(x1 - x0 + 1, 0) == n, (trial, z, y, x0, x1, n)


@pytest.mark.parametrize("case", ["known", "shifted", "rotated"])
def test_empty_space_skipping_gives_the_same_sums(emu, case):
    shape = (16, 24, 48)
    f, m, truth = _pair(shape, seed=4)
    c = tf.grid_center(shape)
    matrix = {"known": truth,
              "shifted": tf.compose(truth, tf.matrix_from_params(np.r_[np.zeros(9), 3.0, -5.0, 9.0], c)),
              "rotated": tf.compose(tf.rotation_matrix(25.0, (1.0, 0.2, 0.5), c), truth)}[case]
    fixed_rows, cell_sat = cuda_solver.empty_space_tables(f, m)
    codes = np.full(shape[0] * shape[1], -2, np.int32)
    assert emu.e_classify(fixed_rows, cell_sat, *shape, *m.shape, np.array(cuda.affine_args(matrix, c), np.float32),
                          codes) == 0
    assert codes.min() >= -1
    skipped = float((codes >= 0).mean())
    if case != "rotated":  # a large rotation sweeps each row across many moving rows: few are skipped
        assert skipped > 0.2, f"only {skipped:.0%} of the rows skipped"
    full = cuda_emu.emulated_mse(emu, f, m, matrix, c, None, True, 6)
    skip = cuda_emu.emulated_mse(emu, f, m, matrix, c, None, True, 6, row_code=codes)
    cpu = metric.mse_terms(f, m, matrix, center=c)
    assert skip.count == full.count == cpu.count
    # skipped rows add exact zeros: the same float sums, only the order of the row partials may move
    np.testing.assert_allclose(skip.sse, full.sse, rtol=1e-12)
    np.testing.assert_allclose(skip.rj, full.rj, rtol=0, atol=1e-12 * np.abs(full.rj).max())
    np.testing.assert_allclose(skip.jtj, full.jtj, rtol=0, atol=1e-12 * np.abs(full.jtj).max())


def test_empty_space_tables_numpy():
    f = np.zeros((3, 4, 5), np.float32)
    m = np.zeros((4, 3, 6), np.float32)
    f[1, 2, 3] = 1.0
    m[2, 1, 0] = 1.0
    rows, sat = cuda_solver.empty_space_tables(f, m)
    assert rows.dtype == np.uint8 and rows.tolist() == [0] * 6 + [1] + [0] * 5
    cells = np.zeros((3, 2), int)
    cells[1:3, 0:2] = 1  # cell rows (i, j) with i in {1, 2}, j in {0, 1} touch moving row (2, 1)
    ref = np.zeros((4, 3), int)
    ref[1:, 1:] = cells.cumsum(0).cumsum(1)
    np.testing.assert_array_equal(sat.reshape(4, 3), ref)


def _emulated_level(emu, f, m, params0, c, max_iter, blocks=3):
    state = cuda_solver.initial_state(params0)
    sums = np.empty(192)
    for _ in range(max_iter + 2):
        assert emu.e_solver_pass(f, m, None, None, *f.shape, *m.shape, state, c.astype(np.float32),
                                 cuda_solver.free_mask(None), 1e-3, max_iter, blocks, sums) == 0
    return state


def test_device_solver_reports_max_passes_and_singular(emu):
    # The statuses the host reads back (gpureg/core/cuda_solver.py) from the emulated device passes:
    # max_iter reached, and a system that stays singular (a NaN in the moving volume makes every
    # J^T J entry NaN after the first pass), each a RuntimeWarning and converged=False; no overlap
    # is an error.
    shape = (10, 12, 40)
    f, m, truth = _pair(shape, seed=3)
    c = tf.grid_center(shape)
    params0 = tf.params_from_matrix(np.eye(4), c)
    state = _emulated_level(emu, f, m, params0, c, max_iter=2)
    assert _status(state) == cuda_solver.MAX_PASSES and state[cuda_solver.STATE["passes"]] == 2
    with pytest.warns(RuntimeWarning, match="'max_passes': 2 passes"):
        assert cuda_solver.solver_outcome(_status(state), 2, 2) is False
    bad = m.copy()
    bad[5, 6, 20] = np.nan
    state = _emulated_level(emu, f, bad, params0, c, max_iter=8)
    assert _status(state) == cuda_solver.SINGULAR and state[cuda_solver.STATE["passes"]] == 1
    with pytest.warns(RuntimeWarning, match="'singular'"):
        assert cuda_solver.solver_outcome(_status(state), 1, 8) is False
    assert cuda_solver.solver_outcome(cuda_solver.CONVERGED, 5, 8) is True
    with pytest.raises(RuntimeError, match="outside the moving volume"):
        cuda_solver.solver_outcome(cuda_solver.NO_OVERLAP, 1, 8)
    with pytest.raises(RuntimeError, match="status 0"):
        cuda_solver.solver_outcome(cuda_solver.RUNNING, 9, 8)


def test_zero_damping_is_refused_and_cannot_loop(emu):
    # lam0 == 0 made the retry loop (lam *= 10 on a failed factorisation) spin forever. Both
    # solvers refuse it; the kernel's retry grows from LAM_MIN whatever the state holds, so a
    # zero damping in the state with a singular system still ends (status singular).
    with pytest.raises(ValueError, match="lam0 must be > 0"):
        levenberg_marquardt(lambda p: None, np.zeros(12), corner_move((8, 8, 8)), lam0=0.0)
    with pytest.raises(ValueError, match="lam0 must be > 0"):
        cuda_solver.levenberg_marquardt_device(None, None, np.zeros(12), np.zeros(3), lam0=0.0)
    sums = np.full(192, np.nan)
    sums[cuda._COUNT * 6] = 100.0  # overlap, but a NaN J^T J: no damping makes it factorisable
    state = cuda_solver.initial_state(np.zeros(12), lam0=0.0)
    emu.h_lm_update(state, sums, 0xFFF, 8, 8, 8, 1e-3, 60)
    assert _status(state) == cuda_solver.SINGULAR
    assert state[cuda_solver.STATE["lam"]] > solver.LAM_MAX
    sums = np.zeros(192)
    sums[cuda._COUNT * 6] = 100.0  # J^T J = 0: factorisable once the damping is > 0, zero step
    state = cuda_solver.initial_state(np.zeros(12), lam0=0.0)
    emu.h_lm_update(state, sums, 0xFFF, 8, 8, 8, 1e-3, 60)
    assert _status(state) == cuda_solver.CONVERGED
