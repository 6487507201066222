"""Deformable registration benchmark: gpureg's B-spline FFD vs elastix's B-spline on the same pairs.

The pair: the analytic two-particle phantom (grey, textured) and its copy
moved by :class:`gpureg.synth.deform.SmoothWarp` (rotation 3 deg + shift about
1.4 voxels at 64^3, plus a smooth deformation of at most 3 voxels at 64^3,
scaled with the size), sampled exactly, so the true position of every
reference voxel in the moving volume is known. Both methods get the same
arrays, smoothed once with a Gaussian of sigma 1 (gpureg's preparation;
``smooth=0`` inside gpureg so nothing is filtered twice), and the same
final control-point spacing:

- gpureg: ``register_deformable_prepared`` (its affine, then control grids
  4S, 2S, S, L-BFGS-B on MSE + bending energy);
- elastix (itk-elastix): its default "affine" then "bspline" parameter maps
  with ``Metric = AdvancedMeanSquares`` and
  ``FinalGridSpacingInPhysicalUnits = S`` (everything else elastix's defaults:
  4 resolutions, adaptive stochastic gradient descent, random sampling of
  2048 points per iteration), and again with 20000 samples per iteration
  (``--elastix-samples``; the defaults fold at 64^3 in this case).

Reported per size: wall time (ms, median over repeats), mean error (voxels)
over the particle voxels of ``p + displacement`` against the truth, the error
of the best least-squares affine (what no affine method can beat), the
smallest Jacobian determinant, and ratio = elastix time / gpureg time.

    python bench/deformable.py                 # 64 and 128 on the CPU
    python bench/deformable.py --device gpu --sizes 256 --no-elastix
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from common import save, synchronize

from gpureg.core import transform as tf
from gpureg.core.backend import to_device, to_host
from gpureg.register.deformable import register_deformable_prepared
from gpureg.register.prepare import Prep, prepare_volume
from gpureg.synth.deform import SmoothWarp
from gpureg.synth.phantom import two_particle_phantom


def make_pair(size, seed=1):
    """Fixed and moving phantoms, particle points and their true moving positions."""
    shape = (size,) * 3
    c = tf.grid_center(shape)
    affine = tf.rotation_matrix(3.0, (1.0, 0.5, 0.2), c)
    affine[:3, 3] += np.array([1.0, -0.8, 0.6]) * size / 64
    warp = SmoothWarp(shape, 3.0 * size / 64, matrix=affine, seed=seed)
    fixed, labels = two_particle_phantom(shape, seed=2, return_labels=True)
    moving = two_particle_phantom(shape, warp, seed=2)
    points = np.argwhere(labels > 0).astype(np.float64)
    return fixed, moving, points, warp.moving_from_reference(points), warp.best_affine(points)


def mean_error(displacement, points, truth):
    idx = tuple(points.astype(int).T)
    q = points + np.stack([np.asarray(d)[idx] for d in displacement], axis=1)
    return float(np.linalg.norm(q - truth, axis=1).mean())


def run_gpureg(f, m, spacing, device, **options):
    fd, md = to_device(f, device), to_device(m, device)
    synchronize(device)
    t0 = time.perf_counter()
    res = register_deformable_prepared(fd, md, spacing=spacing, **options)
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3, to_host(res.displacement), res.min_jacobian


def run_elastix(f, m, spacing, samples):
    import itk

    fixed, moving = itk.GetImageFromArray(f.astype(np.float32)), itk.GetImageFromArray(m.astype(np.float32))
    params = itk.ParameterObject.New()
    for name in ("affine", "bspline"):
        p = params.GetDefaultParameterMap(name)
        p["Metric"] = ["AdvancedMeanSquares"]
        if name == "bspline":
            p["FinalGridSpacingInPhysicalUnits"] = [str(float(spacing))]
        if samples:
            p["NumberOfSpatialSamples"] = [str(int(samples))]
        params.AddParameterMap(p)
    t0 = time.perf_counter()
    # elastix uses every core by default (number_of_threads= crashed itk-elastix 0.25.4 here)
    _, result = itk.elastix_registration_method(fixed, moving, parameter_object=params, log_to_console=False)
    ms = (time.perf_counter() - t0) * 1e3
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:  # transformix writes deformationField.nii into the working folder
        os.chdir(tmp)
        try:
            field = itk.GetArrayFromImage(itk.transformix_deformation_field(moving, result))  # (z, y, x, 3): x, y, z
        finally:
            os.chdir(cwd)
    disp = np.moveaxis(field[..., ::-1], -1, 0).astype(np.float32)
    return ms, disp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--spacing", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-elastix", action="store_true")
    ap.add_argument("--elastix-samples", type=int, nargs="+", default=[0, 20000],
                    help="elastix NumberOfSpatialSamples per run (0: its default, 2048); the first is the row's "
                         "reference, all are listed under reference_variants")
    ap.add_argument("--interpolation", default="linear", choices=["linear", "cubic"],
                    help="gpureg's sampling of the moving volume in the objective (cubic: CPU only)")
    ap.add_argument("--regularization", type=float, default=2.0, help="gpureg's bending-energy weight")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    results = []
    for size in args.sizes:
        fixed, moving, points, truth, best = make_pair(size)
        grey = Prep(binarize=False)  # Gaussian sigma 1 only: the common input of both methods
        f = prepare_volume(fixed, "cpu", grey)
        m = prepare_volume(moving, "cpu", grey)
        floor = float(np.linalg.norm(points @ best[:3, :3].T + best[:3, 3] - truth, axis=1).mean())
        opts = {"interpolation": args.interpolation, "regularization": args.regularization}
        run_gpureg(f, m, args.spacing, args.device, **opts)  # warm-up: kernel compilation (numba or NVRTC)
        runs = [run_gpureg(f, m, args.spacing, args.device, **opts) for _ in range(args.repeats)]
        ms = float(np.median([r[0] for r in runs]))
        row = {"case": "grey two-particle, smooth deformation <= 3 vox (64^3, scaled) + affine", "size": size,
               "spacing": args.spacing, **opts, "registration_ms": round(ms, 1),
               "error_vox": round(mean_error(runs[-1][1], points, truth), 4),
               "min_jacobian": round(runs[-1][2], 4), "best_affine_error_vox": round(floor, 4),
               "identity_error_vox": round(float(np.linalg.norm(points - truth, axis=1).mean()), 4)}
        if not args.no_elastix:
            variants = []
            for samples in args.elastix_samples:
                ref = [run_elastix(f, m, args.spacing, samples) for _ in range(args.repeats)]
                variants.append({"samples": samples or 2048, "reference_ms": round(float(np.median([r[0] for r in ref])), 1),
                                 "reference_error_vox": round(mean_error(ref[-1][1], points, truth), 4),
                                 "reference_min_jacobian": round(bspline_free_min_jacobian(ref[-1][1]), 4)})
                print(size, variants[-1], flush=True)
            first = variants[0]
            row.update({"reference": "elastix (itk-elastix) affine + bspline, AdvancedMeanSquares, "
                                     f"NumberOfSpatialSamples {first['samples']}",
                        **{k: v for k, v in first.items() if k != "samples"},
                        "ratio": round(first["reference_ms"] / ms, 2), "reference_variants": variants})
        print(row, flush=True)
        results.append(row)
    save("deformable", args.device, results, out_dir=args.out_dir,
         extra={"threads": args.threads, "note": "same prepared arrays (Gaussian sigma 1) for both methods; "
                "errors: mean distance to the exact truth over the particle voxels"})


def bspline_free_min_jacobian(displacement):
    """Smallest det(I + grad displacement) of a dense field (central differences)."""
    g = [np.gradient(displacement[i].astype(np.float64)) for i in range(3)]
    jac = np.array([[g[i][k] + (1.0 if i == k else 0.0) for k in range(3)] for i in range(3)])
    return float(np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1))).min())


if __name__ == "__main__":
    main()
