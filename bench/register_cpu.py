"""CPU registration benchmark: gpureg (NumPy/SciPy) vs SimpleITK on the same pairs.

For each size, a binarized two-particle phantom pair with a known affine
(rotation 6 deg about an oblique axis, anisotropic scale, shear, shift) is
prepared once (Otsu + Gaussian sigma 1, gpureg's registration input); both
gpureg and SimpleITK (MeanSquares, affine, shrink 4/2/1, full sampling, same
thread count) register exactly those arrays. Reports median wall time, mean
displacement error over the particles, and ratio = SimpleITK time / gpureg time.

    python bench/register_cpu.py            # 64, 96, 128
    python bench/register_cpu.py --quick    # 64 only, one repeat
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import gpureg  # noqa: E402
from common import median_time, save  # noqa: E402
from gpureg.core import transform as tf  # noqa: E402
from gpureg.register import prepare_volume, register_prepared  # noqa: E402


def known_affine(shape):
    """The benchmark's ground-truth moving_from_reference for a grid of ``shape``."""
    c = tf.grid_center(shape)
    m = tf.compose(tf.rotation_matrix(6.0, (0.3, 1, 1), c), tf.scale_matrix((1.04, 0.96, 1.02), c))
    m[0, 1] += 0.02
    m[:3, 3] += np.array([3.0, -4.0, 2.5]) * shape[0] / 64
    return m


def make_pair(size, device="cpu"):
    """Prepared (binarized, smoothed) fixed/moving arrays, particle mask and the true matrix."""
    shape = (size,) * 3
    truth = known_affine(shape)
    fixed, labels = gpureg.two_particle_phantom(shape, return_labels=True)
    moving = gpureg.two_particle_phantom(shape, truth)
    f = prepare_volume(fixed, device, binarize=True)
    m = prepare_volume(moving, device, binarize=True)
    return f, m, labels > 0, truth


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-repeats", type=int, default=1, help="SimpleITK repeats (minutes each at 128^3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="64^3 only, one repeat, no warm-up")
    ap.add_argument("--no-sitk", action="store_true", help="skip SimpleITK")
    args = ap.parse_args(argv)
    sizes, repeats, warmup = ([64], 1, 0) if args.quick else (args.sizes, args.repeats, 1)
    from gpureg.validate.sitk import register_sitk, sitk_available

    use_sitk = sitk_available() and not args.no_sitk
    rows = []
    for size in sizes:
        f, m, mask, truth = make_pair(size)
        ms, res = median_time(lambda: register_prepared(f, m), repeats=repeats, warmup=warmup)
        row = {"case": "binarized two-particle, known affine", "size": size, "registration_ms": round(ms, 1),
               "passes_per_level": res.iterations, "error_vox": round(gpureg.displacement_error(res.matrix, truth, mask=mask)[0], 4)}
        if use_sitk:
            ref_ms, (mat, _) = median_time(lambda: register_sitk(f, m, threads=args.threads),
                                         repeats=1 if args.quick else args.ref_repeats, warmup=0)
            row.update(reference="SimpleITK", reference_ms=round(ref_ms, 1), reference_threads=args.threads,
                       reference_repeats=1 if args.quick else args.ref_repeats,
                       reference_error_vox=round(gpureg.displacement_error(mat, truth, mask=mask)[0], 4),
                       ratio=round(ref_ms / ms, 2))
        print(row, flush=True)
        rows.append(row)
    save("register_cpu", "cpu", rows, extra={"quick": args.quick, "threads": args.threads})


if __name__ == "__main__":
    main()
