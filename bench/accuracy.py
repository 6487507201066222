"""Sub-voxel accuracy sweep (issue 13): hard vs partial-volume binarization, and grey levels.

The wider version of tests/register/test_accuracy.py: random affines (rotation <= 5 deg,
scale 0.95-1.05, shear <= 0.03, shift <= 6 % of the size) of the two-particle
phantom (edge 1 voxel) over several phantom seeds, salt-and-pepper noise in
the moving volume (removed by ``--denoise``, default ``impulse``), binarized with each
``ramp`` and raw; and pure sub-voxel translations (0.1-0.9 voxel per axis)
binarized at 64^3 and 32^3. Writes a DESIGN.md-schema JSON with the worst and
mean error (voxels) per condition and the median registration time
(preparation included, as register_affine runs it).

    python bench/accuracy.py                    # 5 seeds, ramps 0 and 3, CPU
    python bench/accuracy.py --seeds 3 --denoise median impulse
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import gpureg  # noqa: E402
from common import save  # noqa: E402
from gpureg.synth import random_affine, salt_and_pepper  # noqa: E402



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--ramps", type=float, nargs="+", default=[0.0, 3.0])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--denoise", nargs="+", default=["impulse"], choices=("impulse", "median", "gaussian"),
                    help="filters compared on the noisy cases")
    ap.add_argument("--device", default="cpu", choices=("auto", "cpu", "gpu"))
    args = ap.parse_args(argv)
    n, edge = args.size, 1.0
    cells = {}

    def record(key, err, seconds):
        cells.setdefault(key, []).append((err, seconds))
        print(f"{key}: {err:.3f} vox {seconds:.2f} s", flush=True)

    for seed in range(args.seeds):
        truth = random_affine(np.random.default_rng(100 + seed), n)
        fixed, labels = gpureg.two_particle_phantom((n,) * 3, seed=seed, edge_width=edge, return_labels=True)
        moving = gpureg.two_particle_phantom((n,) * 3, truth, seed=seed, edge_width=edge)
        for noise in args.noise:
            m = salt_and_pepper(moving, noise, seed=seed + 17) if noise else moving
            for filt in args.denoise if noise else [None]:
                for mode in [("binarized", r) for r in args.ramps] + [("raw", None)]:
                    t0 = time.perf_counter()
                    prep = gpureg.Prep(binarize=mode[0] == "binarized", ramp=mode[1] or 0.0, denoise=filt)
                    res = gpureg.register_affine(fixed, m, prep=prep, device=args.device)
                    err = gpureg.displacement_error(res.matrix, truth, mask=labels > 0)[0]
                    name = mode[0] if mode[1] is None else f"binarized, ramp {mode[1]:g}"
                    record(f"random affine {n}^3, {name}, salt-and-pepper {100 * noise:g} %"
                           + (f", {filt}" if filt else ""), err, time.perf_counter() - t0)
    rng = np.random.default_rng(5)
    shifts = [rng.uniform(0.1, 0.9, 3) for _ in range(2 * args.seeds)]
    for size in (64, 32):
        fixed, labels = gpureg.two_particle_phantom((size,) * 3, edge_width=edge, return_labels=True)
        for shift in shifts:
            truth = np.eye(4)
            truth[:3, 3] = shift
            moving = gpureg.two_particle_phantom((size,) * 3, truth, edge_width=edge)
            for ramp in args.ramps:
                t0 = time.perf_counter()
                res = gpureg.register_affine(fixed, moving, prep=gpureg.Prep(ramp=ramp), device=args.device)
                err = gpureg.displacement_error(res.matrix, truth, mask=labels > 0)[0]
                record(f"sub-voxel shift {size}^3, binarized, ramp {ramp:g}", err, time.perf_counter() - t0)
    results = [{"case": key, "size": int(key.split("^")[0].split()[-1]), "cases": len(v),
                "error_worst_vox": round(max(e for e, _ in v), 4), "error_vox": round(float(np.mean([e for e, _ in v])), 4),
                "registration_ms": round(1e3 * float(np.median([s for _, s in v])), 1)} for key, v in cells.items()]
    for r in results:
        print(f"{r['case']}: worst {r['error_worst_vox']:.3f} mean {r['error_vox']:.3f} voxel ({r['cases']} cases)")
    save("accuracy", args.device if args.device != "auto" else "cpu", results,
         extra={"seeds": args.seeds, "ramps": args.ramps, "noise": args.noise, "denoise": args.denoise,
                "edge_width": edge})
    return 0


if __name__ == "__main__":
    sys.exit(main())
