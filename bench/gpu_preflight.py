"""Preflight of a lent GPU session (first step of bench/gpu_check.sh, about 20 s).

Prints the device, driver, CUDA runtime, NVRTC, CuPy, numba and ASTRA versions, imports
CuPy, numba and ASTRA, compiles every kernel of ``kernels/*.cu`` as gpureg does, runs one
fused pass at 32^3 against the CPU metric and one registration with the device-resident
solver against the CPU registration. Any failure prints one line ``preflight: FAILED ...``
and exits 1, so that gpu_check.sh stops before spending the session on a broken install.
Writes ``preflight.json`` into ``$GPUREG_BENCH_OUT`` (or bench/results/).

    python bench/gpu_preflight.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


class Failed(Exception):
    """A preflight check failed (the message is the line to print)."""


def versions(report: dict, gpu=None) -> None:
    """Fill ``report`` with the versions of everything the session relies on."""
    import cupy as cp

    report["python"] = platform.python_version()
    report["numpy"] = np.__version__
    report["cupy"] = cp.__version__
    report["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
    report["cuda_driver"] = cp.cuda.runtime.driverGetVersion()
    report["nvrtc"] = ".".join(str(v) for v in cp.cuda.nvrtc.getVersion())
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    report["device"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    report["compute_capability"] = dev.compute_capability
    report["devices"] = cp.cuda.runtime.getDeviceCount()
    report["memory_gib"] = round(dev.mem_info[1] / 2**30, 1)
    try:
        import numba

        report["numba"] = numba.__version__
    except ImportError as exc:
        raise Failed(f"numba does not import ({exc}): the CPU kernels and the reference comparisons need it") from exc
    try:
        import astra

        report["astra"] = astra.__version__
        report["astra_cuda"] = bool(astra.use_cuda())
    except Exception as exc:  # noqa: BLE001 - astra's import fails in several ways on a bare machine
        report["astra"] = f"MISSING ({type(exc).__name__}: {exc})"
    if not report.get("astra_cuda"):
        raise Failed(f"ASTRA with CUDA is unusable ({report['astra']}): carry it with "
                     "`bash /work/shared/device/prepare.sh` and start with `source .device/setup.sh`")


def compile_all(report: dict, gpu=None) -> None:
    """Every kernel of every source, compiled on this device as gpureg.core.cuda_loader does."""
    from gpureg.core import cuda_loader

    t0 = time.perf_counter()
    # The 64-bit index build is compiled by tests/core/test_gpu.py (test_wide_index_build_...).
    for source, names in cuda_loader.KERNEL_FILES.items():
        for name in names:
            key = f"{source}:{name}"
            try:
                kernel = cuda_loader.get_kernel(source, name)
            except Exception as exc:
                raise Failed(f"kernel {key} does not compile or load: {exc}") from exc
            report.setdefault("registers", {})[key] = int(kernel.num_regs)
            report.setdefault("local_bytes", {})[key] = int(kernel.local_size_bytes)
    report["compile_s"] = round(time.perf_counter() - t0, 2)


def pass_vs_cpu(report: dict, gpu) -> None:
    """One fused pass at 32^3 on the GPU against the CPU metric."""
    import gpureg
    from gpureg.core import cuda, metric
    from gpureg.core import transform as tf

    shape = (32, 32, 32)
    c = tf.grid_center(shape)
    truth = tf.rotation_matrix(4.0, (0.3, 1.0, 0.2), c)
    truth[:3, 3] += (0.6, -0.4, 0.9)
    f = gpureg.two_particle_phantom(shape, seed=1)
    m = gpureg.two_particle_phantom(shape, truth, seed=1)
    cpu = metric.mse_terms(f, m, truth, center=c)
    got = gpu.mse_terms(gpu.asarray(f), gpu.asarray(m), truth, center=c)
    # float32 row sums on the GPU, float64 on the CPU: 1e-4 of the largest entry (tests/core/test_gpu.py)
    rj_err = float(np.abs(got.rj - cpu.rj).max() / max(np.abs(cpu.rj).max(), 1e-30))
    jtj_err = float(np.abs(got.jtj - cpu.jtj).max() / max(np.abs(cpu.jtj).max(), 1e-30))
    report["pass_32"] = {"count": [got.count, cpu.count], "rj_rel_err": rj_err, "jtj_rel_err": jtj_err}
    if abs(got.count - cpu.count) > 2 or rj_err > 1e-4 or jtj_err > 1e-4:
        raise Failed(f"the fused pass differs from the CPU at 32^3: {report['pass_32']}")


def registration_vs_cpu(report: dict, gpu) -> None:
    """One registration with the device-resident solver against the CPU registration (48^3 by default)."""
    import gpureg
    from gpureg.core import transform as tf
    from gpureg.register import prepare_volume, register_prepared

    shape = (gpu.size,) * 3
    c = tf.grid_center(shape)
    truth = tf.rotation_matrix(3.0, (0.3, 1.0, 0.2), c)
    truth[:3, 3] += (1.2, -0.8, 0.5)
    f_host, labels = gpureg.two_particle_phantom(shape, seed=3, return_labels=True)
    m_host = gpureg.two_particle_phantom(shape, truth, seed=3)
    f_cpu, m_cpu = prepare_volume(f_host, "cpu", gpureg.Prep()), prepare_volume(m_host, "cpu", gpureg.Prep())
    cpu = register_prepared(f_cpu, m_cpu)
    res = register_prepared(gpu.asarray(f_cpu), gpu.asarray(m_cpu))
    mask = labels > 0
    between = gpureg.displacement_error(res.matrix, cpu.matrix, mask=mask)[0]
    report["registration"] = {
        "size": gpu.size, "gpu_vs_cpu_vox": round(float(between), 5),
        "gpu_error_vox": round(float(gpureg.displacement_error(res.matrix, truth, mask=mask)[0]), 4),
        "cpu_error_vox": round(float(gpureg.displacement_error(cpu.matrix, truth, mask=mask)[0]), 4),
        "passes_gpu": list(res.iterations), "passes_cpu": list(cpu.iterations)}
    # Same data, same solver arithmetic: float32 GPU sums against float64 CPU sums move the
    # optimum by far less than the 0.02 voxel accuracy the registration tests hold.
    if between > 0.02:
        raise Failed(f"the device-solver registration differs from the CPU one by {between:.4f} voxel at "
                     f"{gpu.size}^3: {report['registration']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-selftest", action="store_true",
                    help="run the comparisons with NumPy standing in for the GPU (CI: the preflight's own code paths)")
    ap.add_argument("--size", type=int, default=48, help="cube size of the registration check")
    args = ap.parse_args(argv)
    report: dict = {"benchmark": "gpu_preflight", "cpu_selftest": args.cpu_selftest}
    out = Path(os.environ.get("GPUREG_BENCH_OUT") or Path(__file__).resolve().parent / "results")
    t0 = time.perf_counter()
    status = 0
    try:
        if args.cpu_selftest:
            from gpureg.core import metric

            gpu = types.SimpleNamespace(asarray=np.asarray, mse_terms=metric.mse_terms, size=args.size)
            checks = (pass_vs_cpu, registration_vs_cpu)
        else:
            gpu = _gpu()
            gpu.size = args.size
            checks = (versions, compile_all, pass_vs_cpu, registration_vs_cpu)
        for check in checks:
            t = time.perf_counter()
            check(report, gpu)
            report.setdefault("seconds", {})[check.__name__] = round(time.perf_counter() - t, 2)
            print(f"preflight: {check.__name__} ok ({report['seconds'][check.__name__]} s)", flush=True)
    except Failed as exc:
        report["failed"] = str(exc)
        print(f"preflight: FAILED {exc}", flush=True)
        status = 1
    except Exception as exc:  # noqa: BLE001 - a bug in the preflight or the package: stop the session too
        import traceback

        traceback.print_exc()
        report["failed"] = f"{type(exc).__name__}: {exc}"
        print(f"preflight: FAILED (error) {type(exc).__name__}: {exc}", flush=True)
        status = 1
    report["total_s"] = round(time.perf_counter() - t0, 2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "preflight.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("registers", "local_bytes")}, default=str))
    return status


def _gpu():
    """CuPy and the GPU launchers, or Failed with the reason they are unusable."""
    try:
        import cupy as cp
    except Exception as exc:  # noqa: BLE001
        raise Failed(f"CuPy does not import ({type(exc).__name__}: {exc})") from exc
    try:
        import hdf5plugin  # noqa: F401 - gpureg.io.results registers its codecs at import
    except ImportError as exc:
        raise Failed("hdf5plugin is missing and gpureg does not import without it: carry it "
                     "(bash /work/shared/device/prepare.sh --with hdf5plugin==4.4.0)") from exc
    from gpureg.core import cuda
    from gpureg.core.backend import GPUUnavailableError, resolve_device

    try:
        resolve_device("gpu")
    except GPUUnavailableError as exc:
        raise Failed(str(exc)) from exc
    return types.SimpleNamespace(asarray=cp.asarray, mse_terms=cuda.mse_terms)


if __name__ == "__main__":
    sys.exit(main())
