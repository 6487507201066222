"""GPU registration benchmark: fused-pass bandwidth, full registration time, and SimpleITK on the same pairs.

For each size (128^3, 256^3, 512^3 by default) the two-particle phantom and
its copy moved by a known affine (bench/register_cpu.py's ``known_affine``:
rotation 6 deg about an oblique axis, anisotropic scale, shear, shift) are
binarized and smoothed on the GPU (gpureg's registration input). Measured in
one run, on one device:

- ``pass_ms``: one fused MSE pass (value, gradient and J^T J; kernel plus the
  partials' reduction, CUDA events, median of 50 after warm-up) at the true
  transform; ``bandwidth_fraction``: its effective bandwidth (fixed + moving
  volume read once) over that of a device-to-device copy of the same volume
  (read + write) timed the same way: ``copy_ms / pass_ms``;
- ``pass_call_ms``: the same pass through :func:`gpureg.cuda.mse_terms`
  (host launch, copy of the 192 sums back, unpacking);
- ``registration_ms``: :func:`gpureg.register_affine` on the prepared pair
  (median of ``--repeats`` >= 5 after a warm-up, synchronised; the
  Levenberg-Marquardt steps on the device), ``registration_host_solver_ms``
  the same with the NumPy solver on the host (``solver="host"``), and
  ``registration_binarize_ms`` including Otsu + smoothing of both raw volumes;
- ``error_vox``: mean displacement error over the particles' voxels;
- SimpleITK (:func:`gpureg.validate.sitk.register_sitk`, all CPU cores) on
  the same prepared arrays for sizes <= ``--sitk-max`` (256): time, error and
  ``ratio`` = SimpleITK time / gpureg time.

Without a usable GPU it says so and exits (status 2) without writing JSON.
Rows of an earlier run of the same day and device are kept for sizes not
measured again, so the sizes may be run in separate invocations.

    python bench/register_gpu.py                  # 128, 256, 512
    python bench/register_gpu.py --sizes 512      # one size
    python bench/register_gpu.py --quick          # 64 and 128, 3 repeats (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import gpureg  # noqa: E402
from common import RESULTS, median_time, save  # noqa: E402
from gpureg.core import transform as tf  # noqa: E402
from gpureg.register import register_prepared  # noqa: E402

DESIGN = ("single fused pass: warps own reference rows, lanes x = lane + 32k; 26 float row sums per lane "
          "(S_a[ik] = sum g_i g_k x'^a, R_a[i] = sum r g_i x'^a, sse, count), per-row warp transpose-reduction "
          "(31 shuffles), 6 double monomial accumulators per lane, shared-memory block partials, second kernel "
          "sums partials in double; 256 threads, launch bounds 4 blocks/SM (64 registers, no spills per ptxas)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--repeats", type=int, default=5, help="timed registrations per size (after one warm-up)")
    ap.add_argument("--sitk-max", type=int, default=256, help="largest size also registered with SimpleITK")
    ap.add_argument("--sitk-repeats", type=int, default=1)
    ap.add_argument("--no-sitk", action="store_true", help="skip SimpleITK")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="processes generating the phantoms")
    ap.add_argument("--quick", action="store_true", help="sizes 64 and 128, 3 repeats, 10 pass timings")
    args = ap.parse_args(argv)

    from gpureg.core.backend import GPUUnavailableError, resolve_device

    try:
        resolve_device("gpu")
    except GPUUnavailableError as exc:
        print(f"register_gpu: {exc}; this benchmark needs an NVIDIA GPU, nothing was measured and no JSON "
              "was written (bench/register_cpu.py measures the CPU path)", file=sys.stderr)
        return 2

    sizes, repeats, n_pass = ([64, 128], 3, 10) if args.quick else (args.sizes, max(args.repeats, 5), 50)
    sitk = None
    if not args.no_sitk:
        try:
            from gpureg.validate.sitk import register_sitk, sitk_available

            sitk = register_sitk if sitk_available() else None
        except ImportError:
            sitk = None
        if sitk is None:
            print("register_gpu: SimpleITK (or gpureg.sitk_reference) is unavailable; no reference timings",
                  file=sys.stderr)
    rows = []
    for size in sizes:
        row = measure(size, repeats=repeats, n_pass=n_pass, workers=args.workers,
                      sitk=sitk if size <= args.sitk_max else None, sitk_repeats=args.sitk_repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
        # Saved after each size: a session cut off at the largest size keeps the others.
        save("register_gpu", "gpu", _merge_with_earlier(rows),
             extra={"quick": args.quick, "repeats": repeats, "fused_pass_design": DESIGN,
                    "sitk_threads": os.cpu_count()})
    return 0


def measure(size: int, *, repeats: int, n_pass: int, workers: int, sitk, sitk_repeats: int) -> dict:
    """All measurements of one size (see the module docstring)."""
    from register_cpu import known_affine

    from gpureg.core import cuda, cuda_loader
    from gpureg.core.backend import cupy_or_none
    from gpureg.register import prepare_volume

    cp = cupy_or_none()
    shape = (size,) * 3
    truth = known_affine(shape)
    t0 = time.perf_counter()
    (fixed, labels), moving = phantoms(shape, truth, workers)
    phantom_s = time.perf_counter() - t0
    mask = labels > 0
    f_raw, m_raw = cp.asarray(fixed), cp.asarray(moving)
    del fixed, moving
    f = prepare_volume(f_raw, "gpu", gpureg.Prep())
    m = prepare_volume(m_raw, "gpu", gpureg.Prep())

    center = tf.grid_center(shape)
    pass_ms = event_ms(lambda: cuda.mse_terms_device(f, m, truth, center), repeats=n_pass)
    pass_call_ms, _ = median_time(lambda: cuda.mse_terms(f, m, truth, center), repeats=n_pass, warmup=3, device="gpu")
    dst = cp.empty_like(f)
    copy_ms = event_ms(lambda: dst.data.copy_from_device_async(f.data, f.nbytes), repeats=n_pass)
    name = "mse_terms_pass<true, float>"
    kernel = cuda_loader.get_kernel("affine.cu", name)

    reg_ms, res = median_time(lambda: register_prepared(f, m), repeats=repeats, warmup=1,
                              device="gpu")
    # the NumPy solver on the host, for comparison
    host_ms, res_host = median_time(lambda: register_prepared(f, m, solver="host"), repeats=repeats, warmup=1,
                                    device="gpu")
    bin_ms, res_b = median_time(lambda: gpureg.register_affine(f_raw, m_raw, prep=gpureg.Prep(), device="gpu"),
                                repeats=repeats, warmup=1, device="gpu")
    err = gpureg.displacement_error(res.matrix, truth, mask=mask)[0]
    row = {
        "case": "binarized two-particle, known affine", "size": size,
        "registration_ms": round(reg_ms, 2), "registration_binarize_ms": round(bin_ms, 2),
        "registration_host_solver_ms": round(host_ms, 2), "passes_per_level_host_solver": res_host.iterations,
        "passes_per_level": res.iterations, "converged": bool(res.converged),
        "error_vox": round(err, 4),
        "error_binarize_vox": round(gpureg.displacement_error(res_b.matrix, truth, mask=mask)[0], 4),
        "pass_ms": round(pass_ms, 4), "pass_call_ms": round(pass_call_ms, 4), "copy_ms": round(copy_ms, 4),
        "pass_gb_per_s": round(2 * f.nbytes / pass_ms / 1e6, 1), "copy_gb_per_s": round(2 * f.nbytes / copy_ms / 1e6, 1),
        "bandwidth_fraction": round(copy_ms / pass_ms, 3),
        "kernel_registers": int(kernel.num_regs), "resident_blocks": cuda_loader.resident_blocks("affine.cu", name),
        "phantom_s": round(phantom_s, 1),
    }
    if sitk is not None:
        f_host, m_host = cp.asnumpy(f), cp.asnumpy(m)
        times, matrix = [], None
        for _ in range(sitk_repeats):
            t0 = time.perf_counter()
            matrix, _seconds = sitk(f_host, m_host, threads=None)
            times.append((time.perf_counter() - t0) * 1e3)
        ref_ms = statistics.median(times)
        row.update(reference="SimpleITK", reference_ms=round(ref_ms, 1), reference_repeats=sitk_repeats,
                   reference_error_vox=round(gpureg.displacement_error(matrix, truth, mask=mask)[0], 4),
                   ratio=round(ref_ms / reg_ms, 1))
    return row


def event_ms(fn, *, repeats: int, per_event: int = 20, warmup: int = 3) -> float:
    """Median GPU time (ms) per call of the work ``fn`` queues on the current stream.

    ``per_event`` calls are queued between one pair of CUDA events, behind a
    spin kernel that keeps the GPU busy while the host queues them: the
    Python prologue of each call (argument packing, allocation) is then not
    in the measured interval, only back-to-back GPU work.
    """
    from gpureg.core.backend import cupy_or_none

    cp = cupy_or_none()
    spin = cp.RawKernel(r"""extern "C" __global__ void spin(long long cycles) {
        const long long t0 = clock64(); while (clock64() - t0 < cycles) {} }""", "spin")
    clock_khz = cp.cuda.Device().attributes["ClockRate"]
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        spin((1,), (1,), (np.int64(clock_khz * (1 + per_event // 4)),))  # >= 0.25 ms of GPU time per queued call
        start.record()
        for _ in range(per_event):
            fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / per_event)
    return statistics.median(times)


def phantoms(shape, truth, workers: int):
    """``(fixed, labels), moving`` of the two-particle phantom, generated in z-slabs by ``workers`` processes.

    The slabs use the phantom's own per-particle functions; a small grid is
    first checked to equal :func:`gpureg.two_particle_phantom` bit for bit,
    else (the phantom module changed) the serial function is used. With
    ``$GPUREG_BENCH_CACHE`` set they are kept there (``.npz``) for a later run
    (bench/gpu_check.sh sets it, so a rerun on a warm machine skips the 512^3 phantoms).
    """
    cache = os.environ.get("GPUREG_BENCH_CACHE")
    if cache:
        import hashlib

        key = hashlib.sha1(np.asarray(truth, np.float64).tobytes() + repr(tuple(shape)).encode()).hexdigest()[:12]
        path = Path(cache) / f"register_gpu-phantoms-{shape[0]}x{shape[1]}x{shape[2]}-{key}.npz"
        if path.is_file():
            with np.load(path) as z:
                return (z["fixed"], z["labels"]), z["moving"]
        (fixed, labels), moving = _generate(shape, truth, workers)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part.npz")
        np.savez(tmp, fixed=fixed, labels=labels, moving=moving)
        os.replace(tmp, path)
        return (fixed, labels), moving
    return _generate(shape, truth, workers)


def _generate(shape, truth, workers: int):
    if workers > 1 and _slabs_match_phantom():
        ctx = multiprocessing.get_context("spawn")  # the parent holds a CUDA context: never fork it
        n = min(workers, shape[0])
        bounds = np.linspace(0, shape[0], n + 1).astype(int)
        jobs = [(shape, m, int(a), int(b)) for m in (None, truth) for a, b in zip(bounds[:-1], bounds[1:])]
        with ctx.Pool(n) as pool:
            parts = pool.starmap(_slab, jobs)
        half = len(jobs) // 2
        fixed = np.concatenate([p[0] for p in parts[:half]])
        labels = np.concatenate([p[1] for p in parts[:half]])
        moving = np.concatenate([p[0] for p in parts[half:]])
        return (fixed, labels), moving
    return gpureg.two_particle_phantom(shape, return_labels=True), gpureg.two_particle_phantom(shape, truth)


def _slab(shape, matrix, z0, z1, seed=0):
    """Planes ``z0:z1`` of ``two_particle_phantom(shape, matrix, return_labels=True)`` (defaults otherwise)."""
    from gpureg.synth import phantom as ph

    rng = np.random.default_rng(seed)
    params = [ph._particle_params(rng, spec) for spec in ph.PARTICLES]
    center = (np.asarray(shape, dtype=np.float64) - 1) / 2
    half = min(shape) / 2.0
    motion = np.eye(4) if matrix is None else np.asarray(matrix, dtype=np.float64)
    inverse = np.linalg.inv(motion)
    grid = np.stack(np.meshgrid(np.arange(shape[1], dtype=np.float64), np.arange(shape[2], dtype=np.float64),
                                indexing="ij"), -1).reshape(-1, 2)
    plane = grid.shape[0]
    out = np.zeros((z1 - z0) * plane, dtype=np.float32)
    labels = np.zeros(out.shape, dtype=np.uint8)
    zstep = max(1, (1 << 21) // plane)
    for a in range(z0, z1, zstep):
        b = min(z1, a + zstep)
        q = np.concatenate([np.repeat(np.arange(a, b, dtype=np.float64), plane)[:, None], np.tile(grid, (b - a, 1))],
                           axis=1)
        acc = np.zeros(q.shape[0])
        lab = np.zeros(q.shape[0], dtype=np.uint8)
        for k, par in enumerate(params):
            p = q @ inverse[:3, :3].T + inverse[:3, 3]
            u = (p - center) / half
            occ = ph._occupancy(u, par, half, 0.7)
            acc += occ * (par["level"] * ph._texture(u, par))
            lab[occ > 0.5] = k + 1
        out[(a - z0) * plane:(b - z0) * plane] = acc
        labels[(a - z0) * plane:(b - z0) * plane] = lab
    shape_out = (z1 - z0, shape[1], shape[2])
    return np.clip(out, 0.0, 1.0).reshape(shape_out), labels.reshape(shape_out)


def _slabs_match_phantom() -> bool:
    shape = (20, 24, 28)
    truth = tf.rotation_matrix(7.0, (1.0, 0.5, 0.2), center=tf.grid_center(shape))
    try:
        for m in (None, truth):
            ref, ref_labels = gpureg.two_particle_phantom(shape, m, return_labels=True)
            top, top_labels = _slab(shape, m, 0, 9)
            rest, rest_labels = _slab(shape, m, 9, shape[0])
            if not (np.array_equal(np.concatenate([top, rest]), ref)
                    and np.array_equal(np.concatenate([top_labels, rest_labels]), ref_labels)):
                raise ValueError("slabs differ")
    except Exception as exc:  # the phantom's internals changed: fall back to the serial generator
        print(f"register_gpu: parallel phantom slabs unusable ({exc}); generating serially", file=sys.stderr)
        return False
    return True


def _merge_with_earlier(rows: list) -> list:
    """These rows plus those of today's earlier run on the same device for other sizes."""
    import datetime

    from common import device_name

    device = device_name("gpu")
    merged = {r["size"]: r for r in rows}
    folder = Path(os.environ.get("GPUREG_BENCH_OUT") or RESULTS)  # where save() writes
    for path in folder.glob(f"register_gpu-*-{datetime.date.today().isoformat()}.json"):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("device") == device:
            for r in doc.get("results", []):
                merged.setdefault(r.get("size"), {**r, "git_sha": doc.get("git_sha")})
    return [merged[k] for k in sorted(merged)]


if __name__ == "__main__":
    sys.exit(main())
