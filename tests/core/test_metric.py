"""CPU metric pass: the sparse-support shortcut is exact; masks and validity."""

import numpy as np

import gpureg
from gpureg.core import transform as tf
from gpureg.core.metric import cell_support, mse_terms


def test_cell_support_brute_force():
    rng = np.random.default_rng(0)
    v = np.zeros((6, 7, 8), np.float32)
    v[rng.random(v.shape) < 0.05] = 1
    ref = np.zeros(v.shape, bool)
    for i, j, k in np.ndindex(v.shape):
        ref[i, j, k] = v[i:i + 2, j:j + 2, k:k + 2].any()
    np.testing.assert_array_equal(cell_support(v), ref)


def test_support_shortcut_is_exact():
    shape = (40, 40, 40)
    c = tf.grid_center(shape)
    m = tf.rotation_matrix(7, (1, 0.5, 0), c)
    m[:3, 3] += [2.3, -1.1, 3.7]
    fixed = gpureg.binarize(gpureg.two_particle_phantom(shape))
    moving = gpureg.binarize(gpureg.two_particle_phantom(shape, m))
    for mask in (None, np.arange(40)[:, None, None] % 3 + np.zeros(shape) > 0):
        a = mse_terms(fixed, moving, m @ tf.rotation_matrix(1, (0, 0, 1), c), mask=mask)
        b = mse_terms(fixed, moving, m @ tf.rotation_matrix(1, (0, 0, 1), c), mask=mask, support=cell_support(moving))
        assert a.count == b.count and a.sse > 0
        np.testing.assert_allclose(b.sse, a.sse, rtol=1e-12)
        np.testing.assert_allclose(b.rj, a.rj, rtol=1e-10, atol=1e-12 * np.abs(a.rj).max())
        np.testing.assert_allclose(b.jtj, a.jtj, rtol=1e-10, atol=1e-12 * np.abs(a.jtj).max())


def test_count_excludes_outside_samples():
    vol = np.random.default_rng(1).random((10, 10, 10), dtype=np.float32)
    shift = np.eye(4)
    shift[2, 3] = 3.5  # x -> x + 3.5: x = 0..5 stay inside (q_x <= 9)
    t = mse_terms(vol, vol, shift)
    assert t.count == 10 * 10 * 6
    far = np.eye(4)
    far[0, 3] = 50.0
    assert mse_terms(vol, vol, far).count == 0 and mse_terms(vol, vol, far).mse == float("inf")
