"""Host-side plumbing of the GPU path, checked without a GPU (issue 14's defects).

The GPU-only halves of these fixes (a NumPy mask with CuPy volumes, a volume
on another GPU, the prefetcher's ordering) are in test_gpu.py; here is what a
CPU can show.
"""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

import gpureg
from gpureg import xanes
from gpureg.core import cuda

ROOT = Path(__file__).resolve().parents[2]


def test_white_line_is_nan_where_no_energy_is_a_candidate(xp):
    # Spectrum 1's edge lies beyond the edge window, so its derivative peaks on the window's last
    # energy and no energy above the edge is a white-line candidate: the white line must be NaN
    # (it was the window's first energy, below the edge). Spectrum 0 is a normal edge.
    energies = xanes.scan_energies()
    spectra = xanes.synthetic_spectra(energies, np.array([6550.0, 6575.0]), jump=np.array([1.0, 1.0]),
                                      width=np.array([3.0, 3.0])).astype(np.float32)
    out = xanes.edge_energy(xp.asarray(spectra), energies, method="derivative", pre=(energies[0], 6530.0),
                            post=(6560.0, energies[-1]), min_jump=0.0)
    white, edge = gpureg.to_host(out["white_line"]), gpureg.to_host(out["edge_energy"])
    assert bool(gpureg.to_host(out["mask"]).all())
    assert np.isfinite(white[0]) and white[0] > edge[0]
    assert np.isnan(white[1]), f"white line {white[1]} eV below the edge {edge[1]} eV"


def test_optional_kernel_pointers_are_explicit_nulls():
    # CuPy <= 13 turns a None argument into an undefined pointer (cupy#9046): gpureg passes a 64-bit 0.
    null = cuda.pointer_or_null(None)
    assert isinstance(null, np.uint64) and null == 0 and null.nbytes == 8
    a = np.zeros(3)
    assert cuda.pointer_or_null(a) is a
    assert cuda.mse_pass_name(True, None) == "mse_terms_pass<true, float>"
    assert cuda.mse_pass_name(False, np.zeros(2, bool)) == "mse_terms_pass<false, bool>"


def test_gpu_check_script_dry_run(tmp_path):
    # The script a lent GPU session runs: its plumbing (steps, time limits, one tar) on the CPU, and
    # the budget table: every step's inputs can be generated within half its limit on 16 cores.
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": sys.executable, "HOME": str(tmp_path),
           "GPUREG_BENCH_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    # What comes back from a device run: one tar plus at most 3 small files (the limit is 8 files).
    files = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert "gpu_check.tar.gz" in files and len(files) <= 4, files
    assert all((tmp_path / f).stat().st_size < 100_000 for f in files if f != "gpu_check.tar.gz")
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["dry_run"] is True
    steps = {s["step"]: s for s in doc["steps"]}
    assert list(steps)[:3] == ["budget", "preflight", "gpu_tests"]
    assert {"register_gpu", "recon", "xanes", "pipeline"} <= set(steps)
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as tar:
        logs = {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    bad = {k: (s["rc"], logs.get(f"{k}.log", "")[-400:]) for k, s in steps.items() if s["rc"] != 0}
    assert not bad, bad
    assert {f"{k}.log" for k in steps if k != "budget"} | {"gpu_check.json", "budget.log"} <= set(logs)
    assert "total" in logs["budget.log"] and " NO " not in logs["budget.log"]
    collected = logs["gpu_tests.log"]  # every gpu-marked test of the suite is selected
    for name in ("test_gpu.py", "test_particles.py", "test_synth_recon.py", "test_deformable.py"):
        assert name in collected, name


def test_gpu_budget_refuses_inputs_that_do_not_fit(tmp_path, capsys):
    # The 256^3 x 16-energy pipeline of the first script: ~370 s of single-threaded simulation
    # against a 95 s limit. The budget must say NO (and exit 1), and refuse limits over 480 s.
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_budget

    table = tmp_path / "steps.txt"
    table.write_text("pipeline 95 python bench/pipeline.py --device gpu --size 256 --energies 16\n"
                     "recon 60 python bench/recon.py --quick  # no estimator\n")
    assert gpu_budget.main([str(table)]) == 1
    assert "NO" in capsys.readouterr().out
    table.write_text("pipeline 45 python bench/pipeline.py --device gpu --size 64 --energies 6\n")
    assert gpu_budget.main([str(table)]) == 0
    table.write_text("recon 300 python bench/recon.py\nother 200 python bench/recon.py\n")
    assert gpu_budget.main([str(table)]) == 1


def test_gpu_without_nvrtc_falls_back_to_the_cpu_in_one_line(monkeypatch, caplog):
    # CuPy imports and sees a device, but NVRTC cannot be loaded: every gpureg kernel is compiled
    # at run time, so "auto" must choose the CPU (one warning line) and "gpu" must say why.
    import logging
    import types

    import pytest

    from gpureg.core import backend

    class RawKernel:
        def __init__(self, code, name):
            self.name = name

        def compile(self):
            raise OSError("libnvrtc.so.13: cannot open shared object file: No such file or directory")

    fake = types.ModuleType("cupy")
    fake.RawKernel = RawKernel
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    from gpureg.core.config import config

    config.set(disable_gpu=False)  # conftest restores the configuration
    backend._cupy_probe.cache_clear()
    backend._note_fallback.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="gpureg"):
            assert backend.resolve_device("auto") == "cpu"
            assert backend.resolve_device("auto") == "cpu"
        lines = [r for r in caplog.records if "no usable GPU" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        assert "NVRTC" in lines[0].getMessage() and "libnvrtc.so.13" in lines[0].getMessage()
        assert "\n" not in lines[0].getMessage()
        with pytest.raises(backend.GPUUnavailableError, match="NVRTC"):
            backend.resolve_device("gpu")
        # With a working compiler the same fake device is used.
        RawKernel.compile = lambda self: None
        backend._cupy_probe.cache_clear()
        assert backend.resolve_device("auto") == "gpu"
    finally:
        backend._cupy_probe.cache_clear()
        backend._note_fallback.cache_clear()


def test_register_gpu_keeps_rows_saved_in_the_output_folder(tmp_path, monkeypatch):
    # register_gpu saves after each size into $GPUREG_BENCH_OUT (gpu_check.sh's work folder) and
    # merges the rows of an earlier run of the day from that same folder, not from bench/results.
    import datetime

    sys.path.insert(0, str(ROOT / "bench"))
    import register_gpu
    from common import device_name

    monkeypatch.setenv("GPUREG_BENCH_OUT", str(tmp_path))
    earlier = {"device": device_name("gpu"), "git_sha": "abc", "results": [{"size": 512, "pass_ms": 9.0}]}
    (tmp_path / f"register_gpu-gpu-{datetime.date.today().isoformat()}.json").write_text(json.dumps(earlier))
    rows = register_gpu._merge_with_earlier([{"size": 128, "pass_ms": 1.0}])
    assert [r["size"] for r in rows] == [128, 512] and rows[1]["git_sha"] == "abc"
    monkeypatch.setenv("GPUREG_BENCH_OUT", str(tmp_path / "elsewhere"))
    assert [r["size"] for r in register_gpu._merge_with_earlier([{"size": 128}])] == [128]


def test_gpu_preflight_code_paths_on_the_cpu(tmp_path, monkeypatch, capsys):
    # The preflight gates a lent session: its comparisons must run, here with NumPy standing in
    # for the GPU (the same calls into gpureg, so an API change breaks this test, not the session).
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_preflight

    monkeypatch.setenv("GPUREG_BENCH_OUT", str(tmp_path))
    assert gpu_preflight.main(["--cpu-selftest", "--size", "32"]) == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert report["pass_32"]["rj_rel_err"] == 0.0 and report["registration"]["gpu_vs_cpu_vox"] == 0.0
    assert set(report["seconds"]) == {"pass_vs_cpu", "registration_vs_cpu"}
    # Without CuPy the real run stops with one line and status 1 (gpu_check.sh then runs nothing else).
    if "cupy" not in sys.modules:
        assert gpu_preflight.main([]) == 1
        assert "preflight: FAILED" in capsys.readouterr().out
