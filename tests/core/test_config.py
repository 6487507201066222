"""``gpureg.config``: environment read once, ``with`` blocks per context (threads given it explicitly), the
GPU switch, the solver argument, and no environment access outside the configuration module and the CLI."""

import concurrent.futures as cf
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import gpureg
from gpureg.core import backend
from gpureg.core.config import Settings, config, submit

ROOT = Path(gpureg.__file__).resolve().parent


def _python(code, env=None, timeout=120):
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith("GPUREG_")}
    full.update(env or {}, PYTHONPATH=str(ROOT.parent))
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=timeout)


def test_environment_is_read_once_at_import():
    code = ("import os, gpureg; s = gpureg.config.get(); os.environ['GPUREG_THREADS'] = '7'; "
            "print(s.cpu_backend, s.threads, s.solver, s.disable_gpu, gpureg.config.threads)")
    r = _python(code, {"GPUREG_CPU_BACKEND": "numpy", "GPUREG_THREADS": "3", "GPUREG_GPU_SOLVER": "host",
                       "GPUREG_DISABLE_GPU": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["numpy", "3", "host", "True", "3"]  # a later change of os.environ is not seen


def test_invalid_environment_names_the_variable_when_used():
    r = _python("import gpureg\ntry:\n    gpureg.config.threads\nexcept ValueError as e:\n    print(e)",
                {"GPUREG_THREADS": "many"})
    assert r.returncode == 0, r.stderr  # import gpureg still works
    assert "GPUREG_THREADS must be a positive integer, got 'many'" in r.stdout
    r = _python("import gpureg\ntry:\n    gpureg.config.get()\nexcept ValueError as e:\n    print(e)",
                {"GPUREG_CPU_BACKEND": "fortran"})
    assert "GPUREG_CPU_BACKEND" in r.stdout and "fortran" in r.stdout


def test_with_block_is_scoped_and_nests():
    before = config.get()
    with config(threads=1, cpu_backend="numpy") as inner:
        assert inner == config.get() and config.threads == 1 and backend.cpu_engine() == "numpy"
        with config(threads=2):
            assert config.threads == 2 and config.cpu_backend == "numpy"
        assert config.threads == 1
    assert config.get() == before
    with pytest.raises(ValueError, match="solver must be one of"):
        with config(solver="gpu"):
            pass
    with pytest.raises(AttributeError, match="no setting 'thread'"):
        config.thread  # noqa: B018


def test_threads_see_the_context_they_are_given():
    """A plain thread starts from the process-wide settings; gpureg hands its context to its pools."""
    seen = {}
    with config(cpu_backend="numpy"):
        t = threading.Thread(target=lambda: seen.setdefault("plain", config.cpu_backend))
        t.start()
        t.join()
        with cf.ThreadPoolExecutor(1) as pool:
            seen["submitted"] = submit(pool, lambda: config.cpu_backend).result()
    assert seen == {"plain": config.get().cpu_backend, "submitted": "numpy"}


def test_set_is_process_wide():
    config.set(threads=2)  # conftest restores it
    with cf.ThreadPoolExecutor(1) as pool:
        assert pool.submit(lambda: config.threads).result() == 2


def test_disable_gpu_hides_the_gpu():
    from gpureg.recon.fbp import astra_cuda_probe

    with config(disable_gpu=True):
        assert backend.resolve_device("auto") == "cpu" and not gpureg.gpu_available()
        assert astra_cuda_probe() == (False, "GPU use is disabled (gpureg.config.disable_gpu; GPUREG_DISABLE_GPU)")
        with pytest.raises(gpureg.GPUUnavailableError, match="disabled"):
            backend.resolve_device("gpu")


def test_solver_argument():
    vol = gpureg.two_particle_phantom((24, 24, 24))
    with pytest.raises(ValueError, match=r"solver must be one of \('device', 'host'\)"):
        gpureg.register_prepared(vol, vol, solver="cpu")
    np.testing.assert_array_equal(gpureg.register_prepared(vol, vol, solver="host").matrix,
                                  gpureg.register_prepared(vol, vol).matrix)  # the CPU always solves on the host


def test_dask_task_runs_under_the_clients_settings(monkeypatch):
    from gpureg.pipeline import distributed

    monkeypatch.setattr(distributed, "_register_one", lambda *a: config.get())
    given = Settings(cpu_backend="numpy", threads=1)
    assert distributed.register_one("x.h5", 0, None, None, None, None, given) == given
    assert distributed.register_one("x.h5", 0, None, None, None, None) == config.get()


def test_environment_is_read_only_by_the_config_module_and_the_cli():
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in ROOT.rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"os\.(environ|getenv|putenv)", line)]
    outside = [h for h in hits if not (h.startswith("core/config.py:") or h.startswith("cli/"))]
    assert outside == [], outside
