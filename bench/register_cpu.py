"""CPU registration benchmark: gpureg's compiled CPU engine vs SimpleITK and elastix on the same pairs.

For each size, a two-particle phantom pair with a known affine (rotation 6 deg
about an oblique axis, anisotropic scale, shear, shift), noise-free or with
10 % or 30 % salt-and-pepper noise (independent in both volumes), registered
binarized or raw (grey). gpureg is timed end to end from the raw volumes
(``register_affine``: ``denoise="impulse"`` on the noisy cases, Otsu, Gaussian sigma 1,
pyramid, Levenberg-Marquardt); the peers register the very arrays gpureg
registers (its prepared volumes: impulses removed, binarized, smoothed), their
preparation not timed:

- SimpleITK: MeanSquares, affine, shrink 4/2/1, regular-step gradient descent
  (:func:`gpureg.validate.register_sitk`), 10 % random sampling and full sampling;
- elastix (itk-elastix): default affine map, AdvancedMeanSquares, 3 resolutions,
  2048 random samples, at most 256 iterations per level, centre-of-gravity initialisation
  (:func:`gpureg.validate.elastix.register_elastix`, the validation sweep's setup).

All methods use ``--threads`` threads (default 2). Rounds are interleaved (one
run of every method on a pair, then the next round), so load from other
processes hits all methods alike; times are medians over rounds after one
warm-up of gpureg; ``cpu_ms`` is the process CPU time (all threads) of each run,
less sensitive than wall time to a loaded machine. Error: mean displacement from the truth over the particle
voxels. Also reported: time per voxel, gpureg's preparation time (both volumes,
within each timed registration) and its share of the registration, the
cost of noise (noisy / noise-free time), the load average, numba's first-call
compile time (empty cache) and cached start-up, in subprocesses, and whether
the target of issue 12 holds: gpureg <= 0.5x elastix's time at 128^3 and
192^3, at an error no worse than elastix's, in every row.

    python bench/register_cpu.py                       # 64 96 128 192, 3 rounds
    python bench/register_cpu.py --quick               # 64 only, one round
    python bench/register_cpu.py --sitk-full-max 96    # full-sampling SimpleITK up to 96^3 (default 64)
    python bench/register_cpu.py --noise 0.1           # noise-free and 10 % only
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from common import save

import gpureg
from gpureg.core import transform as tf
from gpureg.register import prepare_volume, register_affine
from gpureg.synth import salt_and_pepper



def known_affine(shape):
    """The benchmark's ground-truth moving_from_reference for a grid of ``shape``."""
    c = tf.grid_center(shape)
    m = tf.compose(tf.rotation_matrix(6.0, (0.3, 1, 1), c), tf.scale_matrix((1.04, 0.96, 1.02), c))
    m[0, 1] += 0.02
    m[:3, 3] += np.array([3.0, -4.0, 2.5]) * shape[0] / 64
    return m


def make_pair(size, noise=0.0, binarize=True, device="cpu"):
    """Raw fixed/moving, their prepared (registered) arrays, particle mask and the true matrix."""
    shape = (size,) * 3
    truth = known_affine(shape)
    fixed, labels = gpureg.two_particle_phantom(shape, return_labels=True)
    moving = gpureg.two_particle_phantom(shape, truth)
    if noise:
        fixed, moving = salt_and_pepper(fixed, noise, seed=size + 1), salt_and_pepper(moving, noise, seed=size + 2)
    den = "impulse" if noise else None
    prep = gpureg.Prep(binarize=binarize, denoise=den)
    f = prepare_volume(fixed, device, prep)
    m = prepare_volume(moving, device, prep)
    return fixed, moving, f, m, labels > 0, truth, den


def register_elastix(fixed, moving, *, threads=2, samples=2048):
    """elastix affine MSE registration (:func:`gpureg.validate.elastix.register_elastix`, the validation's setup)."""
    from gpureg.validate.elastix import register_elastix as elastix

    return elastix(fixed, moving, samples=samples, threads=threads)[0]


def numba_compile_seconds() -> dict:
    """First-call time of a small registration in a fresh process: empty numba cache, then warm cache."""
    code = ("import time, numpy as np, gpureg; from gpureg.register import register_affine; "
            "f = gpureg.two_particle_phantom((32,) * 3); t = time.perf_counter(); "
            "register_affine(f, f, device='cpu', prep=gpureg.Prep(denoise='impulse')); "
            "register_affine(f, f, device='cpu', prep=gpureg.Prep(binarize=False)); print(time.perf_counter() - t)")
    root = str(Path(__file__).resolve().parents[1])
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=root)
        for key in ("first_call", "cached_first_call"):
            cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
            cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            out[key + "_s"] = round(float(r.stdout.strip().splitlines()[-1]), 2) if r.returncode == 0 else r.stderr[-300:]
            out[key + "_process_cpu_s"] = round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 2)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 192])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sitk-max", type=int, default=128, help="largest size for SimpleITK with 10 %% sampling")
    ap.add_argument("--sitk-full-max", type=int, default=64, help="largest size for full-sampling SimpleITK")
    ap.add_argument("--sitk-rounds", type=int, default=1, help="rounds with SimpleITK (the first ones; minutes each)")
    ap.add_argument("--noise", type=float, nargs="+", default=[0.1, 0.3],
                    help="salt-and-pepper fractions besides noise-free (default 0.1 0.3)")
    ap.add_argument("--quick", action="store_true", help="64^3 only, one round")
    ap.add_argument("--no-peers", action="store_true", help="gpureg only")
    args = ap.parse_args(argv)
    sizes, rounds = ([64], 1) if args.quick else (args.sizes, args.rounds)
    gpureg.config.set(threads=args.threads)
    from gpureg.validate.sitk import register_sitk, sitk_available

    compile_s = numba_compile_seconds()
    print("numba:", compile_s, flush=True)
    peers = {}
    if not args.no_peers:
        if sitk_available():
            peers["SimpleITK 10%"] = lambda f, m: _sitk(register_sitk, f, m, args.threads, 0.1)
            peers["SimpleITK full"] = lambda f, m: _sitk(register_sitk, f, m, args.threads, None)
        try:
            import itk  # noqa: F401

            peers["elastix"] = lambda f, m: register_elastix(f, m, threads=args.threads)
        except ImportError:
            print("itk-elastix not installed; skipping elastix", flush=True)
    if peers:  # warm-up: the first call of a peer loads its libraries (ITK: seconds)
        _, _, f, m, _, _, _ = make_pair(32, 0.0, True)
        for fn in peers.values():
            fn(f, m)
    rows, loads = [], []
    for size in sizes:
        for noise in (0.0, *args.noise):
            for binarize in (True, False):
                fixed, moving, f, m, mask, truth, den = make_pair(size, noise, binarize)

                prep_times = []

                def ours(fixed=fixed, moving=moving, binarize=binarize, den=den, prep_times=prep_times):
                    result = register_affine(fixed, moving, device="cpu", prep=gpureg.Prep(binarize=binarize, denoise=den))
                    prep_times.append(result.prepare_seconds * 1e3)
                    return result.matrix

                methods = {"gpureg": ours}
                for name, fn in peers.items():
                    if (name == "SimpleITK full" and size > args.sitk_full_max) or (
                            name.startswith("SimpleITK") and size > args.sitk_max):
                        continue
                    methods[name] = lambda fn=fn, f=f, m=m: fn(f, m)
                ours()  # warm-up (numba compiled and cached; page cache)
                prep_times.clear()
                times = {k: [] for k in methods}
                cpu = {k: [] for k in methods}
                errors = {}
                for k in range(rounds):
                    loads.append(os.getloadavg()[0])
                    for name, fn in methods.items():
                        if name.startswith("SimpleITK") and k >= args.sitk_rounds:
                            continue
                        t0, c0 = time.perf_counter(), time.process_time()
                        mat = fn()
                        times[name].append((time.perf_counter() - t0) * 1e3)
                        cpu[name].append((time.process_time() - c0) * 1e3)
                        errors[name] = gpureg.displacement_error(mat, truth, mask=mask)[0]
                case = f"{'binarized' if binarize else 'raw'}, {'noise-free' if not noise else f'{round(noise * 100)} % salt-and-pepper'}"
                ms = statistics.median(times["gpureg"])
                prep_ms = statistics.median(prep_times)
                row = {"case": case, "size": size, "noise": noise, "binarize": binarize, "registration_ms": round(ms, 1),
                       "preparation_ms": round(prep_ms, 1), "preparation_share": round(prep_ms / ms, 2),
                       "ns_per_voxel": round(ms * 1e6 / size**3, 1), "error_vox": round(errors["gpureg"], 4),
                       "cpu_ms": round(statistics.median(cpu["gpureg"]), 1),
                       "denoise": den, "rounds": rounds, "threads": args.threads,
                       "load_average": round(statistics.median(loads[-rounds:]), 1), "peers": {}}
                for name in methods:
                    if name == "gpureg":
                        continue
                    ref_ms = statistics.median(times[name])
                    ref_cpu = statistics.median(cpu[name])
                    row["peers"][name] = {"ms": round(ref_ms, 1), "rounds": len(times[name]), "cpu_ms": round(ref_cpu, 1),
                                          "cpu_ratio": round(ref_cpu / statistics.median(cpu["gpureg"]), 2), "ns_per_voxel": round(ref_ms * 1e6 / size**3, 1),
                                          "error_vox": round(errors[name], 4), "ratio": round(ref_ms / ms, 2)}
                if "elastix" in row["peers"]:
                    e = row["peers"]["elastix"]
                    row.update(reference="elastix", reference_ms=e["ms"], reference_error_vox=e["error_vox"],
                               ratio=e["ratio"])
                print(row, flush=True)
                rows.append(row)
    target = _target(rows)
    print("target (issue 12):", target, flush=True)
    extra = {"quick": args.quick, "threads": args.threads, "numba": compile_s, "noise_levels": [0.0, *args.noise],
             "target": target, "noise_cost": _noise_cost(rows),
             "load_average": {"median": round(statistics.median(loads), 2), "max": round(max(loads), 2)},
             "note": "gpureg timed from raw volumes (preparation included); peers on gpureg's prepared arrays"}
    save("register_cpu", "cpu", rows, extra=extra)


def _target(rows) -> dict:
    """Issue 12's rule: at 128^3 and 192^3, gpureg <= 0.5x elastix's time at an error no worse, in every row."""
    judged = [r for r in rows if r["size"] in (128, 192) and "ratio" in r]
    failing = [f"{r['size']} {r['case']}" for r in judged
               if not (r["ratio"] >= 2.0 and r["error_vox"] <= r["reference_error_vox"])]
    return {"rule": "registration_ms <= 0.5 x elastix ms and error_vox <= elastix error, sizes 128 and 192",
            "rows": len(judged), "rows_met": len(judged) - len(failing), "failing": failing,
            "worst_time_fraction": round(max((1 / r["ratio"] for r in judged), default=float("nan")), 2)}


def _noise_cost(rows) -> list:
    """Time of each noisy row relative to the noise-free row of the same size and preparation."""
    clean = {(r["size"], r["binarize"]): r["registration_ms"] for r in rows if r["noise"] == 0}
    return [{"size": r["size"], "case": r["case"],
             "vs_noise_free": round(r["registration_ms"] / clean[(r["size"], r["binarize"])], 2)}
            for r in rows if r["noise"] and (r["size"], r["binarize"]) in clean]


def _sitk(register_sitk, f, m, threads, sampling):
    if sampling is None:
        return register_sitk(f, m, threads=threads)[0]
    return register_sitk(f, m, threads=threads, sampling=sampling)[0]


if __name__ == "__main__":
    main()
