"""The CPU kernels' thread pools: fork-safe (lock re-created in the child), re-entrant ``run_planes``, and a
per-range kernel that does not depend on how the planes are cut.

The two hang scenarios run in a subprocess with a timeout: before the fix each of them deadlocked.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpureg
from gpureg.core import cpu_kernels
from gpureg.core.config import config

ROOT = Path(gpureg.__file__).resolve().parents[1]


def _run(code: str, timeout: float = 90):
    # NUMBA_NUM_THREADS=4: real pools of 2+ threads even on a 1-core CI runner
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUREG_")}
    env.update(PYTHONPATH=str(ROOT), NUMBA_NUM_THREADS="4")
    try:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("deadlocked (no answer within the timeout)")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_while_another_thread_holds_the_pool_lock():
    code = """
import os, threading, time
from gpureg.core import cpu_kernels
held, release = threading.Event(), threading.Event()
def hold():
    with cpu_kernels._POOLS_LOCK:  # another thread is inside _pool() when the process forks
        held.set()
        release.wait()
threading.Thread(target=hold, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    cpu_kernels._pool(2)  # deadlocked when the child inherited the held lock
    os._exit(0)
release.set()
for _ in range(300):
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("child exit", os.waitstatus_to_exitcode(status))
        break
    time.sleep(0.1)
else:
    os.kill(pid, 9)
    print("child hung")
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert "child exit 0" in r.stdout, r.stdout + r.stderr


def test_run_planes_called_from_its_own_pool_does_not_deadlock():
    code = """
import numpy as np
from gpureg.core import cpu_kernels
from gpureg.core.config import config
config.set(threads=2)
out = np.zeros(64)
def inner(out, z0, z1):
    out[z0:z1] += 1
def outer(out, z0, z1):  # a range that runs another kernel through run_planes
    cpu_kernels.run_planes(inner, 64, out, n_voxels=1 << 20)
cpu_kernels.run_planes(outer, 64, out, n_voxels=1 << 20)
print(int(out.min()), int(out.max()))
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr
    # 8 outer ranges (4 x 2 threads), each adds 1 to every plane once
    assert r.stdout.split() == ["8", "8"]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cell_support_is_the_same_for_any_cut_of_the_planes(threads):
    """Each range of planes looks one plane ahead (its own loop bound untouched); compared with the NumPy
    definition: a cell is supported when any of its 8 corners is non-zero (edges clamped)."""
    rng = np.random.default_rng(4)
    v = (rng.random((41, 40, 43)) < 0.02).astype(np.float32)  # sparse: most cells empty
    assert v.size >= cpu_kernels.SMALL_VOLUME
    nz = v != 0
    p = np.pad(nz, ((0, 1), (0, 1), (0, 1)), mode="edge")
    expected = np.zeros_like(nz)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                expected |= p[dz:dz + v.shape[0], dy:dy + v.shape[1], dx:dx + v.shape[2]]
    with config(threads=threads):
        np.testing.assert_array_equal(cpu_kernels.cell_support(v), expected)
