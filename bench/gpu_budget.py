"""Step budget of bench/gpu_check.sh: will each step's inputs be ready within its share of its time limit?

``gpu_check.sh --dry-run`` calls this with every step of its table. For a step whose
benchmark is known here (:data:`ESTIMATORS`), the CPU work of generating its inputs
(phantoms, simulated scans, spectra stacks) is measured at a small size on this machine
(process CPU time, the least of 3 calls, so a loaded machine does not inflate it much), scaled to the sizes of the
step's command line by voxel count, and divided by the cores that generate them on the
device (16 when the benchmark spreads them over processes, 1 when it does not). The
estimate is conservative: fixed overheads are scaled with the voxels too. A step fits when
that estimate is at most ``SHARE`` of its time limit; the script exits 1 when one does not.

    python bench/gpu_budget.py TABLE_FILE      # lines "name limit_s command..."

Adding a benchmark to gpu_check.sh: add an estimator below if it generates sizeable inputs
on the CPU (a function of the parsed command line returning ``(what, cpu_s, processes)``
tuples), else the table shows "-" for it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DEVICE_CORES = 16  # the lent machine (nvidia-h100-x1 / nvidia-h200)
SHARE = 0.5  # inputs may take at most this fraction of a step's limit
DEVICE_COMMAND_LIMIT_S = 600  # one command on the lent machine
TOTAL_LIMIT_S = 480  # the table's limits together: leaves room for the tar, the transfers and a slow start


def _cpu_seconds(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


_cache: dict = {}


REPEATS = 3  # timed calls per estimate; the least is kept


def _per_voxel(key, fn, voxels) -> float:
    """CPU seconds per voxel of ``fn`` (measured once per process: the least of ``REPEATS`` timed calls).

    Other work on the machine (another test worker, a benchmark) only ever adds to a call's CPU time (shared
    caches and memory bandwidth): one call measured 0.30-0.52 s on the loaded 2-core machine where the least of
    six was 0.30, as on the quiet one.
    """
    if key not in _cache:
        fn()  # first call: imports, numba compilation (not input generation on a warm run)
        _cache[key] = min(_cpu_seconds(fn) for _ in range(REPEATS)) / voxels
    return _cache[key]


def _phantom_per_voxel() -> float:
    import gpureg

    return _per_voxel("phantom", lambda: gpureg.two_particle_phantom((40, 40, 40)), 40 ** 3)


def register_gpu(argv):
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--workers", type=int, default=DEVICE_CORES)
    ap.add_argument("--quick", action="store_true")
    args, _ = ap.parse_known_args(argv)
    sizes = [64, 128] if args.quick else args.sizes
    per = _phantom_per_voxel()
    return [(f"2 phantoms {n}^3", 2 * per * n ** 3, min(args.workers, DEVICE_CORES)) for n in sizes]


def xanes(argv):
    import xanes as bench_xanes

    from gpureg import xanes as gx

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--size", type=int, nargs="*")
    ap.add_argument("--host-max", type=int, default=256)
    ap.add_argument("--energies", type=int, default=60)
    ap.add_argument("--quick", action="store_true")
    args, _ = ap.parse_known_args(argv)
    energies = gx.scan_energies(fine_step=1.5 if args.energies == 60 else 3.0)
    sizes = args.size or ([64] if args.quick else [256, 512])
    per = _per_voxel(f"stack{args.energies}", lambda: bench_xanes.make_stack(energies, 32), 32 ** 3)
    out = [(f"host stack {n}^3", per * n ** 3, 1) for n in sizes if n <= args.host_max]
    n_acc = 1500 if args.quick else 5000
    acc = _per_voxel("accuracy", lambda: bench_xanes.accuracy(energies, n=250), 250) * n_acc * 2  # 36 and 60 energies
    return out + [(f"accuracy {n_acc} x 2 grids", acc, 1)]


def pipeline(argv):
    from gpureg.synth import mn_energy_grid, simulate

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--energies", type=int, default=8)
    ap.add_argument("--angles", type=int, default=181)
    ap.add_argument("--quick", action="store_true")
    args, _ = ap.parse_known_args(argv)
    size, n_e = (48, 6) if args.quick else (args.size, args.energies)
    grid = np.asarray(mn_energy_grid())

    def sim():
        with tempfile.TemporaryDirectory() as tmp:
            simulate(Path(tmp) / "raw.h5", size=32, energies=grid[:2], n_angles=args.angles, seed=0)

    per = _per_voxel(f"simulate{args.angles}", sim, 2 * 32 ** 3)  # per voxel and energy
    return [(f"simulate {size}^3 x {n_e} energies x {args.angles} angles", per * n_e * size ** 3, 1)]


def deformable(argv):
    import deformable as bench_deformable

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--cases", nargs="+", default=None)
    ap.add_argument("--legacy", action="store_true")
    args, _ = ap.parse_known_args(argv)
    if args.cases:
        cases = [bench_deformable.parse_case(c) for c in args.cases]
    elif args.legacy:
        cases = [(n, 3.0, None, 0.0) for n in (args.sizes or [64, 128])]
    else:
        cases = [c for c in bench_deformable.SWEEP if args.sizes is None or c[0] in args.sizes]
    out = []
    for size, amplitude, sigma, noise in cases:
        kind = "sinusoidal" if sigma is None else "gaussian"
        per = _per_voxel(f"deformable-{kind}", lambda: bench_deformable.make_pair(
            32, amplitude=amplitude, sigma=sigma, noise=noise, cache=False), 32 ** 3)
        out.append((f"warped pair {size}^3 ({kind})", per * size ** 3, 1))
    return out


def align(argv):
    import align as bench_align

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--parts", nargs="+", default=["speed", "accuracy", "e2e"])
    args, _ = ap.parse_known_args(argv)
    per = _per_voxel("align", lambda: bench_align._projections(48, 6552.0, 2.0, 12), 48 ** 3)
    out = [(f"2 jittered projection sets {n}^3", 2 * per * n ** 3, 1) for n in args.sizes if "speed" in args.parts]
    if set(args.parts) - {"speed"}:
        out.append(("accuracy / e2e simulations (not estimated)", float("inf"), 1))
    return out


def chemistry(argv):
    import chemistry as bench_chemistry

    from gpureg import xanes as gx

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", default="lcf,kmeans,chain")
    args, _ = ap.parse_known_args(argv)
    n = 64 if args.quick else args.size
    energies = gx.scan_energies(fine_step=1.5)
    per = _per_voxel("chemistry", lambda: bench_chemistry.make_stack(energies, 32), 32 ** 3)
    out = [(f"mixture stack 60 x {n}^3", per * n ** 3, 1)]
    if "lcf" in args.cases:  # the per-voxel scipy NNLS reference on 2000 voxels
        out.append(("scipy NNLS reference, 2000 voxels", _per_voxel(
            "nnls", lambda: bench_chemistry.reference_nnls(*_small_mixture(bench_chemistry, energies)), 2000) * 2000, 1))
    return out


def _small_mixture(bench_chemistry, energies):
    stack, _, _, refs = bench_chemistry.make_stack(energies, 16)
    return stack, energies, refs


# benchmark script -> estimator of its input generation
ESTIMATORS = {"register_gpu.py": register_gpu, "xanes.py": xanes, "pipeline.py": pipeline,
              "deformable.py": deformable, "align.py": align, "chemistry.py": chemistry}


def read_table(path) -> list:
    """``(name, limit_s, argv)`` of every step line (``name limit_s command...``; ``#`` comments)."""
    steps = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, limit, *cmd = shlex.split(line)
            steps.append((name, int(limit), cmd))
    return steps


def estimate(cmd) -> tuple:
    """``(seconds on the device, description)`` of the inputs of one step's command, or (None, "-")."""
    script = next((Path(a).name for a in cmd if a.endswith(".py")), None)
    fn = ESTIMATORS.get(script)
    if fn is None:
        return None, "-"
    i = next(k for k, a in enumerate(cmd) if a.endswith(".py"))
    parts = fn(cmd[i + 1:])
    seconds = sum(cpu / max(1, procs) for _, cpu, procs in parts)
    return seconds, "; ".join(f"{what} ({cpu:.0f} CPU-s / {procs})" for what, cpu, procs in parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", help="file of step lines: name limit_s command...")
    args = ap.parse_args(argv)
    steps = read_table(args.table)
    total = sum(limit for _, limit, _ in steps)
    ok = True
    print(f"{'step':<14}{'limit_s':>8}{'inputs_s':>10}{'share_s':>9}  fits  inputs on {DEVICE_CORES} cores "
          f"(measured here on {os.cpu_count()} cores, CPU time)")
    for name, limit, cmd in steps:
        seconds, what = estimate(cmd)
        share = SHARE * limit
        fits = seconds is None or seconds <= share
        ok &= fits
        shown = "-" if seconds is None else f"{seconds:.1f}"
        print(f"{name:<14}{limit:>8}{shown:>10}{share:>9.0f}  {'yes' if fits else 'NO ':<4}  {what}")
    print(f"{'total':<14}{total:>8}   (at most {TOTAL_LIMIT_S} s: one device command runs at most "
          f"{DEVICE_COMMAND_LIMIT_S} s)")
    if total > TOTAL_LIMIT_S:
        print(f"gpu_budget: the steps' limits add up to {total} s, over {TOTAL_LIMIT_S} s", file=sys.stderr)
        ok = False
    if not ok:
        print("gpu_budget: a step's inputs would not be ready within its share of its limit", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
